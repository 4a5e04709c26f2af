import io
import json
import os
import signal
from typing import Any

import pytest
import torch
from helpers import DEVICE_READS, is_cpu_count, make_data, make_model, make_steps

import lightfunc as lf
from lightfunc.testing import assert_trees_close


def _setup(dropout=0.0):
    model = make_model(dropout=dropout)
    train_step, eval_step = make_steps(model)
    state = lf.TrainState.create(model, lf.optim.adamw(1e-2), seed=0)
    return lf.build(train_step, compile=False), lf.build_eval(eval_step, compile=False), state


def test_counters_follow_steps_and_epochs():
    step, _, state = _setup()
    data = make_data(n=100, batch_size=32)  # 4 batches
    seen = [(ls.step, ls.epoch, ls.batch_idx) for ls in lf.loop(step, state, data, max_epochs=2)]
    assert seen == [
        (1, 0, 1),
        (2, 0, 2),
        (3, 0, 3),
        (4, 0, 4),
        (5, 1, 1),
        (6, 1, 2),
        (7, 1, 3),
        (8, 1, 4),
    ]


def test_one_epoch_by_default_and_max_steps_stops_mid_epoch():
    step, _, state = _setup()
    data = make_data(n=100, batch_size=32)
    assert [ls.step for ls in lf.loop(step, state, data)] == [1, 2, 3, 4]
    last = list(lf.loop(step, state, data, max_steps=6, max_epochs=10))[-1]
    assert (last.step, last.epoch, last.batch_idx) == (6, 1, 2)
    assert int(last.state.step) == 6


def test_limit_train_batches_as_count_and_fraction():
    step, _, state = _setup()
    data = make_data(n=128, batch_size=16)  # 8 batches
    assert len(list(lf.loop(step, state, data, limit_train_batches=3))) == 3
    assert len(list(lf.loop(step, state, data, limit_train_batches=0.5, max_epochs=2))) == 8


def test_evaluation_runs_at_each_epoch_end_and_every_n_steps():
    step, evaluate, state = _setup()
    data = make_data(n=100, batch_size=32)
    states = list(lf.loop(step, state, data, max_epochs=2, eval_step=evaluate, eval_data=data))
    assert [ls.step for ls in states if ls.evaluated] == [4, 8]
    assert set(states[-1].eval_metrics) == {"loss", "acc"}
    states = list(
        lf.loop(step, state, data, max_epochs=2, eval_step=evaluate, eval_data=data, eval_every=3)
    )
    assert [ls.step for ls in states if ls.evaluated] == [3, 4, 6, 8]


def test_evaluation_also_runs_when_max_steps_ends_the_run_mid_epoch():
    step, evaluate, state = _setup()
    data = make_data(n=100, batch_size=32)
    states = list(lf.loop(step, state, data, max_steps=2, eval_step=evaluate, eval_data=data))
    assert [ls.step for ls in states if ls.evaluated] == [2]


def test_fast_dev_run_runs_one_train_and_one_eval_batch():
    step, evaluate, state = _setup()
    calls = []
    data = make_data(n=100, batch_size=32)

    def counting_eval(state, batch):
        calls.append(batch[0].shape[0])
        return evaluate(state, batch)

    states = list(
        lf.loop(
            step,
            state,
            data,
            max_epochs=5,
            fast_dev_run=True,
            eval_step=counting_eval,
            eval_data=data,
        )
    )
    assert len(states) == 1 and states[0].evaluated and calls == [32]
    assert len(list(lf.loop(step, state, data, fast_dev_run=3))) == 3


def test_eval_step_given_as_a_plain_function_is_built_like_the_train_step():
    step, evaluate, state = _setup()
    data = make_data()
    last = list(lf.loop(step, state, data, eval_step=evaluate.fn, eval_data=data))[-1]
    assert last.evaluated


