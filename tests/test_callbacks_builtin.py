import datetime
import io
import json

import pytest
import torch
from helpers import make_data, make_model, make_steps

import lightfunc as lf
from lightfunc.callbacks import _profiler, _progress, _summary, _timer
from lightfunc.callbacks._profiler import ProfilerCallback
from lightfunc.callbacks._progress import ProgressBar
from lightfunc.callbacks._summary import ModelSummary, summarize
from lightfunc.callbacks._timer import Timer


def _setup(model=None, state=None):
    model = model if model is not None else make_model()
    train_step, eval_step = make_steps(model)
    if state is None:
        state = lf.TrainState.create(model, lf.optim.sgd(0.1), seed=0)
    return lf.build(train_step, compile=False), lf.build_eval(eval_step, compile=False), state


def _drive(callbacks, states):
    """Call the hooks the way `lf.loop` does, on states recorded from a run."""
    for cb in callbacks:
        cb.on_start(lf.LoopState(state=states[0].state, step=states[0].step - 1))
    stopped_at = None
    for ls in states:
        stop = [bool(cb.on_step(ls)) for cb in callbacks]
        for cb in callbacks:
            cb.on_step_end(ls)
        if any(stop):
            stopped_at = ls.step
            break
    for cb in callbacks:
        cb.on_end(ls)
    return stopped_at


def _states(n, *, eval_steps=()):
    """`n` hand-made loop states with a 'loss' metric; evaluated at `eval_steps`."""
    out = []
    for step in range(1, n + 1):
        evaluated = step in eval_steps
        out.append(
            lf.LoopState(
                state=None,
                step=step,
                epoch=(step - 1) // 10,
                metrics={"loss": torch.tensor(1.0 / step), "acc": torch.tensor(0.5)},
                eval_metrics={"loss": torch.tensor(2.0)} if evaluated else None,
                eval_at_step=step if evaluated else -1,
            )
        )
    return out


# ModelSummary ---------------------------------------------------------------------------

# helpers.make_model: Linear(8, 16, bias=False) -> BatchNorm1d(16) -> ReLU -> Dropout -> Linear(16, 3)
LINEAR0, BATCHNORM, LINEAR4 = 8 * 16, 16 + 16, 16 * 3 + 3
BUFFERS = 16 + 16 + 1  # running_mean, running_var (fp32), num_batches_tracked (int64)


def _totals(text):
    return {
        line.split(":")[0].strip(): line.split(":")[1].split()[0]
        for line in text.splitlines()
        if ":" in line
    }


def test_summarize_counts_layers_and_totals_of_a_module():
    text = summarize(make_model())
    rows = [line.split("|") for line in text.splitlines() if "|" in line][1:]
    assert [tuple(cell.strip() for cell in r) for r in rows] == [
        ("0", "Linear", str(LINEAR0)),
        ("1", "BatchNorm1d", str(BATCHNORM)),
        ("2", "ReLU", "0"),
        ("3", "Dropout", "0"),
        ("4", "Linear", str(LINEAR4)),
    ]
    totals = _totals(text)
    assert totals["Trainable params"] == str(LINEAR0 + BATCHNORM + LINEAR4) == "211"
    assert totals["Frozen params"] == "0"
    assert totals["Buffers"] == str(BUFFERS)
    assert totals["Params size (MB)"] == f"{211 * 4 / 1e6:.3f}"
    assert totals["Total size (MB)"] == f"{(211 * 4 + 32 * 4 + 8) / 1e6:.3f}"


def test_summary_of_a_train_state_counts_only_its_params_as_trainable():
    model = make_model()
    model.get_submodule("0").weight.requires_grad_(False)
    state = lf.TrainState.create(lf.params_of(model, trainable_only=True), lf.optim.sgd(0.1))
    state = state.replace(buffers=lf.buffers_of(model))
    out = io.StringIO()
    step, _, _ = _setup(model, state)
    cb = ModelSummary(model, stream=out)
    for _ in lf.loop(step, state, make_data(), max_steps=1, callbacks=[cb]):
        pass
    totals = _totals(out.getvalue())
    assert totals["Trainable params"] == str(BATCHNORM + LINEAR4)
    assert totals["Frozen params"] == str(LINEAR0)
    assert totals["Total params"] == "211"
    assert totals["Buffers"] == str(BUFFERS)
    assert cb.summary == out.getvalue().rstrip("\n")
    # Without the module the layers come from the parameter names, and nothing is frozen.
    text = summarize(state)
    assert [line.split("|")[0].strip() for line in text.splitlines() if "|" in line][1:] == [
        "1",
        "4",
    ]
    assert _totals(text)["Frozen params"] == "0"


