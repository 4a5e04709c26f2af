import math

import pytest
import torch
from helpers import make_data, make_model, make_steps

import lightfunc as lf
from lightfunc.callbacks import Callback, EarlyStopping, ModelCheckpoint


def _setup():
    model = make_model()
    train_step, eval_step = make_steps(model)
    state = lf.TrainState.create(model, lf.optim.adamw(1e-2), seed=0)
    return lf.build(train_step, compile=False), lf.build_eval(eval_step, compile=False), state


def _scripted_eval(values):
    """An eval step whose 'loss' follows `values`, one per evaluation."""
    calls = []

    def eval_step(state, batch):
        calls.append(1)
        return {"loss": torch.tensor(values[len(calls) - 1])}

    return eval_step


class Recorder(Callback):
    def __init__(self, name="r", stop_at=None):
        self.name, self.stop_at, self.events, self.count = name, stop_at, [], 0

    def describe(self):
        return self.name

    def state_dict(self):
        return {"count": self.count}

    def load_state_dict(self, state):
        self.count = state["count"]
        self.events.append(("load", state["count"]))

    def on_start(self, ls):
        self.events.append(("start", ls.step))

    def on_step(self, ls):
        self.count += 1
        self.events.append(("step", ls.step))
        return self.stop_at is not None and ls.step >= self.stop_at

    def on_step_end(self, ls):
        self.events.append(("end_of_step", ls.callbacks[self.state_key]["count"]))

    def on_end(self, ls):
        self.events.append(("end", ls.step))


def test_hooks_run_in_order_and_states_are_collected_before_on_step_end():
    step, _, state = _setup()
    rec = Recorder()
    states = list(lf.loop(step, state, make_data(n=64), callbacks=[rec]))
    assert rec.events == [
        ("start", 0),
        ("step", 1),
        ("end_of_step", 1),
        ("step", 2),
        ("end_of_step", 2),
        ("end", 2),
    ]
    assert states[-1].callbacks == {"Recorder[r]": {"count": 2}}


def test_a_callback_can_stop_the_loop():
    step, _, state = _setup()
    rec = Recorder(stop_at=3)
    states = list(lf.loop(step, state, make_data(), max_epochs=5, callbacks=[rec]))
    assert states[-1].step == 3 and rec.events[-1] == ("end", 3)


def test_callback_state_is_handed_back_on_resume():
    step, _, state = _setup()
    first = list(lf.loop(step, state, make_data(n=64), callbacks=[Recorder()]))
    rec = Recorder()
    list(lf.loop(step, first[-1], make_data(n=64), max_epochs=2, callbacks=[rec]))
    assert rec.events[0] == ("load", 2) and rec.count == 4


def test_two_callbacks_with_one_state_key_are_rejected():
    step, _, state = _setup()
    with pytest.raises(ValueError, match=r"two callbacks share the state key 'Recorder\[a\]'"):
        lf.loop(step, state, make_data(), callbacks=[Recorder("a"), Recorder("a")])
    with pytest.raises(
        TypeError, match=r"callbacks must be lightfunc.callbacks.Callback instances, got str"
    ):
        lf.loop(step, state, make_data(), callbacks=["progress"])


def test_two_early_stoppings_on_different_metrics_do_not_collide():
    assert EarlyStopping("val_loss").state_key != EarlyStopping("val_acc", mode="max").state_key


@pytest.mark.parametrize(
    ("mode", "values", "kwargs", "stop_at_eval"),
    [
        (
            "min",
            [1.0, 0.9, 0.95, 0.92, 0.91, 0.5],
            {"patience": 3},
            5,
        ),  # no new best after 0.9 for 3 checks
        (
            "min",
            [1.0, 0.9, 0.89, 0.88, 0.87, 0.86],
            {"patience": 2, "min_delta": 0.05},
            4,
        ),  # gains < min_delta
        ("max", [0.1, 0.5, 0.4, 0.6, 0.55, 0.58, 0.59], {"patience": 3}, 7),
        ("min", [1.0, 0.5, 0.05, 0.04], {"stopping_threshold": 0.1}, 3),
        ("min", [1.0, 2.0, 7.0, 0.5], {"divergence_threshold": 5.0, "patience": 10}, 3),
        ("min", [1.0, math.nan, 0.5], {"patience": 10}, 2),
    ],
)
def test_early_stopping_stops_at_the_right_evaluation(mode, values, kwargs, stop_at_eval):
    step, _, state = _setup()
    es = EarlyStopping("val_loss", mode=mode, **kwargs)
    data = make_data(n=32)  # one batch per epoch: evaluation k happens at step k
    states = list(
        lf.loop(
            step,
            state,
            data,
            max_epochs=20,
            eval_step=_scripted_eval(values + [0.0] * 20),
            eval_data=data,
            callbacks=[es],
        )
    )
    assert states[-1].step == stop_at_eval and es.stopped_step == stop_at_eval, es.reason


def test_early_stopping_on_a_train_metric_checks_at_epoch_ends():
    step, _, state = _setup()
    es = EarlyStopping(
        "loss", patience=0, mode="max"
    )  # a falling loss never "improves" in max mode
    states = list(lf.loop(step, state, make_data(n=64), max_epochs=5, callbacks=[es]))
    assert states[-1].step == 4 and states[-1].epoch_end  # first check sets best, second stops


