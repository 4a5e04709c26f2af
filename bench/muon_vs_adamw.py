"""Muon against AdamW on the char LM: validation bits per byte at equal steps, each lr swept.

    python -m bench.muon_vs_adamw [--steps 400] [--seeds 0 1 2] [--out bench/results]

Each run is `examples/char_lm.py`'s `main` (in this process, eager, no
sample), with `--optimizer adamw` or `--optimizer muon`: the same data,
batches, initial weights and schedule (linear warm-up, cosine decay to a
tenth of the peak) for a given seed, and the same number of steps; only the
optimizer differs. Muon (lightfunc.optim.muon: torch.optim.Muon's defaults)
takes the blocks' matrices; the embeddings, the output head, the biases and
the LayerNorm scales stay with AdamW in both runs.

Learning rates are chosen fairly, on the first seed only: AdamW's peak lr
is swept over `--adamw-lrs`; Muon's over `--muon-lrs`, with its AdamW part
at AdamW's best lr. While the best value is at an end of the values tried,
the next one beyond it (the grid's own ratio) is tried too (at most three
more), so a best value is not simply the edge of the grid. The best lr of each then runs on the other
seeds. The score is the validation loss in bits per byte (nats / ln 2) on
the held-out last 10% of the text after the last step; a run whose loss
goes non-finite is reported as diverged.

The model is smaller than the example's default (`--width 64 --layers 2`)
and runs in float32 on `--threads` threads (1: on a shared 2-core machine
one thread per process is several times faster than two), so the whole
comparison fits in about 20 minutes there. Wall time per step is the whole
run (three evaluations and a checkpoint included) divided by the steps: a
side note, not a speed benchmark.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from .report import add_out_argument

ROOT = Path(__file__).resolve().parents[1]
NAME = "muon_vs_adamw"
SETTINGS: tuple[str, ...] = ("steps", "seeds", "adamw_lrs", "muon_lrs", "width", "layers")
SETTINGS += ("batch_size", "seq", "bytes", "precision", "threads")
MAX_EXTRA = 3  # values tried past an end of a learning-rate grid, at most


def char_lm() -> Any:
    """The example module (examples/ is a folder of scripts, not a package)."""
    examples = str(ROOT / "examples")
    if examples not in sys.path:
        sys.path.insert(0, examples)
    import char_lm as module

    return module


def run_one(
    args: argparse.Namespace, optimizer: str, lr: float, adamw_lr: float, seed: int, workdir: Path
) -> dict[str, Any]:
    """One char-LM run; its output goes to a log file under `workdir`, its result is returned."""
    run_dir = workdir / f"{optimizer}_lr{lr:g}_seed{seed}"
    run_dir.mkdir(parents=True, exist_ok=True)
    argv = [
        "--optimizer", optimizer, "--lr", str(adamw_lr), "--muon-lr", str(lr),
        "--steps", str(args.steps), "--seed", str(seed), "--width", str(args.width),
        "--layers", str(args.layers), "--batch-size", str(args.batch_size), "--seq", str(args.seq),
        "--bytes", str(args.bytes), "--precision", args.precision, "--no-compile",
        "--sample-chars", "0", "--run-dir", str(run_dir),
    ]  # fmt: skip
    start = time.perf_counter()
    with (
        (run_dir / "output.txt").open("w") as log,
        contextlib.redirect_stdout(log),
        contextlib.redirect_stderr(log),
    ):
        try:
            bits = float(char_lm().main(argv))
        except FloatingPointError:  # fit's non-finite check: the loss diverged
            bits = math.inf
    seconds = time.perf_counter() - start
    output = (run_dir / "output.txt").read_text()
    if math.isfinite(bits) and f"\n{args.steps} steps (" not in output:  # stopped early
        raise RuntimeError(
            f"the {optimizer} run (lr {lr:g}, seed {seed}) stopped before step {args.steps} "
            f"(a signal?); its output ends:\n{output[-2000:]}"
        )
    return {
        "optimizer": optimizer,
        "lr": lr,
        "adamw_lr": adamw_lr,
        "seed": seed,
        "steps": args.steps,
        "bits_per_byte": bits if math.isfinite(bits) else None,
        "seconds": seconds,
        "seconds_per_step": seconds / args.steps,
    }


def sweep(
    grid: Sequence[float],
    score: Callable[[float], float],
    log: Callable[[str], None],
    max_extra: int = MAX_EXTRA,
) -> float:
    """The grid value with the lowest score, the grid grown past an end while the best is there.

    While the best value is the lowest or highest of two or more tried, the
    next value beyond it (the ratio of the two outermost at that end, 3
    significant digits) is tried, at most `max_extra` times.
    """
    values = sorted(grid)
    scores = {v: score(v) for v in values}
    for _ in range(max_extra if len(values) >= 2 else 0):
        tried = sorted(scores)
        best = min(tried, key=lambda v: scores[v])
        if best == tried[0]:
            extra = float(f"{tried[0] * tried[0] / tried[1]:.3g}")
        elif best == tried[-1]:
            extra = float(f"{tried[-1] * tried[-1] / tried[-2]:.3g}")
        else:
            break
        log(f"  best at the edge of the grid ({best:g}): trying {extra:g} too")
        scores[extra] = score(extra)
    return min(scores, key=lambda v: scores[v])


def measure(args: argparse.Namespace, log: Callable[[str], None] = print) -> dict[str, Any]:
    """The sweep on the first seed, then both best lrs on the others; torch's threads restored."""
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        return _measure(args, log)
    finally:
        torch.set_num_threads(threads)


