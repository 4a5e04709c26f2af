"""Gradient accumulation: n micro-batches, one update, equal to one step on the whole batch."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from helpers import make_data, make_model, make_steps

import lightfunc as lf
from lightfunc.testing import assert_trees_close

# float32: the accumulated gradient is a weighted sum of n partial means instead
# of one mean, a few roundings apart; Adam then divides by sqrt(v), which can
# amplify a 1e-8 gradient difference to ~1e-7 in the parameters.
ATOL = RTOL = 1e-6


def whole_batch(n_rows: int = 30) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = make_data(n=n_rows, batch_size=n_rows)[0]
    return x, y


def train(n: int, steps: int = 5, *, compile: bool = False, **build_kwargs: Any) -> Any:
    model = make_model(batchnorm=False)
    train_step, _ = make_steps(model)
    step = lf.build(train_step, compile=compile, accumulate_grad_batches=n, **build_kwargs)
    state = lf.TrainState.create(model, lf.optim.adamw(1e-2, weight_decay=1e-2), seed=None)
    batch = whole_batch()
    history = []
    for _ in range(steps):
        state, metrics = step(state, batch)
        history.append(metrics)
    return state, history


@pytest.mark.parametrize("n", [2, 3, 4])  # 30 rows: 4 gives uneven chunks of 8, 8, 7, 7
def test_accumulated_step_equals_one_step_on_the_whole_batch(n):
    reference, ref_metrics = train(1)
    state, metrics = train(n)
    assert int(state.step) == int(reference.step) == 5
    assert_trees_close(state.params, reference.params, atol=ATOL, rtol=RTOL)
    assert_trees_close(state.opt_state, reference.opt_state, atol=ATOL, rtol=RTOL)
    # The loss metric is the micro-batch losses weighted by their rows: the whole-batch mean.
    for m, r in zip(metrics, ref_metrics, strict=True):
        torch.testing.assert_close(m["loss"], r["loss"], atol=ATOL, rtol=RTOL)


def test_buffers_update_on_every_micro_batch():
    model = make_model(batchnorm=True)
    train_step, _ = make_steps(model)
    step = lf.build(train_step, compile=False, accumulate_grad_batches=3)
    state = lf.TrainState.create(model, lf.optim.sgd(0.1), seed=None)
    state, _ = step(state, whole_batch())
    assert int(state.buffers["1.num_batches_tracked"]) == 3 and int(state.step) == 1


def test_micro_batches_leave_the_inputs_alone_and_keep_the_rng_stream():
    """Dropout draws differ per micro-batch, and the key advances once per update."""
    model = make_model(batchnorm=False, dropout=0.5)
    train_step, _ = make_steps(model)
    step = lf.build(train_step, compile=False, accumulate_grad_batches=2)
    state = lf.TrainState.create(model, lf.optim.sgd(0.1), seed=3)
    batch = whole_batch()
    a, _ = step(state, batch)
    b, _ = step(state, batch)
    assert_trees_close(a.params, b.params, atol=0, rtol=0)  # reproducible
    assert a.rng.counter == state.rng.counter + 1


@pytest.mark.compiled
def test_compiled_accumulation_matches_eager_and_stops_compiling():
    eager, _ = train(4, steps=3)
    before = lf.compile_counts()["graphs"]
    compiled, _ = train(4, steps=3, compile=True)
    # Chunks of 8 rows without and with an accumulator, of 7 rows with one,
    # and the last chunk: four graphs, built in the first step, none after.
    assert lf.compile_counts()["graphs"] - before == 4
    assert_trees_close(compiled.params, eager.params, atol=ATOL, rtol=RTOL)


def test_accumulation_under_bf16_mixed_keeps_fp32_master_weights():
    state, metrics = train(2, steps=2, precision="bf16-mixed")
    reference, _ = train(1, steps=2, precision="bf16-mixed")
    assert state.params["0.weight"].dtype == torch.float32
    # bf16 matmuls: 8 bits of mantissa, so compare loosely.
    assert_trees_close(state.params, reference.params, atol=2e-2, rtol=2e-2)
    assert metrics[-1]["loss"].dtype == torch.float32


def test_a_batch_shorter_than_n_is_one_row_per_micro_batch_and_one_whole_batch_update():
    # An epoch's short last batch: before, a ValueError ended the run at the first epoch end.
    model = make_model(batchnorm=False)
    train_step, _ = make_steps(model)
    state = lf.TrainState.create(model, lf.optim.adamw(1e-2))
    x, y = whole_batch()
    accumulated, metrics = lf.build(train_step, compile=False, accumulate_grad_batches=4)(
        state, (x[:3], y[:3])
    )
    plain, plain_metrics = lf.build(train_step, compile=False)(state, (x[:3], y[:3]))
    assert int(accumulated.step) == 1
    assert_trees_close(accumulated.params, plain.params, atol=1e-6, rtol=1e-6)
    assert_trees_close(metrics["loss"], plain_metrics["loss"], atol=1e-6, rtol=1e-6)


def test_accumulation_errors_say_what_to_change():
    model = make_model(batchnorm=False)
    train_step, _ = make_steps(model)
    for bad in (0, -2, 1.5, True):
        with pytest.raises(ValueError, match="`accumulate_grad_batches` must be a positive int"):
            lf.build(train_step, accumulate_grad_batches=bad)
    state = lf.TrainState.create(model, lf.optim.sgd(0.1))
    step = lf.build(train_step, compile=False, accumulate_grad_batches=4)
    x, y = whole_batch()
    with pytest.raises(ValueError, match=r"sizes \[29, 30\]"):
        step(state, (x, y[:29]))

    def no_update(state: lf.TrainState, batch: Any) -> Any:
        return state, {}

    step = lf.build(no_update, compile=False, accumulate_grad_batches=2)
    with pytest.raises(TypeError, match="never called it"):
        step(state, (x, y))

    def two_updates(state: lf.TrainState, batch: Any) -> Any:
        grads = {k: torch.ones_like(v) for k, v in state.params.items()}
        return state.apply_gradients(grads).apply_gradients(grads), {}

    step = lf.build(two_updates, compile=False, accumulate_grad_batches=2)
    with pytest.raises(RuntimeError, match="called twice in one step"):
        step(state, (x, y))
    step = lf.build(train_step, compile=False, accumulate_grad_batches=2)
    with pytest.raises(TypeError, match="holds none"):
        step({"params": state.params}, (x, y))


def test_loop_counts_updates_not_micro_batches():
    model = make_model(batchnorm=False)
    train_step, _ = make_steps(model)
    step = lf.build(train_step, compile=False, accumulate_grad_batches=2)
    state = lf.TrainState.create(model, lf.optim.sgd(0.1))
    data = make_data(n=64, batch_size=16)
    last = list(lf.loop(step, state, data, accelerator="cpu"))[-1]
    assert last.step == 4 and int(last.state.step) == 4


def fp16_step(model: torch.nn.Module) -> Any:
    """The helpers' classification step, scaling its loss as a float16 step does."""

    def train_step(state: lf.TrainState, batch: Any) -> Any:
        x, y = batch

        def loss_fn(params: dict[str, torch.Tensor]) -> torch.Tensor:
            logits, _ = lf.apply(model, params, state.buffers, x, train=True)
            return torch.nn.functional.cross_entropy(logits, y)

        loss, grads = lf.value_and_grad(loss_fn, loss_scale=state.loss_scale)(state.params)
        return state.apply_gradients(grads), {"loss": loss}

    return train_step


