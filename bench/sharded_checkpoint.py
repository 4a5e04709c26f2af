"""Sharded checkpoints: lightfunc's shard format vs torch's distributed checkpoint engine, in one run.

    python -m bench.sharded_checkpoint [--mb 140] [--world 2] [--repeats 3] [--out bench/results]

The state is AdamW-shaped (params + two moments), float32, `Shard(0)` DTensors
over `--world` gloo ranks, about `--mb` MB per rank, with uneven rows. Each
engine runs in its own fresh processes (so each one's peak memory is its own):

- lightfunc: `save_sharded` (fsync) and `load_sharded` into a template of the
  same layout, checking every chunk's CRC-32;
- dcp: `torch.distributed.checkpoint.save` with `HuggingFaceStorageWriter(
  save_distributed=True)` (safetensors, no pickled `.metadata`; fsyncs by
  default) and `dcp.load` with `HuggingFaceStorageReader` (no checksums).

Each repeat runs one save and one load per engine, the engines alternating
(so both see the same machine load). Reported per engine: the medians of the
save and load seconds (rank 0, between barriers) and of the rise of rank 0's
peak RSS over its RSS once the state and the template exist (save and load
together), and whether every round trip is bit-exact. Then a
capability probe on 3 ranks: the middle shard file of a checkpoint is deleted
and the checkpoint loaded, and we record whether the engine raised or loaded
silently (and so left the template's values in the hole).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

import lightfunc as lf
import lightfunc.distributed as lfd
from lightfunc.distributed._checkpoint import load_sharded, save_sharded
from lightfunc.distributed._spawn import spawn

ROWS, COLS = 1001, 512  # odd rows: uneven shards


@dataclasses.dataclass(frozen=True)
class Config:
    mb: int = 140  # per rank
    world: int = 2
    repeats: int = 3


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def _state(mesh: Any, mb: int, world: int, fill: float | None = None) -> dict[str, Any]:
    """This rank's rows of each tensor as a `Shard(0)` DTensor, built without the full tensor
    (whose freed memory would hide the engines' own allocations from the RSS high-water mark)."""
    from torch.distributed.tensor import DTensor, Shard

    n = max(1, round(mb * world * 2**20 / (4 * ROWS * COLS * 3)))
    rank = mesh.get_rank()
    per = -(-ROWS // world)  # torch.chunk's rows per rank; the last ranks hold fewer
    rows = max(0, min(ROWS, (rank + 1) * per) - rank * per)
    out = {}
    for i in range(n):
        for j, k in enumerate(("p", "m", "v")):
            g = torch.Generator().manual_seed(world * (3 * i + j) + rank)
            local = (
                torch.randn(rows, COLS, generator=g)
                if fill is None
                else torch.full((rows, COLS), fill)
            )
            out[f"{k}{i}"] = DTensor.from_local(
                local, mesh, [Shard(0)], run_check=False, shape=(ROWS, COLS), stride=(COLS, 1)
            )
    return out


def _engine(mesh: lfd.Mesh, engine: str, root: str, config: Config) -> dict[str, Any]:
    """One save and one load by `engine` in fresh processes: seconds, peak RSS rise, exactness."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp

    device_mesh = mesh.device_mesh
    state = _state(device_mesh, config.mb, config.world)
    like = _state(device_mesh, config.mb, config.world, fill=0.0)
    nbytes = sum(t.to_local().numel() * 4 for t in state.values())
    path = Path(root) / engine
    if mesh.global_rank == 0:
        shutil.rmtree(path, ignore_errors=True)
    rss_before = _rss_mb()

    def save() -> None:
        if engine == "lightfunc":
            save_sharded(state, path)
        else:
            writer = dcp.HuggingFaceStorageWriter(str(path), save_distributed=True)
            dcp.save(state, storage_writer=writer)

    def load() -> dict[str, Any]:
        if engine == "lightfunc":
            return dict(load_sharded(path, like=like))
        dcp.load(like, storage_reader=dcp.HuggingFaceStorageReader(str(path)))
        return like

    seconds = {}
    for kind, fn in (("save", save), ("load", load)):
        dist.barrier()
        start = time.perf_counter()
        out = fn()
        dist.barrier()
        seconds[kind] = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {
        "mb_per_rank": nbytes / 2**20,
        "save_s": seconds["save"],
        "load_s": seconds["load"],
        "peak_rss_rise_mb": peak - rss_before,
        "bit_exact": all(torch.equal(out[k].to_local(), v.to_local()) for k, v in state.items()),
    }


def _missing_shard(mesh: lfd.Mesh, engine: str, root: str) -> str:
    """Save 10 rows on 3 ranks, delete the middle shard file, load: "raised" or "silent"."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.tensor import Shard, distribute_tensor

    device_mesh = mesh.device_mesh
    path = Path(root) / f"hole-{engine}"
    state = {"w": distribute_tensor(torch.arange(10.0), device_mesh, [Shard(0)])}
    if engine == "lightfunc":
        save_sharded(state, path)
        middle = json.loads((path / "index.json").read_text())["files"][1]
    else:
        dcp.save(
            state, storage_writer=dcp.HuggingFaceStorageWriter(str(path), save_distributed=True)
        )
        middle = sorted(p.name for p in path.glob("*.safetensors"))[1]
    dist.barrier()
    if mesh.global_rank == 0:
        (path / middle).unlink()
    dist.barrier()
    like = {"w": distribute_tensor(torch.full((10,), -1.0), device_mesh, [Shard(0)])}
    try:
        if engine == "lightfunc":
            load_sharded(path, like=like)
        else:
            dcp.load(like, storage_reader=dcp.HuggingFaceStorageReader(str(path)))
    except Exception as e:  # every rank raises (the collective agrees)
        return f"raised {type(e).__name__}"
    return f"silent: loaded {like['w'].full_tensor().tolist()}"


def measure(config: Config) -> dict[str, Any]:
    load_before = os.getloadavg()[0]
    runs: dict[str, list[dict[str, Any]]] = {"lightfunc": [], "dcp": []}
    probe = {}
    with tempfile.TemporaryDirectory(prefix="lightfunc-sharded-bench-", dir=".") as tmp:
        for _ in range(config.repeats):  # alternating, so both see the same machine load
            for engine, done in runs.items():
                done.append(
                    spawn(_engine, config.world, args=(engine, tmp, config), timeout=600)[0]
                )
        for engine in runs:
            probe[engine] = spawn(_missing_shard, 3, args=(engine, tmp), timeout=300)[0]
    records = [
        {
            "engine": engine,
            "mb_per_rank": done[0]["mb_per_rank"],
            **{
                key: statistics.median(d[key] for d in done)
                for key in ("save_s", "load_s", "peak_rss_rise_mb")
            },
            "bit_exact": all(d["bit_exact"] for d in done),
        }
        for engine, done in runs.items()
    ]
    return {
        "torch": torch.__version__,
        "lightfunc": lf.__version__,
        "config": dataclasses.asdict(config),
        "cpus": os.cpu_count(),
        "load_average": [load_before, os.getloadavg()[0]],  # 1-minute, before and after
        "records": records,
        "missing_middle_shard": probe,
    }


def markdown(results: dict[str, Any]) -> str:
    c = results["config"]
    lines = [
        f"Sharded checkpoints, {c['world']} gloo ranks, Shard(0) float32 state "
        f"(torch {results['torch']}, lightfunc {results['lightfunc']}); median of {c['repeats']}; "
        f"{results['cpus']} CPUs, 1-minute load average {results['load_average'][0]:.1f} before, "
        f"{results['load_average'][1]:.1f} after.",
        "",
        "| engine | MB per rank | save s | load s | peak RSS rise MB | bit-exact |",
        "|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['engine']} | {r['mb_per_rank']:.0f} | {r['save_s']:.3f} | {r['load_s']:.3f} | "
        f"{r['peak_rss_rise_mb']:.0f} | {r['bit_exact']} |"
        for r in results["records"]
    ]
    lines += ["", "Middle shard file of a 3-rank checkpoint deleted, then loaded:", ""]
    lines += [
        f"- {engine}: {outcome}" for engine, outcome in results["missing_middle_shard"].items()
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.sharded_checkpoint")
    parser.add_argument("--mb", type=int, default=Config.mb)
    parser.add_argument("--world", type=int, default=Config.world)
    parser.add_argument("--repeats", type=int, default=Config.repeats)
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args(argv)
    results = measure(Config(mb=args.mb, world=args.world, repeats=args.repeats))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "sharded_checkpoint.json").write_text(json.dumps(results, indent=2) + "\n")
    table = markdown(results)
    (args.out / "sharded_checkpoint.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
