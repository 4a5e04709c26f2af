"""Memory and step time of sharded steps (lightfunc and torch's own) on 1, 2 and 4 processes.

    python -m bench.distributed [--sections memory,mixed,phases,time,speed] [--worlds 1,2,4]
                                [--setups "lightfunc FSDP,torch FSDP2"] [--time-worlds 2,4]
                                [--paired "lightfunc FSDP donated"] [--paired-with "torch FSDP2"]
                                [--time-steps 8] [--mixed-worlds 2] [--mem-steps 3]
                                [--workloads mlp,gpt]
                                [--eager] [--rounds 5] [--steps 10] [--out bench/results]

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

Setups with " compiled blocks" in their name ("lightfunc FSDP compiled blocks", the
same followed by " donated", "torch FSDP2 compiled blocks"; run with `--setups`) compile
each block's forward with inductor: lightfunc's through `lf.compile_regions` (the eager
FSDP step's per-block gathers, releases and backward re-gathers run around the compiled
forwards), FSDP2's through `torch.compile(block.forward)` before `fully_shard` (its
hooks eager likewise).
Their `gathered MB` is not counted (the counting dispatch mode cannot be active while
dynamo compiles), and their ratios are to FSDP2 compiled the same way when it ran.

`mixed` (default on, 2 processes): the same GPT in bf16-mixed, lightfunc FSDP
gathering Linear weights in bfloat16 (the default) and in float32, and FSDP2 with
`MixedPrecisionPolicy(param_dtype=bfloat16, reduce_dtype=float32)`: peak
memory and the bytes all-gathered per step.

`phases` (default on, 2 processes, fp32): lightfunc FSDP and FSDP2, the
resident set's peak in each phase of the step (between steps, forward,
backward, update), sampled every millisecond in a thread, with glibc's
mmap threshold fixed so that freed tensors leave the resident set: where
the difference between the two comes from.

`time` (not on by default; `memory` runs the same alternation, 3 steps): lightfunc
FSDP and FSDP2 alternating step by step at 2 and 4 ranks, with each step's CPU
time split by phase (forward, backward, update, between steps): where the step
time goes, and the per-step time ratio with its quartiles. `--paired` names the
lightfunc setup that `time` and `phases` set against FSDP2: the setups are
"lightfunc DDP", "lightfunc FSDP" and either followed by " donated" (`build(...,
donate=True)`, eager: the optimizer writes its update into the shards), or a
compiled-blocks setup; `--paired-with` names the FSDP2 setup it is set against
("torch FSDP2", or "torch FSDP2 compiled blocks").

`probe` (not on by default): whether per-unit all-gathers inside one compiled
graph trace in this torch (`_probe_run`): parametrized weights differentiated
by `torch.func.grad` (what lightfunc's compiled step uses) and by
`torch.autograd.grad` under `torch._dynamo.config.trace_autograd_ops`.

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
import contextlib
import dataclasses
import json
import os
import statistics
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

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
- lightfunc FSDP, eager: 16 B / 8 = 2 B, plus the functional update's new state
  shard beside the old one while the update runs (12 B / 8 = 1.5 B): 3.5 B per
  parameter, ~22B. The Linear weights are gathered in bf16 (`gather_in_compute_dtype`,
  the default), so autograd keeps no bf16 copy of a gathered weight for the backward:
  the saved-tensor hooks release the gathered storage itself (before this, autocast's
  copies of every block stayed until its backward: 2 B more, ~14B).
  Where it goes on this GPT: the `phases` table (the step's phases, measured).
- lightfunc FSDP, eager, `donate=True`: the update written into the shards, no second
  state shard: 2 B per parameter plus one block, as FSDP2: ~40B, ~35B.
- lightfunc FSDP, compiled blocks (`lf.compile_regions` + the eager step): gathered per
  block as eagerly, so as the two lines above: ~22B pure, ~35B donated.
- lightfunc FSDP, compiled step (everything gathered at once, in fp32): full fp32 parameters
  and gradients (8 B) + autocast's bf16 copies (2 B) + the 3.5 B above: ~6B.
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
# bf16-mixed (`--sections mixed`): lightfunc FSDP gathering Linear weights in bfloat16 (the
# default) or in float32, and FSDP2 with MixedPrecisionPolicy(bfloat16 params, float32 reduce).
MIXED_SETUPS = ("lightfunc FSDP bf16", "lightfunc FSDP bf16, fp32 gathers", "torch FSDP2 bf16")
# A setup name with this in it compiles each block's forward (inductor): lightfunc's with
# `lf.compile_regions` (the eager FSDP step keeps its per-block gathers around the compiled
# forwards), FSDP2's with `torch.compile(block.forward)` before `fully_shard`.
_COMPILED_BLOCKS = " compiled blocks"
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


def _reset_peak_rss() -> bool:
    """Reset this process's resident-set high-water mark (Linux >= 4.0: `clear_refs` 5)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def _peak_rss_mb() -> float:
    """The resident set's high-water mark since the process started or `_reset_peak_rss`."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _storage_mb(tensors: Any) -> float:
    seen: dict[int, int] = {}
    for x in tensors:
        if isinstance(x, torch.Tensor):
            s = (x.to_local() if hasattr(x, "to_local") else x).untyped_storage()
            seen[s.data_ptr()] = s.nbytes()
    return sum(seen.values()) / 2**20


def _no_phase(name: str) -> None:
    pass


def _setup(
    mesh: lfd.Mesh, setup: str, phase: Callable[[str], None] = _no_phase
) -> tuple[Callable[[Any], torch.Tensor], Callable[[], float]]:
    """`setup`'s model and optimizer: (one step on a batch -> loss, state storage MB).

    `phase(name)` is called as the step enters each phase ("forward",
    "backward", "update", "between"), for `--sections phases`.
    """

    def backward_starts(t: torch.Tensor) -> None:
        if t.requires_grad:
            t.register_hook(lambda g: phase("backward"))

    def loss_of(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.cross_entropy(logits.float(), y)

    if setup.startswith("lightfunc"):
        tx = lf.optim.adamw(LR, b1=BETAS[0], b2=BETAS[1], eps=EPS, weight_decay=WEIGHT_DECAY)
        with torch.device("meta"):  # the step needs the structure only: no weights
            skeleton = _GPT()
        if _COMPILED_BLOCKS in setup:  # each block's forward compiled, gathers eager
            lf.compile_regions(skeleton)
        torch.manual_seed(0)
        if "FSDP" in setup:  # the README's pattern: no rank holds the whole model
            params, buffers = init_sharded(skeleton, mesh)
            state = lf.TrainState.create(params, tx, buffers=buffers, seed=None)
        else:
            state = lf.TrainState.create(_GPT(), tx, seed=None)

        def train_step(state: Any, batch: Any) -> Any:
            x, y = batch

            def loss_fn(params: Any) -> torch.Tensor:
                phase("forward")
                logits, _ = lf.apply(skeleton, params, state.buffers, x, train=True)
                backward_starts(logits)
                return loss_of(logits.reshape(-1, VOCAB), y.reshape(-1))

            loss, grads = lf.value_and_grad(loss_fn)(state.params)
            phase("update")
            return state.apply_gradients(grads), {"loss": loss}

        strategy = (
            lfd.DDP(mesh)
            if "FSDP" not in setup
            else lfd.FSDP(mesh, gather_in_compute_dtype="fp32 gathers" not in setup)
        )
        precision = "bf16-mixed" if "bf16" in setup else None
        step = lf.build(  # " donated": the update written into the state (shards) in place
            train_step,
            compile=False,
            strategy=strategy,
            precision=precision,
            donate=setup.endswith(" donated"),
        )
        state = step.prepare(state)

        def one(batch: Any) -> torch.Tensor:
            nonlocal state
            state, metrics = step(state, batch)
            phase("between")
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
            from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

            policy = (
                MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
                if "bf16" in setup
                else MixedPrecisionPolicy()
            )
            if _COMPILED_BLOCKS in setup:  # as lightfunc's: FSDP2's hooks stay eager
                for block in model.blocks:
                    block.forward = torch.compile(block.forward)
            if mesh.is_distributed:
                for block in model.blocks:
                    fully_shard(block, mesh=mesh.device_mesh, mp_policy=policy)
                fully_shard(model, mesh=mesh.device_mesh, mp_policy=policy)
            net = model
        opt = torch.optim.AdamW(
            net.parameters(), lr=LR, betas=BETAS, eps=EPS, weight_decay=WEIGHT_DECAY
        )

        def one(batch: Any) -> torch.Tensor:
            x, y = batch
            phase("forward")
            logits = net(x)
            backward_starts(logits)
            loss = loss_of(logits.reshape(-1, VOCAB), y.reshape(-1))
            loss.backward()
            phase("update")
            opt.step()
            opt.zero_grad(set_to_none=True)
            phase("between")
            return loss.detach() if not mesh.is_distributed else mesh.all_reduce(loss.detach())

        def held() -> float:
            moments = [t for s in opt.state.values() for t in s.values()]
            return _storage_mb([*net.parameters(), *moments])

    return one, held


def _load_shared_code() -> None:
    """What any setup may load on first use, loaded in every setup before the baseline.

    The first operation on a meta-device tensor (lightfunc's `init_sharded`
    path) imports torch's meta registrations and decompositions (about 900
    modules, ~145 MB of resident set on this machine); DTensor and FSDP2 are
    imported by the sharded setups. Counting them in one setup's peak and
    not another's would measure imports, not training.
    """
    import torch.distributed.fsdp
    import torch.distributed.tensor

    torch.empty(2, device="meta").normal_()


class _GatherBytes(TorchDispatchMode):
    """Bytes that all-gathers returned on this rank (functional and c10d collectives)."""

    def __init__(self) -> None:
        super().__init__()
        self.bytes = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        name = func.name()
        if name == "_c10d_functional::all_gather_into_tensor":
            self.bytes += out.numel() * out.element_size()
        elif name.startswith("c10d::") and "allgather" in name:  # FSDP2: into its own buffer
            first = args[0][0] if isinstance(args[0], list) else args[0]
            self.bytes += first.numel() * first.element_size()
        return out


def _memory_run(mesh: lfd.Mesh, setup: str, steps: int) -> dict[str, Any]:
    """One rank of one setup: build, train `steps` + 1 steps, report memory and time."""
    import resource

    torch.set_num_threads(1)
    batches = [
        tuple(t.chunk(mesh.world_size)[mesh.global_rank] for t in b)
        for b in _gpt_batches(steps + 1)
    ]
    _load_shared_code()
    compiled = _COMPILED_BLOCKS in setup
    if compiled:  # the ranks share the cores: no compile worker pool per rank
        torch._inductor.config.compile_threads = 1
    base = _rss_mb()
    one, held = _setup(mesh, setup)
    # A dispatch mode cannot be active while dynamo compiles: compiled setups' gathers uncounted.
    with contextlib.nullcontext(None) if compiled else _GatherBytes() as gathers:
        one(batches[0])  # warm-up (first-call checks, compiles), its all-gathers counted
    # The steps after the first alone: lightfunc's first call runs `build`'s checks (a second
    # eager run of the step; with donate=True on a copy of the state), which FSDP2 does not.
    reset = _reset_peak_rss()
    before_steps = _rss_mb()
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
        "steady_peak_rss_mb": _peak_rss_mb() if reset else float("nan"),
        # What the timed steps added on top of everything resident before them (the state,
        # and for compiled setups the compiler's own memory): the steps' transient.
        "steps_rise_mb": _peak_rss_mb() - before_steps if reset else float("nan"),
        "added_rss_mb": peak - base,
        "state_mb": held(),
        "ms_per_step": 1e3 * statistics.median(times),
        "loss": float(loss),
        "gathered_mb": float("nan") if gathers is None else gathers.bytes / 2**20,
    }


PAIRED = ("lightfunc FSDP", "torch FSDP2")


def _paired_run(mesh: lfd.Mesh, steps: int, paired: tuple[str, ...] = PAIRED) -> dict[str, Any]:
    """lightfunc FSDP and torch FSDP2 steps alternated in the same ranks: a fair time ratio
    on a machine whose load changes (the separate runs above measure memory).

    Per step and setup (after one warm-up step each): the wall time, the
    process's CPU time (every thread: the rank's own and gloo's) and the CPU
    time of each phase of the step (`_setup`'s phase marks: forward,
    backward, update, between steps), on this rank.
    """
    torch.set_num_threads(1)
    batches = [
        tuple(t.chunk(mesh.world_size)[mesh.global_rank] for t in b)
        for b in _gpt_batches(steps + 1)
    ]
    _load_shared_code()
    if any(_COMPILED_BLOCKS in name for name in paired):  # ranks share the cores: one compile
        torch._inductor.config.compile_threads = 1  # thread per rank, no worker pool
    marks: list[tuple[str, float]] = []
    runs = {
        name: _setup(mesh, name, phase=lambda p: marks.append((p, time.process_time())))[0]
        for name in paired
    }
    out: dict[str, dict[str, list[float]]] = {
        name: {key: [] for key in ("wall", "cpu", *PHASES)} for name in runs
    }
    for i, batch in enumerate(batches):
        for name, one in runs.items():
            mesh.barrier()
            wall, cpu = time.perf_counter(), time.process_time()
            marks[:] = [("forward", cpu)]  # the step's own set-up counts as forward
            one(batch)
            cpu_end, wall_end = time.process_time(), time.perf_counter()
            mesh.barrier()
            if not i:  # the first is a warm-up
                continue
            out[name]["wall"].append(1e3 * (wall_end - wall))
            out[name]["cpu"].append(1e3 * (cpu_end - cpu))
            spent = dict.fromkeys(PHASES, 0.0)
            for (phase, start), (_, end) in zip(marks, [*marks[1:], ("", cpu_end)], strict=True):
                spent[phase] += 1e3 * (end - start)
            for phase in PHASES:
                out[name][phase].append(spent[phase])
    return out


def _quartiles(values: list[float]) -> tuple[float, float, float]:
    q = statistics.quantiles(values, n=4, method="inclusive")
    return q[0], statistics.median(values), q[2]


def _paired_summary(world: int, steps: dict[str, dict[str, list[float]]]) -> dict[str, Any]:
    """Medians per setup, and the per-step ratios lightfunc FSDP / FSDP2 (median, quartiles)."""
    mine = next(per for name, per in steps.items() if name.startswith("lightfunc"))
    ref = next(per for name, per in steps.items() if name.startswith("torch FSDP2"))
    return {
        "world": world,
        "steps": len(mine["wall"]),
        "setups": {
            name: {key: statistics.median(v) for key, v in per.items()}
            for name, per in steps.items()
        },
        "wall_ratio": _quartiles([a / b for a, b in zip(mine["wall"], ref["wall"], strict=True)]),
        "cpu_ratio": _quartiles([a / b for a, b in zip(mine["cpu"], ref["cpu"], strict=True)]),
        "per_step": steps,
    }


def measure_time(
    worlds: tuple[int, ...], steps: int, timeout_s: float, paired: tuple[str, ...] = PAIRED
) -> list[dict[str, Any]]:
    """The paired timing alone (`--sections time`), at each world size."""
    out = []
    for world in worlds:
        print(f"paired timing x{world} ...", flush=True)
        out.append(
            _paired_summary(
                world, spawn(_paired_run, world, args=(steps, paired), timeout=timeout_s)[0]
            )
        )
    return out


def time_markdown(pairs: list[dict[str, Any]]) -> str:
    lines = [
        "Where the step time goes: lightfunc FSDP and torch FSDP2 (the setups named in the "
        "rows) alternating step by step in the same ranks (fp32), rank 0, medians over the steps after one warm-up. CPU "
        "time is the process's (the rank's thread and gloo's), so it leaves out the time spent "
        "waiting for the other ranks or for a core; the phases split it (forward: the step's "
        "set-up and the forward, update: the optimizer and, for lightfunc, the step's metric "
        "and buffer reductions; between: FSDP2's `zero_grad` and loss all-reduce). Ratios: "
        "per step, lightfunc / FSDP2, median (quartiles).",
        "",
        "| ranks | setup | wall ms | CPU ms | forward | backward | update | between "
        "| wall ratio | CPU ratio |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for pair in pairs:
        for name, m in pair["setups"].items():
            mine = name.startswith("lightfunc")
            ratios = (
                " | ".join(
                    f"{q[1]:.2f}x ({q[0]:.2f}-{q[2]:.2f})"
                    for q in (pair["wall_ratio"], pair["cpu_ratio"])
                )
                if mine
                else " | "
            )
            lines.append(
                f"| {pair['world']} | {name} | {m['wall']:.0f} | {m['cpu']:.0f} | "
                + " | ".join(f"{m[p]:.0f}" for p in ("forward", "backward", "update", "between"))
                + f" | {ratios} |"
            )
    return "\n".join(lines) + "\n"


PHASES = ("between", "forward", "backward", "update")


def _phase_run(mesh: lfd.Mesh, setup: str, steps: int) -> dict[str, float]:
    """One rank: the resident set's high-water mark in each phase of `steps` steps, in MB."""
    torch.set_num_threads(1)
    batches = [
        tuple(t.chunk(mesh.world_size)[mesh.global_rank] for t in b)
        for b in _gpt_batches(steps + 1)
    ]
    _load_shared_code()
    current, peaks = ["set-up"], {"base": _rss_mb()}
    one, _ = _setup(mesh, setup, phase=lambda name: current.__setitem__(0, name))
    one(batches[0])  # warm-up: first-call checks
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            rss, name = _rss_mb(), current[0]
            peaks[name] = max(peaks.get(name, 0.0), rss)
            time.sleep(0.001)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    for batch in batches[1:]:
        one(batch)
    stop.set()
    sampler.join()
    return peaks