def test_evaluate_weights_batches_by_size():
    _, evaluate, state = _setup()
    data = make_data(n=100, batch_size=32)
    x = torch.cat([b[0] for b in data])
    y = torch.cat([b[1] for b in data])
    whole = evaluate(state, (x, y))
    batched = lf.evaluate(evaluate, state, data)
    torch.testing.assert_close(batched["acc"], whole["acc"], rtol=0, atol=1e-7)
    torch.testing.assert_close(batched["loss"], whole["loss"], rtol=1e-6, atol=1e-6)


def test_predict_returns_each_batchs_outputs_in_order():
    model = make_model()
    state = lf.TrainState.create(model, lf.optim.sgd(0.1))
    data = [b[0] for b in make_data(n=70, batch_size=32)]
    forward = lf.build_eval(
        lambda s, x: lf.apply(model, s.params, s.buffers, x, train=False)[0], compile=False
    )
    outs = lf.predict(forward, state, data)
    assert [o.shape for o in outs] == [(32, 3), (32, 3), (6, 3)]
    torch.testing.assert_close(outs[2], model.eval()(data[2]), rtol=0, atol=0)


@pytest.mark.parametrize("stop_at", [2, 4, 5])  # mid-epoch, epoch end, first batch of an epoch
def test_breaking_out_and_resuming_gives_the_same_run(stop_at):
    step, evaluate, state = _setup(dropout=0.3)
    data = make_data(n=100, batch_size=32)
    kwargs = dict(max_epochs=3, eval_step=evaluate, eval_data=data)
    straight = list(lf.loop(step, state, data, **kwargs))
    first = []
    for ls in lf.loop(step, state, data, **kwargs):
        first.append(ls)
        if ls.step == stop_at:
            break
    resumed = list(lf.loop(step, first[-1], data, **kwargs))
    assert [ls.step for ls in first + resumed] == [ls.step for ls in straight]
    assert [ls.step for ls in first + resumed if ls.evaluated] == [
        ls.step for ls in straight if ls.evaluated
    ]
    assert_trees_close(resumed[-1].state, straight[-1].state)
    assert (resumed[-1].epoch, resumed[-1].batch_idx) == (
        straight[-1].epoch,
        straight[-1].batch_idx,
    )


def test_the_loop_never_reads_tensors_back_per_step(monkeypatch):
    step, evaluate, state = _setup(dropout=0.1)
    data = make_data(n=100, batch_size=32)
    list(lf.loop(step, state, data, max_steps=1))  # first call validates; measure the steady state

    def forbidden(*args, **kwargs):
        raise AssertionError("the loop synchronised with the device")

    real_item = torch.Tensor.item

    def item(tensor: torch.Tensor) -> Any:
        if is_cpu_count(tensor):  # a host read, not a device one (see the helper)
            return real_item(tensor)
        return forbidden()

    for name in DEVICE_READS:
        monkeypatch.setattr(torch.Tensor, name, item if name == "item" else forbidden)
    states = list(lf.loop(step, state, data, max_epochs=3, eval_step=evaluate, eval_data=data))
    monkeypatch.undo()
    assert len(states) == 12 and states[-1].evaluated


def test_set_epoch_is_called_on_samplers_that_have_it():
    class Sampler:
        def __init__(self):
            self.epochs = []

        def set_epoch(self, epoch):
            self.epochs.append(epoch)

        def __iter__(self):
            return iter(range(4))

        def __len__(self):
            return 4

    sampler = Sampler()
    dataset = torch.utils.data.TensorDataset(torch.randn(4, 8), torch.zeros(4, dtype=torch.long))
    loader = torch.utils.data.DataLoader(dataset, batch_size=2, sampler=sampler)
    step, _, state = _setup()
    list(lf.loop(step, state, loader, max_epochs=3))
    assert sampler.epochs == [0, 1, 2]


def test_a_dataloader_works_as_train_data():
    step, evaluate, state = _setup()
    dataset = torch.utils.data.TensorDataset(*map(torch.cat, zip(*make_data(n=64), strict=True)))
    loader = torch.utils.data.DataLoader(dataset, batch_size=16)
    last = list(lf.loop(step, state, loader, max_epochs=2, eval_step=evaluate, eval_data=loader))[
        -1
    ]
    assert last.step == 8 and last.evaluated


