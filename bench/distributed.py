"""Step times of data-parallel and fully-sharded steps on 2 processes vs 1, on the same global batch.

    python -m bench.distributed [--workloads mlp,gpt] [--eager] [--rounds 5] [--steps 10] [--out bench/results]

For each workload (bench/workloads.py: same model, optimizer and batches as
the main benchmark), three runs train on the same global batches:

- `1 process`: `lf.build(train_step)` on the whole batch;
- `DP x2`: `lf.build(lfd.data_parallel(train_step, mesh))`, each of 2 ranks
  on its half of the batch;
- `FSDP x2`: `lf.build(lfd.fully_sharded(train_step, mesh))` on a state
  sharded by `lfd.shard_state`, each rank on its half.

Each run is its own `spawn` of fresh processes (the 1-process run too, so
that start-up is alike); every rank computes with one thread (torchrun's
`OMP_NUM_THREADS=1`), so 2 ranks use 2 cores where 1 process uses one. After a warm-up (compilation
included, reported as `first_step_s`), each of `rounds` rounds times
`steps` steps between two barriers; the table gives rank 0's median ms per
step and the ratio to the 1-process run. The last loss is reported as a
check that the runs trained alike, and `state_mb` is what each rank keeps
between steps (parameters + optimizer state): FSDP's is about half.

Honest note: this is a shared 2-core CPU machine; the 2 ranks compete with
each other (and with anything else running) for memory bandwidth and
cores, and gloo moves the gradients through memory. These numbers show
that the sharded steps are correct and what their communication costs, not
the speed-up of a real cluster, which needs one device per rank (GPUs, NCCL).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import time
from pathlib import Path
from typing import Any

import torch

import lightfunc as lf
import lightfunc.distributed as lfd
from lightfunc.distributed._spawn import spawn

from .impls import BETAS, EPS, LR, WEIGHT_DECAY, lightfunc_train_step, tensor_bytes
from .workloads import make_workload

MODES = ("1 process", "DP x2", "FSDP x2")


@dataclasses.dataclass(frozen=True)
class Config:
    workloads: tuple[str, ...] = ("mlp", "gpt")
    compile: bool = True
    rounds: int = 5
    steps: int = 10
    warmup: int = 3
    timeout_s: float = 900.0


def _run(mesh: lfd.Mesh, workload_name: str, mode: str, config: Config) -> dict[str, Any]:
    """One rank of one mode: build, warm up, time `rounds` windows of `steps` steps."""
    torch.set_num_threads(1)  # one core per rank, as torchrun's OMP_NUM_THREADS=1
    torch._inductor.config.compile_threads = 1  # no compile worker pools beside the ranks
    workload = make_workload(workload_name)
    model = workload.make_model()
    tx = lf.optim.adamw(LR, b1=BETAS[0], b2=BETAS[1], eps=EPS, weight_decay=WEIGHT_DECAY)
    state = lf.TrainState.create(model, tx, seed=None)
    train_step = lightfunc_train_step(workload, model)
    if mode == "DP x2":
        train_step = lfd.data_parallel(train_step, mesh)
    elif mode == "FSDP x2":
        train_step = lfd.fully_sharded(train_step, mesh)
        state = lfd.shard_state(state, mesh)
    step = lf.build(train_step, compile=config.compile)
    batches = [
        tuple(t.chunk(mesh.world_size)[mesh.global_rank] for t in batch)
        for batch in workload.batches
    ]
    i = 0

    def window(n: int) -> float:
        nonlocal state, i
        mesh.barrier()
        start = time.perf_counter()
        for _ in range(n):
            state, _ = step(state, batches[i % len(batches)])
            i += 1
        mesh.barrier()
        return time.perf_counter() - start

    first = window(1)
    window(config.warmup)
    times = [window(config.steps) / config.steps for _ in range(config.rounds)]
    state, metrics = step(state, batches[i % len(batches)])
    local = [x.to_local() if hasattr(x, "to_local") else x for x in lf.tree_leaves(state)]
    return {
        "ms_per_step": 1e3 * statistics.median(times),
        "spread": (max(times) - min(times)) / statistics.median(times),
        "first_step_s": first,
        "loss": float(metrics["loss"]),
        "state_mb": tensor_bytes(local) / 2**20,
        "threads": torch.get_num_threads(),
    }


def measure(config: Config) -> dict[str, Any]:
    records = []
    for name in config.workloads:
        for mode in MODES:
            nprocs = 1 if mode == "1 process" else 2
            print(f"{name}: {mode} ...", flush=True)
            rank0 = spawn(_run, nprocs, args=(name, mode, config), timeout=config.timeout_s)[0]
            records.append({"workload": name, "mode": mode, **rank0})
    for r in records:
        base = next(
            b for b in records if b["workload"] == r["workload"] and b["mode"] == "1 process"
        )
        r["ratio_to_1_process"] = r["ms_per_step"] / base["ms_per_step"]
    return {
        "torch": torch.__version__,
        "lightfunc": lf.__version__,
        "cpu_count": os.cpu_count() or 1,
        "config": dataclasses.asdict(config),
        "records": records,
    }


def markdown(results: dict[str, Any]) -> str:
    c = results["config"]
    how = "compiled" if c["compile"] else "eager"
    lines = [
        f"Distributed steps ({how}), gloo on {results['cpu_count']} CPU cores "
        f"(torch {results['torch']}, lightfunc {results['lightfunc']}); rank 0's median "
        f"ms/step over {c['rounds']} rounds of {c['steps']} steps, same global batch in every row.",
        "",
        "| workload | run | ms/step | time vs 1 process | spread | first step s | last loss | state MB per rank |",
        "|---|---|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['workload']} | {r['mode']} | {r['ms_per_step']:.2f} | {r['ratio_to_1_process']:.2f}x "
        f"| {r['spread']:.0%} | {r['first_step_s']:.1f} | {r['loss']:.4f} | {r['state_mb']:.2f} |"
        for r in results["records"]
    ]
    lines += [
        "",
        "One thread per rank; `first step s` is the compile (inductor cache as found); `spread` "
        "is (max - min) / median over the rounds. Honest note: on a shared 2-core CPU machine, with gloo moving "
        "gradients through memory, these rows show that the sharded steps are correct (the "
        "same loss as 1 process) and what their communication costs, not the speed-up of a "
        "cluster, which needs one device per rank (GPUs, NCCL). FSDP keeps about half the "
        "state per rank.",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.distributed")
    parser.add_argument("--workloads", default=",".join(Config.workloads))
    parser.add_argument("--eager", action="store_true", help="eager steps (default: compiled)")
    parser.add_argument("--rounds", type=int, default=Config.rounds)
    parser.add_argument("--steps", type=int, default=Config.steps)
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args(argv)
    config = Config(
        workloads=tuple(args.workloads.split(",")),
        compile=not args.eager,
        rounds=args.rounds,
        steps=args.steps,
    )
    results = measure(config)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "distributed.json").write_text(json.dumps(results, indent=2) + "\n")
    table = markdown(results)
    (args.out / "distributed.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
