"""`lightfunc.tune`: the learning-rate range test and the batch-size finder.

References: Lightning's `Tuner.lr_find` on the same sweep (rates, smoothed
losses, suggestion), a hand-written torch.optim loop that sets each step's
rate, numpy's gradient for the suggestion, and exact byte counts for the
memory measurement.
"""

from __future__ import annotations

import doctest
import sys
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import make_data, make_model, make_steps

import lightfunc as lf
from lightfunc._tune_batch import cpu_peak_growth, resident_bytes
from lightfunc._tune_lr import sweep_lrs


def regression_data(n: int = 64, batch_size: int = 16) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 4, generator=g)
    y = x @ torch.randn(4, 1, generator=g)
    return [(x[i : i + batch_size], y[i : i + batch_size]) for i in range(0, n, batch_size)]


def linear_step(model: torch.nn.Module) -> Any:
    def train_step(state: lf.TrainState, batch: Any) -> tuple[lf.TrainState, dict[str, Any]]:
        x, y = batch

        def loss_fn(params: dict[str, torch.Tensor]) -> torch.Tensor:
            return F.mse_loss(lf.apply(model, params, {}, x, train=True)[0], y)

        loss, grads = lf.value_and_grad(loss_fn)(state.params)
        return state.apply_gradients(grads), {"loss": loss}

    return train_step


def snapshot(state: lf.TrainState) -> list[torch.Tensor]:
    return [x.clone() for x in lf.tree_leaves(state) if isinstance(x, torch.Tensor)]


def assert_unchanged(state: lf.TrainState, before: list[torch.Tensor]) -> None:
    after = [x for x in lf.tree_leaves(state) if isinstance(x, torch.Tensor)]
    assert len(after) == len(before)
    for a, b in zip(after, before, strict=True):
        assert a.dtype == b.dtype and torch.equal(a, b)
    # and each field by name, for a readable failure
    assert all(torch.equal(v, state.params[k]) for k, v in state.params.items())


# ---------------------------------------------------------------------------
# lr_find


def test_lr_find_leaves_params_opt_state_buffers_and_step_untouched():
    model = make_model(0)  # BatchNorm: buffers that a step updates
    train_step, _ = make_steps(model)
    state = lf.TrainState.create(model, lf.optim.adamw(1e-3))
    state = lf.build(train_step, compile=False)(state, make_data()[0])[0]  # non-zero moments
    fields = {
        "params": {k: v.clone() for k, v in state.params.items()},
        "buffers": {k: v.clone() for k, v in state.buffers.items()},
        "opt_state": [x.clone() for x in lf.tree_leaves(state.opt_state)],
        "step": state.step.clone(),
    }
    rng, tx = state.rng, state.tx
    result = lf.tune.lr_find(
        lf.build(train_step, compile=False), state, make_data(), num_training=12, max_lr=10.0
    )
    assert len(result.lrs) >= 2
    for name in ("params", "buffers"):
        now = getattr(state, name)
        assert now.keys() == fields[name].keys()
        assert all(torch.equal(now[k], v) for k, v in fields[name].items()), name
    now_opt = lf.tree_leaves(state.opt_state)
    assert len(now_opt) == len(fields["opt_state"])
    assert all(torch.equal(a, b) for a, b in zip(now_opt, fields["opt_state"], strict=True))
    assert torch.equal(state.step, fields["step"])
    assert state.rng == rng and state.tx is tx


def test_lr_find_rates_are_lightnings_sequence():
    # Lightning's _ExponentialLR / _LinearLR: min_lr first, then r = (k + 1) / N.
    exp = sweep_lrs(1e-4, 10.0, 20, "exponential")
    assert exp[0] == 1e-4 and exp[-1] == pytest.approx(10.0, rel=1e-12)
    assert exp[1] == 1e-4 * (10.0 / 1e-4) ** (2 / 20)
    lin = sweep_lrs(0.01, 1.0, 10, "linear")
    assert lin == [0.01] + [0.01 + (k + 1) / 10 * (1.0 - 0.01) for k in range(1, 10)]
    model = torch.nn.Linear(4, 1)
    result = lf.tune.lr_find(
        lf.build(linear_step(model), compile=False),
        lf.TrainState.create(model, lf.optim.sgd(0.1)),
        regression_data(),
        min_lr=0.01,
        max_lr=1.0,
        num_training=10,
        mode="linear",
        early_stop_threshold=None,
    )
    assert list(result.lrs) == lin and result.stop_reason == "completed"
    assert result.mode == "linear"