def test_fit_drives_the_loop_to_the_end_and_shows_plain_progress_off_a_terminal():
    step, evaluate, state = _setup()
    data = make_data(n=100, batch_size=32)
    stream = io.StringIO()
    bar = lf.callbacks.ProgressBar(total=8, log_every_n_steps=2, stream=stream)
    list(
        lf.loop(
            step, state, data, max_epochs=2, eval_step=evaluate, eval_data=data, callbacks=[bar]
        )
    )
    lines = stream.getvalue().splitlines()
    assert "\r" not in stream.getvalue()
    assert len(lines) == 4 and lines[-1].startswith("epoch 1 step 8/8") and "val_acc=" in lines[-1]
    final = lf.fit(step, state, data, max_epochs=2, barebones=True)
    assert final.step == 8 and final.epoch == 1


# -- argument errors -------------------------------------------------------------


def test_eval_step_and_eval_data_go_together():
    step, evaluate, state = _setup()
    with pytest.raises(ValueError, match="`eval_step` and `eval_data` go together"):
        lf.loop(step, state, make_data(), eval_step=evaluate)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"max_steps": 0}, ValueError, r"`max_steps` must be a positive int or None, got 0"),
        ({"max_epochs": 1.5}, ValueError, r"`max_epochs` must be a positive int"),
        ({"eval_every": True}, ValueError, r"`eval_every` must be a positive int"),
        ({"limit_train_batches": 0}, ValueError, r"`limit_train_batches` as a count must be >= 1"),
        ({"limit_train_batches": 1.5}, ValueError, r"as a fraction must be in \(0, 1\]"),
        ({"limit_eval_batches": "all"}, TypeError, r"`limit_eval_batches` must be an int"),
        ({"fast_dev_run": -1}, ValueError, r"`fast_dev_run` must be a bool or a positive int"),
        ({"accelerator": "tpu"}, ValueError, r"`accelerator` must be one of"),
        ({"devices": 2}, ValueError, r"`devices=2`: a single process uses one device"),
    ],
)
def test_bad_loop_arguments_are_rejected_before_any_step(kwargs, error, match):
    step, _, state = _setup()
    with pytest.raises(error, match=match):
        lf.loop(step, state, make_data(), **kwargs)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_asking_for_a_gpu_without_one_says_so():
    step, _, state = _setup()
    with pytest.raises(
        ValueError, match=r"`accelerator='gpu'` was asked for but CUDA is not available"
    ):
        lf.loop(step, state, make_data(), accelerator="gpu")


def test_empty_data_is_reported():
    step, _, state = _setup()
    with pytest.raises(ValueError, match="`train_data` yielded no batches"):
        list(lf.loop(step, state, []))
    with pytest.raises(ValueError, match="`data` yielded no batches to evaluate"):
        lf.evaluate(lambda s, b: {}, state, [])


def test_a_fractional_limit_needs_data_with_a_length():
    step, _, state = _setup()
    with pytest.raises(
        TypeError, match=r"`limit_train_batches=0.5` is a fraction, but the data has no len\(\)"
    ):
        list(lf.loop(step, state, iter(make_data()), limit_train_batches=0.5))


def test_loop_rejects_an_eval_step_as_the_train_step():
    _, evaluate, state = _setup()
    with pytest.raises(TypeError, match=r"`step` must be a train step"):
        lf.loop(evaluate, state, make_data())


def test_loop_rejects_a_train_step_as_the_eval_step():
    step, _, state = _setup()
    with pytest.raises(TypeError, match=r"`eval_step` must be built with lightfunc.build_eval"):
        lf.loop(step, state, make_data(), eval_step=step, eval_data=make_data())


def test_loop_state_replace_rejects_unknown_fields():
    ls = lf.LoopState(state=None)
    assert ls.replace(step=3).step == 3 and ls.step == 0
    with pytest.raises(TypeError, match=r"LoopState has no field\(s\) \['steps'\]"):
        ls.replace(steps=3)


def test_epoch_end_marks_the_last_step_of_each_epoch():
    step, _, state = _setup()
    flags = [
        ls.epoch_end for ls in lf.loop(step, state, make_data(n=100, batch_size=32), max_epochs=2)
    ]
    assert flags == [False, False, False, True] * 2


