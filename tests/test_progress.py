"""ProgressBar: what it shows at 80 columns, stale evaluations, the epoch, compile lines, speed."""

import io

import pytest
import torch
from helpers import make_data, make_model, make_steps

import lightfunc as lf
from lightfunc._compile import CompileEvent, CompileWatch
from lightfunc.callbacks import _progress
from lightfunc.callbacks._progress import ProgressBar


class Terminal(io.StringIO):
    def isatty(self):
        return True


def _states(n, *, eval_steps=(), per_epoch=10):
    """`n` hand-made loop states with train metrics; evaluated at `eval_steps`."""
    out = []
    for step in range(1, n + 1):
        evaluated = step in eval_steps
        out.append(
            lf.LoopState(
                state=None,
                step=step,
                epoch=(step - 1) // per_epoch,
                epoch_end=step % per_epoch == 0,
                metrics={
                    "grad_norm": torch.tensor(3.0),
                    "acc": torch.tensor(0.5),
                    "loss": torch.tensor(1.0 / step),
                },
                eval_metrics={"loss": torch.tensor(2.0), "acc": torch.tensor(0.75)}
                if evaluated
                else None,
                eval_at_step=step if evaluated else -1,
            )
        )
    return out


def _drive(callbacks, states):
    """Call the hooks the way `lf.loop` does, on hand-made states."""
    for cb in callbacks:
        cb.on_start(lf.LoopState(state=None, step=states[0].step - 1))
    last = None
    for ls in states:
        # The loop keeps the last evaluation's metrics on later states.
        if ls.eval_metrics is None and last is not None and last.eval_metrics is not None:
            ls = ls.replace(eval_metrics=last.eval_metrics, eval_at_step=last.eval_at_step)
        for cb in callbacks:
            cb.on_step_end(ls)
        last = ls
    for cb in callbacks:
        cb.on_end(last)


def _lines(text):
    """What a terminal shows, line by line: carriage returns start the line over."""
    return [line for chunk in text.split("\n") for line in chunk.split("\r")]


def test_plain_lines_put_loss_and_the_monitored_metric_first_and_never_repeat_an_evaluation():
    out = io.StringIO()
    bar = ProgressBar(log_every_n_steps=4, stream=out, total=12, monitor="val_acc")
    _drive([bar], _states(12, eval_steps=(6,)))
    lines = out.getvalue().splitlines()
    assert [line.split()[3] for line in lines] == ["4/12", "6/12", "8/12", "12/12"]
    assert lines[0].endswith("loss=0.25 grad_norm=3 acc=0.5")
    # The evaluation's line: loss, the monitored metric, the other evaluation metrics, the rest.
    assert lines[1].endswith("loss=0.1667 val_acc=0.75 val_loss=2 grad_norm=3 acc=0.5")
    assert "val_" not in lines[2] and "val_" not in lines[3]  # not repeated as if new


def test_on_an_80_column_terminal_every_line_fits_and_loss_and_the_monitor_come_first():
    out = Terminal()
    bar = ProgressBar(log_every_n_steps=2, stream=out, total=30, monitor="val_acc", ncols=80)
    _drive([bar], _states(30, eval_steps=(10, 20, 30)))
    lines = [line for line in _lines(out.getvalue()) if line.strip()]
    assert max(len(line) for line in lines) <= 80
    bars = [line for line in lines if "/30" in line]
    assert bars and all(line.startswith("epoch ") for line in bars)
    shown = [line for line in bars if "loss=" in line]
    assert all(line.split("step/s ")[1].startswith("loss=") for line in shown)  # loss first
    assert any("val_acc=0.75" in line for line in bars)  # then the monitored metric
    # Each evaluation also leaves a line above the bar, with all its metrics.
    assert "epoch 0 step 10: val_acc=0.75 val_loss=2" in lines
    assert bar._bar is None  # closed


def test_a_stale_evaluation_on_the_bar_says_where_it_came_from():
    out = Terminal()
    bar = ProgressBar(log_every_n_steps=5, stream=out, total=20, monitor="val_acc", ncols=100)
    _drive([bar], _states(13, eval_steps=(10,)))
    lines = [line for line in _lines(out.getvalue()) if "/20" in line]
    fresh = [line for line in lines if " 10/20 " in line][-1:]  # after its display
    later = [line for line in lines if " 13/20 " in line]  # the bar as it closes
    assert fresh and all("val_acc=0.75" in line and "(e0)" not in line for line in fresh)
    assert later and all("val_acc=0.75 (e0)" in line for line in later)  # end of epoch 0
    # Evaluated mid-epoch: marked with its step.
    out = Terminal()
    bar = ProgressBar(log_every_n_steps=5, stream=out, total=20, monitor="val_acc", ncols=100)
    _drive([bar], _states(8, eval_steps=(5,)))
    assert "val_acc=0.75 (s5)" in out.getvalue()


