import io

import pytest
import torch
from helpers import DEVICE_READS, make_data, make_model, make_steps

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
    seen = [(ts.step, ts.epoch, ts.batch_idx) for ts in lf.loop(step, state, data, max_epochs=2)]
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
    assert [ts.step for ts in lf.loop(step, state, data)] == [1, 2, 3, 4]
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
    assert [ts.step for ts in states if ts.evaluated] == [4, 8]
    assert set(states[-1].eval_metrics) == {"loss", "acc"}
    states = list(
        lf.loop(step, state, data, max_epochs=2, eval_step=evaluate, eval_data=data, eval_every=3)
    )
    assert [ts.step for ts in states if ts.evaluated] == [3, 4, 6, 8]


def test_evaluation_also_runs_when_max_steps_ends_the_run_mid_epoch():
    step, evaluate, state = _setup()
    data = make_data(n=100, batch_size=32)
    states = list(lf.loop(step, state, data, max_steps=2, eval_step=evaluate, eval_data=data))
    assert [ts.step for ts in states if ts.evaluated] == [2]


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
    for ts in lf.loop(step, state, data, **kwargs):
        first.append(ts)
        if ts.step == stop_at:
            break
    resumed = list(lf.loop(step, first[-1], data, **kwargs))
    assert [ts.step for ts in first + resumed] == [ts.step for ts in straight]
    assert [ts.step for ts in first + resumed if ts.evaluated] == [
        ts.step for ts in straight if ts.evaluated
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

    for name in DEVICE_READS:
        monkeypatch.setattr(torch.Tensor, name, forbidden)
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
    bar = lf.ProgressBar(total=8, log_every_n_steps=2, stream=stream)
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


def test_trainer_state_replace_rejects_unknown_fields():
    ts = lf.TrainerState(state=None)
    assert ts.replace(step=3).step == 3 and ts.step == 0
    with pytest.raises(TypeError, match=r"TrainerState has no field\(s\) \['steps'\]"):
        ts.replace(steps=3)


def test_epoch_end_marks_the_last_step_of_each_epoch():
    step, _, state = _setup()
    flags = [
        ts.epoch_end for ts in lf.loop(step, state, make_data(n=100, batch_size=32), max_epochs=2)
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