def test_a_failing_step_saves_the_last_completed_state_before_raising(tmp_path):
    step, _, state = _setup()
    calls = []

    def failing(state, batch):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("boom")
        return step.fn(state, batch)

    manager = lf.CheckpointManager(tmp_path, every_n_steps=100, save_on_exception=True)
    with pytest.raises(RuntimeError, match="boom"):
        list(lf.loop(lf.build(failing, compile=False), state, make_data(), checkpoint=manager))
    restored = manager.restore(state)
    assert restored is not None and restored.step == 2
    index = (tmp_path / "index.json").read_text()
    assert '"reason": "exception"' in index


def test_without_save_on_exception_a_failing_step_writes_nothing(tmp_path):
    _, _, state = _setup()
    manager = lf.CheckpointManager(tmp_path, every_n_steps=100)

    def failing(state, batch):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        list(
            lf.loop(
                lf.build(failing, compile=False, validate=False),
                state,
                make_data(),
                checkpoint=manager,
            )
        )
    assert manager.latest() is None


def test_checkpoint_must_be_a_manager():
    step, _, state = _setup()
    with pytest.raises(
        TypeError, match=r"`checkpoint` must be a lightfunc.CheckpointManager, got str"
    ):
        lf.loop(step, state, make_data(), checkpoint="runs/x")


# -- interrupts: SIGTERM and exceptions go to the callbacks' `on_interrupt` --------------


class Interrupts(lf.callbacks.Callback):
    """Records every `on_interrupt` and `on_end`, and what SIGTERM's handler is during the run."""

    def __init__(self):
        self.events = []

    def on_interrupt(self, ls, reason):
        self.events.append((reason, ls.step))

    def on_end(self, ls):
        self.events.append(("end", ls.step))


def _sigterm_at(states, step):
    """Iterate the loop, sending this process SIGTERM (as a preemption does) at `step`."""
    seen = []
    for ls in states:
        seen.append(ls)
        if ls.step == step:
            os.kill(os.getpid(), signal.SIGTERM)
    return seen


def _failing_at(step_fn, call):
    calls = []

    def failing(state, batch):
        calls.append(1)
        if len(calls) == call:
            raise RuntimeError("boom")
        return step_fn(state, batch)

    return lf.build(failing, compile=False)


@pytest.mark.parametrize("how", ["checkpoint", "callbacks"])
def test_sigterm_saves_the_last_completed_step_and_stops_cleanly(tmp_path, how):
    step, _, state = _setup()
    manager = lf.CheckpointManager(tmp_path, every_n_steps=100)
    recorder = Interrupts()
    if how == "checkpoint":
        passed = {"checkpoint": manager, "callbacks": [recorder]}
    else:
        passed = {"callbacks": [manager, recorder]}
    before = signal.getsignal(signal.SIGTERM)
    seen = _sigterm_at(lf.loop(step, state, make_data(), max_epochs=5, **passed), step=2)
    assert [ls.step for ls in seen] == [1, 2]
    assert recorder.events == [("sigterm", 2), ("end", 2)]
    index = json.loads((tmp_path / "index.json").read_text())["checkpoints"]
    assert [(e["step"], e["reason"]) for e in index] == [(2, "sigterm")]
    restored = manager.restore(state)
    assert restored is not None and restored.step == 2
    assert_trees_close(restored.state, seen[-1].state)
    assert signal.getsignal(signal.SIGTERM) is before  # the loop's handler is gone again


class FailsAt(lf.callbacks.Callback):
    """Raises from `hook` at step 3."""

    def __init__(self, hook):
        self.hook, self.step = hook, 0

    def _maybe_fail(self, hook, step):
        if hook == self.hook and step == 3:
            raise RuntimeError("boom")

    def extra_metrics(self, ls):
        self.step = ls.step
        self._maybe_fail("extra_metrics", ls.step)
        return {}

    def on_step(self, ls):
        self._maybe_fail("on_step", ls.step)

    def state_dict(self):
        self._maybe_fail("state_dict", self.step)
        return {"step": self.step}

    def on_step_end(self, ls):
        self._maybe_fail("on_step_end", ls.step)


