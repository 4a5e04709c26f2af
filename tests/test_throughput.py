"""`lightfunc.callbacks.ThroughputMonitor`: FLOPs counted once, rates from a controlled clock.

FLOPs are compared exactly with `FlopCounterMode` on a hand-written forward
and backward of the same module; rates come from an injected clock (no
wall-clock assertion anywhere), so samples/s, tokens/s, FLOP/s and MFU are
exact arithmetic on known step counts and times.
"""

from __future__ import annotations

import doctest
import io
import json
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from helpers import make_data, make_model, make_steps
from torch.utils.flop_counter import FlopCounterMode

import lightfunc as lf
from lightfunc._compile import CompileEvent
from lightfunc.callbacks import ThroughputMonitor


def _hand_written_flops(model: torch.nn.Module, batch: Any) -> int:
    x, y = batch
    counter = FlopCounterMode(display=False)
    with counter:
        F.cross_entropy(model(x), y).backward()
    return int(counter.get_total_flops())


class _Conv(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(1, 4, 3)
        self.head = torch.nn.Linear(4 * 6 * 6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.conv(x)).flatten(1))


@pytest.mark.parametrize("kind", ["mlp", "conv"])
def test_flops_equal_flop_counter_on_a_hand_written_forward_and_backward(kind):
    model = make_model(dropout=0.5) if kind == "mlp" else _Conv()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 8, generator=g) if kind == "mlp" else torch.randn(16, 1, 8, 8, generator=g)
    batch = (x, torch.randint(0, 3, (16,), generator=g))
    train_step, _ = make_steps(model)
    state = lf.TrainState.create(model, lf.optim.adamw(1e-3))
    built = lf.build(train_step, compile=False)
    monitor = ThroughputMonitor(batch=batch, step=built)  # a built Step: its fn is counted
    rng = torch.get_rng_state()
    params = {k: v.clone() for k, v in state.params.items()}
    monitor.on_start(lf.LoopState(state=state))
    assert torch.equal(torch.get_rng_state(), rng)  # dropout's draws were given back
    expected = _hand_written_flops(model, batch)
    assert expected > 0 and monitor.flops_per_step == expected
    for k, v in params.items():
        assert torch.equal(state.params[k], v)  # the state is untouched
    monitor.on_end(lf.LoopState(state=state))


def test_a_built_step_is_counted_under_its_precision_and_a_plain_one_is_explained():
    model = make_model()
    train_step, _ = make_steps(model)
    batch = make_data(n=16)[0]
    built = lf.build(train_step, compile=False, precision="bf16-true")
    state = built.prepare(lf.TrainState.create(model, lf.optim.sgd(0.1)))
    assert state.params["0.weight"].dtype == torch.bfloat16
    monitor = ThroughputMonitor(batch=batch, step=built)
    monitor.on_start(lf.LoopState(state=state))
    assert monitor.flops_per_step == _hand_written_flops(make_model(), batch)
    monitor.on_end(lf.LoopState(state=state))
    plain = ThroughputMonitor(batch=batch, step=train_step)
    with pytest.raises(RuntimeError, match=r"could not count FLOPs: `train_step\(state, batch\)`"):
        plain.on_start(lf.LoopState(state=state))  # bf16 weights, a float32 batch
    plain.on_end(lf.LoopState(state=state))


