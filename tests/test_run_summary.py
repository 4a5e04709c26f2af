"""The end-of-run summary: why the run stopped, best and final metrics, time split, files."""

import io

import pytest
import torch
from helpers import make_data, make_model, make_steps

import lightfunc as lf
from lightfunc.callbacks import RunSummary, summarize_run


def _setup(seed=0):
    model = make_model(seed)
    train_step, eval_step = make_steps(model)
    state = lf.TrainState.create(model, lf.optim.sgd(0.1), seed=0)
    return train_step, eval_step, state


def _last(*args, **kwargs):
    states = list(lf.loop(*args, **kwargs))
    return states[-1]


DATA = make_data(n=96, batch_size=32)  # 3 batches per epoch


def test_summarize_run_says_which_limit_stopped_a_loop():
    train_step, _, state = _setup()
    last = _last(train_step, state, DATA, max_epochs=2, compile=False)
    report = summarize_run(last, max_epochs=2)
    assert report.stopped == "max_epochs=2 reached"
    assert (report.step, report.epoch) == (6, 1)
    assert str(report).splitlines()[0] == "Run stopped at step 6 (epoch 1): max_epochs=2 reached"
    assert report.train["loss"] == pytest.approx(float(last.metrics["loss"]))
    assert summarize_run(last).stopped.startswith("the loop ended (give the summary its limits")
    last = _last(train_step, state, DATA, max_steps=4, compile=False)
    assert summarize_run(last, max_steps=4).stopped == "max_steps=4 reached"
    assert summarize_run(last).times == {}  # a function of the state: nothing timed


def test_early_stopping_is_reported_with_its_reason_and_the_best_value():
    train_step, eval_step, state = _setup()
    stopper = lf.callbacks.EarlyStopping("val_loss", patience=1, stopping_threshold=10.0)
    last = _last(
        train_step,
        state,
        DATA,
        max_epochs=5,
        eval_step=eval_step,
        eval_data=DATA,
        callbacks=[stopper],
        compile=False,
    )
    assert last.step == 3  # the first evaluation is below the threshold
    report = summarize_run(last, max_epochs=5, callbacks=[stopper])
    assert report.stopped.startswith("early stopping: val_loss = ")
    assert "reached the stopping threshold 10.0" in report.stopped
    # Without the callback object, its state in the last LoopState still says so.
    assert summarize_run(last, max_epochs=5).stopped.startswith("early stopping (EarlyStopping[")
    assert report.validation["val_loss"] == pytest.approx(float(last.eval_metrics["loss"]))
    assert report.eval_at_step == 3


def test_run_summary_tracks_the_best_value_and_its_step(capsys):
    train_step, eval_step, state = _setup()
    out = io.StringIO()
    summary = RunSummary(monitor="val_loss", mode="min", max_epochs=4, stream=out)
    values = []

    class Record(lf.callbacks.Callback):
        def on_step_end(self, ls):
            if ls.evaluated:
                values.append((float(ls.eval_metrics["loss"]), ls.step, ls.epoch))

    _last(
        train_step,
        state,
        DATA,
        max_epochs=4,
        eval_step=eval_step,
        eval_data=DATA,
        callbacks=[Record(), summary],
        compile=False,
    )
    best = min(values)
    assert summary.report.best == ("val_loss", best[0], best[1], best[2])
    text = out.getvalue()
    assert f"best        val_loss={best[0]:.4g} at step {best[1]} (epoch {best[2]})" in text
    assert text.startswith("Run stopped at step 12 (epoch 3): max_epochs=4 reached")
    times = summary.report.times
    assert set(times) == {"compile", "train", "eval", "checkpoints", "total"}
    assert times["compile"] == 0.0 and times["checkpoints"] == 0.0  # eager, no manager
    assert sum(times[k] for k in ("compile", "train", "eval", "checkpoints")) == pytest.approx(
        times["total"]
    )


def test_run_summary_times_evaluation_and_checkpoints_when_wrapped(tmp_path):
    train_step, eval_step, state = _setup()
    manager = lf.CheckpointManager(tmp_path / "ckpt", every_n_steps=1)
    summary = RunSummary(callbacks=[manager], stream=io.StringIO())
    _last(
        train_step,
        state,
        DATA,
        max_epochs=1,
        eval_step=eval_step,
        eval_data=summary.timed_eval_data(DATA),
        callbacks=[*summary.timed_callbacks([manager]), summary],
        compile=False,
    )
    times = summary.report.times
    assert times["eval"] > 0 and times["checkpoints"] > 0  # measured, not assumed
    assert ("checkpoints", str(tmp_path / "ckpt")) in summary.report.paths