def fp16_run(n: int, batches: list[Any]) -> tuple[Any, list[Any]]:
    model = make_model(batchnorm=False)
    step = lf.build(
        fp16_step(model), compile=False, precision="16-mixed", accumulate_grad_batches=n
    )
    scale = lf.LossScale.create(1024.0, growth_interval=2)
    state = step.prepare(
        lf.TrainState.create(model, lf.optim.adamw(1e-2), seed=None, loss_scale=scale)
    )
    history = []
    for batch in batches:
        state, metrics = step(state, batch)
        history.append(metrics)
    return state, history


def test_16_mixed_accumulation_equals_one_step_on_the_whole_batch():
    """Loss scaling x accumulation: the same updates, skips and scale as the whole batch.

    The second batch has a NaN in its last rows, so one micro-batch's
    gradients are NaN: the whole update is skipped once (not per
    micro-batch) and the scale halves once, as for the whole batch."""
    x, y = whole_batch()
    poisoned = x.clone()
    poisoned[-3:] = float("nan")
    batches = [(x, y), (poisoned, y), (x, y), (x, y), (x, y)]
    reference, ref_metrics = fp16_run(1, batches)
    for n in (2, 3):
        state, metrics = fp16_run(n, batches)
        assert int(state.step) == int(reference.step) == 5
        assert int(state.loss_scale.skipped) == int(reference.loss_scale.skipped) == 1
        # 1024, halved once at the skip (512), doubled after the next 2 good steps (1024).
        assert float(state.loss_scale.scale) == float(reference.loss_scale.scale) == 1024.0
        assert [float(m["skipped_steps"]) for m in metrics] == [0.0, 1.0, 1.0, 1.0, 1.0]
        assert [float(m["loss_scale"]) for m in metrics] == [
            float(m["loss_scale"]) for m in ref_metrics
        ]
        # float16 forward and backward on different row chunks: a few fp16 roundings apart.
        assert_trees_close(state.params, reference.params, atol=2e-3, rtol=2e-3)