def test_the_epoch_label_is_current_between_displays():
    out = Terminal()
    bar = ProgressBar(log_every_n_steps=50, stream=out, total=30, ncols=80)
    states = _states(11)  # 10 steps per epoch: step 11 is in epoch 1; no display yet
    bar.on_start(lf.LoopState(state=None))
    for ls in states:
        bar.on_step_end(ls)
    assert bar._bar.desc == "epoch 1" and bar._bar.n == 11  # tqdm draws it at its next refresh
    bar.on_end(states[-1])
    assert _lines(out.getvalue())[-2].startswith("epoch 1 11/30 ")


def test_compile_lines_and_compile_time_kept_out_of_the_speed(monkeypatch):
    now = [100.0]
    monkeypatch.setattr(_progress.time, "perf_counter", lambda: now[0])
    out = io.StringIO()
    bar = ProgressBar(log_every_n_steps=10, stream=out, total=40)
    states = _states(20)
    bar.on_start(lf.LoopState(state=None))
    # The first step compiles for 30 s, then every step takes 0.5 s.
    bar._compile_started("train_step")
    now[0] += 30.0
    bar._watch.events.append(CompileEvent("train_step", 30.0, False, 100.0))
    bar._compile_ended(bar._watch.events[-1])
    for ls in states:
        now[0] += 0.5
        bar.on_step_end(ls)
    bar._compile_started("eval_step")
    bar._watch.events.append(CompileEvent("eval_step", 1.5, True, now[0]))
    bar._compile_ended(bar._watch.events[-1])
    bar._compile_started("eval_step")  # again: e.g. the last, smaller batch
    bar._compile_ended(CompileEvent("eval_step", 1.8, True, now[0]))
    lines = out.getvalue().splitlines()
    assert lines[0] == "compiling train_step ... 30.0 s"
    assert lines[1].startswith("epoch 0 step 10/40 2.00 step/s eta 0:15 ")  # 0.5 s a step
    assert lines[2].startswith("epoch 1 step 20/40 2.00 step/s eta 0:10 ")
    assert lines[3] == "compiling eval_step ... 1.5 s (warm cache)"
    assert lines[4] == "recompiling eval_step for new inputs ... 1.8 s (warm cache)"
    bar.on_end(states[-1])


@pytest.mark.compiled
def test_a_compiled_run_says_what_it_compiles(fresh_dynamo):
    model = make_model()
    train_step, eval_step = make_steps(model)
    state = lf.TrainState.create(model, lf.optim.sgd(0.1), seed=0)
    data = make_data(n=64, batch_size=32)
    out = io.StringIO()
    bar = ProgressBar(log_every_n_steps=1, stream=out)
    watch = CompileWatch()
    try:
        for _ in lf.loop(
            train_step, state, data, eval_step=eval_step, eval_data=data, callbacks=[bar]
        ):
            pass
    finally:
        watch.close()
    text = out.getvalue()
    assert text.startswith("compiling train_step ... ")
    assert "compiling eval_step ... " in text
    assert [e.name for e in watch.events] == ["train_step", "eval_step"]
    assert all(e.seconds > 0 for e in watch.events)
    assert bar.compile_seconds == pytest.approx(sum(e.seconds for e in watch.events), rel=0.1)


def test_the_compile_watch_sees_nothing_without_compiles_and_closes_twice():
    watch = CompileWatch()
    assert watch.events == [] and watch.seconds == 0.0
    watch.close()
    watch.close()


def test_progress_errors():
    with pytest.raises(ValueError, match=r"`ncols` must be an int >= 40 .* got 20"):
        ProgressBar(ncols=20)
    with pytest.raises(ValueError, match="`log_every_n_steps` must be an int >= 1, got 0"):
        ProgressBar(log_every_n_steps=0)
    with pytest.raises(ValueError, match="`total` must be an int >= 1"):
        ProgressBar(total=-3)
    with pytest.raises(TypeError, match=r"write `metrics=\['loss'\]`"):
        ProgressBar(metrics="loss")


def test_a_run_that_raises_leaves_no_compile_watch_behind(tmp_path):
    model = make_model()
    train_step, _ = make_steps(model)
    state = lf.TrainState.create(model, lf.optim.sgd(0.1), seed=0)
    calls = []

    def failing(state, batch):
        calls.append(1)
        if len(calls) > 1:
            raise RuntimeError("boom")
        return train_step(state, batch)

    bar = ProgressBar(stream=io.StringIO())
    with pytest.raises(RuntimeError, match="boom"):
        lf.fit(
            failing,
            state,
            make_data(),
            compile=False,
            callbacks=[bar],
            enable_model_summary=False,
            default_root_dir=tmp_path,
        )
    assert bar._watch is None and not bar._active  # fit closed it
    # A loop user's bar closes itself on the loop's `on_interrupt("exception")`.
    calls.clear()
    bar = ProgressBar(stream=io.StringIO())
    with pytest.raises(RuntimeError, match="boom"):
        for _ in lf.loop(failing, state, make_data(), compile=False, callbacks=[bar]):
            pass
    assert bar._watch is None and not bar._active