def test_summary_size_follows_dtypes_and_max_depth():
    model = torch.nn.Sequential(
        torch.nn.Sequential(torch.nn.Linear(1000, 1000)), torch.nn.Linear(1000, 10)
    ).to(torch.bfloat16)
    n = 1000 * 1000 + 1000 + 1000 * 10 + 10
    text = summarize(model, max_depth=-1)
    assert _totals(text)["Params size (MB)"] == f"{n * 2 / 1e6:.3f}" == "2.022"
    names = [line.split("|")[0].strip() for line in text.splitlines() if "|" in line][1:]
    assert names == ["0", "0.0", "1"]
    assert "|" not in summarize(model, max_depth=0)


def test_summary_of_a_custom_state_uses_the_module_or_says_what_is_missing():
    custom = lf.LoopState(state={"params": {"w": torch.zeros(2)}, "step": 0})
    out = io.StringIO()
    ModelSummary(stream=out).on_start(custom)
    assert "pass the module as `ModelSummary(model=...)`" in out.getvalue()
    cb = ModelSummary(make_model(), stream=io.StringIO())
    cb.on_start(custom)
    assert _totals(cb.summary)["Total params"] == "211"


def test_summary_errors():
    with pytest.raises(ValueError, match="`max_depth` must be an int >= -1"):
        ModelSummary(max_depth=-2)
    with pytest.raises(TypeError, match=r"`model` must be an nn.Module or None, got dict"):
        ModelSummary({"w": torch.zeros(2)})  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"`model_or_params` must be an nn.Module, a TrainState"):
        summarize([torch.zeros(2)])  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"`module` must be an nn.Module or None, got str"):
        summarize({"w": torch.zeros(2)}, module="net")  # type: ignore[arg-type]


# Timer ----------------------------------------------------------------------------------


