"""`lightfunc.optim.track_health` and `lightfunc.callbacks.HealthMonitor`.

The statistics are checked against a recomputation from the same gradients,
parameters and updates with plain torch (float32: rtol 1e-5, the rounding of
summing squares in another order), they reach a logger's file under
`health/...`, a compiled step runs one graph for logging and non-logging
steps, and the wrapper composes with `apply_if_finite` and accumulation.
"""

from __future__ import annotations

import dataclasses
import doctest
import io
import json
import math
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from helpers import make_data, make_model, make_steps

import lightfunc as lf
from lightfunc.optim import HealthState, find_state, track_health
from lightfunc.testing import assert_trees_close

RTOL = 1e-5  # float32, norms summed in another order than the reference


def _health(state: lf.TrainState) -> HealthState:
    found = find_state(state.opt_state, HealthState)
    assert found is not None
    return found


def _reference(
    names: list[str], grads: dict, params: dict, updates: dict, group_of: Any
) -> dict[str, dict[str, float]]:
    """Per group: the norms and the non-finite count, with plain torch in float64."""
    out: dict[str, dict[str, float]] = {}
    for name in names:
        g = out.setdefault(group_of(name), {"grad": 0.0, "param": 0.0, "update": 0.0, "nf": 0})
        g["grad"] += float(grads[name].double().square().sum())
        g["param"] += float(params[name].double().square().sum())
        g["update"] += float(updates[name].double().square().sum())
        g["nf"] += int((~torch.isfinite(grads[name])).sum())
    return {
        k: {
            "grad_norm": math.sqrt(v["grad"]),
            "param_norm": math.sqrt(v["param"]),
            "update_norm": math.sqrt(v["update"]),
            "nonfinite": v["nf"],
        }
        for k, v in out.items()
    }


def _check_against(health: HealthState, reference: dict[str, dict[str, float]]) -> None:
    assert list(health.groups) == list(reference)
    for j, group in enumerate(health.groups):
        ref = reference[group]
        for stat in ("grad_norm", "param_norm", "update_norm"):
            got = float(getattr(health, stat)[j])
            assert got == pytest.approx(ref[stat], rel=RTOL), (group, stat)
        assert int(health.nonfinite[j]) == ref["nonfinite"]
        ratio = ref["update_norm"] / ref["param_norm"]
        assert float(health.update_ratio[j]) == pytest.approx(ratio, rel=2 * RTOL)