def measure_phases(
    world: int, steps: int, timeout_s: float, setups: tuple[str, ...] = PAIRED
) -> list[dict[str, Any]]:
    """Where each setup's memory goes: per-phase RSS peaks, lightfunc FSDP vs FSDP2.

    glibc returns a freed block to the system only if it was mmap-ed, and its
    mmap threshold grows with the blocks freed; fixing it at 64 KiB (in the
    spawned ranks' environment) makes the resident set follow the live tensors.
    """
    records = []
    saved = os.environ.get("MALLOC_MMAP_THRESHOLD_")
    os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"
    try:
        for setup in setups:
            print(f"phases: {setup} x{world} ...", flush=True)
            ranks = spawn(_phase_run, world, args=(setup, steps), timeout=timeout_s)
            records.append({"setup": setup, "world": world, **ranks[0]})
    finally:
        if saved is None:
            os.environ.pop("MALLOC_MMAP_THRESHOLD_")
        else:
            os.environ["MALLOC_MMAP_THRESHOLD_"] = saved
    return records


def phases_markdown(records: list[dict[str, Any]], steps: int) -> str:
    lines = [
        f"Where the memory goes (fp32, {records[0]['world']} ranks, rank 0, {steps} steps "
        f"after a warm-up): the resident set's highest value in each phase of the step, MB, "
        f"sampled every millisecond, with glibc's mmap threshold fixed at 64 KiB so that freed "
        f"tensors leave the resident set. `base`: before the model is built (after loading "
        f"the shared code).",
        "",
        "| setup | base | between steps | forward | backward | update | peak |",
        "|---|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['setup']} | {r['base']:.0f} | "
        + " | ".join(f"{r.get(name, float('nan')):.0f}" for name in PHASES)
        + f" | {max(r.get(name, 0.0) for name in PHASES):.0f} |"
        for r in records
    ]
    return "\n".join(lines) + "\n"


