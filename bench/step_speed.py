"""Steps per second of one training step on the digits demo model, several ways, in one run.

    python -m bench                 # or: make bench
    python -m bench --quick --out bench/results

Implementations, all on the same model, batch, init and AdamW settings:
- raw_eager: nn.Module + torch.optim.AdamW (foreach), the usual PyTorch loop body;
- lightfunc_eager: `lf.build(train_step, compile=False)`;
- lightfunc_compiled: `lf.build(train_step)` (forward, backward and AdamW in one graph).

Method: every implementation is warmed up (compiles included), then timed in
alternating windows so machine noise hits all of them alike; we report the
median window and the spread (max - min) / median. Ratios are within this one run.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

import lightfunc as lf


@dataclasses.dataclass(frozen=True)
class Config:
    """One benchmark setting."""

    batch_size: int = 64
    hidden: int = 256
    windows: int = 7
    steps_per_window: int = 200
    warmup_steps: int = 30


def make_model(hidden: int) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(64, hidden), torch.nn.ReLU(), torch.nn.Dropout(0.2),
        torch.nn.Linear(hidden, hidden), torch.nn.ReLU(), torch.nn.Dropout(0.2),
        torch.nn.Linear(hidden, 10),
    )  # fmt: skip


def raw_eager(config: Config, batch: tuple[torch.Tensor, torch.Tensor]) -> Callable[[], None]:
    model = make_model(config.hidden).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-2)
    x, y = batch

    def run() -> None:
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    return run


def lightfunc_step(
    config: Config, batch: tuple[torch.Tensor, torch.Tensor], compile: bool
) -> Callable[[], None]:
    model = make_model(config.hidden)
    box = [lf.TrainState.create(model, lf.optim.adamw(1e-3, weight_decay=1e-2))]

    def train_step(
        state: lf.TrainState, batch: Any
    ) -> tuple[lf.TrainState, dict[str, torch.Tensor]]:
        x, y = batch

        def loss_fn(params: dict[str, torch.Tensor]) -> torch.Tensor:
            logits, _ = lf.apply(model, params, state.buffers, x, train=True)
            return F.cross_entropy(logits, y)

        loss, grads = lf.value_and_grad(loss_fn)(state.params)
        return state.apply_gradients(grads), {"loss": loss}

    step = lf.build(train_step, compile=compile)

    def run() -> None:
        box[0], _ = step(box[0], batch)

    return run


def measure(config: Config) -> list[dict[str, Any]]:
    g = torch.Generator().manual_seed(0)
    batch = (
        torch.rand(config.batch_size, 64, generator=g),
        torch.randint(0, 10, (config.batch_size,), generator=g),
    )
    impls: dict[str, Callable[[], None]] = {}
    compile_s: dict[str, float] = {}
    for name, factory in {
        "raw_eager": lambda: raw_eager(config, batch),
        "lightfunc_eager": lambda: lightfunc_step(config, batch, compile=False),
        "lightfunc_compiled": lambda: lightfunc_step(config, batch, compile=True),
    }.items():
        run = factory()
        start = time.perf_counter()
        run()  # first call: validation, and the compile for compiled builds
        compile_s[name] = time.perf_counter() - start
        for _ in range(config.warmup_steps):
            run()
        impls[name] = run
    rates: dict[str, list[float]] = {name: [] for name in impls}
    for _ in range(config.windows):
        for name, run in impls.items():
            start = time.perf_counter()
            for _ in range(config.steps_per_window):
                run()
            rates[name].append(config.steps_per_window / (time.perf_counter() - start))
    base = statistics.median(rates["raw_eager"])
    records = []
    for name, r in rates.items():
        median = statistics.median(r)
        records.append({
            "workload": "mlp", "impl": name, "batch_size": config.batch_size,
            "steps_per_s": median, "steps_per_s_spread": (max(r) - min(r)) / median,
            "ratio_to_raw_eager": median / base, "first_call_s": compile_s[name],
        })  # fmt: skip
    return records


def machine_info() -> dict[str, Any]:
    return {
        "torch": torch.__version__, "lightfunc": lf.__version__, "python": platform.python_version(),
        "machine": platform.machine(), "processor": platform.processor(),
        "threads": torch.get_num_threads(), "cuda": torch.cuda.is_available(),
    }  # fmt: skip


def table(records: list[dict[str, Any]]) -> str:
    lines = [
        "| workload | impl | steps/s | spread | vs raw eager | first call (s) |",
        "|---|---|---|---|---|---|",
    ]
    for r in records:
        lines.append(
            f"| {r['workload']} | {r['impl']} | {r['steps_per_s']:.0f} | {r['steps_per_s_spread']:.0%} "
            f"| {r['ratio_to_raw_eager']:.2f}x | {r['first_call_s']:.1f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="lightfunc step-speed benchmark")
    parser.add_argument("--quick", action="store_true", help="fewer, shorter windows")
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args(argv)
    config = Config(windows=3, steps_per_window=50) if args.quick else Config()
    records = measure(config)
    md = table(records)
    print(md)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(
        json.dumps(
            {"machine": machine_info(), "config": dataclasses.asdict(config), "records": records},
            indent=2,
        )
    )
    (args.out / "results.md").write_text(md + "\n")
    print(f"wrote {args.out / 'results.json'} and {args.out / 'results.md'}")