@pytest.mark.parametrize("hook", ["extra_metrics", "on_step", "state_dict", "on_step_end"])
def test_a_failing_callback_is_named_and_the_others_save_its_step(tmp_path, hook):
    step, _, state = _setup()
    manager = lf.CheckpointManager(tmp_path, every_n_steps=100, save_on_exception=True)
    recorder, failing = Interrupts(), FailsAt(hook)
    with pytest.raises(RuntimeError, match="boom") as raised:
        list(lf.loop(step, state, make_data(), callbacks=[recorder, failing, manager]))
    assert raised.value.__notes__ == [
        f"Raised by the callback FailsAt, in `{hook}` at step 3; the other callbacks were "
        f"told (`on_interrupt(ls, 'exception')`)."
    ]
    assert recorder.events == [("exception", 3)]  # and none for the failing callback
    restored = manager.restore(state, callbacks=[FailsAt(None)])
    reference = list(lf.loop(step, state, make_data(), max_steps=3))[-1]
    assert restored is not None and restored.step == 3
    assert_trees_close(restored.state, reference.state)
    index = json.loads((tmp_path / "index.json").read_text())["checkpoints"]
    assert [(e["step"], e["reason"]) for e in index] == [(3, "exception")]


def test_sigterm_is_caught_only_while_a_callback_handles_interrupts():
    step, _, state = _setup()
    before = signal.getsignal(signal.SIGTERM)
    handlers = {}
    for name, callbacks in [("none", []), ("handler", [Interrupts()])]:
        for _ in lf.loop(step, state, make_data(), max_steps=1, callbacks=callbacks):
            handlers[name] = signal.getsignal(signal.SIGTERM)
    assert handlers["none"] is before
    assert handlers["handler"] is not before
    assert signal.getsignal(signal.SIGTERM) is before


def test_a_custom_callback_gets_both_interrupt_reasons_with_the_last_completed_step():
    step, _, state = _setup()
    on_sigterm = Interrupts()
    _sigterm_at(lf.loop(step, state, make_data(), max_epochs=5, callbacks=[on_sigterm]), step=3)
    assert on_sigterm.events == [("sigterm", 3), ("end", 3)]
    on_error = Interrupts()
    with pytest.raises(RuntimeError, match="boom"):
        list(lf.loop(_failing_at(step.fn, 3), state, make_data(), callbacks=[on_error]))
    assert on_error.events == [("exception", 2)]  # no on_end: the exception propagates


def test_a_step_failing_before_any_step_completed_interrupts_nobody():
    step, _, state = _setup()
    recorder = Interrupts()
    with pytest.raises(RuntimeError, match="boom"):
        list(lf.loop(_failing_at(step.fn, 1), state, make_data(), callbacks=[recorder]))
    assert recorder.events == []


def test_checkpoint_is_shorthand_for_the_manager_as_a_callback(tmp_path):
    step, evaluate, state = _setup()
    data = make_data(n=100, batch_size=32)
    runs = {}
    for how in ("checkpoint", "callbacks"):
        manager = lf.CheckpointManager(tmp_path / how, every_n_steps=3, monitor="val_loss")
        passed = {"checkpoint": manager} if how == "checkpoint" else {"callbacks": [manager]}
        kwargs = dict(max_epochs=2, eval_step=evaluate, eval_data=data)
        last = list(lf.loop(step, state, data, **kwargs, **passed))[-1]
        index = json.loads((tmp_path / how / "index.json").read_text())
        runs[how] = (
            last,
            manager,
            [(e["path"], e["step"], e["reason"]) for e in index["checkpoints"]],
        )
    (a, manager_a, index_a), (b, manager_b, index_b) = runs["checkpoint"], runs["callbacks"]
    assert index_a == index_b and index_a
    assert_trees_close(a.state, b.state)
    assert_trees_close(manager_a.restore(state).state, manager_b.restore(state).state)