def measure_memory(
    worlds: tuple[int, ...],
    steps: int,
    timeout_s: float,
    setups: tuple[str, ...] = SETUPS,
    paired: bool = True,
) -> list[dict[str, Any]]:
    records = []
    for setup in setups:
        for world in worlds:
            print(f"memory: {setup} x{world} ...", flush=True)
            ranks = spawn(_memory_run, world, args=(setup, steps), timeout=timeout_s)
            records.append(
                {
                    "setup": setup,
                    "world": world,
                    "peak_rss_mb": max(r["peak_rss_mb"] for r in ranks),
                    "steady_peak_rss_mb": max(r.get("steady_peak_rss_mb", 0.0) for r in ranks),
                    "steps_rise_mb": max(r.get("steps_rise_mb", 0.0) for r in ranks),
                    "added_rss_mb": max(r["added_rss_mb"] for r in ranks),
                    "state_mb": max(r["state_mb"] for r in ranks),
                    "ms_per_step": ranks[0]["ms_per_step"],
                    "loss": ranks[0]["loss"],
                    "gathered_mb": max(r["gathered_mb"] for r in ranks),
                }
            )
    pairs = {}
    for world in worlds if paired else ():
        print(f"paired timing x{world} ...", flush=True)
        steps_of = spawn(_paired_run, world, args=(steps,), timeout=timeout_s)[0]
        pairs[world] = {name: statistics.median(per["wall"]) for name, per in steps_of.items()}
    for r in records:
        if r["setup"] in pairs.get(r["world"], {}):
            r["paired_ms_per_step"] = pairs[r["world"]][r["setup"]]
    for r in records:
        one = next(b for b in records if b["setup"] == r["setup"] and b["world"] == min(worlds))
        first = next(b for b in records if b["world"] == min(worlds))
        r["loss_vs_1_process"] = abs(r["loss"] - one["loss"])
        r["loss_vs_lightfunc_1"] = abs(r["loss"] - first["loss"])
        fsdp2 = [b for b in records if b["setup"].startswith("torch FSDP2")]
        ref = next(  # FSDP2 compiled the same way if it ran, else the first FSDP2 row
            (
                b
                for b in fsdp2
                if b["world"] == r["world"]
                and (_COMPILED_BLOCKS in b["setup"]) == (_COMPILED_BLOCKS in r["setup"])
            ),
            next((b for b in fsdp2 if b["world"] == r["world"]), r),  # else itself (`--setups`)
        )
        r["time_vs_fsdp2"] = r["ms_per_step"] / ref["ms_per_step"]
        if "paired_ms_per_step" in r:
            r["paired_vs_fsdp2"] = r["paired_ms_per_step"] / ref["paired_ms_per_step"]
        r["peak_vs_fsdp2"] = r["peak_rss_mb"] / ref["peak_rss_mb"]
        r["steady_vs_fsdp2"] = r["steady_peak_rss_mb"] / ref["steady_peak_rss_mb"]
    return records