def test_lr_find_updates_equal_a_torch_loop_that_sets_each_rate():
    """Adam at rate lr_k on step k: the sweep's scaled updates against torch.optim.Adam."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    reference = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    reference.load_state_dict(model.state_dict())
    data = regression_data()
    result = lf.tune.lr_find(
        lf.build(linear_step(model), compile=False),
        lf.TrainState.create(model, lf.optim.adam(3e-4)),
        data,
        min_lr=1e-4,
        max_lr=0.1,
        num_training=16,
        early_stop_threshold=None,
    )
    opt = torch.optim.Adam(reference.parameters(), lr=1e-4)
    losses = []
    for k, lr in enumerate(result.lrs):
        x, y = data[k % len(data)]
        for group in opt.param_groups:
            group["lr"] = lr
        opt.zero_grad()
        loss = F.mse_loss(reference(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    # float32: the sweep scales each update once more than torch does (one rounding per step)
    np.testing.assert_allclose(result.losses, losses, rtol=1e-5)


@pytest.mark.parametrize(
    "build_options", [{"accumulate_grad_batches": 2}, {"skip_nonfinite": True}]
)
def test_lr_find_sets_the_rate_under_the_step_transforms(build_options):
    """Optimizer wrappers from the build sit inside the sweep's: one rate per optimizer update."""
    model = torch.nn.Linear(4, 1)
    results = [
        lf.tune.lr_find(
            lf.build(linear_step(model), compile=False, **options),
            lf.TrainState.create(model, lf.optim.sgd(0.1)),
            regression_data(),
            min_lr=1e-3,
            num_training=20,
            early_stop_threshold=None,
        )
        for options in ({}, build_options)
    ]
    # accumulation splits each batch in two halves: the same mean gradient, summed differently
    np.testing.assert_allclose(results[1].losses, results[0].losses, rtol=1e-5)
    assert results[1].suggestion_index == results[0].suggestion_index


def test_lr_find_smoothing_and_suggestion_follow_lightnings_rules():
    model = torch.nn.Linear(4, 1)
    result = lf.tune.lr_find(
        lf.build(linear_step(model), compile=False),
        lf.TrainState.create(model, lf.optim.sgd(0.1)),
        regression_data(),
        min_lr=1e-4,
        max_lr=1.0,
        num_training=30,
        early_stop_threshold=None,
    )
    avg = 0.0
    for k, (raw, smooth) in enumerate(zip(result.losses, result.smoothed, strict=True)):
        avg = 0.98 * avg + 0.02 * raw
        assert smooth == pytest.approx(avg / (1 - 0.98 ** (k + 2)), rel=1e-12)
    # the steepest descent, by numpy's second-order gradient over the kept points
    kept = np.arange(10, len(result.lrs) - 1)
    grad = np.gradient(
        np.array(result.smoothed, dtype=np.float32)[kept],
        np.array(result.lrs, dtype=np.float32)[kept],
    )
    assert result.suggestion_index == kept[int(np.argmin(grad))]
    assert result.suggestion == result.lrs[result.suggestion_index]
    assert result.suggest(skip_begin=len(result.lrs), skip_end=0) is None
    assert result.suggest(skip_begin=0, skip_end=0) is not None


def test_lr_find_stops_when_the_smoothed_loss_diverges():
    model = torch.nn.Linear(4, 1)
    result = lf.tune.lr_find(
        lf.build(linear_step(model), compile=False),
        lf.TrainState.create(model, lf.optim.sgd(0.1)),
        regression_data(),
        min_lr=1e-3,
        max_lr=1e3,
        num_training=100,
    )
    assert result.stop_reason == "diverged" and len(result.lrs) < 100
    s = result.smoothed
    assert s[-1] > 4.0 * min(s[:-1])  # the step that stopped it is kept, as in Lightning
    assert all(s[k] <= 4.0 * min(s[:k]) for k in range(1, len(s) - 1))


def test_lr_find_reports_a_one_pass_iterator_that_runs_out():
    model = torch.nn.Linear(4, 1)
    result = lf.tune.lr_find(
        lf.build(linear_step(model), compile=False),
        lf.TrainState.create(model, lf.optim.sgd(0.1)),
        iter(regression_data()),
        num_training=10,
    )
    assert result.stop_reason == "data exhausted" and len(result.lrs) == 4
    assert result.suggestion is None  # 4 points, 11 skipped


