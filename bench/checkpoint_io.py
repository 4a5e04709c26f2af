"""Checkpoint save / load throughput: lightfunc vs torch.save / torch.load vs raw safetensors, in one run.

    python -m bench.checkpoint_io [--mb 512] [--repeats 3] [--out bench/results]

The state is an AdamW-shaped dict (params + two moments) of float32 tensors
totalling about `--mb` MB. Each method is timed `repeats` times, alternating,
and the median is reported as MB/s. `lf.save` always fsyncs (durability is
its contract); `torch.save` and `safetensors.save_file` do not, so they are
also reported followed by an fsync of the file for a like-for-like number.
Loads read from the page cache (the file was just written), and are forced
to touch every byte (safetensors loads are lazy memory maps).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import safetensors.torch
import torch

import lightfunc as lf

from .report import add_out_argument


@dataclasses.dataclass(frozen=True)
class Config:
    mb: int = 512
    repeats: int = 5


def make_state(mb: int) -> dict[str, Any]:
    per_tensor = 8 * 2**20  # 32 MB of float32
    n = max(1, round(mb * 2**20 / (4 * per_tensor * 3)))
    g = torch.Generator().manual_seed(0)
    params = {f"layer{i}.weight": torch.randn(per_tensor, generator=g) for i in range(n)}
    return {
        "params": params,
        "mu": {k: v * 0.1 for k, v in params.items()},
        "nu": {k: v * v for k, v in params.items()},
    }


def _flat(state: dict[str, Any]) -> dict[str, torch.Tensor]:
    return {f"{group}.{k}": v for group, tensors in state.items() for k, v in tensors.items()}


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _touch(tree: Any) -> None:
    # Force every byte in (safetensors returns lazy memory maps).
    for leaf in lf.tree_leaves(tree):
        if isinstance(leaf, torch.Tensor):
            leaf.sum()


def methods(
    state: dict[str, Any], directory: Path
) -> dict[str, tuple[Callable[[], None], Callable[[], None]]]:
    """name -> (save, load) closures over `state`, each writing its own file in `directory`."""
    lf_path, pt_path, st_path = (
        directory / "lf.safetensors",
        directory / "state.pt",
        directory / "raw.safetensors",
    )
    flat = _flat(state)

    def torch_save_fsync() -> None:
        torch.save(state, pt_path)
        _fsync(pt_path)

    def st_save_fsync() -> None:
        safetensors.torch.save_file(flat, st_path)
        _fsync(st_path)

    return {
        "lightfunc (verify)": (
            lambda: lf.save(state, lf_path),
            lambda: _touch(lf.load(lf_path, like=state)),
        ),
        "lightfunc (no verify)": (
            lambda: lf.save(state, lf_path),
            lambda: _touch(lf.load(lf_path, like=state, verify=False)),
        ),
        "torch.save/load": (
            lambda: torch.save(state, pt_path),
            lambda: _touch(torch.load(pt_path, weights_only=True)),
        ),
        "torch.save+fsync/load": (
            torch_save_fsync,
            lambda: _touch(torch.load(pt_path, weights_only=True)),
        ),
        "safetensors raw+fsync": (
            st_save_fsync,
            lambda: _touch(safetensors.torch.load_file(st_path)),
        ),
    }


def measure(config: Config) -> dict[str, Any]:
    state = make_state(config.mb)
    nbytes = sum(t.numel() * t.element_size() for t in lf.tree_leaves(state))
    times: dict[str, dict[str, list[float]]] = {}
    with tempfile.TemporaryDirectory(prefix="lightfunc-ckpt-bench-", dir=".") as tmp:
        table = methods(state, Path(tmp))
        for _ in range(config.repeats):
            for name, (save, load) in table.items():
                for kind, fn in (("save", save), ("load", load)):
                    start = time.perf_counter()
                    fn()
                    times.setdefault(name, {"save": [], "load": []})[kind].append(
                        time.perf_counter() - start
                    )
    mb = nbytes / 2**20
    records = [
        {
            "method": name,
            "mb": mb,
            "save_mb_per_s": mb / statistics.median(t["save"]),
            "load_mb_per_s": mb / statistics.median(t["load"]),
        }
        for name, t in times.items()
    ]
    return {
        "torch": torch.__version__,
        "lightfunc": lf.__version__,
        "state_mb": mb,
        "config": dataclasses.asdict(config),
        "records": records,
    }


def markdown(results: dict[str, Any]) -> str:
    lines = [
        f"Checkpoint I/O, {results['state_mb']:.0f} MB float32 state (torch {results['torch']}, lightfunc {results['lightfunc']}); median of {results['config']['repeats']}.",
        "",
        "| method | save MB/s | load MB/s |",
        "|---|---|---|",
    ]
    lines += [
        f"| {r['method']} | {r['save_mb_per_s']:.0f} | {r['load_mb_per_s']:.0f} |"
        for r in results["records"]
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.checkpoint_io",
        description="Checkpoint save and load throughput (MB/s) of lf.save / lf.load against "
        "torch.save / torch.load and raw safetensors, alternating in one run.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--mb", type=int, default=Config.mb, help="size of the AdamW-shaped state to write, in MB"
    )
    parser.add_argument(
        "--repeats", type=int, default=Config.repeats, help="timed repeats per method (median)"
    )
    add_out_argument(parser)
    args = parser.parse_args(argv)
    results = measure(Config(mb=args.mb, repeats=args.repeats))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "checkpoint_io.json").write_text(json.dumps(results, indent=2) + "\n")
    table = markdown(results)
    (args.out / "checkpoint_io.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