def memory_markdown(records: list[dict[str, Any]], steps: int, *, mixed: bool = False) -> str:
    params = sum(p.numel() for p in _GPT().parameters())
    how = "bf16-mixed (float32 master weights)" if mixed else "fp32"
    lines = [
        f"Memory per rank, a {params / 1e6:.1f}M-parameter GPT ({BLOCKS} blocks, d_model "
        f"{D_MODEL}, {how}, AdamW), eager, gloo, one thread per rank, global batch "
        f"{GLOBAL_BATCH}x{SEQ} tokens split over the ranks, median of {steps} steps after one "
        f"warm-up step. The largest rank's figures. Every setup first loads the code any of "
        f"them loads (meta-device registrations, DTensor, FSDP2: ~150 MB) before its baseline. "
        f"`gathered MB`: what the all-gathers of one step returned on a rank. `steps after "
        f"the first`: the resident set's peak over the timed steps alone (its high-water mark "
        f"reset after the first step, which for lightfunc runs `build`'s first-call checks); "
        f"`rise`: that peak minus the resident set just before those steps (the steps' "
        f"transient, without what was resident before them: the state, and for compiled "
        f"setups the compiler's own memory).",
        "",
        "| setup | ranks | peak RSS MB | added by the run MB | peak RSS, steps after the first MB "
        "| rise MB | state MB (storage) | gathered MB | ms/step | time vs FSDP2 | peak vs FSDP2 "
        "| steps after the first vs FSDP2 | loss vs 1 process |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['setup']} | {r['world']} | {r['peak_rss_mb']:.0f} | {r['added_rss_mb']:.0f} "
        f"| {r.get('steady_peak_rss_mb', float('nan')):.0f} "
        f"| {r.get('steps_rise_mb', float('nan')):.0f} "
        f"| {r['state_mb']:.1f} | {r['gathered_mb']:.1f} | {r['ms_per_step']:.0f} "
        f"| {r['time_vs_fsdp2']:.2f}x | {r['peak_vs_fsdp2']:.2f}x "
        f"| {r.get('steady_vs_fsdp2', float('nan')):.2f}x | {r['loss_vs_1_process']:.1e} |"
        for r in records
    ]
    if mixed:  # the setups differ, not the world sizes: each loss against the first row's
        first = records[0]
        lines[2] = lines[2].replace("loss vs 1 process", f"loss vs {first['setup']}")
        lines[4:] = [
            line.rsplit("|", 2)[0] + f"| {abs(r['loss'] - first['loss']):.1e} |"
            for line, r in zip(lines[4:], records, strict=True)
        ]
        return "\n".join(lines) + "\n"
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


