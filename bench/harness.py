"""Measure every implementation on every workload, in one process, alternating with the baseline.

Method, chosen for shared 2-core machines where absolute speed drifts 15-30%
between runs but ratios measured side by side repeat within a few percent:

1. Build each implementation and run its first `CHECK_STEPS` steps from the
   shared initial state; their losses must agree with the raw eager loop's
   (else the comparison is meaningless and we stop). The first call's time is
   `compile_s` (cache as found).
2. Warm up, then size each implementation's timing window to about
   `window_s` seconds.
3. For each of `rounds` rounds: time a raw eager window, then an
   implementation window, then raw eager again, and so on through every
   implementation. An implementation's ratio in a round is its steps/s over
   the mean of the two baseline windows beside it; we report the median ratio
   over rounds, and the median steps/s with its spread ((max - min) / median).
   Each window is timed twice: wall-clock and process CPU time. On a loaded
   machine the CPU-time ratio (`cpu_ratio_to_raw_eager`, steps per CPU-second)
   is the steadier of the two: time spent waiting for a core is not counted.
4. Memory: `state_mb` (parameters + optimizer state held between steps) plus
   `step_peak_mb`, the peak of allocator memory above that during a step.
   On CPU it is read from the torch profiler's allocation events over two
   steps, counting only the second: the profiler does not see the free of a
   block allocated before profiling began, so a functional step, which frees
   its input state, would look one state larger if the input state came from
   before the window. After the first profiled step the state held is one the
   profiler saw allocated. On GPU, `torch.cuda.max_memory_allocated`.
5. `time_to_first_step_s`: from constructing the implementation (building
   the step, the Trainer) to the first step's loss, compile included (inductor
   cache as found).
6. In a full run, cold and warm compile times of the compiled implementations
   come from fresh processes: one with an empty inductor cache, then a second
   one that keeps it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from . import lightning_impls
from .impls import RUNNERS, Runner
from .workloads import Workload, make_workload

BASELINE = "raw_eager"
CHECK_STEPS = 3
# Step 0 is the same forward pass on the same init: it must agree closely.
# Later steps follow AdamW updates, whose first steps are nearly sign(grad) * lr:
# gradient entries near zero whose sign differs between eager and compiled
# kernels move by a full learning rate, which shows as ~1e-3 in the loss.
LOSS_RTOL = (1e-5, 5e-3)
# Cold/warm compile probes (two fresh processes each) run for the library and
# its no-library limit; probing every compiled variant would double a full run.
COMPILE_PROBED = ("raw_compiled_functional", "lightfunc_compiled")


@dataclasses.dataclass(frozen=True)
class Config:
    """One benchmark run."""

    workloads: tuple[str, ...] = ("mlp", "cnn", "gpt")
    impls: tuple[str, ...] = (
        "raw_eager", "raw_compiled_module", "raw_compiled_functional",
        "lightfunc_eager", "lightfunc_compiled", "lightfunc_loop", "lightfunc_fit", "lightfunc_fit_barebones",
        "lightning_trainer", "lightning_barebones", "lightning_compiled",
    )  # fmt: skip
    rounds: int = 5
    window_s: float = 0.6
    min_window_steps: int = 3
    threads: int = 1
    compile_probes: bool = True
    device: str = "cpu"


QUICK = Config(workloads=("mlp",), rounds=3, window_s=0.2, compile_probes=False)


def all_runners() -> dict[str, type[Runner]]:
    runners = dict(RUNNERS)
    if lightning_impls.available():
        runners.update(lightning_impls.RUNNERS)
    return runners


def measure_workload(
    workload: Workload, config: Config, peak_flops: float, log: Any = print
) -> list[dict[str, Any]]:
    """Records for every implementation in `config.impls` on `workload`."""
    available = all_runners()
    names = [n for n in config.impls if n in available]
    skipped = [n for n in config.impls if n not in available]
    if skipped:
        log(f"  skipping {', '.join(skipped)} (not installed: pip install -e '.[bench]')")
    if BASELINE not in names:
        names.insert(0, BASELINE)

    # Compiled code of earlier workloads would sit in the same dynamo caches
    # (nn.Sequential.forward is one code object for every model) and cost
    # failed guard checks on every call.
    torch._dynamo.reset()
    runners: dict[str, Runner] = {}
    try:
        compile_s: dict[str, float] = {}
        first_losses: dict[str, list[float]] = {}
        first_step_s: dict[str, float] = {}
        for name in names:
            start = time.perf_counter()
            runner = runners[name] = available[name](workload)
            losses = runner.first_losses(CHECK_STEPS)
            compile_s[name] = time.perf_counter() - start
            first_step_s[name] = runner.first_loss_at - start
            first_losses[name] = losses
            _check_losses(workload.name, name, losses, first_losses[BASELINE])
            log(
                f"  {name}: first losses {', '.join(f'{x:.5f}' for x in losses)} "
                f"(first step {first_step_s[name]:.1f} s)"
            )

        steps = {name: _window_steps(runner, config) for name, runner in runners.items()}
        rates: dict[str, list[float]] = {name: [] for name in runners}
        ratios: dict[str, list[float]] = {name: [] for name in runners if name != BASELINE}
        cpu_ratios: dict[str, list[float]] = {name: [] for name in ratios}
        base = runners[BASELINE]
        for _ in range(config.rounds):
            before, before_cpu = _rates(base, steps[BASELINE])
            rates[BASELINE].append(before)
            for name in ratios:
                rate, rate_cpu = _rates(runners[name], steps[name])
                after, after_cpu = _rates(base, steps[BASELINE])
                rates[name].append(rate)
                rates[BASELINE].append(after)
                ratios[name].append(rate / ((before + after) / 2))
                cpu_ratios[name].append(rate_cpu / ((before_cpu + after_cpu) / 2))
                before, before_cpu = after, after_cpu

        records = []
        for name, runner in runners.items():
            median = statistics.median(rates[name])
            state_b, peak_b = runner.state_bytes(), step_peak_bytes(runner)
            records.append({
                "workload": workload.name, "impl": name,
                "steps_per_s": median, "steps_per_s_spread": (max(rates[name]) - min(rates[name])) / median,
                "ratio_to_raw_eager": statistics.median(ratios[name]) if name in ratios else 1.0,
                "ratio_spread": _spread(ratios.get(name, [1.0])),
                "ratio_min": min(ratios.get(name, [1.0])), "ratio_max": max(ratios.get(name, [1.0])),
                "cpu_ratio_to_raw_eager": statistics.median(cpu_ratios[name]) if name in cpu_ratios else 1.0,
                "cpu_ratio_spread": _spread(cpu_ratios.get(name, [1.0])),
                "cpu_ratio_min": min(cpu_ratios.get(name, [1.0])), "cpu_ratio_max": max(cpu_ratios.get(name, [1.0])),
                **_limit_ratios(name, ratios, cpu_ratios),
                "time_to_first_step_s": first_step_s[name],
                "compile_s": compile_s[name], "compile_cold_s": None, "compile_warm_s": None,
                "state_mb": state_b / 2**20, "step_peak_mb": peak_b / 2**20, "peak_mem_mb": (state_b + peak_b) / 2**20,
                "flops_per_step": workload.flops_per_step,
                "model_gflops_per_s": workload.flops_per_step * median / 1e9,
                "fraction_of_matmul_peak": workload.flops_per_step * median / peak_flops,
                "first_losses": first_losses[name], "window_steps": steps[name],
            })  # fmt: skip
    finally:
        for runner in runners.values():
            runner.close()
    _add_lightning_ratios(records)
    if config.compile_probes:
        for record in records:
            if record["impl"] in COMPILE_PROBED:
                record["compile_cold_s"], record["compile_warm_s"] = compile_times(
                    workload.name, record["impl"], config
                )
                log(
                    f"  {record['impl']}: compile cold {record['compile_cold_s']:.1f} s, warm {record['compile_warm_s']:.1f} s"
                )
    return records


def _check_losses(workload: str, name: str, losses: list[float], reference: list[float]) -> None:
    for i, (a, b) in enumerate(zip(losses, reference, strict=True)):
        rtol = LOSS_RTOL[0] if i == 0 else LOSS_RTOL[1]
        if not math.isclose(a, b, rel_tol=rtol):
            raise RuntimeError(
                f"{workload}/{name}: loss at step {i} is {a:.7f}, the raw eager loop's is {b:.7f} "
                f"(relative tolerance {rtol}); the implementations do not compute the same step."
            )


def _window_steps(runner: Runner, config: Config) -> int:
    """Warm up, then choose a step count that takes about `config.window_s`."""
    runner.run(config.min_window_steps)  # warm-up
    per_step = max(runner.run(config.min_window_steps), 1e-9) / config.min_window_steps
    return max(config.min_window_steps, round(config.window_s / per_step))


def _rate(runner: Runner, steps: int) -> float:
    return steps / runner.run(steps)


def _rates(runner: Runner, steps: int) -> tuple[float, float]:
    """Steps per wall-clock second and per CPU-second (all threads of this process) of one window."""
    wall = runner.run(steps)
    return steps / wall, steps / max(runner.last_cpu_s, 1e-9)


def _spread(values: list[float]) -> float:
    median = statistics.median(values)
    return (max(values) - min(values)) / median if median else 0.0


LIMIT = "raw_compiled_functional"


def _limit_ratios(
    name: str, ratios: dict[str, list[float]], cpu_ratios: dict[str, list[float]]
) -> dict[str, Any]:
    """`name`'s speed over the hand-written compiled functional step's, round by round.

    Each round's ratio to raw eager divided by the limit's in the same round
    (wall and CPU time), so the two were measured seconds apart; median and
    min-max over rounds. None when the limit was not run.
    """
    if LIMIT not in ratios or name not in ratios:
        return {"ratio_to_limit": None, "cpu_ratio_to_limit": None}
    out: dict[str, Any] = {}
    for key, table in (("ratio_to_limit", ratios), ("cpu_ratio_to_limit", cpu_ratios)):
        per_round = [a / b for a, b in zip(table[name], table[LIMIT], strict=True)]
        out[key] = statistics.median(per_round)
        out[f"{key}_min"], out[f"{key}_max"] = min(per_round), max(per_round)
    return out


def _add_lightning_ratios(records: list[dict[str, Any]]) -> None:
    """Ratios to Lightning with its defaults (`ratio_to_lightning`) and to `barebones=True`.

    Like for like: `lightfunc_fit` (bar, logger, checkpoints) against the
    Trainer's defaults, and the bare compiled step or `fit(barebones=True)`
    against the barebones Trainer.
    """
    for key, impl in (("ratio_to_lightning", "lightning_trainer"),
                      ("ratio_to_lightning_barebones", "lightning_barebones")):  # fmt: skip
        lightning = next((r for r in records if r["impl"] == impl), None)
        for r in records:
            r[key] = (
                r["ratio_to_raw_eager"] / lightning["ratio_to_raw_eager"] if lightning else None
            )


def step_peak_bytes(runner: Runner, steps: int = 2) -> int:
    """Peak allocator memory above the level at the start, over `steps` training steps."""
    if runner.device.type == "cuda":
        torch.cuda.synchronize(runner.device)
        base = torch.cuda.memory_allocated(runner.device)
        torch.cuda.reset_peak_memory_stats(runner.device)
        runner.run(steps)
        return torch.cuda.max_memory_allocated(runner.device) - base
    from torch.profiler import ProfilerActivity, profile, record_function

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        runner.run(steps - 1)  # the state it leaves is one the profiler saw allocated
        with record_function(_MARK):
            runner.run(1)
    events = list(prof.profiler.kineto_results.events())  # type: ignore[union-attr]
    mark = min(e.start_ns() for e in events if e.name() == _MARK)
    memory = sorted((e for e in events if e.name() == "[memory]"), key=lambda e: e.start_ns())
    current = 0
    for event in memory:
        if event.start_ns() >= mark:
            break
        current += event.nbytes()
    level = peak = current
    for event in memory:
        if event.start_ns() >= mark:
            current += event.nbytes()
            peak = max(peak, current)
    return peak - level


_MARK = "bench:measured_step"


def matmul_peak_flops(device: torch.device, n: int = 1024, repeats: int = 10) -> float:
    """The best fp32 matmul FLOP/s of `repeats` n x n products: the machine's practical peak."""
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    best = math.inf
    for _ in range(repeats + 2):
        start = time.perf_counter()
        torch.mm(a, b)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def compile_times(workload: str, impl: str, config: Config) -> tuple[float, float]:
    """First-call seconds in a fresh process with an empty inductor cache, then with it warm."""
    with tempfile.TemporaryDirectory(prefix="lightfunc-bench-cache-") as cache:
        env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=cache)
        return _probe(workload, impl, config, env), _probe(workload, impl, config, env)