def _measure(args: argparse.Namespace, log: Callable[[str], None]) -> dict[str, Any]:
    records: list[dict[str, Any]] = []
    first, *others = args.seeds
    with tempfile.TemporaryDirectory(prefix="muon_vs_adamw_") as tmp:
        workdir = Path(tmp)

        def score(optimizer: str, adamw_lr: float | None = None) -> Callable[[float], float]:
            def run(lr: float) -> float:
                record = run_one(
                    args, optimizer, lr, lr if adamw_lr is None else adamw_lr, first, workdir
                )
                record["sweep"] = True
                records.append(record)
                _log_record(record, log)
                bits = record["bits_per_byte"]
                return math.inf if bits is None else bits

            return run

        log(f"AdamW: lr over {args.adamw_lrs}, seed {first}")
        adamw_lr = sweep(args.adamw_lrs, score("adamw"), log)
        log(f"Muon: lr over {args.muon_lrs}, AdamW part at {adamw_lr:g}, seed {first}")
        muon_lr = sweep(args.muon_lrs, score("muon", adamw_lr), log)
        for seed in others:
            for optimizer, lr in (("adamw", adamw_lr), ("muon", muon_lr)):
                record = run_one(args, optimizer, lr, adamw_lr, seed, workdir)
                record["sweep"] = False
                records.append(record)
                _log_record(record, log)
    return {
        "machine": {
            "torch": torch.__version__,
            "cpu": _cpu_name(),
            "threads": args.threads,
        },
        "settings": {k: getattr(args, k) for k in SETTINGS},
        "best_lr": {"adamw": adamw_lr, "muon": muon_lr},
        "records": records,
    }


def _log_record(r: dict[str, Any], log: Callable[[str], None]) -> None:
    bits = "diverged" if r["bits_per_byte"] is None else f"{r['bits_per_byte']:.4f} bits/byte"
    log(
        f"  {r['optimizer']:5s} lr {r['lr']:<8g} seed {r['seed']}: {bits}, "
        f"{r['seconds']:.0f} s ({r['seconds_per_step']:.3f} s/step)"
    )


def _cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    import platform

    return platform.processor() or platform.machine()