# ---- compiled per-unit gathers: what traces in torch 2.13 (a probe) ----------------------------


class _GatherRows(torch.nn.Module):
    """A parametrization: this rank's rows -> the full tensor, gathered where it is read."""

    def __init__(self, group: Any) -> None:
        super().__init__()
        self.group_name, self.world = group.group_name, group.size()

    def forward(self, local: torch.Tensor) -> torch.Tensor:
        ops = torch.ops._c10d_functional
        gathered = ops.all_gather_into_tensor(local, self.world, self.group_name)
        return ops.wait_tensor(gathered)  # autograd: the backward reduce-scatters (sums)


def _probe_run(mesh: lfd.Mesh) -> dict[str, Any]:
    """A 3-block MLP whose Linear weights are gathered at their use inside one compiled graph."""
    from torch.nn.utils import parametrize

    torch.set_num_threads(1)
    torch._inductor.config.compile_threads = 1
    torch.manual_seed(0)
    width = 8
    net = torch.nn.Sequential(*(torch.nn.Linear(width, width) for _ in range(3)))
    full = {n: p.detach().clone() for n, p in net.named_parameters()}
    local = {n: p.chunk(mesh.world_size)[mesh.global_rank].clone() for n, p in full.items()}
    group = mesh.device_mesh.get_group()
    for layer in list(net):
        for name in ("weight", "bias"):
            parametrize.register_parametrization(layer, name, _GatherRows(group), unsafe=True)
    x, y = torch.randn(4, width), torch.randn(4, width)

    def loss_fn(params: dict[str, torch.Tensor]) -> torch.Tensor:
        names = {n: n.replace(".weight", ".parametrizations.weight.original") for n in params}
        names = {n: v.replace(".bias", ".parametrizations.bias.original") for n, v in names.items()}
        out = torch.func.functional_call(net, {names[n]: t for n, t in params.items()}, (x,))
        return ((out - y) ** 2).mean()

    def by_autograd(params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        leaves = {n: t.detach().requires_grad_() for n, t in params.items()}
        grads = torch.autograd.grad(loss_fn(leaves), list(leaves.values()))
        return dict(zip(leaves, grads, strict=True))

    out: dict[str, Any] = {}
    try:
        torch.func.grad(loss_fn)(local)
        out["torch.func eager"] = "ran"
    except RuntimeError as e:
        out["torch.func eager"] = str(e).split(" For more details")[0]
    start = time.perf_counter()
    with torch._dynamo.config.patch(trace_autograd_ops=True):
        grads = torch.compile(by_autograd, fullgraph=True)(local)
    out["compile_s"] = time.perf_counter() - start

    def one_process(params: dict[str, torch.Tensor]) -> torch.Tensor:
        ref = torch.nn.Sequential(*(torch.nn.Linear(width, width) for _ in range(3)))
        return ((torch.func.functional_call(ref, params, (x,)) - y) ** 2).mean()

    expected = torch.func.grad(one_process)(full)  # every rank has the same batch: grads sum
    out["grad_error"] = max(
        float(
            (grads[n] - mesh.world_size * expected[n].chunk(mesh.world_size)[mesh.global_rank])
            .abs()
            .max()
        )
        for n in full
    )
    return out


def probe_markdown(result: dict[str, Any]) -> str:
    return (
        "Compiled per-unit gathers, a probe (2 gloo ranks, a 3-layer MLP whose weights are "
        "parametrized to all-gather where they are read): `torch.func.grad` over it, eager: "
        f'"{result["torch.func eager"]}". `torch.autograd.grad` compiled with '
        "`fullgraph=True` under `torch._dynamo.config.trace_autograd_ops=True`: one graph, "
        f"compiled in {result['compile_s']:.0f} s, gradients within "
        f"{result['grad_error']:.1e} of one process's.\n"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.distributed")
    parser.add_argument(
        "--sections",
        default="memory,mixed,phases",
        help="comma-separated: memory, mixed, phases, time, probe, speed",
    )
    parser.add_argument(
        "--setups",
        default=",".join(SETUPS),
        help="setups of the memory section (a partial rerun: no paired timing, ratios to itself)",
    )
    parser.add_argument("--time-worlds", default="2,4", help="process counts of the time section")
    parser.add_argument(
        "--paired",
        default="lightfunc FSDP",
        help="the lightfunc setup the time and phases sections set against FSDP2 (e.g. "
        '"lightfunc FSDP donated")',
    )
    parser.add_argument(
        "--paired-with",
        default="torch FSDP2",
        help='the FSDP2 setup it is set against (e.g. "torch FSDP2 compiled blocks")',
    )
    parser.add_argument("--time-steps", type=int, default=8, help="timed steps of the time section")
    parser.add_argument("--worlds", default="1,2,4", help="process counts of the memory section")
    parser.add_argument("--mixed-worlds", default="2", help="process counts of the mixed section")
    parser.add_argument("--mem-steps", type=int, default=3)
    parser.add_argument("--workloads", default=",".join(Config.workloads))
    parser.add_argument("--eager", action="store_true", help="eager steps (default: compiled)")
    parser.add_argument("--rounds", type=int, default=Config.rounds)
    parser.add_argument("--steps", type=int, default=Config.steps)
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args(argv)
    sections = set(args.sections.split(","))
    paired = (args.paired, args.paired_with)
    results: dict[str, Any] = {
        "torch": torch.__version__,
        "lightfunc": lf.__version__,
        "cpu_count": os.cpu_count() or 1,
    }
    text = []
    if "memory" in sections:
        worlds = tuple(int(w) for w in args.worlds.split(","))
        setups = tuple(args.setups.split(","))
        records = measure_memory(
            worlds, args.mem_steps, timeout_s=900.0, setups=setups, paired=setups == SETUPS
        )
        results["memory"] = {"steps": args.mem_steps, "records": records}
        text.append(memory_markdown(records, args.mem_steps))
        text.append(MEMORY_MODEL)
    if "mixed" in sections:
        worlds = tuple(int(w) for w in args.mixed_worlds.split(","))
        mixed = measure_memory(
            worlds, args.mem_steps, timeout_s=900.0, setups=MIXED_SETUPS, paired=False
        )
        results["mixed"] = {"steps": args.mem_steps, "records": mixed}
        text.append(memory_markdown(mixed, args.mem_steps, mixed=True))
    if "phases" in sections:
        phases = measure_phases(2, args.mem_steps, timeout_s=900.0, setups=paired)
        results["phases"] = {"steps": args.mem_steps, "records": phases}
        text.append(phases_markdown(phases, args.mem_steps))
    if "time" in sections:
        worlds = tuple(int(w) for w in args.time_worlds.split(","))
        pairs = measure_time(worlds, args.time_steps, timeout_s=1800.0, paired=paired)
        results["time"] = {"records": pairs}
        text.append(time_markdown(pairs))
    if "probe" in sections:
        print("probe: compiled per-unit gathers x2 ...", flush=True)
        results["probe"] = spawn(_probe_run, 2, timeout=900.0)[0]
        text.append(probe_markdown(results["probe"]))
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