def test_a_signal_is_reported_as_the_reason(tmp_path):
    train_step, _, state = _setup()
    out = io.StringIO()
    manager = lf.CheckpointManager(tmp_path / "ckpt")
    summary = RunSummary(max_epochs=3, callbacks=[manager], stream=out)

    class Preempt(lf.callbacks.Callback):
        def on_step_end(self, ls):
            if ls.step == 2:
                import os
                import signal

                os.kill(os.getpid(), signal.SIGTERM)

    last = _last(
        train_step,
        state,
        DATA,
        max_epochs=3,
        callbacks=[Preempt(), manager, summary],
        compile=False,
    )
    assert last.step == 2
    assert "stopped by a signal (SIGTERM, SIGINT or SIGUSR1)" in out.getvalue()
    assert "(the last completed step was checkpointed)" in out.getvalue()


def test_fit_prints_why_it_stopped_and_where_everything_went(tmp_path, capsys):
    train_step, eval_step, state = _setup()
    lf.fit(
        train_step,
        state,
        DATA,
        max_epochs=3,
        eval_step=eval_step,
        eval_data=DATA,
        default_root_dir=tmp_path,
        compile=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    out = capsys.readouterr().out
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("Run stopped"))
    report = lines[start:]
    assert report[0] == "Run stopped at step 9 (epoch 2): max_epochs=3 reached"
    labels = [line.split()[0] for line in report[1:]]
    assert labels[:3] == ["train", "validation", "time"]
    assert f"  logs        {tmp_path / 'version_0' / 'logs'}" in report
    assert f"  checkpoints {tmp_path / 'version_0' / 'checkpoints'}" in report
    if lf.loggers._tensorboard_logger.tensorboard_available():
        assert report[-1].strip() == f"tensorboard tensorboard --logdir {tmp_path}"


def test_fit_reports_ctrl_c_and_exceptions_before_they_propagate(tmp_path, capsys):
    model = make_model()
    train_step, _ = make_steps(model)
    state = lf.TrainState.create(model, lf.optim.sgd(0.1), seed=0)

    def failing(after, error):
        calls = []

        def step(state, batch):
            calls.append(1)
            if len(calls) > after:
                raise error
            return train_step(state, batch)

        return step

    for error, expected in [
        (KeyboardInterrupt(), "interrupted by Ctrl-C (KeyboardInterrupt)"),
        (RuntimeError("boom"), "the step raised RuntimeError: boom"),
    ]:
        with pytest.raises(type(error)):
            lf.fit(
                failing(2, error),
                state,
                DATA,
                max_epochs=2,
                default_root_dir=tmp_path,
                compile=False,
                enable_progress_bar=False,
                enable_model_summary=False,
            )
        out = capsys.readouterr().out
        assert f"Run stopped at step 2 (epoch 0): {expected}" in out


def test_barebones_fit_prints_no_summary(tmp_path, capsys):
    train_step, _, state = _setup()
    lf.fit(train_step, state, DATA, barebones=True, compile=False, default_root_dir=tmp_path)
    assert "Run stopped" not in capsys.readouterr().out


def test_fit_logs_the_learning_rate_of_a_schedule_and_the_hparams(tmp_path):
    model = make_model()
    train_step, _ = make_steps(model)
    schedule = lf.optim.cosine_decay_schedule(0.1, decay_steps=6)
    state = lf.TrainState.create(model, lf.optim.adamw(schedule), seed=0)
    logger = lf.loggers.CSVLogger(tmp_path, log_every_n_steps=1)
    lf.fit(
        train_step,
        state,
        DATA,
        max_epochs=2,
        logger=logger,
        hparams={"lr": 0.1},
        compile=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        default_root_dir=tmp_path,
    )
    rows = logger.metrics_file.read_text().splitlines()
    assert rows[0].split(",")[-1] == "lr"
    lrs = [float(row.split(",")[-1]) for row in rows[1:]]
    expected = [float(schedule(torch.tensor(step))) for step in range(6)]
    assert lrs == pytest.approx(expected)
    assert logger.hparams == {"lr": 0.1, "max_epochs": 2}


def test_run_summary_errors():
    with pytest.raises(ValueError, match=r"`mode` must be 'min' or 'max', got 'best'"):
        RunSummary(monitor="val_loss", mode="best")  # type: ignore[arg-type]