def test_lr_find_plot_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    model = torch.nn.Linear(4, 1)
    result = lf.tune.lr_find(
        lf.build(linear_step(model), compile=False),
        lf.TrainState.create(model, lf.optim.sgd(0.1)),
        regression_data(),
        min_lr=1e-4,
        num_training=20,
    )
    path = result.plot(tmp_path / "lr.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_lr_find_plot_names_matplotlib_when_it_is_missing(tmp_path, monkeypatch):
    result = lf.tune.LRFindResult((1.0,), (1.0,), (1.0,), None, None, "exponential", "completed")
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(ImportError, match=r"needs matplotlib.*pip install matplotlib"):
        result.plot(tmp_path / "lr.png")


@pytest.mark.compiled
def test_lr_find_compiles_the_sweep_once(fresh_dynamo):
    model = torch.nn.Linear(4, 1)
    step = lf.build(linear_step(model))
    result = lf.tune.lr_find(
        step, lf.TrainState.create(model, lf.optim.sgd(0.1)), regression_data(), num_training=12
    )
    assert len(result.lrs) == 12
    assert lf.compile_counts()["graphs"] == 1  # the rate is a tensor: one graph for 12 rates
    eager = lf.tune.lr_find(
        lf.build(linear_step(model), compile=False),
        lf.TrainState.create(model, lf.optim.sgd(0.1)),
        regression_data(),
        num_training=12,
    )
    np.testing.assert_allclose(result.losses, eager.losses, rtol=1e-5)


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore")
def test_lr_find_agrees_with_lightnings_lr_find(tmp_path):
    pytest.importorskip("lightning")
    from bench.lr_find_lightning import run_lightfunc, run_lightning

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    sweep = {"min_lr": 1e-4, "max_lr": 10.0, "num_training": 40, "mode": "exponential"}
    data = regression_data()
    lrs, smoothed, index = run_lightning(model, data, "sgd", root=tmp_path, **sweep)
    ours = run_lightfunc(model, data, "sgd", base_lr=0.1, **sweep)
    assert list(ours.lrs) == lrs  # bit-identical rates
    assert len(smoothed) == len(ours.smoothed)  # stopped at the same step
    # float32 losses; the sweep scales SGD's update once more than torch: 1e-5 relative
    np.testing.assert_allclose(ours.smoothed, smoothed, rtol=1e-5)
    assert ours.suggestion_index == index is not None


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"min_lr": 0.0}, ValueError, r"`min_lr` must be a finite number in \(0"),
        ({"min_lr": 0.1, "max_lr": 0.1}, ValueError, r"`max_lr`.*above `min_lr`"),
        ({"num_training": 0}, ValueError, r"`num_training` must be an int >= 1"),
        ({"num_training": 10.0}, TypeError, r"`num_training` must be an int"),
        ({"mode": "cosine"}, ValueError, r"`mode` must be one of 'exponential', 'linear'"),
        ({"early_stop_threshold": 0.0}, ValueError, r"`early_stop_threshold`.*None never stops"),
        ({"beta": 1.0}, ValueError, r"`beta` must be a finite number in \[0, 1\)"),
        ({"skip_begin": -1}, ValueError, r"`skip_begin` must be an int >= 0"),
        ({"skip_end": -1}, ValueError, r"`skip_end` must be an int >= 0"),
        ({"loss": 3}, TypeError, r"`loss` must be the name of a metric"),
        ({"loss": "nll"}, ValueError, r"`loss`: the metric 'nll' is not among.*\['loss'\]"),
    ],
)
def test_lr_find_rejects_bad_arguments(kwargs, error, match):
    model = torch.nn.Linear(4, 1)
    with pytest.raises(error, match=match):
        lf.tune.lr_find(
            lf.build(linear_step(model), compile=False),
            lf.TrainState.create(model, lf.optim.sgd(0.1)),
            regression_data(),
            **kwargs,
        )


def test_lr_find_needs_a_constant_nonzero_learning_rate():
    model = torch.nn.Linear(4, 1)
    step = lf.build(linear_step(model), compile=False)
    scheduled = lf.TrainState.create(model, lf.optim.sgd(lf.optim.cosine_decay_schedule(0.1, 10)))
    with pytest.raises(ValueError, match=r"`state`'s optimizer has a learning-rate schedule"):
        lf.tune.lr_find(step, scheduled, regression_data())
    zero = lf.TrainState.create(model, lf.optim.sgd(0.0))
    with pytest.raises(ValueError, match=r"constant learning rate > 0.*got 0.0"):
        lf.tune.lr_find(step, zero, regression_data())