def _params(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    shapes = {"enc.0.weight": (4, 3), "enc.0.bias": (4,), "enc.1.weight": (2, 4), "head.w": (5,)}
    return {k: torch.randn(s, generator=g) for k, s in shapes.items()}


def test_stats_equal_a_recomputation_from_grads_params_and_updates():
    params = _params()
    inner = lf.optim.adamw(0.1, weight_decay=0.1)
    tx = track_health(inner, every=1)
    state = tx.init(params)
    ref_state = inner.init(params)
    for seed in range(3):
        g = torch.Generator().manual_seed(10 + seed)
        grads = {k: torch.randn(v.shape, generator=g) for k, v in params.items()}
        updates, state = tx.update(grads, state, params)
        ref_updates, ref_state = inner.update(grads, ref_state, params)
        assert_trees_close(updates, ref_updates, rtol=0, atol=0)
        reference = _reference(list(params), grads, params, ref_updates, lambda n: n.split(".")[0])
        _check_against(state, reference)
        assert int(state.count) == seed + 1 and int(state.at) == seed + 1
        params = lf.optim.apply_updates(params, updates)


@pytest.mark.parametrize("branch", ["auto", "where"])  # eagerly on the CPU: an `if`, a `where`
def test_stats_are_computed_every_n_updates_and_kept_between(branch):
    params = _params()
    tx = track_health(lf.optim.sgd(0.1), every=3, branch=branch)
    state = tx.init(params)
    seen = []
    for i in range(7):
        grads = {k: torch.full_like(v, float(i + 1)) for k, v in params.items()}
        _, state = tx.update(grads, state, params)
        seen.append((int(state.count), int(state.at), float(state.grad_norm[1])))
    # head.w has 5 elements: the norm of a gradient of all (i+1)s is (i+1) * sqrt(5).
    root5 = math.sqrt(5)
    assert [(c, a) for c, a, _ in seen] == [(1, 0), (2, 0), (3, 3), (4, 3), (5, 3), (6, 6), (7, 6)]
    assert [v for *_, v in seen] == pytest.approx(
        [0, 0, 3 * root5, 3 * root5, 3 * root5, 6 * root5, 6 * root5], rel=RTOL
    )


def test_non_finite_gradient_elements_are_counted_per_group():
    params = _params()
    tx = track_health(lf.optim.sgd(0.1), every=1)
    grads = {k: torch.zeros_like(v) for k, v in params.items()}
    grads["enc.0.weight"][0, :2] = float("nan")
    grads["enc.1.weight"][1, 0] = float("inf")
    grads["head.w"][3] = -float("inf")
    _, state = tx.update(grads, tx.init(params), params)
    assert state.groups == ("enc", "head")
    assert state.nonfinite.tolist() == [3, 1]
    assert not torch.isfinite(state.grad_norm).any()


def test_groups_by_depth_and_by_function():
    params = _params()
    grads = {k: torch.ones_like(v) for k, v in params.items()}
    by_layer = track_health(lf.optim.sgd(0.1), every=1, groups=2)
    _, state = by_layer.update(grads, by_layer.init(params), params)
    assert state.groups == ("enc.0", "enc.1", "head.w")
    assert state.grad_norm.tolist() == pytest.approx([4.0, math.sqrt(8), math.sqrt(5)], rel=RTOL)

    def kind(name: str) -> str:
        return "bias" if name.endswith("bias") else "weight"

    by_kind = track_health(lf.optim.sgd(0.1), every=1, groups=kind)
    _, state = by_kind.update(grads, by_kind.init(params), params)
    assert state.groups == ("bias", "weight")  # tree order: a dict's sorted keys
    assert state.grad_norm.tolist() == pytest.approx([2.0, 5.0], rel=RTOL)


def _autograd_grads(model: torch.nn.Module, params: dict, batch: Any) -> dict[str, torch.Tensor]:
    """The gradient of the helpers' loss with plain autograd, at `params`."""
    x, y = batch
    leaves = {k: v.detach().clone().requires_grad_(True) for k, v in params.items()}
    logits = torch.func.functional_call(model, leaves, (x,))
    loss = F.cross_entropy(logits, y)
    return dict(zip(leaves, torch.autograd.grad(loss, list(leaves.values())), strict=True))


def test_a_train_state_step_measures_its_own_gradients_and_update():
    model = make_model(batchnorm=False)
    train_step, _ = make_steps(model)
    inner = lf.optim.adamw(1e-2)
    state = lf.TrainState.create(model, track_health(inner, every=2))
    step = lf.build(train_step, compile=False)
    data = make_data(n=64, batch_size=16)
    for i, batch in enumerate(data):
        before = state
        state, _ = step(state, batch)
        if (i + 1) % 2:
            assert torch.equal(_health(state).grad_norm, _health(before).grad_norm)
            continue
        grads = _autograd_grads(model, before.params, batch)
        updates = {k: state.params[k] - before.params[k] for k in state.params}
        reference = _reference(
            list(state.params), grads, before.params, updates, lambda n: n.split(".")[0]
        )
        # `updates` is new - old params: one more float32 rounding than the update itself.
        _check_against(_health(state), reference)
        assert int(_health(state).at) == i + 1


def _loop_run(tmp_path, *, every: int, log_every: int, max_steps: int, **loop_kwargs: Any):
    model = make_model(batchnorm=False)
    train_step, _ = make_steps(model)
    state = lf.TrainState.create(model, track_health(lf.optim.adamw(1e-2), every=every))
    logger = lf.loggers.JSONLLogger(tmp_path, log_every_n_steps=log_every)
    out = io.StringIO()
    bar = lf.callbacks.ProgressBar(log_every_n_steps=log_every, stream=out)
    states = list(
        lf.loop(
            lf.build(train_step, compile=False),
            state,
            make_data(n=64, batch_size=16),
            max_steps=max_steps,
            callbacks=[lf.callbacks.HealthMonitor(), logger, bar],
            **loop_kwargs,
        )
    )
    records = [json.loads(line) for line in logger.metrics_file.read_text().splitlines()]
    assert "loss=" in out.getvalue() and "health/" not in out.getvalue()  # in the logs only
    return states, records


def test_health_metrics_reach_the_logger_on_logging_steps(tmp_path):
    states, records = _loop_run(tmp_path, every=2, log_every=2, max_steps=6)
    assert [r["step"] for r in records] == [2, 4, 6]
    for record in records:
        ls = states[record["step"] - 1]
        health, metrics = _health(ls.state), record["metrics"]
        assert health.groups == ("0", "3")
        for j, group in enumerate(health.groups):
            assert metrics[f"health/{group}/grad_norm"] == pytest.approx(
                float(health.grad_norm[j]), rel=1e-6
            )
            assert metrics[f"health/{group}/param_norm"] == pytest.approx(
                float(health.param_norm[j]), rel=1e-6
            )
            assert metrics[f"health/{group}/update_ratio"] == pytest.approx(
                float(health.update_ratio[j]), rel=1e-6
            )
            assert metrics[f"health/{group}/nonfinite"] == 0
        assert metrics["health/grad_norm"] == pytest.approx(
            float(torch.linalg.vector_norm(health.grad_norm)), rel=1e-6
        )
        assert metrics["health/update_ratio"] == pytest.approx(
            float(
                torch.linalg.vector_norm(health.update_norm)
                / torch.linalg.vector_norm(health.param_norm)
            ),
            rel=1e-6,
        )
        assert int(health.at) == record["step"]
    # Between health steps the callback adds nothing.
    assert not any(name.startswith("health/") for name in states[2].metrics)
    # The end-of-run summary leaves them to the logs.
    assert "health/" in str(states[-1].metrics) and "health/" not in str(
        lf.callbacks.summarize_run(states[-1])
    )


def test_health_monitor_only_totals(tmp_path):
    model = make_model(batchnorm=False)
    state = lf.TrainState.create(model, track_health(lf.optim.sgd(0.1), every=1))
    ls = lf.LoopState(state=state, step=1)
    monitor = lf.callbacks.HealthMonitor(per_group=False, prefix="h")
    monitor.on_start(ls)
    assert sorted(monitor.extra_metrics(ls)) == [
        "h/grad_norm",
        "h/nonfinite",
        "h/param_norm",
        "h/update_ratio",
    ]


def test_several_train_states_are_numbered():
    model = make_model(batchnorm=False)
    a = lf.TrainState.create(model, track_health(lf.optim.sgd(0.1), every=1))
    b = lf.TrainState.create(model, track_health(lf.optim.sgd(0.1), every=2))
    metrics = lf.callbacks.HealthMonitor().extra_metrics(
        lf.LoopState(state={"g": a, "d": b}, step=3)
    )
    # Tree order of a dict is its sorted keys: "d" (every=2, not due at step 3), then "g".
    assert "health/1/0/grad_norm" in metrics
    assert not any(name.startswith("health/0/") for name in metrics)


def test_the_wrapper_survives_a_checkpoint_round_trip(tmp_path):
    model = make_model(batchnorm=False)
    train_step, _ = make_steps(model)
    state = lf.TrainState.create(model, track_health(lf.optim.adam(1e-2), every=1))
    state, _ = lf.build(train_step, compile=False)(state, make_data(n=16)[0])
    path = lf.save(state, tmp_path / "ckpt.safetensors")
    fresh = lf.TrainState.create(model, track_health(lf.optim.adam(1e-2), every=1))
    restored = lf.load(path, like=fresh)
    for field in ("params", "opt_state", "step"):
        assert_trees_close(getattr(restored, field), getattr(state, field), rtol=0, atol=0)
    assert _health(restored).groups == ("0", "3")


# Composition ---------------------------------------------------------------------------------


def _nan_batch() -> tuple[torch.Tensor, torch.Tensor]:
    x, y = make_data(n=16)[0]
    x = x.clone()
    x[0, 0] = float("nan")
    return x, y


def test_inside_apply_if_finite_a_skipped_update_rolls_the_health_state_back():
    model = make_model(batchnorm=False)
    train_step, _ = make_steps(model)
    tx = track_health(lf.optim.sgd(0.1), every=1)
    state = lf.TrainState.create(model, tx, skip_nonfinite=True)
    assert isinstance(state.opt_state, lf.optim.ApplyIfFiniteState)  # health is inside
    step = lf.build(train_step, compile=False, skip_nonfinite=True)
    state, _ = step(state, make_data(n=16)[0])
    kept = _health(state)
    state, _ = step(state, _nan_batch())
    assert int(state.loss_scale.skipped) == 1
    assert_trees_close(_health(state), kept, rtol=0, atol=0)


def test_outside_apply_if_finite_a_skipped_update_is_counted():
    model = make_model(batchnorm=False)
    train_step, _ = make_steps(model)
    state = lf.TrainState.create(model, lf.optim.sgd(0.1), skip_nonfinite=True)
    tx = track_health(state.tx, every=1)
    state = state.replace(tx=tx, opt_state=tx.init(state.params))
    step = lf.build(train_step, compile=False, skip_nonfinite=True)
    state = step.prepare(state)
    assert isinstance(state.opt_state, HealthState)  # prepare kept the order
    state, _ = step(state, make_data(n=16)[0])
    before = state
    state, _ = step(state, _nan_batch())
    health = _health(state)
    assert int(state.loss_scale.skipped) == 1 and int(health.count) == 2
    assert int(health.nonfinite.sum()) > 0 and not torch.isfinite(health.grad_norm).all()
    assert health.update_norm.tolist() == [0.0, 0.0]  # the skipped update is zero
    assert_trees_close(state.params, before.params, rtol=0, atol=0)


def test_accumulated_gradients_are_measured_once_per_update():
    model = make_model(batchnorm=False)
    train_step, _ = make_steps(model)
    state = lf.TrainState.create(model, track_health(lf.optim.sgd(0.1), every=1))
    batch = make_data(n=32, batch_size=32)[0]
    whole, _ = lf.build(train_step, compile=False)(state, batch)
    split, _ = lf.build(train_step, compile=False, accumulate_grad_batches=4)(state, batch)
    assert int(_health(split).count) == 1
    for stat in ("grad_norm", "param_norm", "update_norm"):
        torch.testing.assert_close(
            getattr(_health(split), stat), getattr(_health(whole), stat), rtol=RTOL, atol=1e-7
        )


def test_a_deferred_update_passes_through_uncounted():
    params = _params()
    tx = track_health(lf.optim.accumulate_gradients(lf.optim.sgd(0.1)), every=1)
    plain = track_health(lf.optim.sgd(0.1), every=1).init(params)
    weight = torch.tensor(0.5)
    deferring = dataclasses.replace(
        plain, inner=lf.optim.AccumulationState(plain.inner, None, weight, final=False)
    )
    grads = {k: torch.ones_like(v) for k, v in params.items()}
    updates, state = tx.update(grads, deferring, params)
    assert updates is None
    assert int(state.count) == 0 and state.grad_norm.tolist() == [0.0, 0.0]
    assert state.inner.consumed


# Compiled ------------------------------------------------------------------------------------


@pytest.mark.compiled
def test_compiled_step_is_one_graph_for_logging_and_other_steps(fresh_dynamo):
    model = make_model(batchnorm=False)
    train_step, _ = make_steps(model)
    state = lf.TrainState.create(model, track_health(lf.optim.adamw(1e-2), every=3))
    data = make_data(n=64, batch_size=16)
    compiled, eager = lf.build(train_step), lf.build(train_step, compile=False)
    c_state, e_state = state, state
    c_state, _ = compiled(c_state, data[0])
    graphs = lf.compile_counts()["graphs"]
    assert graphs == 1
    e_state, _ = eager(e_state, data[0])
    for i in range(1, 7):  # steps 2..7: logging steps 3 and 6 among them
        c_state, _ = compiled(c_state, data[i % 4])
        e_state, _ = eager(e_state, data[i % 4])
        ch, eh = _health(c_state), _health(e_state)
        assert int(ch.at) == int(eh.at) == 3 * ((i + 1) // 3)
        for stat in ("grad_norm", "param_norm", "update_norm", "nonfinite"):
            torch.testing.assert_close(getattr(ch, stat), getattr(eh, stat), rtol=RTOL, atol=1e-6)
    assert lf.compile_counts()["graphs"] == graphs, "a logging step recompiled"


@pytest.mark.compiled
@pytest.mark.parametrize("branch", ["auto", "cond", "where"])
def test_compiled_the_statistics_are_one_graph_with_or_without_a_cond(fresh_dynamo, branch):
    graphs: list[torch.fx.GraphModule] = []

    def record(gm: torch.fx.GraphModule, inputs: Any) -> Any:
        graphs.append(gm)
        return gm.forward

    params = _params()
    tx = track_health(lf.optim.sgd(0.1), every=2, branch=branch)
    update = torch.compile(lambda g, s, p: tx.update(g, s, p), backend=record, fullgraph=True)
    state = eager = tx.init(params)
    for i in range(4):
        grads = {k: torch.full_like(v, float(i)) for k, v in params.items()}
        _, state = update(grads, state, params)
        _, eager = tx.update(grads, eager, params)
        assert_trees_close(state, eager, rtol=RTOL, atol=0)
    assert len(graphs) == 1
    targets = [str(node.target) for node in graphs[0].graph.nodes]
    has_cond = any("cond" in t and "true" not in t and "false" not in t for t in targets)
    assert has_cond == (branch != "where")  # "auto" is "cond" for parameters on the CPU


# Errors --------------------------------------------------------------------------------------


def test_bad_arguments_are_refused():
    sgd = lf.optim.sgd(0.1)
    with pytest.raises(TypeError, match=r"`tx` must be a lightfunc\.optim GradientTransformation"):
        track_health(torch.optim.SGD, every=1)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"`every` must be an int .*float 1.5"):
        track_health(sgd, every=1.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="`every` must be >= 1, got 0"):
        track_health(sgd, every=0)
    with pytest.raises(ValueError, match=r"`groups` as an int .* got 0"):
        track_health(sgd, groups=0)
    with pytest.raises(
        ValueError, match="`branch` must be one of 'auto', 'cond', 'where', got 'if'"
    ):
        track_health(sgd, branch="if")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"`groups` must be None .* got str 'layer'"):
        track_health(sgd, groups="layer")  # type: ignore[arg-type]
    numbered = track_health(sgd, groups=lambda name: len(name))  # type: ignore[arg-type,return-value]
    with pytest.raises(TypeError, match=r"`groups` must return a group name .* returned int 10"):
        numbered.init(_params())
    with pytest.raises(TypeError, match="`prefix` must be a non-empty string"):
        lf.callbacks.HealthMonitor(prefix="")


