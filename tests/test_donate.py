"""`build(..., donate=True)`: the new state in the old state's storage, the old state consumed."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
import torch

import lightfunc as lf
import lightfunc.distributed

# Same model, data and optimizer for the pure and the donating run: results must agree bit for
# bit (float32: the same operations in the same order; compiled, inductor emits the same
# arithmetic whether the result goes to a new buffer or into the old one).


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 12), torch.nn.ReLU(), torch.nn.Linear(12, 3))


def _batches(n: int = 5) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [
        (torch.randn(8, 6, generator=g), torch.randint(0, 3, (8,), generator=g)) for _ in range(n)
    ]


def _train_step(model: torch.nn.Module) -> Any:
    def train_step(state: lf.TrainState, batch: Any) -> Any:
        x, y = batch

        def loss_fn(params: dict[str, torch.Tensor]) -> torch.Tensor:
            out, _ = lf.apply(model, params, state.buffers, x, train=True)
            return torch.nn.functional.cross_entropy(out, y)

        loss, grads = lf.value_and_grad(loss_fn)(state.params)
        # `step` is a tensor of the old state: donation must not let it show the new count.
        return state.apply_gradients(grads), {"loss": loss, "step": state.step}

    return train_step


def _run(compile: bool, donate: bool, **build: Any) -> tuple[lf.TrainState, list[dict[str, float]]]:
    model = _model()
    step = lf.build(_train_step(model), compile=compile, donate=donate, **build)
    state = lf.TrainState.create(model, lf.optim.adamw(1e-2, weight_decay=0.1))
    seen = []
    for batch in _batches():
        state, metrics = step(state, batch)
        seen.append({k: float(v) for k, v in metrics.items()})
    return state, seen


def _assert_states_equal(a: lf.TrainState, b: lf.TrainState) -> None:
    leaves_a, leaves_b = lf.tree_leaves(a), lf.tree_leaves(b)
    assert len(leaves_a) == len(leaves_b)
    for x, y in zip(leaves_a, leaves_b, strict=True):
        assert torch.equal(x, y)


def _assert_one_rounding_apart(a: Any, b: Any) -> None:
    """`a` and `b` within one float32 rounding of a number below 1 (2**-24): the pure AdamW form
    rounds the move ``new - p`` once more than torch's in-place arithmetic, an error of up to half
    an ulp of the *old* parameter, so several ulps of a new value near zero."""
    for x, y in zip(lf.tree_leaves(a), lf.tree_leaves(b), strict=True):
        assert torch.allclose(x, y, rtol=0.0, atol=2**-24), (x - y).abs().max()


def _torch_adamw(steps: int = 5) -> dict[str, torch.Tensor]:
    """torch.optim.AdamW (single-tensor, in place) on the same model and batches as `_run`."""
    model = _model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1, foreach=False)
    for x, y in _batches(steps):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return {k: v.detach() for k, v in model.named_parameters()}


def test_eager_donating_adamw_updates_in_place_with_torch_optims_arithmetic() -> None:
    pure, pure_metrics = _run(compile=False, donate=False)
    model = _model()
    step = lf.build(_train_step(model), compile=False, donate=True)
    state = lf.TrainState.create(model, lf.optim.adamw(1e-2, weight_decay=0.1))
    # Parameters and Adam's moments (the step counts are new 0-d tensors each step).
    pointers = [t.data_ptr() for t in lf.tree_leaves((state.params, state.opt_state)) if t.ndim]
    seen = []
    for batch in _batches():
        state, metrics = step(state, batch)
        seen.append({k: float(v) for k, v in metrics.items()})
    assert [t.data_ptr() for t in lf.tree_leaves((state.params, state.opt_state)) if t.ndim] == (
        pointers
    )
    # The in-place update is torch.optim.AdamW's own arithmetic: bit for bit. The pure update
    # adds `new - p` to `p`, which is one rounding off where a step is larger than the
    # parameter (here one element of one layer after 5 steps).
    torch_params = _torch_adamw()
    for name, value in torch_params.items():
        assert torch.equal(state.params[name], value), name
    _assert_one_rounding_apart(pure, state)
    assert [m["step"] for m in seen] == [0.0, 1.0, 2.0, 3.0, 4.0]
    assert [m["loss"] for m in seen[:1]] == [m["loss"] for m in pure_metrics[:1]]


def test_reading_the_old_parameters_after_an_in_place_update_raises() -> None:
    model = _model()

    def change_metric(state: lf.TrainState, batch: Any) -> Any:
        x, y = batch

        def loss_fn(params: dict[str, torch.Tensor]) -> torch.Tensor:
            out, _ = lf.apply(model, params, state.buffers, x, train=True)
            return torch.nn.functional.cross_entropy(out, y)

        loss, grads = lf.value_and_grad(loss_fn)(state.params)
        new = state.apply_gradients(grads)
        # Pure, this is the size of the update; in place it would silently be 0.
        change = (new.params["0.weight"] - state.params["0.weight"]).norm()
        return new, {"loss": loss, "change": change, "step": state.step}

    pure = lf.build(change_metric, compile=False)
    _, metrics = pure(lf.TrainState.create(model, lf.optim.adamw(1e-2)), _batches(1)[0])
    assert float(metrics["change"]) > 0
    step = lf.build(change_metric, compile=False, donate=True)
    with pytest.raises(lf.DonatedStateError, match="updated in place by `apply_gradients`"):
        step(lf.TrainState.create(model, lf.optim.adamw(1e-2)), _batches(1)[0])


def test_eager_donation_returns_metrics_that_later_updates_do_not_change() -> None:
    model = _model()

    def weight_metric(state: lf.TrainState, batch: Any) -> Any:
        x, y = batch
        first = state.params["2.bias"][0]  # a view of a parameter, read before the update

        def loss_fn(params: dict[str, torch.Tensor]) -> torch.Tensor:
            out, _ = lf.apply(model, params, state.buffers, x, train=True)
            return torch.nn.functional.cross_entropy(out, y)

        loss, grads = lf.value_and_grad(loss_fn)(state.params)
        return state.apply_gradients(grads), {"loss": loss, "first_bias": first}

    seen = {}
    for donate in (False, True):
        step = lf.build(weight_metric, compile=False, donate=donate)
        state = lf.TrainState.create(model, lf.optim.adamw(1e-2))
        kept = []
        for batch in _batches(3):
            state, metrics = step(state, batch)
            kept.append(metrics["first_bias"])
        seen[donate] = [float(m) for m in kept]  # read after all the steps ran
    assert seen[True] == seen[False]
    assert len(set(seen[True])) == 3  # the parameter moved: each step's value differs


def test_eager_donation_with_accumulation_runs_the_pure_update() -> None:
    # The micro-batches defer (no in-place form): bit for bit the pure step, and the old state
    # stays readable inside the step (`_train_step` reads `state.step` after the update).
    pure, pure_metrics = _run(compile=False, donate=False, accumulate_grad_batches=2)
    donated, donated_metrics = _run(compile=False, donate=True, accumulate_grad_batches=2)
    _assert_states_equal(pure, donated)
    assert pure_metrics == donated_metrics


def test_eager_donation_without_an_in_place_form_is_the_pure_step() -> None:
    # SGD has no in-place form; a parameter without a gradient (skip_unused keeps its moments)
    # and a frozen one send AdamW through the pure update: bit for bit the pure step's results.
    torch.manual_seed(0)
    model = torch.nn.ModuleDict({"a": torch.nn.Linear(6, 3), "unused": torch.nn.Linear(2, 2)})
    model["a"].bias.requires_grad_(False)

    def partial_step(state: lf.TrainState, batch: Any) -> Any:
        x, y = batch

        def loss_fn(params: dict[str, torch.Tensor]) -> torch.Tensor:
            out = x @ params["a.weight"].T + state.buffers.get("a.bias", 0.0)
            return torch.nn.functional.cross_entropy(out, y)

        loss, grads = lf.value_and_grad(loss_fn)(state.params)
        return state.apply_gradients(grads), {"loss": loss}

    for tx in (lambda: lf.optim.sgd(0.1, momentum=0.9), lambda: lf.optim.adamw(1e-2)):
        results = []
        for donate in (False, True):
            step = lf.build(partial_step, compile=False, donate=donate, validate=False)
            state = lf.TrainState.create(model, tx())
            for batch in _batches(3):
                state, _ = step(state, batch)
            results.append(state)
        _assert_states_equal(*results)
        assert torch.equal(results[1].params["unused.weight"], model["unused"].weight)


def test_a_consumed_state_raises_on_every_use() -> None:
    model = _model()
    step = lf.build(_train_step(model), compile=False, donate=True)
    state = lf.TrainState.create(model, lf.optim.sgd(0.1))
    params = state.params  # a caller that kept the old dict
    new, _ = step(state, _batches(1)[0])
    match = "donated to `train_step`"
    with pytest.raises(lf.DonatedStateError, match=match):
        state.params["0.weight"]
    # SGD writes in place eagerly: the old dict's entries were marked by `apply_gradients`.
    with pytest.raises(lf.DonatedStateError, match="updated in place by `apply_gradients` inside"):
        params["0.weight"] + 1
    with pytest.raises(lf.DonatedStateError, match=match):
        state.step + 1
    with pytest.raises(lf.DonatedStateError, match="passed to a step that already consumed it"):
        step(state, _batches(1)[0])
    with pytest.raises(lf.DonatedStateError, match=match):
        lf.save(state, "unused.safetensors")  # never writes: the error comes first
    assert not Path("unused.safetensors").exists()
    assert "<donated>" in repr(state)  # printing a consumed state is fine
    step(new, _batches(1)[0])  # the returned state is the live one


def test_a_dict_of_states_is_consumed_one_level_down() -> None:
    model = _model()
    inner = _train_step(model)

    def two_step(states: dict[str, lf.TrainState], batch: Any) -> Any:
        a, metrics = inner(states["a"], batch)
        return {"a": a, "b": states["b"]}, metrics

    step = lf.build(two_step, compile=False, donate=True, validate=False)
    states = {
        "a": lf.TrainState.create(model, lf.optim.sgd(0.1)),
        "b": lf.TrainState.create(model, lf.optim.sgd(0.1)),
    }
    new, _ = step(states, _batches(1)[0])
    with pytest.raises(lf.DonatedStateError):
        states["a"].params["0.weight"]
    # "b" went through unchanged: it is part of the new state, so it stays readable.
    assert new["b"] is states["b"]
    assert new["b"].params["0.weight"].shape == (12, 6)


def test_donate_is_checked_at_build() -> None:
    with pytest.raises(TypeError, match="`donate` must be True or False, got 'yes'"):
        lf.build(_train_step(_model()), donate="yes")  # type: ignore[arg-type]
    mesh = lf.distributed.init_mesh()
    with pytest.raises(ValueError, match="`donate=True` was given with the FSDP strategy and"):
        lf.build(_train_step(_model()), strategy=lf.distributed.FSDP(mesh), donate=True)
    lf.build(  # eager FSDP updates its shards in place
        _train_step(_model()), strategy=lf.distributed.FSDP(mesh), donate=True, compile=False
    )


def test_loop_and_fit_run_a_donating_step_with_checkpoints(tmp_path: Path) -> None:
    model = _model()
    data = _batches(6)

    straight = {}
    for donate in (False, True):
        manager = lf.CheckpointManager(tmp_path / f"ckpt_{donate}", every_n_steps=2)
        last = None
        for ls in lf.loop(
            _train_step(model),
            lf.TrainState.create(model, lf.optim.adamw(1e-2)),
            data,
            max_steps=4,
            compile=False,
            donate=donate,
            checkpoint=manager,
        ):
            last = ls
        # Resume from the step-4 checkpoint and finish: the same state as a straight run.
        restored = manager.restore(lf.TrainState.create(model, lf.optim.adamw(1e-2)))
        assert restored is not None and restored.step == 4
        for ls in lf.loop(
            _train_step(model), restored, data, max_steps=6, compile=False, donate=donate
        ):
            last = ls
        assert last is not None and last.step == 6
        straight[donate] = last.state
    _assert_one_rounding_apart(straight[False], straight[True])  # in place: torch's arithmetic
    fitted = lf.fit(
        lf.build(_train_step(model), compile=False, donate=True),
        lf.TrainState.create(model, lf.optim.adamw(1e-2)),
        data,
        max_steps=6,
        default_root_dir=tmp_path / "runs",
        enable_progress_bar=False,
    )
    _assert_states_equal(straight[True], fitted.state)


@pytest.mark.parametrize("how", ["loop", "fit", "fit plain step", "loop LoopState"])
def test_loop_and_fit_consume_the_callers_state_that_their_donating_steps_write(
    tmp_path: Path, how: str
) -> None:
    # Before: the loop's first step wrote into the caller's tensors through other state objects
    # (prepared, placed on the device), so the caller's `state` stayed readable and showed the
    # final weights with step 0: a second run from it trained on silently (and
    # `fit(plain_step, donate=True)` refused to run at all).
    model = _model()
    state = lf.TrainState.create(model, lf.optim.adamw(1e-2))
    given: Any = lf.LoopState(state=state) if how == "loop LoopState" else state
    step = _train_step(model)
    if how.startswith("loop"):
        runs = list(lf.loop(step, given, _batches(3), max_steps=3, compile=False, donate=True))
        final = runs[-1]
    else:
        built = step if how == "fit plain step" else lf.build(step, compile=False, donate=True)
        options = {"compile": False, "donate": True} if how == "fit plain step" else {}
        final = lf.fit(built, state, _batches(3), max_steps=3, default_root_dir=tmp_path,
                       enable_progress_bar=False, **options)  # fmt: skip
    assert final.step == 3
    with pytest.raises(lf.DonatedStateError, match="donated to `train_step`"):
        _ = state.params["0.weight"]
    plain = list(lf.loop(step, lf.TrainState.create(model, lf.optim.adamw(1e-2)), _batches(3),
                         max_steps=3, compile=False))[-1]  # fmt: skip
    _assert_one_rounding_apart(plain.state, final.state)


def test_the_tuners_never_consume_the_callers_state() -> None:
    model = _model()
    step = lf.build(_train_step(model), compile=False, donate=True)
    state = lf.TrainState.create(model, lf.optim.adamw(1e-3))
    before = [t.clone() for t in lf.tree_leaves(state)]
    lf.tune.lr_find(step, state, _batches(4) * 3, num_training=12, skip_begin=1, skip_end=1)
    lf.tune.find_batch_size(
        step,
        state,
        lambda n: (torch.randn(n, 6), torch.randint(0, 3, (n,))),
        max_memory=2**30,
        max_batch_size=8,
        steps_per_trial=1,
    )
    for old, now in zip(before, lf.tree_leaves(state), strict=True):
        assert torch.equal(old, now)
    step(state, _batches(1)[0])  # still the caller's to donate


@pytest.mark.compiled
def test_compiled_donating_step_reuses_the_storage_and_matches_the_pure_one() -> None:
    pure, pure_metrics = _run(compile=True, donate=False)
    model = _model()
    step = lf.build(_train_step(model), compile=True, donate=True)
    state = lf.TrainState.create(model, lf.optim.adamw(1e-2, weight_decay=0.1))
    pointers = [t.data_ptr() for t in lf.tree_leaves(state)]
    seen = []
    for batch in _batches():
        state, metrics = step(state, batch)
        seen.append({k: float(v) for k, v in metrics.items()})
    # Every parameter, moment and the step count stayed in the storage they were created in.
    assert [t.data_ptr() for t in lf.tree_leaves(state)] == pointers
    _assert_states_equal(pure, state)
    assert seen == pure_metrics
    assert [m["step"] for m in seen] == [0.0, 1.0, 2.0, 3.0, 4.0]


@dataclasses.dataclass(frozen=True)
class _Pair:
    a: torch.Tensor
    b: torch.Tensor


lf.register_dataclass(_Pair)


@pytest.mark.compiled
def test_compiled_donation_skips_what_cannot_be_donated() -> None:
    # The same tensor twice, a leaf whose shape changes and one returned as it is.
    def step_fn(state: dict[str, Any], batch: torch.Tensor) -> Any:
        pair = state["pair"]
        new = {
            "pair": _Pair(a=pair.a + batch, b=pair.b * 2),
            "grow": torch.cat([state["grow"], batch[:1]]),
            "same": state["same"],
        }
        return new, {"sum": pair.a.sum()}

    step = lf.build(step_fn, compile=True, donate=True, validate=False)
    shared = torch.ones(3)
    same = torch.zeros(2)
    state = {"pair": _Pair(a=shared, b=shared), "grow": torch.zeros(1), "same": same}
    new, metrics = step(state, torch.full((3,), 5.0))
    assert torch.equal(shared, torch.ones(3))  # written twice would be wrong: not donated
    assert torch.equal(new["pair"].a, torch.full((3,), 6.0))
    assert torch.equal(new["pair"].b, torch.full((3,), 2.0))
    assert new["grow"].shape == (2,)
    assert new["same"] is same
    assert float(metrics["sum"]) == 3.0


@pytest.mark.compiled
def test_compiled_donating_step_keeps_the_first_call_checks() -> None:
    model = _model()

    def ignores_params(state: lf.TrainState, batch: Any) -> Any:
        x, y = batch

        def loss_fn(params: dict[str, torch.Tensor]) -> torch.Tensor:
            return torch.nn.functional.cross_entropy(model(x), y) + 0 * sum(
                p.sum() for p in params.values()
            )

        loss, grads = lf.value_and_grad(loss_fn)(state.params)
        return state.apply_gradients(grads), {"loss": loss}

    step = lf.build(ignores_params, compile=True, donate=True)
    state = lf.TrainState.create(model, lf.optim.sgd(0.1))
    with pytest.raises(ValueError, match="the loss does not depend on the parameters"):
        step(state, _batches(1)[0])


@pytest.mark.compiled
def test_compiled_donation_with_accumulation_matches_the_pure_step() -> None:
    pure, pure_metrics = _run(compile=True, donate=False, accumulate_grad_batches=2)
    donated, donated_metrics = _run(compile=True, donate=True, accumulate_grad_batches=2)
    _assert_states_equal(pure, donated)
    assert pure_metrics == donated_metrics