def test_early_stopping_names_a_missing_metric():
    step, evaluate, state = _setup()
    with pytest.raises(
        KeyError, match=r"`monitor='val_los'` is not among the evaluation metrics \(acc, loss\)"
    ):
        list(
            lf.loop(
                step,
                state,
                make_data(),
                eval_step=evaluate,
                eval_data=make_data(),
                callbacks=[EarlyStopping("val_los")],
            )
        )


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"mode": "up"}, r"`mode` must be 'min' or 'max', got 'up'"),
        ({"patience": -1}, r"`patience` must be an int >= 0, got -1"),
        ({"min_delta": -0.1}, r"`min_delta` must be >= 0"),
    ],
)
def test_early_stopping_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        EarlyStopping("val_loss", **kwargs)


def test_early_stopping_state_survives_a_checkpoint_and_resume(tmp_path):
    step, _, state = _setup()
    data = make_data(n=32)
    values = [1.0, 0.5, 0.6, 0.7, 0.8, 0.9]  # best at eval 2, patience 3 -> stops at eval 5
    straight = EarlyStopping("val_loss", patience=3)
    done = list(
        lf.loop(
            step,
            state,
            data,
            max_epochs=10,
            eval_step=_scripted_eval(values),
            eval_data=data,
            callbacks=[straight],
        )
    )
    assert done[-1].step == 5

    es = EarlyStopping("val_loss", patience=3)
    ckpt = ModelCheckpoint(tmp_path, every_n_steps=1)
    for ls in lf.loop(
        step,
        state,
        data,
        max_epochs=10,
        eval_step=_scripted_eval(values),
        eval_data=data,
        callbacks=[es, ckpt],
    ):
        if ls.step == 3:
            break
    resumed_es = EarlyStopping("val_loss", patience=3)
    start = ckpt.manager.restore(state, callbacks=[resumed_es])
    assert start is not None and start.callbacks[resumed_es.state_key] == {
        "best": 0.5,
        "wait": 1,
        "stopped_step": -1,
    }
    rest = list(
        lf.loop(
            step,
            start,
            data,
            max_epochs=10,
            eval_step=_scripted_eval(values[3:]),
            eval_data=data,
            callbacks=[resumed_es],
        )
    )
    assert rest[-1].step == 5 and resumed_es.stopped_step == 5


def test_model_checkpoint_keeps_the_top_k_with_templated_names(tmp_path):
    step, _, state = _setup()
    data = make_data(n=32)
    values = [0.9, 0.5, 0.7, 0.2, 0.8]
    ckpt = ModelCheckpoint(
        tmp_path, monitor="val_loss", save_top_k=2, filename="{epoch:02d}-{val_loss:.3f}"
    )
    list(
        lf.loop(
            step,
            state,
            data,
            max_epochs=5,
            eval_step=_scripted_eval(values),
            eval_data=data,
            callbacks=[ckpt],
        )
    )
    assert sorted(p.name for p in tmp_path.glob("*.safetensors")) == [
        "01-0.500.safetensors", "03-0.200.safetensors", "last.safetensors",
    ]  # fmt: skip
    assert ckpt.best_model_path == tmp_path / "03-0.200.safetensors"


def test_learning_rate_monitor_reports_the_rate_each_update_used(tmp_path):
    model = make_model()
    train_step, _ = make_steps(model)
    schedule = lf.optim.linear_schedule(1.0, 0.0, transition_steps=4)
    state = lf.TrainState.create(model, lf.optim.sgd(schedule))
    logger = lf.loggers.CSVLogger(tmp_path, log_every_n_steps=1)
    monitor = lf.callbacks.LearningRateMonitor(schedule)
    states = list(
        lf.loop(
            lf.build(train_step, compile=False),
            state,
            make_data(n=128),
            callbacks=[monitor, logger],
        )
    )
    assert [float(ls.metrics["lr"]) for ls in states] == [1.0, 0.75, 0.5, 0.25]
    rows = (tmp_path / "run" / "metrics.csv").read_text().splitlines()
    assert (
        rows[0].split(",")[:4] == ["step", "epoch", "loss", "lr"]
        and rows[2].split(",")[3] == "0.75"
    )


def test_learning_rate_monitor_checks_its_arguments():
    with pytest.raises(
        TypeError, match=r"`schedule` must be a lightfunc.optim schedule .* got str"
    ):
        lf.callbacks.LearningRateMonitor("cosine")
    monitor = lf.callbacks.LearningRateMonitor(0.1)
    with pytest.raises(
        TypeError, match=r"needs a state with a `step` tensor \(a TrainState\), got dict"
    ):
        monitor.extra_metrics(lf.LoopState(state={"w": torch.zeros(1)}))
    assert float(
        monitor.extra_metrics(
            lf.LoopState(state=lf.TrainState.create({"w": torch.zeros(1)}, lf.optim.sgd(0.1)))
        )["lr"]
    ) == pytest.approx(0.1)


def test_early_stopping_finds_an_evaluation_metric_already_named_val():
    step, _, state = _setup()
    values = iter([1.0, 2.0, 3.0])

    def prefixed_eval(state, batch):
        return {"val_loss": torch.tensor(next(values))}

    es = EarlyStopping("val_loss", patience=1)
    data = make_data(n=32)
    states = list(
        lf.loop(
            step, state, data, max_epochs=3, eval_step=prefixed_eval, eval_data=data, callbacks=[es]
        )
    )
    assert states[-1].step == 2 and es.stopped_step == 2 and es.best == 1.0


def test_callback_is_the_one_class_below_the_loop_and_model_checkpoint_is_a_manager(tmp_path):
    from lightfunc._callback import Callback as CoreCallback

    assert Callback is CoreCallback
    ckpt = ModelCheckpoint(tmp_path, every_n_steps=1)
    assert isinstance(ckpt, lf.CheckpointManager) and ckpt.manager is ckpt
    assert ckpt.state_key == f"ModelCheckpoint[{tmp_path}]" and ckpt.handles_interrupts
    assert ckpt.last_model_path is None and ckpt.best_model_path is None
