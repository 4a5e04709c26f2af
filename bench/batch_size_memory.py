"""The batch-size finder's CPU memory measure against the operating system's peak resident size.

    python -m bench.batch_size_memory        # Linux; writes bench/results/batch_size_memory.md

`lf.tune.find_batch_size` measures a CPU step's peak with
`torch.profiler` (the running sum of torch's CPU allocations and frees).
This checks it against an independent measure: the process's peak resident
size (`VmHWM` in /proc/self/status), reset to the current size before the
step by writing "5" to /proc/self/clear_refs (Linux >= 4.0), after
`malloc_trim(0)` hands freed heap memory back. Their difference is memory
that is not a torch tensor (thread stacks, allocator bookkeeping, oneDNN
scratch space), a fixed cost that matters less as the batch grows.
"""

from __future__ import annotations

import ctypes
import dataclasses
import json
import platform
import re
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

import lightfunc as lf
from lightfunc._tune_batch import cpu_peak_growth

RESULTS = Path(__file__).parent / "results"


@dataclasses.dataclass(frozen=True)
class Config:
    batch_size: int
    features: int = 256
    hidden: int = 1024


CONFIGS = tuple(Config(n) for n in (4096, 16384, 32768))


def _status(key: str) -> int:
    text = Path("/proc/self/status").read_text()
    match = re.search(rf"{key}:\s+(\d+) kB", text)
    assert match is not None, key
    return int(match.group(1)) * 1024


def measure(config: Config) -> dict[str, Any]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(config.features, config.hidden),
        torch.nn.ReLU(),
        torch.nn.Linear(config.hidden, 10),
    )

    def train_step(state: lf.TrainState, batch: Any) -> tuple[lf.TrainState, dict[str, Any]]:
        x, y = batch

        def loss_fn(params: dict[str, torch.Tensor]) -> torch.Tensor:
            return F.cross_entropy(lf.apply(model, params, {}, x, train=True)[0], y)

        loss, grads = lf.value_and_grad(loss_fn)(state.params)
        return state.apply_gradients(grads), {"loss": loss}

    state = lf.TrainState.create(model, lf.optim.adam(1e-3))
    step = lf.build(train_step, compile=False)
    batch = (
        torch.randn(config.batch_size, config.features),
        torch.randint(0, 10, (config.batch_size,)),
    )
    step(state, batch)  # warm-up
    profiled = cpu_peak_growth(lambda: step(state, batch))
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    before = _status("VmRSS")
    out = step(state, batch)
    del out
    resident = _status("VmHWM") - before
    return {
        "config": dataclasses.asdict(config),
        "profiler_growth_bytes": profiled,
        "rss_growth_bytes": resident,
        "ratio": resident / profiled,
    }


def main() -> None:
    rows = [measure(c) for c in CONFIGS]
    lines = [
        "# CPU peak memory: torch.profiler (what find_batch_size uses) vs the peak RSS",
        "",
        "`python -m bench.batch_size_memory`: one eager Adam step of a 256-1024-10 MLP;",
        "growth of live tensor bytes during the step by `torch.profiler(profile_memory=True)`",
        "against the growth of the process's peak resident size (VmHWM reset by clear_refs).",
        "",
        f"torch {torch.__version__}, lightfunc {lf.__version__}, {platform.machine()} "
        f"{platform.system()}.",
        "",
        "| batch size | profiler MB | peak RSS MB | RSS / profiler |",
        "|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['config']['batch_size']} | {r['profiler_growth_bytes'] / 1e6:.1f} "
            f"| {r['rss_growth_bytes'] / 1e6:.1f} | {r['ratio']:.3f} |"
        )
        print(lines[-1])
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "batch_size_memory.json").write_text(json.dumps(rows, indent=2))
    (RESULTS / "batch_size_memory.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {RESULTS / 'batch_size_memory.md'}")


if __name__ == "__main__":
    main()