def _probe(workload: str, impl: str, config: Config, env: dict[str, str]) -> float:
    cmd = [
        sys.executable,
        "-m",
        "bench.probe",
        workload,
        impl,
        "--threads",
        str(config.threads),
        "--device",
        config.device,
    ]
    out = subprocess.run(
        cmd, env=env, capture_output=True, text=True, cwd=Path(__file__).parents[1], check=True
    )
    return float(json.loads(out.stdout.strip().splitlines()[-1])["first_call_s"])


def run(config: Config, log: Any = print) -> dict[str, Any]:
    """Measure everything in `config`; returns the JSON-ready results."""
    torch.set_num_threads(config.threads)
    device = torch.device(config.device)
    peak = matmul_peak_flops(device)
    log(f"matmul peak: {peak / 1e9:.1f} GFLOP/s ({config.threads} thread(s), fp32, {device})")
    records = []
    started = time.perf_counter()
    for name in config.workloads:
        workload = make_workload(name, device=device)
        log(f"{name}: {workload.description}, {workload.flops_per_step / 1e9:.3g} GFLOP/step")
        records += measure_workload(workload, config, peak, log)
    return {
        "machine": machine_info(config),
        "config": dataclasses.asdict(config),
        "matmul_peak_gflops": peak / 1e9,
        "seconds": time.perf_counter() - started,
        "records": records,
    }


def machine_info(config: Config) -> dict[str, Any]:
    import platform

    import lightfunc

    info = {
        "torch": torch.__version__, "lightfunc": lightfunc.__version__, "python": platform.python_version(),
        "machine": platform.machine(), "cpu": _cpu_name(), "cpus": os.cpu_count(), "threads": config.threads,
        "device": config.device, "cuda": torch.cuda.get_device_name() if config.device == "cuda" else None,
    }  # fmt: skip
    if lightning_impls.available():
        import lightning

        info["lightning"] = lightning.__version__
    return info


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor()
