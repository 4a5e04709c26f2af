"""Memory and step time of sharded steps (lightfunc and torch's own) on 1, 2 and 4 processes.

    python -m bench.distributed [--sections memory,speed] [--worlds 1,2,4] [--mem-steps 3]
                                [--workloads mlp,gpt] [--eager] [--rounds 5] [--steps 10] [--out bench/results]

`memory` (the default section): a 25.5M-parameter GPT (8 blocks in an
`nn.ModuleList`, d_model 512, fp32, AdamW), trained eagerly on the same
global batches by lightfunc `DDP`, lightfunc `FSDP` (per-block gathering,
the state made by `init_sharded` from a meta-device model, the README's
pattern; the same values as the CPU model with the same seed),
torch DDP and torch FSDP2 (`fully_shard` per block and on the root,
`torch.optim.AdamW`), each on 1, 2 and 4 processes, one thread per rank.
Per rank: the peak resident set (`ru_maxrss`) and that peak minus the
resident set just before the model is built (what the run itself added),
the bytes of the storages the state holds between steps (parameters and
optimizer state, `untyped_storage().nbytes()`, each storage once), the
median step time, and the last loss's distance from the same setup on one
process. The CPU allocator keeps no peak statistic, so the allocator's
peak is not reported (on CUDA it would be `torch.cuda.max_memory_allocated`).

`speed` (the section this file had before): step times of compiled
data-parallel and fully-sharded steps on 2 processes vs 1 (below).

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
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

import lightfunc as lf
import lightfunc.distributed as lfd
from lightfunc.distributed._sharded_init import init_sharded
from lightfunc.distributed._spawn import spawn

from .impls import BETAS, EPS, LR, WEIGHT_DECAY, lightfunc_train_step, tensor_bytes
from .workloads import make_workload

MODES = ("1 process", "DP x2", "FSDP x2")

MEMORY_MODEL = """Memory model on paper: the largest model that fits an 80 GB device at 8 ranks,
bf16-mixed (fp32 master weights, fp32 gradients, Adam's two fp32 moments: 16 bytes
per parameter; bf16 copies for compute), before activations:

- torch DDP: 16 B + the bf16 copies (2 B) on every rank: 80e9 / 18 = ~4.4B parameters.
- lightfunc DDP: as torch DDP, plus the functional update's new parameters and
  moments alive beside the old ones during the update (12 B): 80e9 / 30 = ~2.7B.
- torch FSDP2 (bf16 gathers): 16 B / 8 = 2 B, plus one block gathered at a time:
  ~40B, ~35B after a block's working set.