def final_rows(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Per optimizer at its best lr: bits per byte by seed, mean, spread, s/step."""
    rows = []
    for optimizer, lr in results["best_lr"].items():
        runs = [r for r in results["records"] if r["optimizer"] == optimizer and r["lr"] == lr]
        runs = sorted(runs, key=lambda r: r["seed"])
        bits = [r["bits_per_byte"] for r in runs]
        finite = [b for b in bits if b is not None]
        rows.append(
            {
                "optimizer": optimizer,
                "lr": lr,
                "bits": dict(zip([r["seed"] for r in runs], bits, strict=True)),
                "mean": statistics.fmean(finite) if finite else None,
                "std": statistics.stdev(finite) if len(finite) > 1 else None,
                "min": min(finite, default=None),
                "max": max(finite, default=None),
                "seconds_per_step": statistics.median(r["seconds_per_step"] for r in runs),
            }
        )
    return rows


def command_options(settings: dict[str, Any]) -> str:
    """The options that repeat a run with these settings."""
    words = []
    for key in SETTINGS:
        value = settings[key]
        values = value if isinstance(value, list) else [value]
        words.append(
            f"--{key.replace('_', '-')} "
            + " ".join(f"{v:g}" if isinstance(v, float) else str(v) for v in values)
        )
    return " ".join(words)


def _bits(x: float | None) -> str:
    return "diverged" if x is None else f"{x:.3f}"


def markdown(results: dict[str, Any]) -> str:
    s, m = results["settings"], results["machine"]
    seeds = s["seeds"]
    rows = final_rows(results)
    adamw_lr = results["best_lr"]["adamw"]
    lines = [
        "# Muon vs AdamW on the char LM",
        "",
        f"Validation bits per byte after {s['steps']} steps (lower is better; 8 is a uniform "
        f"guess), `examples/char_lm.py` with `--width {s['width']} --layers {s['layers']} "
        f"--batch-size {s['batch_size']} --seq {s['seq']} --bytes {s['bytes']} --precision "
        f"{s['precision']} --no-compile`, {m['threads']} thread(s), torch {m['torch']}, "
        f"{m['cpu']}. Same data, batches, initial weights and schedule per seed; Muon "
        f"(lightfunc.optim.muon, torch.optim.Muon's defaults) on the blocks' matrices, AdamW on "
        f"the embeddings, head, biases and norms (at AdamW's best lr, {adamw_lr:g}).",
        "",
        "| optimizer | peak lr | "
        + " | ".join(f"seed {seed}" for seed in seeds)
        + " | mean ± std (min-max) | s/step |",
        "|---|---|" + "---|" * len(seeds) + "---|---|",
    ]
    for r in rows:
        spread = "" if r["std"] is None else f" ± {r['std']:.3f} ({r['min']:.3f}-{r['max']:.3f})"
        lines.append(
            f"| {r['optimizer']} | {r['lr']:g} | "
            + " | ".join(_bits(r["bits"].get(seed)) for seed in seeds)
            + f" | {_bits(r['mean'])}{spread} | {r['seconds_per_step']:.3f} |"
        )
    by = {r["optimizer"]: r["bits"] for r in rows}
    diffs = [
        by["muon"][seed] - by["adamw"][seed]
        for seed in seeds
        if by["muon"].get(seed) is not None and by["adamw"].get(seed) is not None
    ]
    if diffs:
        lines += [
            "",
            "Muon minus AdamW, seed by seed (paired: same data and initial weights): "
            + ", ".join(f"{d:+.3f}" for d in diffs)
            + f" bits per byte; mean {statistics.fmean(diffs):+.3f}.",
        ]
    lines += [
        "",
        f"Learning-rate sweep (seed {seeds[0]}; the lowest of each optimizer is used above, so "
        f"seed {seeds[0]}'s figure is the best of its sweep and the other seeds' are not):",
        "",
        "| optimizer | peak lr | bits per byte | s/step |",
        "|---|---|---|---|",
    ]
    for r in sorted(
        (r for r in results["records"] if r.get("sweep")), key=lambda r: (r["optimizer"], r["lr"])
    ):
        lines.append(
            f"| {r['optimizer']} | {r['lr']:g} | {_bits(r['bits_per_byte'])} | "
            f"{r['seconds_per_step']:.3f} |"
        )
    lines += [
        "",
        "s/step: the whole run (three evaluations of the held-out split and a checkpoint "
        "included) over the steps, eager, in the first table the median over the seeds; "
        "measured on a machine shared with other jobs, so a side note, not a speed "
        "measurement.",
        "",
        f"Command: `python -m bench.muon_vs_adamw {command_options(s)} --out bench/results` "
        f"({results['seconds'] / 60:.0f} min).",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=400, help="train steps per run")
    parser.add_argument(
        "--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds; the first one for the sweep"
    )
    parser.add_argument(
        "--adamw-lrs", type=float, nargs="+", default=[3e-3, 1e-2, 3e-2], help="AdamW's peak lrs"
    )
    parser.add_argument(
        "--muon-lrs", type=float, nargs="+", default=[0.01, 0.02, 0.05], help="Muon's peak lrs"
    )
    parser.add_argument("--width", type=int, default=64, help="model width")
    parser.add_argument("--layers", type=int, default=2, help="transformer blocks")
    parser.add_argument("--batch-size", type=int, default=32, help="windows per step")
    parser.add_argument("--seq", type=int, default=64, help="bytes of context")
    parser.add_argument("--bytes", type=int, default=1_000_000, help="text size (10%% held out)")
    parser.add_argument("--precision", default="32-true", help="char_lm.py's --precision")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    add_out_argument(parser)
    args = parser.parse_args(argv)
    start = time.perf_counter()
    results = measure(args)
    results["seconds"] = time.perf_counter() - start
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{NAME}.json").write_text(json.dumps(results, indent=1) + "\n")
    text = markdown(results)
    (args.out / f"{NAME}.md").write_text(text)
    print(text)
    print(f"{results['seconds']:.0f} s in all; written to {args.out / NAME}.md and .json")
    return results


if __name__ == "__main__":
    main()