class _Clock:
    """A clock the test sets: `now` seconds."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_rates_come_from_step_counts_and_the_clock():
    clock = _Clock()
    monitor = ThroughputMonitor(
        batch_size=32,
        tokens_per_sample=10,
        flops_per_step=1e6,
        peak_flops=1e7,
        log_every_n_steps=4,
        clock=clock,
    )
    monitor.on_start(lf.LoopState(state={}))
    seen = {}
    for step in range(1, 11):
        clock.now = 100.0 + 0.5 * step  # 0.5 s per step
        metrics = monitor.extra_metrics(lf.LoopState(state={}, step=step))
        seen[step] = {k: float(v) for k, v in metrics.items()}
    assert [s for s, m in seen.items() if m] == [4, 8]  # not the first step, not in between
    # step 1 -> 4: 3 steps in 1.5 s; then 4 -> 8: 4 steps in 2 s. 2 steps/s both times.
    for step in (4, 8):
        assert seen[step] == pytest.approx(
            {
                "throughput/samples_per_sec": 64.0,
                "throughput/tokens_per_sec": 640.0,
                "throughput/flops_per_sec": 2e6,
                "throughput/mfu": 0.2,  # achieved / peak
            }
        )
    clock.now = 106.0  # the end, at step 10 (its clock read at 105.0)
    monitor.on_end(lf.LoopState(state={}, step=10))
    # steps 1 -> 10 in 105.5 s... 9 steps in 5.5 s
    assert monitor.summary() == pytest.approx(
        {
            "samples_per_sec": 32 * 9 / 5.5,
            "tokens_per_sec": 320 * 9 / 5.5,
            "flops_per_sec": 1e6 * 9 / 5.5,
            "mfu": 1e6 * 9 / 5.5 / 1e7,
            "flops_per_step": 1e6,
        }
    )


def test_compile_time_is_left_out_of_the_rates():
    clock = _Clock()
    monitor = ThroughputMonitor(batch_size=8, log_every_n_steps=2, clock=clock)
    monitor.on_start(lf.LoopState(state={}))
    clock.now = 1.0
    monitor.extra_metrics(lf.LoopState(state={}, step=1))
    # A recompile of 3 s happened during step 2, which ended 4 s later on the clock.
    monitor._watch.events.append(CompileEvent("train_step", 3.0, False, 1.5))  # type: ignore[union-attr]
    clock.now = 5.0
    metrics = monitor.extra_metrics(lf.LoopState(state={}, step=2))
    assert float(metrics["throughput/samples_per_sec"]) == pytest.approx(8.0)  # 1 step in 1 s


def test_tokens_from_a_function_of_the_batch():
    batch = {"ids": torch.zeros(4, 16, dtype=torch.long), "mask": torch.ones(4, 16)}
    batch["mask"][:, 12:] = 0
    monitor = ThroughputMonitor(batch=batch, tokens_per_sample=lambda b: int(b["mask"].sum()))
    assert monitor.samples_per_step == 4 and monitor.tokens_per_step == 48


def test_measured_peak_is_a_matmul_rate():
    peak = lf.callbacks.measure_peak_flops("cpu", size=64, repeats=2)
    assert peak > 0
    monitor = ThroughputMonitor(batch_size=4, flops_per_step=1.0, peak_flops="measure")
    monitor.on_start(lf.LoopState(state={"w": torch.zeros(2)}))
    assert isinstance(monitor.peak_flops, float) and monitor.peak_flops > 0
    monitor.on_end(lf.LoopState(state={}))


def test_the_loop_shows_and_logs_throughput_and_the_summary_reports_it(tmp_path):
    model = make_model()
    train_step, _ = make_steps(model)
    state = lf.TrainState.create(model, lf.optim.sgd(0.1))
    data = make_data(n=64, batch_size=16)
    ticks = iter(float(i) for i in range(1, 100))  # one second per clock read
    monitor = ThroughputMonitor(
        batch=data[0],
        step=train_step,
        peak_flops=1e6,
        log_every_n_steps=2,
        clock=lambda: next(ticks),
    )
    logger = lf.loggers.JSONLLogger(tmp_path, log_every_n_steps=2)
    out = io.StringIO()
    bar = lf.callbacks.ProgressBar(log_every_n_steps=2, stream=out)
    summary = lf.callbacks.RunSummary(callbacks=[monitor], max_steps=6, stream=io.StringIO())
    for _ in lf.loop(
        lf.build(train_step, compile=False),
        state,
        data,
        max_steps=6,
        callbacks=[monitor, logger, bar, summary],
    ):
        pass
    flops = _hand_written_flops(make_model(), data[0])
    records = [json.loads(line) for line in logger.metrics_file.read_text().splitlines()]
    # Clock reads: step 1 (t=1), 2 (t=2), 4 (t=3), 6 (t=4), the end (t=5).
    assert [r["metrics"]["throughput/samples_per_sec"] for r in records] == [16.0, 32.0, 32.0]
    assert [r["metrics"]["throughput/mfu"] for r in records] == pytest.approx(
        [flops / 1e6, 2 * flops / 1e6, 2 * flops / 1e6]
    )
    lines = out.getvalue().splitlines()
    assert "32 samples/s" in lines[-1] and "% MFU" in lines[-1]
    assert "throughput/" not in out.getvalue()  # shown in the short field only
    report = summary.report
    assert report is not None
    assert report.throughput["samples_per_sec"] == pytest.approx(16 * 5 / 4)  # steps 1->6, 4 s
    assert report.throughput["flops_per_step"] == flops
    assert "throughput  20 samples/s" in str(report)


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="needs the number of examples per step"):
        ThroughputMonitor()
    with pytest.raises(ValueError, match="`batch_size` must be a positive int or None, got 0"):
        ThroughputMonitor(batch_size=0)
    with pytest.raises(ValueError, match="`log_every_n_steps` must be a positive int, got 0"):
        ThroughputMonitor(batch_size=1, log_every_n_steps=0)
    with pytest.raises(ValueError, match=r"`step=` counts FLOPs .* pass `batch=` too"):
        ThroughputMonitor(batch_size=1, step=lambda s, b: s)
    with pytest.raises(TypeError, match="`step` must be the train step function, got int"):
        ThroughputMonitor(batch_size=1, step=3)  # type: ignore[arg-type]
    batch = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="not both"):
        ThroughputMonitor(batch=batch, step=lambda s, b: s, flops_per_step=1.0)
    with pytest.raises(ValueError, match="`flops_per_step` must be a finite number in"):
        ThroughputMonitor(batch=batch, flops_per_step=0.0)
    with pytest.raises(TypeError, match="`clock` must be a function returning seconds"):
        ThroughputMonitor(batch=batch, clock=1.0)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"`tokens_per_sample` must be an int .* got str"):
        ThroughputMonitor(batch=batch, tokens_per_sample="seq")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="`tokens_per_sample` must be a positive int, got 0"):
        ThroughputMonitor(batch=batch, tokens_per_sample=0)
    with pytest.raises(ValueError, match="counts the tokens of `batch=`: pass it"):
        ThroughputMonitor(batch_size=2, tokens_per_sample=lambda b: 1)
    with pytest.raises(TypeError, match=r"`tokens_per_sample` returned 0\.5 for the example"):
        ThroughputMonitor(batch=batch, tokens_per_sample=lambda b: 0.5)  # type: ignore[arg-type,return-value]
    with pytest.raises(ValueError, match="`peak_flops` must be a number of FLOP/s, 'measure'"):
        ThroughputMonitor(batch=batch, peak_flops="h100")
    with pytest.raises(ValueError, match="`peak_flops` must be a finite number in"):
        ThroughputMonitor(batch=batch, peak_flops=-1.0)
    with pytest.raises(ValueError, match="`size` must be a positive int, got 0"):
        lf.callbacks.measure_peak_flops("cpu", size=0)


def test_docstring_examples_run():
    from lightfunc.callbacks import _throughput

    result = doctest.testmod(_throughput, extraglobs={"lf": lf})
    assert result.attempted > 0 and result.failed == 0


def test_fit_prints_the_throughput_line(tmp_path, capsys):
    model = make_model()
    train_step, _ = make_steps(model)
    data = make_data(n=64, batch_size=16)
    monitor = ThroughputMonitor(batch=data[0], step=train_step, log_every_n_steps=2)
    lf.fit(
        train_step,
        lf.TrainState.create(model, lf.optim.sgd(0.1)),
        data,
        max_steps=4,
        default_root_dir=tmp_path,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=False,
        compile=False,
        callbacks=[monitor],
    )
    (line,) = [row for row in capsys.readouterr().out.splitlines() if "throughput" in row]
    assert line.startswith("  throughput  ")  # not also in the `train` row
    assert (
        "samples/s" in line
        and f"{_hand_written_flops(make_model(), data[0]) / 1e3:.3g}k FLOP/step" in line
    )
