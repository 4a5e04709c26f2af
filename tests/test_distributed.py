"""lightfunc.distributed: 2 processes (gloo, CPU) against one process on the concatenated batch.

Process start-up and compilation dominate, so each group of checks runs in
one `spawn` of 2 ranks (a module-scoped fixture), and each test asserts on
its part of the results. Every spawn is bounded by a timeout: nothing hangs.
"""

from __future__ import annotations

import functools
import traceback
import warnings
from collections.abc import Callable
from typing import Any

import pytest
import torch
from helpers import make_model, make_steps, ok_results
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.data import DataLoader, RandomSampler, TensorDataset

import lightfunc as lf
import lightfunc.distributed as lfd
from lightfunc.distributed._spawn import spawn

WORLD = 2
STEPS = 12
TOL = 1e-6


# ---- what the ranks run -----------------------------------------------------------------


def _data(
    steps: int = STEPS, batch: int = 8, seed: int = 1
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Global batches; rank r trains on the r-th half of each."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(steps, batch, 8, generator=g)
    y = torch.randint(0, 3, (steps, batch), generator=g)
    return [(x[i], y[i]) for i in range(steps)]


def _mine(batch: Any, mesh: lfd.Mesh) -> Any:
    return tuple(t.chunk(mesh.world_size)[mesh.global_rank] for t in batch)


def _optimizer() -> lf.optim.GradientTransformation:
    # Clipping by the global norm checks that a sharded update reduces the norm over ranks.
    return lf.optim.chain(lf.optim.clip_by_global_norm(0.5), lf.optim.adamw(1e-2, weight_decay=0.1))


def _train(step: Any, state: Any, batches: list[Any]) -> tuple[Any, dict[str, torch.Tensor]]:
    metrics: dict[str, torch.Tensor] = {}
    for batch in batches:
        state, metrics = step(state, batch)
    return state, metrics


def _reference(batchnorm: bool = False) -> tuple[lf.TrainState, dict[str, torch.Tensor]]:
    """One process, eager, on the concatenated (global) batches."""
    model = make_model(0, batchnorm=batchnorm)
    train_step, _ = make_steps(model)
    state = lf.TrainState.create(model, _optimizer(), seed=None)
    return _train(lf.build(train_step, compile=False), state, _data())


def _max_diff(a: Any, b: Any) -> float:
    la, lb = lf.tree_leaves(a), lf.tree_leaves(b)
    assert len(la) == len(lb)
    return max(
        float((x.double() - y.double()).abs().max()) if x.numel() else 0.0
        for x, y in zip(la, lb, strict=True)
    )


def _dp_run(mesh: lfd.Mesh, compile: bool, donate: bool = False) -> dict[str, Any]:
    model = make_model(0, batchnorm=False)
    train_step, _ = make_steps(model)
    state = lf.TrainState.create(model, _optimizer(), seed=None)
    pointers = [t.data_ptr() for t in lf.tree_leaves(state.params)]
    step = lf.build(lfd.data_parallel(train_step, mesh), compile=compile, donate=donate)
    graphs = lf.compile_counts()["graphs"]
    state, metrics = _train(step, state, [_mine(b, mesh) for b in _data()])
    ref, ref_metrics = _reference()
    return {
        "params": _max_diff(state.params, ref.params),
        "opt_state": _max_diff(state.opt_state, ref.opt_state),
        "loss": abs(float(metrics["loss"]) - float(ref_metrics["loss"])),
        "graphs": lf.compile_counts()["graphs"] - graphs,
        # Donated: the parameters stayed in the storage they were created in.
        "same_storage": [t.data_ptr() for t in lf.tree_leaves(state.params)] == pointers,
    }


def _fsdp_run(mesh: lfd.Mesh, compile: bool, donate: bool = False) -> dict[str, Any]:
    from torch.distributed.tensor import DTensor, Shard

    model = make_model(0, batchnorm=False)
    train_step, _ = make_steps(model)
    state = lfd.shard_state(lf.TrainState.create(model, _optimizer(), seed=None), mesh)
    step = lf.build(lfd.fully_sharded(train_step, mesh), compile=compile, donate=donate)
    graphs = lf.compile_counts()["graphs"]
    batches = [_mine(b, mesh) for b in _data()]
    # From the second step on: the shards `shard_state` makes are `detach()`ed aliases (views)
    # of the tensors they were cut into, which they keep alive as their `_base`; sharing storage,
    # they are not written in place, so the first update runs pure. Its new shards are their own.
    state, _ = step(state, batches[0])
    pointers = _local_pointers(state)
    state, metrics = _train(step, state, batches[1:])
    new_graphs = lf.compile_counts()["graphs"] - graphs
    same_storage = _local_pointers(state) == pointers
    weight = state.params["3.weight"]  # (3, 16): 2 rows on rank 0, 1 on rank 1
    layout = (
        isinstance(weight, DTensor)
        and weight.placements == (Shard(0),)
        and tuple(weight.to_local().shape) == ((2, 16) if mesh.global_rank == 0 else (1, 16))
        and all(isinstance(x, DTensor) for x in lf.tree_leaves(state.opt_state) if x.ndim > 0)
    )
    full = lfd.gather_state(state)
    ref, ref_metrics = _reference()
    return {
        "params": _max_diff(full.params, ref.params),
        "opt_state": _max_diff(full.opt_state, ref.opt_state),
        "loss": abs(float(metrics["loss"]) - float(ref_metrics["loss"])),
        "layout": layout,
        "graphs": new_graphs,
        # Donated (eager): every parameter and moment shard was updated where it lives.
        "same_storage": same_storage,
    }


def _local_pointers(state: lf.TrainState) -> list[int]:
    """Where each parameter and moment (shard) keeps its values on this rank."""
    leaves = lf.tree_leaves((state.params, state.opt_state))
    return [(x.to_local() if hasattr(x, "to_local") else x).data_ptr() for x in leaves if x.ndim]


def _two_states_run(mesh: lfd.Mesh) -> dict[str, float]:
    """A state of two TrainStates (one with a 0-d and an uneven 1-d parameter), DP and FSDP."""
    model = make_model(0, batchnorm=False)
    extra = {"temperature": torch.tensor(1.5), "offset": torch.zeros(3)}

    def train_step(state: dict[str, lf.TrainState], batch: Any) -> Any:
        x, y = batch

        def loss_fn(params: Any) -> torch.Tensor:
            logits, _ = lf.apply(model, params["net"], {}, x, train=True)
            logits = logits * params["extra"]["temperature"] + params["extra"]["offset"]
            return torch.nn.functional.cross_entropy(logits, y)

        params = {"net": state["net"].params, "extra": state["extra"].params}
        loss, grads = lf.value_and_grad(loss_fn)(params)
        return {
            "net": state["net"].apply_gradients(grads["net"]),
            "extra": state["extra"].apply_gradients(grads["extra"]),
        }, {"loss": loss}

    def fresh() -> dict[str, lf.TrainState]:
        return {
            "net": lf.TrainState.create(model, _optimizer(), seed=None),
            "extra": lf.TrainState.create(dict(extra), lf.optim.sgd(0.1, momentum=0.9), seed=None),
        }

    ref, _ = _train(lf.build(train_step, compile=False), fresh(), _data())
    mine = [_mine(b, mesh) for b in _data()]
    dp, _ = _train(lf.build(lfd.data_parallel(train_step, mesh), compile=False), fresh(), mine)
    fsdp_step = lf.build(lfd.fully_sharded(train_step, mesh), compile=False)
    fsdp, _ = _train(fsdp_step, lfd.shard_state(fresh(), mesh), mine)
    fsdp = lfd.gather_state(fsdp)
    return {
        name: max(_max_diff(got[k].params, ref[k].params) for k in ref)
        for name, got in (("dp", dp), ("fsdp", fsdp))
    }


def _collectives(mesh: lfd.Mesh) -> dict[str, Any]:
    r = mesh.global_rank
    tree = {"t": torch.tensor([1.0, 2.0]) * (r + 1), "n": r + 1, "i": torch.tensor(r)}
    out: dict[str, Any] = {
        "mean": mesh.all_reduce(tree),
        "sum": mesh.all_reduce(tree, op="sum"),
        "max": mesh.all_reduce(tree, op="max"),
        "gather": mesh.all_gather({"t": torch.tensor([r, 10 * r]), "s": f"rank{r}"}),
        "broadcast": mesh.broadcast({"t": torch.full((2,), float(r)), "s": f"rank{r}"}),
        "input_untouched": bool(torch.equal(tree["t"], torch.tensor([1.0, 2.0]) * (r + 1))),
    }
    mesh.barrier()
    try:
        mesh.broadcast({"t": torch.zeros(r + 1)})
    except ValueError as e:
        out["broadcast_mismatch"] = str(e)
    # all_reduce checked the same way: before, other keys reduced unrelated values silently,
    # other shapes left one rank waiting, other ops gave each rank the sum.
    mismatched = {
        "keys": lambda: mesh.all_reduce({"lr": 1.0} if r == 0 else {"loss": 3.0}),
        "shape": lambda: mesh.all_reduce(torch.ones(2 + 2 * r)),
        "dtype": lambda: mesh.all_reduce(
            torch.ones(2, dtype=torch.float32 if r else torch.float64)
        ),
        "op": lambda: mesh.all_reduce(torch.ones(2), op="sum" if r == 0 else "max"),
    }
    for name, call in mismatched.items():
        try:
            call()
            out[f"all_reduce_{name}"] = "no error"
        except ValueError as e:
            out[f"all_reduce_{name}"] = str(e)
    return out


def _buffers_and_metrics(mesh: lfd.Mesh) -> dict[str, Any]:
    """BatchNorm buffers stay equal over ranks; metrics are reduced by kind."""
    model = make_model(0, batchnorm=True)
    train_step, eval_step = make_steps(model)

    def with_counts(state: Any, batch: Any) -> Any:
        new, metrics = train_step(state, batch)
        n = torch.tensor(batch[1].shape[0])
        return new, {**metrics, "n": n, "rank0": torch.tensor(mesh.global_rank == 0)}

    state = lf.TrainState.create(model, _optimizer(), seed=None)
    step = lf.build(lfd.data_parallel(with_counts, mesh), compile=False)
    state, metrics = _train(step, state, [_mine(b, mesh) for b in _data(steps=3)])
    everyone = mesh.all_gather(state.buffers)
    same = all(bool((v[0] == v[1]).all()) for v in everyone.values())
    batch = _data(steps=1)[0]
    dp_eval = lfd.data_parallel_eval(eval_step, mesh)(state, _mine(batch, mesh))
    full_eval = eval_step(state, batch)
    sharded = lfd.shard_state(state, mesh)
    fsdp_eval = lfd.fully_sharded_eval(eval_step, mesh)(sharded, _mine(batch, mesh))
    return {
        "buffers_equal": same,
        "n": int(metrics["n"]),
        "rank0": bool(metrics["rank0"]),
        "dp_eval": _max_diff(dp_eval, full_eval),
        "fsdp_eval": _max_diff(fsdp_eval, full_eval),
    }


class _CountCollectives(TorchDispatchMode):
    """Counts functional collectives issued (not their waits and wrappers).

    torch's CommDebugMode cannot be used here: its module hooks break `torch.func.grad`.
    """

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        op = func.name().split("::")[-1]
        if func.namespace == "_c10d_functional" and op != "wait_tensor" and not op.startswith("_"):
            self.count += 1
        return func(*args, **(kwargs or {}))


def _accumulating(model: torch.nn.Module, micro_batches: int) -> Callable[..., Any]:
    """A step that sums the gradients of several micro-batches, then updates once."""

    def train_step(state: lf.TrainState, batch: Any) -> Any:
        total = None
        for x, y in zip(*(t.chunk(micro_batches) for t in batch), strict=True):

            def loss_fn(params: Any, x: torch.Tensor = x, y: torch.Tensor = y) -> torch.Tensor:
                logits, _ = lf.apply(model, params, state.buffers, x, train=True)
                return torch.nn.functional.cross_entropy(logits, y)

            loss, grads = lf.value_and_grad(loss_fn)(state.params)
            total = grads if total is None else lf.tree_map(torch.add, total, grads)
        grads = lf.tree_map(lambda g: g / micro_batches, total)
        return state.apply_gradients(grads), {"loss": loss}

    return train_step


def _communication(mesh: lfd.Mesh) -> dict[str, Any]:
    """Collectives per step, counted: one bucket of gradients and one of metrics; none without sync."""
    model = make_model(0, batchnorm=False)
    train_step, _ = make_steps(model)
    state = lf.TrainState.create(model, _optimizer(), seed=None)
    batch = _mine(_data(steps=1)[0], mesh)
    counts = {}
    for name, fn in (
        ("sync", lfd.data_parallel(train_step, mesh)),
        ("no_sync", lfd.data_parallel(train_step, mesh, sync_gradients=False)),
        ("tiny_buckets", lfd.data_parallel(train_step, mesh, bucket_cap_mb=1e-4)),
        ("accumulated", lfd.data_parallel(_accumulating(model, micro_batches=4), mesh)),
    ):
        with _CountCollectives() as comm:
            fn(state, batch)
        counts[name] = comm.count
    return {**counts, "n_params": len(state.params)}


def _errors(mesh: lfd.Mesh) -> dict[str, str]:
    model = make_model(0, batchnorm=False)
    train_step, _ = make_steps(model)
    state = lf.TrainState.create(model, _optimizer(), seed=None)
    batch = _mine(_data(steps=1)[0], mesh)
    out = {}
    for name, call in (
        (
            "dp_no_train_state",
            lambda: lfd.data_parallel(lambda s, b: (s, {}), mesh)({"w": torch.ones(2)}, batch),
        ),
        ("fsdp_not_sharded", lambda: lfd.fully_sharded(train_step, mesh)(state, batch)),
    ):
        try:
            call()
        except Exception as e:
            out[name] = f"{type(e).__name__}: {e}"
    return out


def _loop_with_loader(mesh: lfd.Mesh) -> dict[str, float]:
    """`lf.loop` over a rank-sharded Loader equals one process over the same global batches."""
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(40, 8, generator=g), torch.randint(0, 3, (40,), generator=g)

    def run(
        prepare: Callable[[Any], Any],
        transform: Callable[[Any], Any],
        batch_size: int,
        rank: int,
        world: int,
    ) -> Any:
        model = make_model(0, batchnorm=False)
        train_step, _ = make_steps(model)
        state = prepare(lf.TrainState.create(model, _optimizer(), seed=None))
        loader = lf.Loader((x, y), batch_size, seed=0, rank=rank, world_size=world)
        step = lf.build(transform(train_step), compile=False)
        *_, last = lf.loop(step, state, loader, max_epochs=2, accelerator="cpu")
        return last.state.params

    dp = run(lambda s: s, lambda f: lfd.data_parallel(f, mesh), 4, mesh.global_rank, WORLD)
    shard = functools.partial(lfd.shard_state, mesh=mesh)
    fsdp = run(shard, lambda f: lfd.fully_sharded(f, mesh), 4, mesh.global_rank, WORLD)
    single = run(lambda s: s, lambda f: f, 8, 0, 1)
    return {"dp": _max_diff(dp, single), "fsdp": _max_diff(lfd.gather_state(fsdp), single)}


def _ddp_starts_from_rank_0(mesh: lfd.Mesh) -> dict[str, Any]:
    """Ranks seeded differently: `DDP.prepare` gives every rank rank 0's weights, as torch DDP."""
    r = mesh.global_rank
    model = make_model(seed=r)  # a mistake: each rank builds other initial weights
    train_step, _ = make_steps(model)
    strategy = lfd.DDP(mesh)
    state = strategy.prepare(lf.TrainState.create(model, _optimizer(), seed=0))
    step = lf.build(train_step, strategy=strategy, compile=False)
    state, _ = _train(step, state, [_mine(b, mesh) for b in _data(steps=2)])
    everyone = mesh.all_gather(state.params)
    other = make_model(0) if r == 0 else torch.nn.Linear(3, 3)  # another model on rank 1
    try:
        strategy.prepare(lf.TrainState.create(other, _optimizer()))
        mismatch = "no error"
    except ValueError as e:
        mismatch = str(e)
    sharded = lfd.FSDP(mesh).prepare(lf.TrainState.create(make_model(0), _optimizer()))
    try:
        strategy.prepare(sharded)
        crossed = "no error"
    except TypeError as e:
        crossed = str(e)
    return {
        "equal": all(torch.equal(v[0], v[1]) for v in everyone.values()),
        "mismatch": mismatch,
        "crossed": crossed,
    }


def _build_strategy(mesh: lfd.Mesh) -> dict[str, Any]:
    """`lf.build(strategy=DDP(mesh))`, with accumulation and with float16 loss scaling."""
    model = make_model(0, batchnorm=False)
    train_step, _ = make_steps(model)
    fresh = lf.TrainState.create(model, _optimizer(), seed=None)
    mine = [_mine(b, mesh) for b in _data()]
    ddp = lf.build(train_step, compile=False, strategy=lfd.DDP(mesh))
    accumulated = lf.build(
        train_step, compile=False, strategy="ddp", mesh=mesh, accumulate_grad_batches=2
    )
    plain, _ = _train(ddp, ddp.prepare(fresh), mine)
    acc, _ = _train(accumulated, accumulated.prepare(fresh), mine)
    # Not prepared: the step reduces the gradients for the call itself (on every micro-batch).
    unprepared, _ = _train(accumulated, fresh, mine)
    ref, _ = _reference()
    counts = {}
    for name, step, state in (
        ("ddp", ddp, ddp.prepare(fresh)),
        ("accumulated", accumulated, accumulated.prepare(fresh)),
        ("unprepared", accumulated, fresh),
    ):
        step(state, mine[0])  # the first call validates; count a later one
        with _CountCollectives() as comm:
            step(state, mine[0])
        counts[name] = comm.count

    # 16-mixed: rank 1 alone overflows at step 2; both ranks must skip it.
    half = lf.build(scaled_step(model), compile=False, strategy=lfd.DDP(mesh), precision="16-mixed")
    state = half.prepare(lf.TrainState.create(model, _optimizer(), seed=None))
    skipped = []
    for i, (x, y) in enumerate(mine[:4]):
        if i == 1 and mesh.global_rank == 1:
            x = x * float("inf")
        state, metrics = half(state, (x, y))
        skipped.append(int(metrics["skipped_steps"]))
    return {
        "ddp": _max_diff(plain.params, ref.params),
        "accumulated": _max_diff(acc.params, ref.params),
        "unprepared": _max_diff(unprepared.params, ref.params),
        "counts": counts,
        "repr": repr(ddp),
        "skipped": skipped,
        "step": int(state.step),
        "scale": float(state.loss_scale.scale),
        "params": [x.tolist() for x in lf.tree_leaves(state.params)],
    }


def scaled_step(model: torch.nn.Module) -> Any:
    """The helpers' classification step, scaling its loss as a float16 step does."""

    def train_step(state: lf.TrainState, batch: Any) -> Any:
        x, y = batch

        def loss_fn(params: Any) -> torch.Tensor:
            logits, _ = lf.apply(model, params, state.buffers, x, train=True)
            return torch.nn.functional.cross_entropy(logits, y)

        loss, grads = lf.value_and_grad(loss_fn, loss_scale=state.loss_scale)(state.params)
        return state.apply_gradients(grads), {"loss": loss}

    return train_step


def _fsdp_compositions(mesh: lfd.Mesh) -> dict[str, Any]:
    """FSDP with accumulation (equal to one process) and with loss scaling (skips on every rank)."""
    model = make_model(0, batchnorm=False)
    train_step, _ = make_steps(model)
    fresh = lf.TrainState.create(model, _optimizer(), seed=None)
    mine = [_mine(b, mesh) for b in _data()]
    accumulated = lf.build(
        train_step, compile=False, strategy=lfd.FSDP(mesh), accumulate_grad_batches=2
    )
    acc, _ = _train(accumulated, accumulated.prepare(fresh), mine)
    ref, _ = _reference()
    half = lf.build(
        scaled_step(model), compile=False, strategy=lfd.FSDP(mesh), precision="16-mixed"
    )
    state = half.prepare(lf.TrainState.create(model, _optimizer(), seed=None))
    skipped, before = [], None
    for i, (x, y) in enumerate(mine[:4]):
        if i == 1 and mesh.global_rank == 1:
            x = x * float("inf")
        if i == 1:
            before = lfd.gather_state(state).params
        state, metrics = half(state, (x, y))
        if i == 1:
            after_skip = lfd.gather_state(state).params
        skipped.append(int(metrics["skipped_steps"]))
    full = lfd.gather_state(state)
    return {
        "accumulated": _max_diff(lfd.gather_state(acc).params, ref.params),
        "skipped": skipped,
        "skip_kept_params": _max_diff(before, after_skip),
        "step": int(full.step),
        "scale": float(full.loss_scale.scale),
        "params": [x.tolist() for x in lf.tree_leaves(full.params)],
    }


def _metric_reductions(mesh: lfd.Mesh) -> dict[str, Any]:
    """Each rank's half of the global batch; metrics combined over the 2 ranks."""
    step = lf.build(
        metrics_step, compile=False, strategy=lfd.DDP(mesh), metric_reductions=REDUCTIONS
    )
    state = step.prepare(lf.TrainState.create(torch.nn.Linear(2, 1), lf.optim.sgd(0.0)))
    _, metrics = step(state, _mine(METRICS_BATCH, mesh))
    return {k: v.item() for k, v in metrics.items()}


def _loop_with_fsdp_strategy(mesh: lfd.Mesh) -> dict[str, Any]:
    """`loop` shards a plain state for `strategy="fsdp"` and builds the eval step to match."""
    from torch.distributed.tensor import DTensor

    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(40, 8, generator=g), torch.randint(0, 3, (40,), generator=g)

    def run(rank: int, world: int, batch_size: int, **strategy: Any) -> Any:
        model = make_model(0, batchnorm=False)
        train_step, eval_step = make_steps(model)
        state = lf.TrainState.create(model, _optimizer(), seed=None)
        loader = lf.Loader((x, y), batch_size, seed=0, rank=rank, world_size=world)
        step = lf.build(train_step, compile=False, **strategy)
        *_, last = lf.loop(
            step, state, loader, max_epochs=2, eval_step=eval_step, eval_data=[(x, y)]
        )
        return last

    sharded = run(mesh.global_rank, WORLD, 4, strategy="fsdp", mesh=mesh)
    single = run(0, 1, 8)
    return {
        "sharded": isinstance(sharded.state.params["0.weight"], DTensor),
        "params": _max_diff(lfd.gather_state(sharded.state).params, single.state.params),
        "eval": abs(float(sharded.eval_metrics["loss"]) - float(single.eval_metrics["loss"])),
    }


def _checks(mesh: lfd.Mesh, names: list[str]) -> dict[str, Any]:
    """Run the named checks; each result is ("ok", value) or ("error", traceback); warnings listed."""
    checks: dict[str, Callable[[], Any]] = {
        "collectives": lambda: _collectives(mesh),
        "dp_eager": lambda: _dp_run(mesh, compile=False),
        "fsdp_eager": lambda: _fsdp_run(mesh, compile=False),
        "dp_eager_donate": lambda: _dp_run(mesh, compile=False, donate=True),
        "fsdp_eager_donate": lambda: _fsdp_run(mesh, compile=False, donate=True),
        "dp_compiled": lambda: _dp_run(mesh, compile=True),
        "dp_compiled_donate": lambda: _dp_run(mesh, compile=True, donate=True),
        "fsdp_compiled": lambda: _fsdp_run(mesh, compile=True),
        "buffers_and_metrics": lambda: _buffers_and_metrics(mesh),
        "communication": lambda: _communication(mesh),
        "errors": lambda: _errors(mesh),
        "loop": lambda: _loop_with_loader(mesh),
        "two_states": lambda: _two_states_run(mesh),
        "build_strategy": lambda: _build_strategy(mesh),
        "ddp_rank_0": lambda: _ddp_starts_from_rank_0(mesh),
        "fsdp_compositions": lambda: _fsdp_compositions(mesh),
        "metric_reductions": lambda: _metric_reductions(mesh),
        "loop_fsdp_strategy": lambda: _loop_with_fsdp_strategy(mesh),
    }
    torch._inductor.config.compile_threads = 1  # 2 ranks share 2 cores: no compile worker pools
    results: dict[str, Any] = {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        # As in pyproject.toml: torch 2.13's inductor calls its own deprecated torch.jit.script.
        warnings.filterwarnings("ignore", "`torch.jit.script", DeprecationWarning)
        for name in names:
            try:
                results[name] = ("ok", checks[name]())
            except Exception:
                results[name] = ("error", traceback.format_exc())
    results["warnings"] = [f"{w.category.__name__}: {w.message}" for w in caught]
    return results


EAGER = [
    "collectives",
    "dp_eager",
    "fsdp_eager",
    "dp_eager_donate",
    "fsdp_eager_donate",
    "buffers_and_metrics",
    "communication",
    "errors",
    "loop",
    "two_states",
    "build_strategy",
    "ddp_rank_0",
    "fsdp_compositions",
    "metric_reductions",
    "loop_fsdp_strategy",
]
COMPILED = ["dp_compiled", "fsdp_compiled", "dp_compiled_donate"]


@pytest.fixture(scope="module")
def ranks(request) -> list[dict[str, Any]]:
    """The results of every check, from one spawn of 2 ranks (compiled checks only if selected)."""
    selected = [i for i in request.session.items if i.module is request.module]
    compiled = any(i.get_closest_marker("compiled") for i in selected)
    return spawn(_checks, WORLD, args=(EAGER + COMPILED * compiled,), timeout=420)


# ---- 2 processes ----------------------------------------------------------------------


@pytest.mark.multiprocess
def test_host_collectives_reduce_gather_and_broadcast_pytrees(ranks):
    for out in ok_results(ranks, "collectives"):
        assert torch.equal(out["mean"]["t"], torch.tensor([1.5, 3.0]))
        assert out["mean"]["n"] == 1.5 and out["mean"]["i"].item() == 0.5
        assert out["sum"]["n"] == 3 and torch.equal(out["sum"]["t"], torch.tensor([3.0, 6.0]))
        assert out["max"]["i"].item() == 1
        assert torch.equal(out["gather"]["t"], torch.tensor([[0, 0], [1, 10]]))
        assert out["gather"]["s"] == ["rank0", "rank1"]
        assert (
            torch.equal(out["broadcast"]["t"], torch.zeros(2)) and out["broadcast"]["s"] == "rank0"
        )
        assert out["input_untouched"]
        # Every rank sees the mismatch and raises (none is left waiting in a collective).
        assert "differs between ranks" in out["broadcast_mismatch"]
        assert "`t: (1,) torch.float32` on rank 0" in out["broadcast_mismatch"]
        for name in ("keys", "shape", "dtype", "op"):
            assert "`all_reduce`: the call differs between ranks" in out[f"all_reduce_{name}"]


@pytest.mark.multiprocess
def test_ddp_prepare_gives_every_rank_rank_0s_state_and_names_a_differing_model(ranks):
    # Before, ranks seeded differently trained apart (rank 1 kept its own weights).
    for out in ok_results(ranks, "ddp_rank_0"):
        assert out["equal"]
        assert "`broadcast`: the call differs between ranks" in out["mismatch"]
        # An FSDP-prepared state given to DDP: was an error deep inside torch.
        assert "it was prepared for FSDP" in out["crossed"]


@pytest.mark.multiprocess
@pytest.mark.parametrize("name", ["dp_eager", "fsdp_eager", "dp_eager_donate", "fsdp_eager_donate"])
def test_two_ranks_match_one_process_on_the_concatenated_batch(ranks, name):
    for out in ok_results(ranks, name):
        assert out["params"] <= TOL, out
        assert out["opt_state"] <= TOL, out
        assert out["loss"] <= TOL, out  # the loss metric is averaged over the ranks
        if name.endswith("_donate"):  # clip + AdamW updated in place, shards included
            assert out["same_storage"], out


@pytest.mark.multiprocess
@pytest.mark.compiled
@pytest.mark.parametrize("name", ["dp_compiled", "fsdp_compiled", "dp_compiled_donate"])
def test_compiled_two_ranks_match_one_process_in_one_graph(ranks, name):
    for out in ok_results(ranks, name):
        assert out["params"] <= TOL, out
        assert out["opt_state"] <= TOL, out
        assert out["loss"] <= TOL, out
        assert out["graphs"] == 1, out  # collectives inside the graph, and no recompiles
        if name == "dp_compiled_donate":
            assert out["same_storage"], out


@pytest.mark.multiprocess
def test_every_train_state_in_the_state_is_reduced_scalars_and_uneven_rows_included(ranks):
    for out in ok_results(ranks, "two_states"):
        assert out["dp"] <= TOL and out["fsdp"] <= TOL, out


@pytest.mark.multiprocess
def test_fully_sharded_state_holds_row_chunks_of_params_and_optimizer_state(ranks):
    assert all(out["layout"] for out in ok_results(ranks, "fsdp_eager"))


@pytest.mark.multiprocess
def test_buffers_stay_equal_and_metrics_are_reduced_by_kind(ranks):
    for out in ok_results(ranks, "buffers_and_metrics"):
        assert out["buffers_equal"]
        assert out["n"] == 8  # integers summed: the global batch size
        assert out["rank0"] is True  # booleans OR-ed
        assert out["dp_eval"] <= TOL and out["fsdp_eval"] <= TOL


@pytest.mark.multiprocess
def test_gradients_go_in_one_bucket_and_only_the_optimizer_call_communicates(ranks):
    for out in ok_results(ranks, "communication"):
        assert out["sync"] == 2  # one gradient bucket + one metrics bucket
        assert out["no_sync"] == 0
        assert out["tiny_buckets"] == out["n_params"] + 1  # a bucket per tensor at a tiny cap
        # Only the optimizer call communicates: micro-batches before it do not.
        assert out["accumulated"] == 2


@pytest.mark.multiprocess
def test_a_state_the_transforms_cannot_use_is_named_in_the_error(ranks):
    for out in ok_results(ranks, "errors"):
        assert out["dp_no_train_state"].startswith("TypeError: `data_parallel`")
        assert "holds none" in out["dp_no_train_state"]
        assert out["fsdp_not_sharded"].startswith("TypeError: `fully_sharded` expects")
        assert "`params.0.bias` is a plain Tensor" in out["fsdp_not_sharded"]


@pytest.mark.multiprocess
def test_loop_over_a_rank_sharded_loader_matches_one_process(ranks):
    for out in ok_results(ranks, "loop"):
        assert out["dp"] <= TOL and out["fsdp"] <= TOL, out


@pytest.mark.multiprocess
def test_the_ranks_raise_no_warnings(ranks):
    assert ranks[0]["warnings"] == [] and ranks[1]["warnings"] == []


@pytest.mark.multiprocess
def test_build_strategy_ddp_matches_one_process_and_accumulates_without_gradient_sync(ranks):
    for result in ok_results(ranks, "build_strategy"):
        assert result["ddp"] <= TOL and result["accumulated"] <= TOL
        assert result["unprepared"] <= TOL
        assert "strategy=DDP(world_size=2)" in result["repr"]
        # One step: a gradient bucket and a metrics bucket. Accumulated over 2
        # micro-batches: the first reduces only its metrics; the gradients go once,
        # on their sum. An unprepared state reduces per micro-batch (correct, slower).
        assert result["counts"] == {"ddp": 2, "accumulated": 3, "unprepared": 4}


@pytest.mark.multiprocess
def test_loop_shards_a_plain_state_for_fsdp_and_evaluates_it(ranks):
    for result in ok_results(ranks, "loop_fsdp_strategy"):
        assert result["sharded"]
        assert result["params"] <= TOL and result["eval"] <= TOL


@pytest.mark.multiprocess
def test_loss_scaling_under_ddp_skips_on_every_rank_when_one_overflows(ranks):
    rank0, rank1 = ok_results(ranks, "build_strategy")
    assert rank0["skipped"] == rank1["skipped"] == [0, 1, 1, 1]
    assert rank0["step"] == rank1["step"] == 4  # a skipped update still counts as a step
    assert rank0["scale"] == rank1["scale"] == 2.0**15
    assert rank0["params"] == rank1["params"]  # the ranks did not diverge


@pytest.mark.multiprocess
def test_fsdp_accumulates_like_one_process_and_skips_on_every_rank(ranks):
    rank0, rank1 = ok_results(ranks, "fsdp_compositions")
    assert rank0["accumulated"] <= TOL and rank1["accumulated"] <= TOL
    assert rank0["skipped"] == rank1["skipped"] == [0, 1, 1, 1]
    assert rank0["skip_kept_params"] == rank1["skip_kept_params"] == 0.0
    assert rank0["step"] == rank1["step"] == 4
    assert rank0["scale"] == rank1["scale"] == 2.0**15
    assert rank0["params"] == rank1["params"]


@pytest.mark.multiprocess
def test_one_metric_rule_across_evaluate_accumulation_and_ranks(ranks):
    """The same metrics over the same 8 rows: evaluate over 2 batches, 2 micro-batches,
    2 ranks of 4 rows, and the 8 rows at once, all agree."""
    expected = metrics_step(None, METRICS_BATCH)[1]
    evaluated = lf.evaluate(
        lf.build_eval(
            lambda s, b: metrics_step(None, b)[1], compile=False, metric_reductions=REDUCTIONS
        ),
        {},
        [tuple(t[:4] for t in METRICS_BATCH), tuple(t[4:] for t in METRICS_BATCH)],
    )
    step = lf.build(
        metrics_step, compile=False, accumulate_grad_batches=2, metric_reductions=REDUCTIONS
    )
    state = lf.TrainState.create(torch.nn.Linear(2, 1), lf.optim.sgd(0.0))
    _, accumulated = step(state, METRICS_BATCH)
    for name, value in expected.items():
        want = value.item()
        assert evaluated[name].item() == pytest.approx(want), name
        assert accumulated[name].item() == pytest.approx(want), name
        for rank in ok_results(ranks, "metric_reductions"):
            assert rank[name] == pytest.approx(want), name


METRICS_BATCH = (
    torch.tensor(
        [
            [0.5, 1.0],
            [2.0, -1.0],
            [3.0, 0.0],
            [1.0, 1.0],
            [0.0, 0.0],
            [4.0, 2.0],
            [-1.0, 0.5],
            [0.25, 0.75],
        ]
    ),
)
REDUCTIONS: dict[str, Any] = {"worst": "max", "best": "min"}


def metrics_step(state: Any, batch: Any) -> Any:
    """Metrics of every kind of reduction, from the batch alone (a no-op update)."""
    (x,) = batch
    metrics = {
        "mean": x[:, 0].mean(),  # default for floats: mean over examples
        "rows": torch.tensor(x.shape[0]),  # default for ints: sum
        "any_big": (x > 3.5).any(),  # default for bools: any
        "worst": x.max(),  # declared "max"
        "best": x.min(),  # declared "min"
    }
    if state is None:
        return None, metrics
    grads = {k: torch.ones_like(v) for k, v in state.params.items()}  # sgd(0.0): no movement
    return state.apply_gradients(grads), metrics


def _raise_on_rank_one(mesh: lfd.Mesh) -> None:
    if mesh.global_rank == 1:
        raise ValueError("boom on rank 1")
    mesh.barrier()  # rank 0 would wait here forever without spawn's clean-up


def _sleep(mesh: lfd.Mesh) -> None:
    import time

    time.sleep(60)


@pytest.mark.multiprocess
def test_spawn_reports_a_failing_rank_and_stops_the_others():
    with pytest.raises(RuntimeError, match=r"rank 1 raised:(.|\n)*boom on rank 1"):
        spawn(_raise_on_rank_one, WORLD, timeout=60)


@pytest.mark.multiprocess
def test_spawn_kills_every_rank_after_its_timeout():
    # Killed while still starting up, or asleep: either way, within the timeout.
    with pytest.raises(TimeoutError, match=r"did not finish within timeout=3"):
        spawn(_sleep, WORLD, timeout=3)


# ---- one process -------------------------------------------------------------------------


def _two_rank_mesh(rank: int = 0) -> lfd.Mesh:
    """A mesh that reports 2 ranks without a process group: for code that needs no collective."""
    return lfd.Mesh(
        world_size=2, global_rank=rank, local_rank=rank, node_rank=0, device=torch.device("cpu")
    )


def test_one_process_mesh_returns_inputs_and_steps_unchanged():
    mesh = lfd.init_mesh(accelerator="cpu")
    assert (mesh.world_size, mesh.global_rank, mesh.is_global_zero) == (1, 0, True)
    tree = {"a": torch.ones(2), "n": 3}
    assert mesh.all_reduce(tree, op="sum")["n"] == 3
    assert torch.equal(mesh.all_gather(tree)["a"], torch.ones(1, 2))
    assert mesh.broadcast(tree) is tree
    mesh.barrier()
    step = lambda s, b: (s, {})  # noqa: E731
    assert lfd.data_parallel(step, mesh) is step
    assert lfd.fully_sharded(step, mesh) is step
    state = lf.TrainState.create(torch.nn.Linear(2, 2), lf.optim.sgd(0.1))
    assert lfd.shard_state(state, mesh) is state
    loader = DataLoader(TensorDataset(torch.arange(10)), batch_size=2, shuffle=True)
    assert lfd.setup_dataloader(loader, mesh) is loader


def test_rank_zero_prints_and_the_others_do_not(capsys):
    lfd.Mesh.single().print("hello")
    _two_rank_mesh(rank=1).print("quiet")
    assert capsys.readouterr().out == "hello\n"


@pytest.mark.parametrize(
    ("drop_last", "expected"),
    [(False, [[0, 2, 4, 6, 8, 10], [1, 3, 5, 7, 9, 0]]), (True, [[0, 2, 4, 6], [1, 3, 5, 7]])],
)
def test_setup_dataloader_gives_each_rank_its_share_of_the_order(drop_last, expected):
    loader = DataLoader(TensorDataset(torch.arange(11)), batch_size=2, drop_last=drop_last)
    shares = [
        [int(i) for (batch,) in lfd.setup_dataloader(loader, _two_rank_mesh(rank)) for i in batch]
        for rank in range(2)
    ]
    assert shares == expected  # DistributedSampler's: interleaved, padded by repeating the first


def test_setup_dataloader_shuffles_by_seed_and_epoch_when_the_loader_shuffled():
    loader = DataLoader(TensorDataset(torch.arange(64)), batch_size=4, shuffle=True)
    orders = {}
    for epoch in (0, 1):
        for rank in range(2):
            mine = lfd.setup_dataloader(loader, _two_rank_mesh(rank), seed=5)
            mine.sampler.set_epoch(epoch)  # what lf.loop does every epoch
            orders[epoch, rank] = [int(i) for (batch,) in mine for i in batch]
    for epoch in (0, 1):
        assert sorted(orders[epoch, 0] + orders[epoch, 1]) == list(range(64))
    assert orders[0, 0] != orders[1, 0]
    assert isinstance(loader.sampler, RandomSampler)  # the given loader is left as it was


def test_setup_dataloader_keeps_the_loader_options():
    loader = DataLoader(
        TensorDataset(torch.arange(8)), batch_size=3, shuffle=False, collate_fn=list
    )
    mine = lfd.setup_dataloader(loader, _two_rank_mesh())
    assert (mine.batch_size, mine.collate_fn, mine.sampler.shuffle) == (3, list, False)


@pytest.mark.parametrize(
    ("make", "error", "match"),
    [
        (lambda d: [1, 2], TypeError, "re-makes plain torch.utils.data.DataLoaders, got list"),
        (
            lambda d: DataLoader(d, batch_sampler=[[0, 1], [2, 3]]),
            TypeError,
            "custom batch_sampler",
        ),
        (lambda d: DataLoader(d, sampler=[3, 2, 1]), TypeError, "custom sampler"),
        (
            lambda d: DataLoader(_Stream(), batch_size=2),
            ValueError,
            "cannot shard an IterableDataset",
        ),
    ],
)
def test_setup_dataloader_rejects_what_it_cannot_shard(make, error, match):
    with pytest.raises(error, match=match):
        lfd.setup_dataloader(make(TensorDataset(torch.arange(8))), _two_rank_mesh())


class _Stream(torch.utils.data.IterableDataset):
    def __iter__(self):
        return iter(range(4))


def test_bad_arguments_name_the_argument():
    mesh = lfd.Mesh.single()
    step = lambda s, b: (s, {})  # noqa: E731
    with pytest.raises(
        TypeError, match=r"`data_parallel`: `mesh` must be a lightfunc\.distributed\.Mesh"
    ):
        lfd.data_parallel(step, "cpu")
    with pytest.raises(ValueError, match="`bucket_cap_mb` must be > 0, got 0"):
        lfd.data_parallel(step, mesh, bucket_cap_mb=0)
    with pytest.raises(TypeError, match="`bucket_cap_mb` must be a number"):
        lfd.fully_sharded(step, mesh, bucket_cap_mb="25")
    with pytest.raises(ValueError, match="`op` must be 'mean' or 'sum', got 'max'"):
        lfd.reduce_gradients(lf.optim.sgd(0.1), mesh, op="max")
    with pytest.raises(ValueError, match="`op` must be one of"):
        mesh.all_reduce({"a": torch.ones(1)}, op="avg")
    with pytest.raises(TypeError, match="reduces tensors and numbers, got str at `a`"):
        mesh.all_reduce({"a": "x"})
    with pytest.raises(ValueError, match="`src=2` is not a rank"):
        mesh.broadcast({}, src=2)
    with pytest.raises(ValueError, match="`accelerator` must be one of"):
        lfd.init_mesh(accelerator="tpu")
    with pytest.raises(TypeError, match="holds none"):
        lfd.shard_state({"w": torch.ones(2)}, mesh)
    with pytest.raises(ValueError, match="`nprocs` must be an int >= 1"):
        spawn(step, 0)
    with pytest.raises(ValueError, match="`timeout` must be positive"):
        spawn(step, 1, timeout=0)


def test_init_mesh_names_the_missing_launch_variables(monkeypatch):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    for name in ("LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(ValueError, match="lacks LOCAL_RANK, MASTER_ADDR, MASTER_PORT"):
        lfd.init_mesh(accelerator="cpu")


def test_reduce_gradients_on_one_process_is_the_optimizer_itself():
    tx = lf.optim.sgd(0.1)
    assert lfd.reduce_gradients(tx, lfd.Mesh.single()) is tx


def test_build_strategy_on_one_process_runs_the_plain_step_and_checks_its_arguments():
    model = make_model(0, batchnorm=False)
    train_step, _ = make_steps(model)
    state = lf.TrainState.create(model, _optimizer(), seed=None)
    batch = _data(steps=1)[0]
    plain, _ = lf.build(train_step, compile=False)(state, batch)
    for strategy in ("ddp", "fsdp"):
        step = lf.build(train_step, compile=False, strategy=strategy)
        assert step.strategy.world_size == 1 and step.strategy.name == strategy
        one, _ = step(state, batch)
        assert _max_diff(one.params, plain.params) == 0.0
    with pytest.raises(ValueError, match=r"`strategy` must be 'ddp'.*got 'dp'"):
        lf.build(train_step, strategy="dp")
    with pytest.raises(ValueError, match=r"`mesh` is only used with a `strategy`"):
        lf.build(train_step, mesh=lfd.Mesh.single())
    with pytest.raises(TypeError, match=r"`mesh` must be a lightfunc\.distributed\.Mesh"):
        lf.build(train_step, strategy="ddp", mesh="cpu")
    with pytest.raises(TypeError, match=r"`strategy` must be None, 'ddp', 'fsdp' or a strategy"):
        lf.build(train_step, strategy=object())
    with pytest.raises(ValueError, match=r"`mesh` goes with a strategy name"):
        lf.build(train_step, strategy=lf.SingleProcess(), mesh=lfd.Mesh.single())