def test_lr_find_needs_exactly_one_train_state():
    model = torch.nn.Linear(4, 1)
    one = lf.TrainState.create(model, lf.optim.sgd(0.1))

    def step(state: Any, batch: Any) -> Any:
        return state, {"loss": torch.zeros(())}

    with pytest.raises(ValueError, match=r"exactly one TrainState.*got 2"):
        lf.tune.lr_find(lf.build(step, compile=False), {"g": one, "d": one}, regression_data())


def test_lr_find_needs_batches_and_a_train_step():
    model = torch.nn.Linear(4, 1)
    state = lf.TrainState.create(model, lf.optim.sgd(0.1))
    step = lf.build(linear_step(model), compile=False)
    with pytest.raises(ValueError, match=r"`data` yielded no batches"):
        lf.tune.lr_find(step, state, [])
    with pytest.raises(TypeError, match=r"`data` must be an iterable of batches.*got int"):
        lf.tune.lr_find(step, state, 3)  # type: ignore[arg-type]

    def eval_step(state: Any, batch: Any) -> dict[str, torch.Tensor]:
        return {"loss": torch.zeros(())}

    with pytest.raises(TypeError, match=r"`step` must be a train step"):
        lf.tune.lr_find(lf.build_eval(eval_step, compile=False), state, regression_data())


# ---------------------------------------------------------------------------
# find_batch_size


def mlp_step() -> tuple[Any, lf.TrainState]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 4))

    def train_step(state: lf.TrainState, batch: Any) -> tuple[lf.TrainState, dict[str, Any]]:
        x, y = batch

        def loss_fn(params: dict[str, torch.Tensor]) -> torch.Tensor:
            return F.cross_entropy(lf.apply(model, params, {}, x, train=True)[0], y)

        loss, grads = lf.value_and_grad(loss_fn)(state.params)
        return state.apply_gradients(grads), {"loss": loss}

    return lf.build(train_step, compile=False), lf.TrainState.create(model, lf.optim.adam(1e-3))