- lightfunc FSDP, eager: 16 B / 8 = 2 B, plus the functional update's transient
  copy of the state shard (12 B / 8 = 1.5 B), plus autocast's bf16 copies of the
  gathered weights, which autograd keeps for backward (the saved-tensor hooks
  release the gathered fp32 storage, not autocast's copies): 2 B of every block
  until its backward. 5.5 B per parameter: ~14B. In fp32 (no copies): 3.5 B, ~22B.
  Gathering in bf16 when autocast computes in bf16 would remove the 2 B (~22B).
- lightfunc FSDP, compiled (everything gathered at once): full fp32 parameters and
  gradients (8 B) + bf16 copies (2 B) + the 3.5 B above: ~6B.
"""


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


# ---- memory: a 25.5M-parameter GPT on 1, 2 and 4 processes --------------------------------

SETUPS = ("lightfunc DDP", "lightfunc FSDP", "torch DDP", "torch FSDP2")
D_MODEL, HEADS, BLOCKS, VOCAB, SEQ, GLOBAL_BATCH = 512, 8, 8, 256, 64, 8


class _Block(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.ln1, self.ln2 = torch.nn.LayerNorm(D_MODEL), torch.nn.LayerNorm(D_MODEL)
        self.qkv = torch.nn.Linear(D_MODEL, 3 * D_MODEL)
        self.proj = torch.nn.Linear(D_MODEL, D_MODEL)
        self.up = torch.nn.Linear(D_MODEL, 4 * D_MODEL)
        self.down = torch.nn.Linear(4 * D_MODEL, D_MODEL)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, HEADS, -1).transpose(1, 3).unbind(2)
        a = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(a.transpose(1, 2).reshape(b, t, D_MODEL))
        return x + self.down(torch.nn.functional.gelu(self.up(self.ln2(x))))


class _GPT(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(VOCAB, D_MODEL)
        self.pos = torch.nn.Embedding(SEQ, D_MODEL)
        self.blocks = torch.nn.ModuleList(_Block() for _ in range(BLOCKS))
        self.ln = torch.nn.LayerNorm(D_MODEL)
        self.head = torch.nn.Linear(D_MODEL, VOCAB)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens) + self.pos(torch.arange(tokens.shape[1]))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln(x))


def _gpt_batches(steps: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, VOCAB, (steps, GLOBAL_BATCH, SEQ + 1), generator=g)
    return [(t[:, :-1], t[:, 1:]) for t in tokens]


def _rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _storage_mb(tensors: Any) -> float:
    seen: dict[int, int] = {}
    for x in tensors:
        if isinstance(x, torch.Tensor):
            s = (x.to_local() if hasattr(x, "to_local") else x).untyped_storage()
            seen[s.data_ptr()] = s.nbytes()
    return sum(seen.values()) / 2**20


def _setup(mesh: lfd.Mesh, setup: str) -> tuple[Callable[[Any], torch.Tensor], Callable[[], float]]:
    """`setup`'s model and optimizer: (one step on a batch -> loss, state storage MB)."""
    loss_of = torch.nn.functional.cross_entropy
    if setup.startswith("lightfunc"):
        tx = lf.optim.adamw(LR, b1=BETAS[0], b2=BETAS[1], eps=EPS, weight_decay=WEIGHT_DECAY)
        with torch.device("meta"):  # the step needs the structure only: no weights
            skeleton = _GPT()
        torch.manual_seed(0)
        if setup.endswith("FSDP"):  # the README's pattern: no rank holds the whole model
            params, buffers = init_sharded(skeleton, mesh)
            state = lf.TrainState.create(params, tx, buffers=buffers, seed=None)
        else:
            state = lf.TrainState.create(_GPT(), tx, seed=None)

        def train_step(state: Any, batch: Any) -> Any:
            x, y = batch

            def loss_fn(params: Any) -> torch.Tensor:
                logits, _ = lf.apply(skeleton, params, state.buffers, x, train=True)
                return loss_of(logits.reshape(-1, VOCAB), y.reshape(-1))

            loss, grads = lf.value_and_grad(loss_fn)(state.params)
            return state.apply_gradients(grads), {"loss": loss}

        strategy = lfd.DDP(mesh) if setup.endswith("DDP") else lfd.FSDP(mesh)
        step = lf.build(train_step, compile=False, strategy=strategy)
        state = step.prepare(state)

        def one(batch: Any) -> torch.Tensor:
            nonlocal state
            state, metrics = step(state, batch)
            return metrics["loss"]

        def held() -> float:
            return _storage_mb(lf.tree_leaves((state.params, state.opt_state)))
    else:
        torch.manual_seed(0)
        model = _GPT()
        if setup == "torch DDP":
            net: torch.nn.Module = (
                torch.nn.parallel.DistributedDataParallel(model) if mesh.is_distributed else model
            )
        else:
            from torch.distributed.fsdp import fully_shard

            if mesh.is_distributed:
                for block in model.blocks:
                    fully_shard(block, mesh=mesh.device_mesh)
                fully_shard(model, mesh=mesh.device_mesh)
            net = model
        opt = torch.optim.AdamW(
            net.parameters(), lr=LR, betas=BETAS, eps=EPS, weight_decay=WEIGHT_DECAY
        )

        def one(batch: Any) -> torch.Tensor:
            x, y = batch
            loss = loss_of(net(x).reshape(-1, VOCAB), y.reshape(-1))
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return loss.detach() if not mesh.is_distributed else mesh.all_reduce(loss.detach())

        def held() -> float:
            moments = [t for s in opt.state.values() for t in s.values()]
            return _storage_mb([*net.parameters(), *moments])

    return one, held


def _memory_run(mesh: lfd.Mesh, setup: str, steps: int) -> dict[str, Any]:
    """One rank of one setup: build, train `steps` + 1 steps, report memory and time."""
    import resource

    torch.set_num_threads(1)
    batches = [
        tuple(t.chunk(mesh.world_size)[mesh.global_rank] for t in b)
        for b in _gpt_batches(steps + 1)
    ]
    base = _rss_mb()
    one, held = _setup(mesh, setup)
    one(batches[0])  # warm-up (first-call checks)
    times, loss = [], torch.tensor(0.0)
    for batch in batches[1:]:
        mesh.barrier()
        start = time.perf_counter()
        loss = one(batch)
        mesh.barrier()
        times.append(time.perf_counter() - start)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {
        "peak_rss_mb": peak,
        "added_rss_mb": peak - base,
        "state_mb": held(),
        "ms_per_step": 1e3 * statistics.median(times),
        "loss": float(loss),
    }


def _paired_run(mesh: lfd.Mesh, steps: int) -> dict[str, float]:
    """lightfunc FSDP and torch FSDP2 steps alternated in the same ranks: a fair time ratio
    on a machine whose load changes (the separate runs above measure memory)."""
    torch.set_num_threads(1)
    batches = [
        tuple(t.chunk(mesh.world_size)[mesh.global_rank] for t in b)
        for b in _gpt_batches(steps + 1)
    ]
    runs = {name: _setup(mesh, name)[0] for name in ("lightfunc FSDP", "torch FSDP2")}
    times: dict[str, list[float]] = {name: [] for name in runs}
    for i, batch in enumerate(batches):
        for name, one in runs.items():
            mesh.barrier()
            start = time.perf_counter()
            one(batch)
            mesh.barrier()
            if i:  # the first is a warm-up
                times[name].append(time.perf_counter() - start)
    return {name: 1e3 * statistics.median(t) for name, t in times.items()}


def measure_memory(worlds: tuple[int, ...], steps: int, timeout_s: float) -> list[dict[str, Any]]:
    records = []
    for setup in SETUPS:
        for world in worlds:
            print(f"memory: {setup} x{world} ...", flush=True)
            ranks = spawn(_memory_run, world, args=(setup, steps), timeout=timeout_s)
            records.append(
                {
                    "setup": setup,
                    "world": world,
                    "peak_rss_mb": max(r["peak_rss_mb"] for r in ranks),
                    "added_rss_mb": max(r["added_rss_mb"] for r in ranks),
                    "state_mb": max(r["state_mb"] for r in ranks),
                    "ms_per_step": ranks[0]["ms_per_step"],
                    "loss": ranks[0]["loss"],
                }
            )
    paired = {}
    for world in worlds:
        print(f"paired timing x{world} ...", flush=True)
        paired[world] = spawn(_paired_run, world, args=(steps,), timeout=timeout_s)[0]
    for r in records:
        if r["setup"] in paired[r["world"]]:
            r["paired_ms_per_step"] = paired[r["world"]][r["setup"]]
    for r in records:
        one = next(b for b in records if b["setup"] == r["setup"] and b["world"] == min(worlds))
        first = next(b for b in records if b["world"] == min(worlds))
        r["loss_vs_1_process"] = abs(r["loss"] - one["loss"])
        r["loss_vs_lightfunc_1"] = abs(r["loss"] - first["loss"])
        ref = next(b for b in records if b["setup"] == "torch FSDP2" and b["world"] == r["world"])
        r["time_vs_fsdp2"] = r["ms_per_step"] / ref["ms_per_step"]
        if "paired_ms_per_step" in r:
            r["paired_vs_fsdp2"] = r["paired_ms_per_step"] / ref["paired_ms_per_step"]
        r["peak_vs_fsdp2"] = r["peak_rss_mb"] / ref["peak_rss_mb"]
    return records


def memory_markdown(records: list[dict[str, Any]], steps: int) -> str:
    params = sum(p.numel() for p in _GPT().parameters())
    lines = [
        f"Memory per rank, a {params / 1e6:.1f}M-parameter GPT ({BLOCKS} blocks, d_model "
        f"{D_MODEL}, fp32, AdamW), eager, gloo, one thread per rank, global batch "
        f"{GLOBAL_BATCH}x{SEQ} tokens split over the ranks, median of {steps} steps after one "
        f"warm-up step. The largest rank's figures.",
        "",
        "| setup | ranks | peak RSS MB | added by the run MB | state MB (storage) | ms/step "
        "| time vs FSDP2 | peak vs FSDP2 | loss vs 1 process |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['setup']} | {r['world']} | {r['peak_rss_mb']:.0f} | {r['added_rss_mb']:.0f} "
        f"| {r['state_mb']:.1f} | {r['ms_per_step']:.0f} | {r['time_vs_fsdp2']:.2f}x "
        f"| {r['peak_vs_fsdp2']:.2f}x | {r['loss_vs_1_process']:.1e} |"
        for r in records
    ]
    lines += [
        "",
        "Step time of lightfunc FSDP over torch FSDP2 with the two alternating, step by step, "
        "in the same ranks (the separate runs above saw different machine load): "
        + ", ".join(
            f"{r['world']} ranks {r['paired_vs_fsdp2']:.2f}x "
            f"({r['paired_ms_per_step']:.0f} ms vs "
            f"{next(b for b in records if b['setup'] == 'torch FSDP2' and b['world'] == r['world'])['paired_ms_per_step']:.0f})"
            for r in records
            if r["setup"] == "lightfunc FSDP" and "paired_vs_fsdp2" in r
        )
        + ".",
    ]
    return "\n".join(lines) + "\n"


def memory_chart(records: list[dict[str, Any]], path: Path) -> None:
    """Per-rank peak RSS and state storage against the number of ranks, one line per setup."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    for setup in SETUPS:
        rows = [r for r in records if r["setup"] == setup]
        worlds = [r["world"] for r in rows]
        axes[0].plot(worlds, [r["peak_rss_mb"] for r in rows], marker="o", label=setup)
        axes[1].plot(worlds, [r["state_mb"] for r in rows], marker="o", label=setup)
    for ax, label in zip(
        axes, ("peak RSS per rank, MB", "state storage per rank, MB"), strict=True
    ):
        ax.set_xlabel("ranks")
        ax.set_ylabel(label)
        ax.set_xticks(sorted({r["world"] for r in records}))
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"25.5M-parameter GPT, fp32 + AdamW, gloo on CPU (torch {torch.__version__})")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.distributed")
    parser.add_argument("--sections", default="memory", help="memory, speed, or both")
    parser.add_argument("--worlds", default="1,2,4", help="process counts of the memory section")
    parser.add_argument("--mem-steps", type=int, default=3)
    parser.add_argument("--workloads", default=",".join(Config.workloads))
    parser.add_argument("--eager", action="store_true", help="eager steps (default: compiled)")
    parser.add_argument("--rounds", type=int, default=Config.rounds)
    parser.add_argument("--steps", type=int, default=Config.steps)
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args(argv)
    sections = set(args.sections.split(","))
    results: dict[str, Any] = {
        "torch": torch.__version__,
        "lightfunc": lf.__version__,
        "cpu_count": os.cpu_count() or 1,
    }
    text = []
    if "memory" in sections:
        worlds = tuple(int(w) for w in args.worlds.split(","))
        records = measure_memory(worlds, args.mem_steps, timeout_s=900.0)
        results["memory"] = {"steps": args.mem_steps, "records": records}
        text.append(memory_markdown(records, args.mem_steps))
        text.append(MEMORY_MODEL)
    if "speed" in sections:
        config = Config(
            workloads=tuple(args.workloads.split(",")),
            compile=not args.eager,
            rounds=args.rounds,
            steps=args.steps,
        )
        results["speed"] = measure(config)
        text.append(markdown(results["speed"]))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "distributed.json").write_text(json.dumps(results, indent=2) + "\n")
    if "memory" in results:
        memory_chart(results["memory"]["records"], args.out / "distributed.png")
    table = "\n".join(text)
    (args.out / "distributed.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
