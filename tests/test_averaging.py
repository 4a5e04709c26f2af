"""Weight averaging (`lf.optim.ema`, `lf.optim.swa`) against torch.optim.swa_utils.AveragedModel.

The references feed lightfunc's own parameter trajectory into an
`AveragedModel` after every optimizer step (what a torch training loop
does), so the comparisons check the averaging alone. Tolerance: 1e-6
absolute and relative in float32 (the eager CPU path uses torch's own
`_foreach_lerp`, so it is bit-identical in practice; compiled code may
contract the lerp into a fused multiply-add, one rounding apart per step).
"""

from __future__ import annotations

import collections
from typing import Any

import pytest
import torch
from helpers import make_data, make_model, make_steps
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn, get_swa_multi_avg_fn

import lightfunc as lf
from lightfunc.testing import assert_trees_close

TOL = {"atol": 1e-6, "rtol": 1e-6}


def _apply_step(state: lf.TrainState, grads: dict[str, torch.Tensor]) -> Any:
    """A train step whose batch is the gradients: the optimizer and the average, nothing else."""
    return state.apply_gradients(grads), {"step": state.step.float()}


def _gradients(steps: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    shapes = {n: p.shape for n, p in make_model(batchnorm=False).named_parameters()}
    return [{n: torch.randn(s, generator=g) for n, s in shapes.items()} for _ in range(steps)]


def _trajectory_run(
    tx: lf.optim.GradientTransformation,
    steps: int,
    *,
    compile: bool = False,
    on_step: Any = None,
) -> lf.TrainState:
    """`steps` updates of the helper MLP's parameters, calling `on_step(state)` after each."""
    step = lf.build(_apply_step, compile=compile)
    state = lf.TrainState.create(make_model(batchnorm=False), tx)
    for grads in _gradients(steps):
        state, _ = step(state, grads)
        if on_step is not None:
            on_step(state)
    return state


def _reference(state_params: dict[str, torch.Tensor], averaged: AveragedModel) -> None:
    """What a torch loop does after `optimizer.step()`: `averaged.update_parameters(model)`."""
    model = make_model(batchnorm=False)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(state_params[name])
    averaged.update_parameters(model)


def _averaged_dict(averaged: AveragedModel) -> dict[str, torch.Tensor]:
    return {n: p.detach() for n, p in averaged.module.named_parameters()}


def _check_against_torch(
    tx: lf.optim.GradientTransformation,
    averaged: AveragedModel,
    name: str,
    *,
    steps: int,
    compile: bool = False,
    every: Any = None,
    exact: bool = True,
) -> lf.TrainState:
    k = 0

    def on_step(state: lf.TrainState) -> None:
        nonlocal k
        k += 1
        if every is None or every(k):
            _reference(state.params, averaged)

    state = _trajectory_run(tx, steps, compile=compile, on_step=on_step)
    # Eagerly on the CPU the README says bit for bit (EMA, warm-up, SWA's multi-tensor average).
    tol = TOL if compile or not exact else {"atol": 0, "rtol": 0}
    assert_trees_close(lf.optim.averaged_params(state, name), _averaged_dict(averaged), **tol)
    found = lf.optim.averaged_params(state, name)
    assert not torch.equal(found["0.weight"], state.params["0.weight"])  # it is an average
    return state


@pytest.mark.parametrize("decay", [0.9, 0.999])
def test_ema_matches_averaged_model_with_get_ema_multi_avg_fn(decay):
    averaged = AveragedModel(make_model(batchnorm=False), multi_avg_fn=get_ema_multi_avg_fn(decay))
    state = _check_against_torch(
        lf.optim.ema(lf.optim.adamw(1e-2), decay), averaged, "ema", steps=150
    )
    average = lf.optim.averaged_params(state)  # "ema" is the default name
    assert int(averaged.n_averaged) == 150
    assert int(state.opt_state.count) == 150 and int(state.opt_state.step) == 150
    # The eager CPU path is torch's own kernel: bit-identical, not just close.
    assert_trees_close(average, _averaged_dict(averaged), atol=0, rtol=0)


def _warmup_avg_fn(decay: float) -> Any:
    def avg_fn(avg: torch.Tensor, p: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
        d = min(decay, (1 + int(n)) / (10 + int(n)))
        return torch.lerp(avg, p, 1 - d)

    return avg_fn


@pytest.mark.compiled
def test_compiled_averages_match_averaged_model_and_compile_once(fresh_dynamo):
    """EMA, EMA with warm-up and SWA (from update 30, every 7), nested, in one compiled step."""
    tx = lf.optim.ema(lf.optim.adamw(1e-2), 0.95)
    tx = lf.optim.ema(tx, 0.99, warmup=True, name="ema_warm")
    tx = lf.optim.swa(tx, start=30, every=7)
    references = {
        "ema": AveragedModel(make_model(batchnorm=False), multi_avg_fn=get_ema_multi_avg_fn(0.95)),
        "ema_warm": AveragedModel(make_model(batchnorm=False), avg_fn=_warmup_avg_fn(0.99)),
        "swa": AveragedModel(make_model(batchnorm=False)),
    }
    k = 0

    def on_step(state: lf.TrainState) -> None:
        nonlocal k
        k += 1
        for name, averaged in references.items():
            if name != "swa" or (k >= 30 and (k - 30) % 7 == 0):
                _reference(state.params, averaged)

    state = _trajectory_run(tx, 120, compile=True, on_step=on_step)
    for name, averaged in references.items():
        assert_trees_close(lf.optim.averaged_params(state, name), _averaged_dict(averaged), **TOL)
    assert int(references["swa"].n_averaged) == 13
    assert lf.compile_counts()["graphs"] == 1  # the counts and the weights are tensors


def test_ema_warmup_matches_averaged_model_with_the_warmup_rule():
    averaged = AveragedModel(make_model(batchnorm=False), avg_fn=_warmup_avg_fn(0.99))
    tx = lf.optim.ema(lf.optim.adamw(1e-2), 0.99, warmup=True)
    _check_against_torch(tx, averaged, "ema", steps=100)


def test_ema_decay_schedule_is_a_function_of_the_average_count():
    def schedule(n: torch.Tensor) -> torch.Tensor:
        return torch.where(n < 20, 0.5, 0.95)

    def avg_fn(avg: torch.Tensor, p: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
        return torch.lerp(avg, p, 1 - (0.5 if int(n) < 20 else 0.95))

    averaged = AveragedModel(make_model(batchnorm=False), avg_fn=avg_fn)
    _check_against_torch(
        lf.optim.ema(lf.optim.sgd(0.1), schedule), averaged, "ema", steps=60, exact=False
    )


@pytest.mark.parametrize("multi", [True, False], ids=["get_swa_multi_avg_fn", "default"])
@pytest.mark.parametrize(("start", "every"), [(1, 1), (30, 7)])
def test_swa_matches_averaged_model_default_average(start, every, multi):
    # Bit for bit against the multi-tensor SWA average; AveragedModel's own default on the CPU
    # (`get_swa_avg_fn`, one tensor at a time) rounds differently (within 3e-8 here).
    kwargs = {"multi_avg_fn": get_swa_multi_avg_fn()} if multi else {}
    averaged = AveragedModel(make_model(batchnorm=False), use_buffers=False, **kwargs)
    tx = lf.optim.swa(lf.optim.sgd(0.1, momentum=0.9), start=start, every=every)
    state = _check_against_torch(
        tx,
        averaged,
        "swa",
        steps=100,
        every=lambda k: k >= start and (k - start) % every == 0,
        exact=multi,
    )
    assert int(state.opt_state.count) == int(averaged.n_averaged)
    assert int(state.opt_state.step) == 100


def test_averages_nest_and_are_found_by_name():
    inner = lf.optim.ema(lf.optim.adamw(1e-2), 0.5, name="ema_fast")
    tx = lf.optim.swa(lf.optim.ema(inner, 0.99), start=10)
    fast = AveragedModel(make_model(batchnorm=False), multi_avg_fn=get_ema_multi_avg_fn(0.5))
    slow = AveragedModel(make_model(batchnorm=False), multi_avg_fn=get_ema_multi_avg_fn(0.99))
    equal = AveragedModel(make_model(batchnorm=False))
    k = 0

    def on_step(state: lf.TrainState) -> None:
        nonlocal k
        k += 1
        for averaged in (fast, slow) + ((equal,) if k >= 10 else ()):
            _reference(state.params, averaged)

    state = _trajectory_run(tx, 40, on_step=on_step)
    for name, averaged in (("ema_fast", fast), ("ema", slow), ("swa", equal)):
        assert_trees_close(lf.optim.averaged_params(state, name), _averaged_dict(averaged), **TOL)


def test_the_average_is_a_copy_of_the_params_before_any_update():
    state = lf.TrainState.create(make_model(batchnorm=False), lf.optim.ema(lf.optim.sgd(0.1)))
    average = lf.optim.averaged_params(state)
    assert_trees_close(average, state.params, atol=0, rtol=0)
    # Own storage: a checkpoint stores both, and nothing aliases the params.
    assert all(average[n].data_ptr() != p.data_ptr() for n, p in state.params.items())


# ---------------------------------------------------------------------------
# Checkpoints and resume: the average is optimizer state, saved with no new code.


def _last(states: Any) -> lf.LoopState:
    """The last state a loop yields."""
    return collections.deque(states, maxlen=1)[0]


def _fresh_state() -> lf.TrainState:
    tx = lf.optim.swa(lf.optim.ema(lf.optim.adamw(1e-2), 0.9, warmup=True), start=5, every=3)
    return lf.TrainState.create(make_model(batchnorm=False), tx)


def _loop_run(max_steps: int, start: Any, checkpoint: Any = None) -> lf.LoopState:
    step = lf.build(_apply_step, compile=False)
    return _last(lf.loop(step, start, _gradients(8), max_steps=max_steps, checkpoint=checkpoint))


def test_averages_are_checkpointed_and_resume_bit_exactly(tmp_path):
    """Save mid-epoch with a CheckpointManager, restore into a fresh state, finish: bit-identical."""
    uninterrupted = _loop_run(23, _fresh_state())
    manager = lf.CheckpointManager(tmp_path, every_n_steps=11)
    half = _loop_run(11, _fresh_state(), checkpoint=manager)
    resumed = manager.restore(_fresh_state())
    assert resumed is not None and resumed.step == 11
    assert_trees_close(resumed.state.opt_state, half.state.opt_state, atol=0, rtol=0)
    finished = _loop_run(23, resumed)
    assert finished.step == 23
    for field in ("params", "opt_state", "step"):
        a, b = getattr(finished.state, field), getattr(uninterrupted.state, field)
        assert_trees_close(a, b, atol=0, rtol=0)
    for name in ("ema", "swa"):
        a = lf.optim.averaged_params(finished.state, name)
        b = lf.optim.averaged_params(uninterrupted.state, name)
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert int(finished.state.opt_state.count) == 7  # after updates 5, 8, 11, 14, 17, 20, 23
    assert int(finished.state.opt_state.inner.count) == 23


# ---------------------------------------------------------------------------
# What counts as an update: deferred micro-batches, skipped non-finite updates.


def test_accumulated_micro_batches_are_averaged_once_per_update():
    model = make_model(batchnorm=False)
    train_step, _ = make_steps(model)
    step = lf.build(train_step, compile=False, accumulate_grad_batches=2)
    state = lf.TrainState.create(model, lf.optim.ema(lf.optim.adamw(1e-2), 0.9))
    averaged = AveragedModel(make_model(batchnorm=False), multi_avg_fn=get_ema_multi_avg_fn(0.9))
    for batch in make_data(n=320):
        state, _ = step(state, batch)
        _reference(state.params, averaged)
    assert int(state.step) == 10 and int(state.opt_state.count) == 10
    assert_trees_close(lf.optim.averaged_params(state), _averaged_dict(averaged), **TOL)


def test_a_deferred_update_passes_none_through():
    tx = lf.optim.ema(lf.optim.accumulate_gradients(lf.optim.sgd(0.1)))
    params = {"w": torch.ones(2)}
    inner = lf.optim.sgd(0.1).init(params)
    state = lf.optim.AverageState(
        inner=lf.optim.AccumulationState(inner=inner, acc=None, weight=torch.tensor(0.5)),
        average={"w": torch.ones(2)},
        count=torch.tensor(0),
        step=torch.tensor(0),
    )
    updates, new = tx.update({"w": torch.ones(2)}, state, params)
    assert updates is None
    assert int(new.count) == 0 and int(new.step) == 0 and new.inner.acc is not None


def _nan_at_step_3(tx: lf.optim.GradientTransformation, **create: Any) -> list[lf.TrainState]:
    state = lf.TrainState.create({"w": torch.zeros(3)}, tx, **create)
    states = []
    for i in range(5):
        grad = torch.full((3,), float("nan") if i == 2 else -1.0)
        state = state.apply_gradients({"w": grad})
        states.append(state)
    return states


@pytest.mark.parametrize("inside", [False, True])
def test_a_skipped_nonfinite_update_is_not_averaged(inside):
    """`apply_if_finite` around the average (what skip_nonfinite installs) or inside it: same result."""
    if inside:
        scale = lf.LossScale.fixed()
        tx = lf.optim.ema(lf.optim.apply_if_finite(lf.optim.sgd(1.0), scale), 0.5)
        states = _nan_at_step_3(tx)
    else:
        states = _nan_at_step_3(lf.optim.ema(lf.optim.sgd(1.0), 0.5), skip_nonfinite=True)
    average = lf.optim.AverageState
    found = [lf.optim._averaging.find_average(s.opt_state, "ema") for s in states]
    assert all(isinstance(f, average) for f in found)
    assert [int(f.count) for f in found] == [1, 2, 2, 3, 4]
    assert [int(f.step) for f in found] == [1, 2, 2, 3, 4]
    # params 1, 2, 2 (skipped), 3, 4; ema(0.5): 1, 1.5, 1.5, 2.25, 3.125
    values = [float(f.average["w"][0]) for f in found]
    assert values == [1.0, 1.5, 1.5, 2.25, 3.125]
    assert all(torch.isfinite(f.average["w"]).all() for f in found)


def test_skipped_updates_do_not_count_towards_swa_start():
    states = _nan_at_step_3(lf.optim.swa(lf.optim.sgd(1.0), start=3), skip_nonfinite=True)
    found = lf.optim._averaging.find_average(states[-1].opt_state, "swa")
    # Applied updates give params 1, 2, 3, 4; from the 3rd applied one on: mean(3, 4).
    assert int(found.step) == 4 and int(found.count) == 2
    assert found.average["w"].tolist() == [3.5, 3.5, 3.5]


# ---------------------------------------------------------------------------
# Frozen and unused parameters, precision.


def test_frozen_params_have_no_average_and_come_back_as_they_are():
    model = make_model(batchnorm=False)
    model[0].weight.requires_grad_(False)
    state = lf.TrainState.create(model, lf.optim.ema(lf.optim.adamw(1e-2), 0.9))
    assert isinstance(state.opt_state.average["0.weight"], lf.optim.MaskedNode)
    for grads in _gradients(3):
        state = state.apply_gradients(grads)
    average = lf.optim.averaged_params(state)
    assert average["0.weight"] is state.params["0.weight"]
    assert not torch.equal(average["3.weight"], state.params["3.weight"])


def test_a_param_without_gradient_keeps_its_average_that_step():
    params = {"used": torch.zeros(2), "idle": torch.zeros(2)}
    state = lf.TrainState.create(params, lf.optim.ema(lf.optim.sgd(1.0), 0.5))
    state = state.apply_gradients({"used": -torch.ones(2), "idle": -torch.ones(2)})
    state = state.apply_gradients({"used": -torch.ones(2), "idle": torch.zeros(2)})
    assert state.params["idle"].tolist() == [1.0, 1.0]  # left alone, as torch.optim leaves it
    average = lf.optim.averaged_params(state)
    assert average["used"].tolist() == [1.5, 1.5]
    assert average["idle"].tolist() == [1.0, 1.0]


def test_bf16_averages_match_averaged_model_on_a_bf16_model():
    model = make_model(batchnorm=False).to(torch.bfloat16)
    state = lf.TrainState.create(model, lf.optim.ema(lf.optim.sgd(0.05), 0.9))
    averaged = AveragedModel(
        make_model(batchnorm=False).to(torch.bfloat16), multi_avg_fn=get_ema_multi_avg_fn(0.9)
    )
    torch.manual_seed(0)
    for _ in range(20):
        grads = {n: torch.randn_like(p) for n, p in state.params.items()}
        state = state.apply_gradients(grads)
        reference = make_model(batchnorm=False).to(torch.bfloat16)
        with torch.no_grad():
            for n, p in reference.named_parameters():
                p.copy_(state.params[n])
        averaged.update_parameters(reference)
    average = lf.optim.averaged_params(state)
    assert average["0.weight"].dtype == torch.bfloat16
    assert_trees_close(average, _averaged_dict(averaged), atol=0, rtol=0)


def test_with_precision_casts_the_average_with_the_optimizer_state():
    state = lf.TrainState.create(make_model(batchnorm=False), lf.optim.ema(lf.optim.adam(1e-3)))
    half = state.with_precision("16-true")
    assert lf.optim.averaged_params(half)["0.weight"].dtype == torch.float16
    assert half.loss_scale is not None  # apply_if_finite wraps the averaged optimizer


# ---------------------------------------------------------------------------
# Evaluation with the average.


def _trained(steps: int = 6) -> tuple[Any, lf.TrainState]:
    model = make_model()
    train_step, eval_step = make_steps(model)
    step = lf.build(train_step, compile=False)
    eval_step = lf.build_eval(eval_step, compile=False)
    state = lf.TrainState.create(model, lf.optim.ema(lf.optim.adamw(3e-2), 0.8))
    for batch in make_data()[:steps]:
        state, _ = step(state, batch)
    return eval_step, state


def test_evaluate_with_the_ema_weights_swaps_the_params_in():
    eval_step, state = _trained()
    data = make_data(seed=7)
    by_name = lf.evaluate(eval_step, state, data, weights="ema", device=torch.device("cpu"))
    by_hand = lf.evaluate(eval_step, state.replace(params=lf.optim.averaged_params(state)), data)
    plain = lf.evaluate(eval_step, state, data)
    assert_trees_close(by_name, by_hand, atol=0, rtol=0)
    assert float(by_name["loss"]) != float(plain["loss"])
    assert_trees_close(lf.evaluate(eval_step, state, data, weights="params"), plain, atol=0, rtol=0)
    # A LoopState works too, and predict takes the same option.
    ls = lf.LoopState(state=state)
    assert_trees_close(lf.evaluate(eval_step, ls, data, weights="ema"), by_name, atol=0, rtol=0)
    out = lf.predict(eval_step, state, data[:1], weights="ema")
    assert_trees_close(
        out[0], eval_step(state.replace(params=lf.optim.averaged_params(state)), data[0])
    )


def test_evaluate_swaps_only_the_states_that_keep_the_average():
    _, with_ema = _trained()
    plain = lf.TrainState.create(make_model(seed=3), lf.optim.sgd(0.1))
    both = {"a": with_ema, "b": plain}
    swapped = lf._evaluate.with_weights(both, "ema")
    assert swapped["b"] is plain
    assert swapped["a"].params["0.weight"] is with_ema.opt_state.average["0.weight"]


def test_evaluate_errors_name_the_missing_average():
    eval_step, state = _trained(1)
    data = make_data()
    with pytest.raises(ValueError, match=r"`weights='swa'`.*keeps 'ema'.*lightfunc.optim.swa"):
        lf.evaluate(eval_step, state, data, weights="swa")
    plain = lf.TrainState.create(make_model(), lf.optim.sgd(0.1))
    with pytest.raises(ValueError, match=r"no average called 'ema' \(it keeps none\)"):
        lf.evaluate(eval_step, plain, data, weights="ema")
    with pytest.raises(ValueError, match=r"`weights` must be 'params' or the name of an average"):
        lf.predict(eval_step, state, data, weights=None)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------
# Argument errors.


def test_argument_errors_say_what_to_pass():
    sgd = lf.optim.sgd(0.1)
    with pytest.raises(TypeError, match=r"`tx` must be a lightfunc.optim GradientTransformation"):
        lf.optim.ema(torch.optim.SGD, 0.9)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"`tx` must be .*lightfunc.optim.swa\("):
        lf.optim.swa(None, start=1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"`decay` must be .*1.5.*0.999"):
        lf.optim.ema(sgd, 1.5)
    with pytest.raises(TypeError, match=r"`decay` must be a Python float, got Tensor"):
        lf.optim.ema(sgd, torch.tensor(0.9))  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"`warmup` must be a bool, got int"):
        lf.optim.ema(sgd, warmup=1)  # type: ignore[arg-type]
    for bad in ("params", "two words", "", 3):
        with pytest.raises(ValueError, match=r"`name` must be an identifier other than 'params'"):
            lf.optim.ema(sgd, name=bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"`start` must be a positive int, got 0"):
        lf.optim.swa(sgd, start=0)
    with pytest.raises(ValueError, match=r"`every` must be a positive int, got 2.5"):
        lf.optim.swa(sgd, start=1, every=2.5)  # type: ignore[arg-type]


def test_update_without_params_and_accessor_errors():
    tx = lf.optim.ema(lf.optim.sgd(0.1))
    params = {"w": torch.zeros(2)}
    with pytest.raises(TypeError, match=r"lightfunc.optim.ema .* needs them: call `tx.update"):
        tx.update({"w": torch.ones(2)}, tx.init(params))
    with pytest.raises(TypeError, match=r"`state` must be a TrainState .* got dict"):
        lf.optim.averaged_params(params)  # type: ignore[arg-type]
    state = lf.TrainState.create(params, lf.optim.swa(lf.optim.sgd(0.1), start=1))
    with pytest.raises(
        ValueError, match=r"`name='ema'`: .* no average called 'ema' \(it keeps 'swa'\)"
    ):
        lf.optim.averaged_params(state)


def test_loop_and_fit_evaluate_with_eval_weights():
    model = make_model()
    train_step, eval_step = make_steps(model)
    step = lf.build(train_step, compile=False)
    eval_step = lf.build_eval(eval_step, compile=False)
    state = lf.TrainState.create(model, lf.optim.ema(lf.optim.adamw(3e-2), 0.8))
    data, val = make_data(n=96), make_data(seed=7)
    ls = _last(lf.loop(step, state, data, eval_step=eval_step, eval_data=val, eval_weights="ema"))
    assert ls.eval_metrics is not None
    expected = lf.evaluate(eval_step, ls, val, weights="ema")
    assert_trees_close(ls.eval_metrics, expected, atol=0, rtol=0)
    assert float(expected["loss"]) != float(lf.evaluate(eval_step, ls, val)["loss"])
    final = lf.fit(
        step, state, data, eval_step=eval_step, eval_data=val, eval_weights="ema", barebones=True
    )
    assert_trees_close(final.eval_metrics, expected, atol=0, rtol=0)


def test_loop_eval_weights_errors_come_before_the_first_step():
    model = make_model()
    train_step, eval_step = make_steps(model)
    step = lf.build(train_step, compile=False)
    state = lf.TrainState.create(model, lf.optim.ema(lf.optim.adamw(3e-2)))
    data = make_data()
    with pytest.raises(
        ValueError, match=r"`eval_weights='swa'`: the state's optimizer keeps no average"
    ):
        lf.loop(step, state, data, eval_step=eval_step, eval_data=data, eval_weights="swa")
    with pytest.raises(ValueError, match=r"`eval_weights='ema'` was given without `eval_step`"):
        lf.loop(step, state, data, eval_weights="ema")


def test_docstring_examples_run():
    import doctest

    from lightfunc.optim import _averaging

    result = doctest.testmod(_averaging, extraglobs={"lf": lf})
    assert result.attempted >= 3 and result.failed == 0


# ---------------------------------------------------------------------------
# Sharded: under FSDP the average is sharded like the moments, with no code of its own.


def _fsdp_rank(mesh: Any, compile: bool) -> dict[str, float]:
    """One rank of a 2-process FSDP run with EMA and SWA vs one eager process."""
    import fsdp_worker as worker

    import lightfunc.distributed as lfd

    def tx() -> lf.optim.GradientTransformation:
        return lf.optim.swa(lf.optim.ema(worker.optimizer(), 0.9, warmup=True), start=2)

    model = worker.make_net()
    if compile:
        torch._inductor.config.compile_threads = 1  # the ranks share the cores
    step = lf.build(worker.train_step_for(model), compile=compile, strategy=lfd.FSDP(mesh))
    state = step.prepare(lf.TrainState.create(model, tx(), seed=None))
    state, _ = worker.train(step, state, [worker.mine(b, mesh) for b in worker.data()])
    from torch.distributed.tensor import DTensor

    sharded = isinstance(lf.optim.averaged_params(state, "ema")["head.weight"], DTensor)
    full = lfd.gather_state(state)
    reference = lf.TrainState.create(worker.make_net(), tx(), seed=None)
    reference, _ = worker.train(
        lf.build(worker.train_step_for(worker.make_net()), compile=False), reference, worker.data()
    )
    out = {"sharded": float(sharded)}
    for name in ("ema", "swa"):
        ours = lf.optim.averaged_params(full, name)
        out[name] = worker.max_diff(ours, lf.optim.averaged_params(reference, name))
    return out


@pytest.mark.multiprocess
@pytest.mark.slow
@pytest.mark.parametrize("compile", [False, pytest.param(True, marks=pytest.mark.compiled)])
def test_fsdp_shards_the_averages_and_matches_one_process(compile):
    import sys
    from pathlib import Path

    from lightfunc.distributed._spawn import spawn

    sys.path.insert(0, str(Path(__file__).parent / "scripts"))
    for out in spawn(_fsdp_rank, 2, args=(compile,), timeout=480):
        assert out["sharded"] == 1.0, out
        assert out["ema"] <= 1e-6 and out["swa"] <= 1e-6, out


@pytest.mark.parametrize("schedule", [False, True])
def test_eager_updates_read_only_int64_counts_back(monkeypatch, schedule):
    """No value read from a device: on CPU only the 0-d int64 counts, as torch.optim reads its step."""
    decay: Any = (lambda n: torch.where(n < 3, 0.5, 0.9)) if schedule else 0.9
    tx = lf.optim.swa(lf.optim.ema(lf.optim.adamw(1e-2), decay, warmup=True), start=2)
    params = {"w": torch.ones(3, 2), "b": torch.zeros(2)}
    state = tx.init(params)
    real_item = torch.Tensor.item

    def item(tensor: torch.Tensor) -> Any:
        assert tensor.device.type == "cpu" and tensor.ndim == 0 and tensor.dtype == torch.int64
        return real_item(tensor)

    def forbidden(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("a tensor was read back")

    for name in ("tolist", "__bool__", "__float__", "__int__"):
        monkeypatch.setattr(torch.Tensor, name, forbidden)
    monkeypatch.setattr(torch.Tensor, "item", item)
    for _ in range(4):
        updates, state = tx.update({"w": torch.ones(3, 2), "b": torch.ones(2)}, state, params)
        params = lf.optim.apply_updates(params, updates)
    monkeypatch.undo()
    assert int(state.count) == 3 and int(state.inner.count) == 4


@pytest.mark.slow
def test_digits_example_validates_with_the_ema_and_resumes_it(capsys, tmp_path):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
    import digits

    short = [
        "--no-compile",
        "--limit-train-batches",
        "5",
        "--ema",
        "0.9",
        "--run-dir",
        str(tmp_path),
    ]
    digits.main(["--epochs", "1", *short])
    capsys.readouterr()
    accuracy = digits.main(["--epochs", "2", *short, "--resume"])
    out = capsys.readouterr().out
    assert "10 steps (eager)" in out  # the second run only ran epoch 2
    assert not (tmp_path / "version_1").exists()  # resumed in the same version
    line = next(x for x in out.splitlines() if x.startswith("with the EMA weights"))
    assert f"test accuracy {accuracy:.4f}" in line  # validation (and early stopping) used the EMA