def make_batch(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(n)
    return torch.randn(n, 32, generator=g), torch.randint(0, 4, (n,), generator=g)


def test_cpu_peak_growth_counts_the_live_bytes_exactly():
    def allocate() -> torch.Tensor:
        a = torch.empty(1_000_000)  # 4 MB
        b = torch.empty(2_000_000)  # 8 MB: 12 MB live
        del a
        c = torch.empty(500_000)  # 2 MB: 10 MB live
        del b
        return c

    assert cpu_peak_growth(allocate) == 12_000_000
    x = torch.zeros(10, 10)
    assert resident_bytes({"a": x, "view": x[1:], "b": torch.zeros(3, dtype=torch.int64)}) == 424
    assert resident_bytes((x[:2], x[:2])) == 80  # a batch sliced from a dataset: its own rows


def test_find_batch_size_returns_the_largest_size_within_the_budget():
    step, state = mlp_step()
    before = snapshot(state)
    budget = 200_000
    found = lf.tune.find_batch_size(step, state, make_batch, max_memory=budget, steps_per_trial=1)
    assert_unchanged(state, before)
    sizes = [t.batch_size for t in found.trials]
    first_fail = next(i for i, t in enumerate(found.trials) if not t.fits)
    assert sizes[: first_fail + 1] == [2 * 2**i for i in range(first_fail + 1)]  # doubling
    fit = {t.batch_size: t for t in found.trials}
    assert found.chosen.fits and found.chosen.peak_bytes <= budget  # type: ignore[operator]
    assert not fit[found.batch_size + 1].fits  # the next size up was tried, and did not fit
    assert fit[found.batch_size + 1].peak_bytes > budget  # type: ignore[operator]
    assert all(not t.fits for t in found.trials if t.batch_size > found.batch_size)
    # the peak includes the state, the batch and at least the hidden activations
    n = found.batch_size
    assert found.chosen.peak_bytes >= resident_bytes((state, make_batch(n))) + n * 64 * 4  # type: ignore[operator]
    assert found.chosen.steps_per_s is not None and found.chosen.steps_per_s > 0
    assert "| batch size | fits |" in found.table()


def test_find_batch_size_stops_at_max_batch_size():
    step, state = mlp_step()
    found = lf.tune.find_batch_size(
        step, state, make_batch, max_memory=2**30, max_batch_size=12, steps_per_trial=1
    )
    assert [t.batch_size for t in found.trials] == [2, 4, 8, 12] and found.batch_size == 12


def test_find_batch_size_treats_out_of_memory_as_not_fitting():
    """The CUDA path's rule on CPU: a step that raises torch.OutOfMemoryError does not fit."""
    inner, state = mlp_step()

    def step(state: Any, batch: Any) -> Any:
        if batch[0].shape[0] > 10:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return inner.fn(state, batch)

    found = lf.tune.find_batch_size(
        lf.build(step, compile=False), state, make_batch, max_memory=2**30, steps_per_trial=1
    )
    assert found.batch_size == 10
    assert [t.batch_size for t in found.trials] == [2, 4, 8, 16, 12, 10, 11]
    oom = found.trials[3]
    assert not oom.fits and oom.peak_bytes is None and "Tried to allocate" in (oom.error or "")


def test_find_batch_size_rejects_bad_arguments():
    step, state = mlp_step()
    with pytest.raises(ValueError, match=r"`max_memory` is required on cpu"):
        lf.tune.find_batch_size(step, state, make_batch)
    with pytest.raises(ValueError, match=r"`max_memory` must be an int >= 1.*number of bytes"):
        lf.tune.find_batch_size(step, state, make_batch, max_memory=0)
    with pytest.raises(ValueError, match=r"`init_val` must be an int >= 1"):
        lf.tune.find_batch_size(step, state, make_batch, max_memory=2**20, init_val=0)
    with pytest.raises(ValueError, match=r"`max_trials` must be an int >= 1"):
        lf.tune.find_batch_size(step, state, make_batch, max_memory=2**20, max_trials=0)
    with pytest.raises(ValueError, match=r"`steps_per_trial` must be an int >= 1"):
        lf.tune.find_batch_size(step, state, make_batch, max_memory=2**20, steps_per_trial=0)
    with pytest.raises(ValueError, match=r"`max_batch_size` must be an int >= 1"):
        lf.tune.find_batch_size(step, state, make_batch, max_memory=2**20, max_batch_size=0)
    with pytest.raises(TypeError, match=r"`make_batch` must be a function batch_size -> batch"):
        lf.tune.find_batch_size(step, state, [1, 2], max_memory=2**20)  # type: ignore[arg-type]


def test_find_batch_size_says_when_nothing_fits():
    step, state = mlp_step()
    with pytest.raises(ValueError, match=r"`max_memory`: no batch size fits; batch size 1 needs"):
        lf.tune.find_batch_size(step, state, make_batch, max_memory=1000, steps_per_trial=1)


@pytest.mark.compiled
@pytest.mark.slow
def test_find_batch_size_compiles_past_dynamos_recompile_limit(fresh_dynamo):
    import torch._dynamo

    inner, state = mlp_step()
    step = lf.build(inner.fn)  # compiled, one static graph per batch shape
    with torch._dynamo.config.patch(recompile_limit=2):  # 3 shapes pass a limit of 2, as 9 pass 8
        found = lf.tune.find_batch_size(
            step, state, make_batch, max_memory=2**30, max_batch_size=8, steps_per_trial=1
        )
    assert [t.batch_size for t in found.trials] == [2, 4, 8] and found.batch_size == 8
    assert lf.compile_counts()["graphs"] == 3
    # the profiler sees what inductor's compiled kernels allocate: activations, gradients
    for t in found.trials:
        floor = resident_bytes((state, make_batch(t.batch_size))) + t.batch_size * 64 * 4
        assert t.peak_bytes is not None and t.peak_bytes >= floor


def test_docstring_examples_run():
    from lightfunc import _tune_batch, _tune_lr

    for module in (_tune_lr, _tune_batch):
        result = doctest.testmod(module, extraglobs={"lf": lf})
        assert result.failed == 0 and result.attempted > 0, module.__name__


def test_the_cpu_memory_probe_measures_and_prints_nothing(capfd):
    # torch 2.13's CPU build prints `USDT: ... profiler_start/stop` from C++ at every profiler
    # start and stop: find_batch_size's trials printed dozens of such lines.
    from lightfunc._tune_batch import cpu_peak_growth

    assert cpu_peak_growth(lambda: torch.ones(1000)) >= 4000
    captured = capfd.readouterr()
    assert "profiler_st" not in captured.err + captured.out