class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def test_timer_stops_once_max_time_is_exceeded(monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(_timer, "_clock", clock)
    timer = Timer(10.0)
    timer.on_start(lf.LoopState(state=None))
    for step in range(1, 100):
        clock.now += 3.0  # each step takes 3 s
        if timer.on_step(lf.LoopState(state=None, step=step)):
            break
    assert step == 4 and timer.elapsed == 12.0 and timer.remaining == 0.0
    timer.on_end(lf.LoopState(state=None, step=step))
    clock.now += 100.0  # not training: not counted
    assert timer.elapsed == 12.0


def test_timer_in_the_loop_and_resumed_from_its_state(monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(_timer, "_clock", clock)
    step, _, state = _setup()
    data = make_data(n=320, batch_size=32)  # 10 batches

    def ticking(states):
        for ls in states:
            clock.now += 1.0  # the next step's callbacks run 1 s after this one's
            yield ls

    timer = Timer(datetime.timedelta(seconds=4.5))
    states = list(ticking(lf.loop(step, state, data, callbacks=[timer])))
    assert states[-1].step == 6  # step k runs at k - 1 s: 5 s > 4.5 s
    assert states[-1].callbacks["Timer"] == {"elapsed": 5.0}

    # A new Timer resumed from that state counts the 5 s already spent, not the pause.
    clock.now += 60.0
    resumed = Timer(7.5)
    more = list(ticking(lf.loop(step, states[-1], data, callbacks=[resumed])))
    assert [ls.step for ls in more] == [7, 8, 9, 10]
    assert more[-1].callbacks["Timer"] == {"elapsed": 8.0}


def test_timer_parses_durations():
    assert Timer("01:02:03:04").max_time == 86400 + 2 * 3600 + 3 * 60 + 4
    assert Timer(" 00:00:90:00 ").max_time == 5400.0
    assert Timer(datetime.timedelta(minutes=2)).max_time == 120.0
    assert Timer(3).max_time == 3.0 and Timer(0).max_time == 0.0


@pytest.mark.parametrize("bad", ["01:02:03", "1:2:3:x", "00:00:-1:00", "", "1.5:0:0:0"])
def test_timer_rejects_malformed_strings(bad):
    with pytest.raises(ValueError, match=r"`max_time` as a string must be 'DD:HH:MM:SS'"):
        Timer(bad)


def test_timer_rejects_negative_and_non_durations():
    with pytest.raises(ValueError, match=r"`max_time` must be a duration >= 0, got -1.0"):
        Timer(-1.0)
    with pytest.raises(ValueError, match=r"`max_time` must be a duration >= 0, got datetime"):
        Timer(datetime.timedelta(seconds=-5))
    with pytest.raises(ValueError, match=r"`max_time` must be a duration >= 0, got nan"):
        Timer(float("nan"))
    with pytest.raises(TypeError, match=r"`max_time` must be seconds .* got bool True"):
        Timer(True)
    with pytest.raises(TypeError, match=r"`max_time` must be seconds .* got list"):
        Timer([10])  # type: ignore[arg-type]


# ProfilerCallback -----------------------------------------------------------------------


def test_profiler_writes_a_chrome_trace_of_the_window(tmp_path):
    step, _, state = _setup()
    prof = ProfilerCallback(tmp_path / "prof", wait=1, warmup=1, active=2, record_shapes=True)
    states = list(
        lf.loop(step, state, make_data(n=320), max_steps=6, callbacks=[prof])
    )  # the window ends at step 4, before the run does
    assert len(states) == 6
    assert prof.trace_path == tmp_path / "prof" / "trace_steps3-4.json"
    assert [p.name for p in (tmp_path / "prof").iterdir()] == ["trace_steps3-4.json"]
    assert list(tmp_path.iterdir()) == [tmp_path / "prof"]
    assert prof.trace_path is not None
    trace = json.loads(prof.trace_path.read_text())
    assert trace["traceEvents"]
    assert any(e.get("name") == "aten::addmm" for e in trace["traceEvents"])


def test_profiler_writes_at_the_end_of_a_run_shorter_than_the_window(tmp_path):
    step, _, state = _setup()
    prof = ProfilerCallback(tmp_path, wait=0, warmup=1, active=10, export="tensorboard")
    for _ in lf.loop(step, state, make_data(), max_steps=3, callbacks=[prof]):
        pass
    assert prof.trace_path is not None and prof.trace_path.parent == tmp_path
    assert prof.trace_path.name.startswith("trace_steps2-3.")
    assert prof.trace_path.name.endswith(".pt.trace.json")
    assert "traceEvents" in json.loads(prof.trace_path.read_text())


def test_profiler_errors(tmp_path):
    with pytest.raises(ValueError, match="`wait` must be an int >= 0"):
        ProfilerCallback(tmp_path, wait=-1)
    with pytest.raises(ValueError, match="`warmup` must be an int >= 0"):
        ProfilerCallback(tmp_path, warmup=1.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="`active` must be an int >= 1"):
        ProfilerCallback(tmp_path, active=0)
    with pytest.raises(ValueError, match="`export` must be one of"):
        ProfilerCallback(tmp_path, export="json")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"`dirpath` must be a str or os.PathLike folder, got int"):
        ProfilerCallback(3)  # type: ignore[arg-type]


# ProgressBar ----------------------------------------------------------------------------


def test_progress_plain_output_is_one_line_per_interval_and_per_evaluation():
    out = io.StringIO()
    bar = ProgressBar(log_every_n_steps=4, stream=out, total=20)
    _drive([bar], _states(20, eval_steps=(6, 8)))
    text = out.getvalue()
    assert "\r" not in text
    lines = text.splitlines()
    assert [line.split()[3] for line in lines] == [
        "4/20",
        "6/20",
        "8/20",
        "12/20",
        "16/20",
        "20/20",
    ]
    assert lines[0].startswith("epoch 0 step 4/20 ") and "step/s" in lines[0]
    assert "eta " in lines[0] and "eta " not in lines[-1]
    assert lines[0].endswith("loss=0.25 acc=0.5")
    assert lines[1].endswith("loss=0.1667 val_loss=2 acc=0.5")
    assert lines[-1].startswith("epoch 1 step 20/20")


def test_progress_shows_the_last_step_and_reads_metrics_only_on_display_steps():
    out = io.StringIO()
    reads = []

    class Counted(torch.Tensor):
        def __float__(self):
            reads.append(1)
            return super().__float__()

    states = [
        ls.replace(metrics={"loss": ls.metrics["loss"].as_subclass(Counted)}) for ls in _states(7)
    ]
    _drive([ProgressBar(log_every_n_steps=5, stream=out)], states)
    lines = out.getvalue().splitlines()
    assert [line.split()[3] for line in lines] == ["5", "7"]  # no total: no "/N", no ETA
    assert "eta" not in out.getvalue()
    assert len(reads) == 2  # one metric, two display steps


def test_progress_metric_filter():
    out = io.StringIO()
    bar = ProgressBar(log_every_n_steps=2, stream=out, metrics=["val_loss", "acc"])
    _drive([bar], _states(4, eval_steps=(4,)))
    lines = out.getvalue().splitlines()
    assert lines[0].endswith("step/s acc=0.5")
    assert lines[1].endswith("step/s val_loss=2 acc=0.5")
    assert "loss=0.25" not in out.getvalue()


def test_progress_shows_an_evaluation_metric_already_named_val_under_its_name():
    out = io.StringIO()
    states = [
        ls.replace(eval_metrics={"val_loss": torch.tensor(2.0)}) if ls.evaluated else ls
        for ls in _states(2, eval_steps=(2,))
    ]
    _drive([ProgressBar(log_every_n_steps=10, stream=out, metrics=["val_loss"])], states)
    assert out.getvalue().splitlines()[-1].endswith("step/s val_loss=2")


def test_progress_on_a_terminal_draws_a_tqdm_bar():
    pytest.importorskip("tqdm")

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    out = Terminal()
    step, evaluate, state = _setup()
    data = make_data()
    bar = ProgressBar(log_every_n_steps=2, stream=out, total=4)
    states = list(lf.loop(step, state, data, eval_step=evaluate, eval_data=data, callbacks=[bar]))
    assert len(states) == 4
    text = out.getvalue()
    assert "\r" in text and "4/4" in text and "epoch 0" in text
    assert "loss=" in text and "val_acc=" in text
    assert bar._bar is None  # closed


def test_progress_errors():
    with pytest.raises(ValueError, match="`log_every_n_steps` must be an int >= 1, got 0"):
        ProgressBar(log_every_n_steps=0)
    with pytest.raises(ValueError, match="`total` must be an int >= 1"):
        ProgressBar(total=-3)
    with pytest.raises(TypeError, match=r"write `metrics=\['loss'\]`"):
        ProgressBar(metrics="loss")
    bar = ProgressBar(stream=io.StringIO(), metrics=["los"])
    with pytest.raises(ValueError, match=r"names \['los'\] are not among the train metrics"):
        _drive([bar], _states(1))
    bar = ProgressBar(stream=io.StringIO(), metrics=["loss", "val_acc"])
    with pytest.raises(ValueError, match=r"names \['val_acc'\] are not among the evaluation"):
        _drive([bar], _states(3, eval_steps=(2,)))


# All of them ------------------------------------------------------------------------------


def test_ranks_other_than_zero_print_and_write_nothing(monkeypatch, tmp_path):
    for module in (_progress, _summary, _profiler):
        monkeypatch.setattr(module, "_is_rank_zero", lambda: False)
    out = io.StringIO()
    step, _, state = _setup()
    callbacks = [
        ModelSummary(stream=out),
        ProgressBar(log_every_n_steps=1, stream=out),
        ProfilerCallback(tmp_path / "prof", wait=0, active=1),
    ]
    assert len(list(lf.loop(step, state, make_data(), callbacks=callbacks))) == 4
    assert out.getvalue() == ""
    assert not (tmp_path / "prof").exists()


def test_defaults_print_to_stdout_and_stderr(capsys):
    step, _, state = _setup()
    callbacks = [ModelSummary(), ProgressBar(log_every_n_steps=2)]
    for _ in lf.loop(step, state, make_data(), callbacks=callbacks):
        pass
    captured = capsys.readouterr()
    assert "Total params:     211" in captured.out
    assert [line.split()[3] for line in captured.err.splitlines()] == ["2", "4"]