def test_misuse_at_update_and_at_start_is_explained():
    params = _params()
    tx = track_health(lf.optim.sgd(0.1), every=1)
    state = tx.init(params)
    grads = {k: torch.ones_like(v) for k, v in params.items()}
    with pytest.raises(TypeError, match=r"call `tx.update\(grads, state, params\)`"):
        tx.update(grads, state)
    renamed = {("dec" + k[3:] if k.startswith("enc") else k): v for k, v in params.items()}
    with pytest.raises(ValueError, match="belongs to the group 'dec', which the state was not"):
        tx.update(renamed, state, renamed)
    plain = lf.TrainState.create(make_model(), lf.optim.sgd(0.1))
    with pytest.raises(TypeError, match="HealthMonitor found no health statistics"):
        lf.callbacks.HealthMonitor().on_start(lf.LoopState(state=plain))


def test_docstring_examples_run():
    from lightfunc.callbacks import _health as callback_module
    from lightfunc.optim import _health as optim_module

    for module in (optim_module, callback_module):
        result = doctest.testmod(module, extraglobs={"lf": lf})
        assert result.attempted > 0 and result.failed == 0, module.__name__


def test_fit_adds_a_health_monitor_when_the_optimizer_tracks_health(tmp_path):
    import json

    import lightfunc as lf

    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
    tx = lf.optim.track_health(lf.optim.sgd(0.1), every=2)
    state = lf.TrainState.create(model, tx, seed=0)

    def train_step(state, batch):
        x, y = batch

        def loss_fn(params):
            out, _ = lf.apply(model, params, state.buffers, x, train=True)
            return torch.nn.functional.mse_loss(out, y)

        loss, grads = lf.value_and_grad(loss_fn)(state.params)
        return state.apply_gradients(grads), {"loss": loss}

    data = [(torch.randn(8, 4), torch.randn(8, 2)) for _ in range(4)]
    lf.fit(
        lf.build(train_step, compile=False),
        state,
        data,
        max_epochs=1,
        default_root_dir=tmp_path,
        enable_checkpointing=False,
        enable_progress_bar=False,
        log_every_n_steps=2,
        logger=lambda run: lf.loggers.JSONLLogger(run, name="logs", log_every_n_steps=2),
    )
    records = [
        json.loads(line)
        for line in (tmp_path / "version_0" / "logs" / "metrics.jsonl").read_text().splitlines()
    ]
    assert any("health/grad_norm" in r["metrics"] for r in records), records