def test_a_manager_passed_both_ways_is_refused(tmp_path):
    step, _, state = _setup()
    manager = lf.CheckpointManager(tmp_path)
    with pytest.raises(ValueError, match=r"two callbacks share the state key 'CheckpointManager\["):
        lf.loop(step, state, make_data(), checkpoint=manager, callbacks=[manager])


# -- evaluate: each metric combined by its reduction --------------------------------------


def _metric_zoo(state, batch):
    x, _ = batch
    return {
        "mean_x": x.mean(),  # float: mean over examples
        "examples": torch.tensor(x.shape[0]),  # int: summed
        "big": (x.abs() > 3.5).any(),  # bool: any
        "worst": x.abs().max(),  # float, declared "max" below
    }


def test_evaluate_combines_each_metric_by_its_reduction():
    _, _, state = _setup()
    data = make_data(n=100, batch_size=32)
    x = torch.cat([b[0] for b in data])
    declared = lf.build_eval(_metric_zoo, compile=False, metric_reductions={"worst": "max"})
    out = lf.evaluate(declared, state, data)
    assert out["examples"].dtype == torch.int64 and int(out["examples"]) == 100
    assert out["big"].dtype == torch.bool and bool(out["big"]) == bool((x.abs() > 3.5).any())
    torch.testing.assert_close(out["mean_x"], x.mean(), rtol=1e-6, atol=1e-6)
    assert float(out["worst"]) == float(x.abs().max())
    # Undeclared, the same float metric is a mean over examples instead.
    default = lf.evaluate(lf.build_eval(_metric_zoo, compile=False), state, data)
    sizes = torch.tensor([b[0].shape[0] for b in data], dtype=torch.float32)
    maxima = torch.stack([b[0].abs().max() for b in data])
    torch.testing.assert_close(default["worst"], (maxima * sizes).sum() / sizes.sum())


# -- build options are set in one place, the build -----------------------------------------


@pytest.mark.parametrize(
    "option",
    [
        {"precision": "bf16-mixed"},
        {"compile": False},
        {"accumulate_grad_batches": 2},
        {"skip_nonfinite": True},
        {"strategy": "ddp"},
    ],
)
def test_build_options_with_an_already_built_step_are_refused(option):
    step, _, state = _setup()
    name, value = next(iter(option.items()))
    with pytest.raises(
        ValueError, match=rf"`step` is already built .*`{name}={value!r}`.* lightfunc.build"
    ):
        lf.loop(step, state, make_data(), **option)
    with pytest.raises(ValueError, match=rf"already built .*`{name}={value!r}`"):
        lf.fit(step, state, make_data(), barebones=True, **option)


def test_build_options_build_a_plain_step_and_its_plain_eval_step():
    model = make_model()
    train_step, eval_step = make_steps(model)
    state = lf.TrainState.create(model, lf.optim.adamw(1e-2), seed=0)
    data = make_data(n=64)
    last = list(
        lf.loop(train_step, state, data, compile=False, precision="bf16-true",
                eval_step=eval_step, eval_data=data, accelerator="cpu")
    )[-1]  # fmt: skip
    assert last.state.params["0.weight"].dtype == torch.bfloat16 and last.evaluated
    assert (
        last.eval_metrics["loss"].dtype == torch.bfloat16
    )  # built with the train step's precision
    assert isinstance(last.strategy, lf.SingleProcess)


def test_the_loop_holds_one_state_while_the_caller_has_it():
    """While a LoopState is yielded, no earlier state is kept alive by the generator."""
    import gc
    import weakref

    model = make_model(batchnorm=False)
    train_step, _ = make_steps(model)
    step = lf.build(train_step, compile=False)
    state = lf.TrainState.create(model, lf.optim.sgd(0.1), seed=None)
    data = make_data(n=96, batch_size=16)
    refs = []
    for ls in lf.loop(step, state, data, accelerator="cpu"):
        refs.append(weakref.ref(ls.state.params["0.weight"]))
        gc.collect()
        alive = [r for r in refs[:-1] if r() is not None]
        assert alive == [], f"step {ls.step}: {len(alive)} earlier states still alive"
    del state
