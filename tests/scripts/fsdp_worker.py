"""What each rank runs for tests/test_fsdp.py: per-unit fully-sharded steps against one process.

`checks(mesh, names)` runs the named checks and returns
{name: ("ok", value) | ("error", traceback)} plus the warnings raised.
"""

from __future__ import annotations

import contextlib
import traceback
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import lightfunc as lf
import lightfunc.distributed as lfd
from lightfunc.distributed._fsdp import set_units
from lightfunc.distributed._sharded_init import init_sharded

STEPS = 4
VOCAB, WIDTH, HIDDEN, CLASSES = 11, 8, 6, 3  # 6, 11 and 3 rows do not divide by 4


class Block(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm = torch.nn.LayerNorm(WIDTH)
        self.up = torch.nn.Linear(WIDTH, HIDDEN)
        self.down = torch.nn.Linear(HIDDEN, WIDTH)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(torch.tanh(self.up(self.norm(x))))


class Net(torch.nn.Module):
    """Embedding, 3 blocks in a ModuleList (the default units), a head."""

    def __init__(self, blocks: int = 3) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(VOCAB, WIDTH)
        self.blocks = torch.nn.ModuleList(Block() for _ in range(blocks))
        self.head = torch.nn.Linear(WIDTH, CLASSES)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x)
        return self.head(x.mean(1))


def make_net(seed: int = 0) -> Net:
    torch.manual_seed(seed)
    return Net()


def data(steps: int = STEPS, batch: int = 8) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, VOCAB, (steps, batch, 5), generator=g)
    y = torch.randint(0, CLASSES, (steps, batch), generator=g)
    return [(x[i], y[i]) for i in range(steps)]


def optimizer() -> lf.optim.GradientTransformation:
    return lf.optim.chain(lf.optim.clip_by_global_norm(0.5), lf.optim.adamw(1e-2, weight_decay=0.1))


def train_step_for(model: torch.nn.Module) -> Callable[..., Any]:
    def train_step(state: lf.TrainState, batch: Any) -> Any:
        x, y = batch

        def loss_fn(params: Any) -> torch.Tensor:
            logits, _ = lf.apply(model, params, state.buffers, x, train=True)
            return F.cross_entropy(logits, y)

        loss, grads = lf.value_and_grad(loss_fn)(state.params)
        return state.apply_gradients(grads), {"loss": loss}

    return train_step


def mine(batch: Any, mesh: lfd.Mesh) -> Any:
    return tuple(t.chunk(mesh.world_size)[mesh.global_rank] for t in batch)


def train(step: Any, state: Any, batches: list[Any]) -> tuple[Any, dict[str, torch.Tensor]]:
    metrics: dict[str, torch.Tensor] = {}
    for batch in batches:
        state, metrics = step(state, batch)
    return state, metrics


def max_diff(a: Any, b: Any) -> float:
    la, lb = lf.tree_leaves(a), lf.tree_leaves(b)
    assert len(la) == len(lb)
    return max(
        float((x.double() - y.double()).abs().max()) if x.numel() else 0.0
        for x, y in zip(la, lb, strict=True)
    )


def reference(precision: str | None = None) -> tuple[lf.TrainState, dict[str, torch.Tensor]]:
    """One process, eager, on the global batches."""
    model = make_net()
    state = lf.TrainState.create(model, optimizer(), seed=None)
    step = lf.build(train_step_for(model), compile=False, precision=precision)
    return train(step, step.prepare(state), data())


def storage_bytes(tree: Any) -> int:
    """Bytes of the storages this rank holds (each counted once), not the logical size."""
    seen: dict[int, int] = {}
    for x in lf.tree_leaves(tree):
        if isinstance(x, torch.Tensor):
            local = x.to_local() if hasattr(x, "to_local") else x
            s = local.untyped_storage()
            seen[s.data_ptr()] = s.nbytes()
    return sum(seen.values())


class CountCollectives(TorchDispatchMode):
    """Counts functional all-gathers and reduce-scatters, and the all-gathers' bytes."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: dict[str, int] = {}
        self.largest_gather = 0
        self.gathered_bytes = 0  # what all the all-gathers returned, on this rank

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        op = func.name().split("::")[-1]
        if func.namespace == "_c10d_functional" and op != "wait_tensor":
            self.counts[op] = self.counts.get(op, 0) + 1
            if op.startswith("all_gather"):
                size = out.numel() * out.element_size()
                self.largest_gather = max(self.largest_gather, size)
                self.gathered_bytes += size
        return out


def fsdp_run(mesh: lfd.Mesh, compile: bool) -> dict[str, Any]:
    """`FSDP(mesh)` through `build` and `prepare`: params and optimizer state vs one process."""
    model = make_net()
    step = lf.build(train_step_for(model), compile=compile, strategy=lfd.FSDP(mesh))
    state = step.prepare(lf.TrainState.create(model, optimizer(), seed=None))
    graphs = lf.compile_counts()["graphs"]
    state, metrics = train(step, state, [mine(b, mesh) for b in data()])
    new_graphs = lf.compile_counts()["graphs"] - graphs
    full = lfd.gather_state(state)
    ref, ref_metrics = reference()
    sharded = [x.to_local() for x in lf.tree_leaves((state.params, state.opt_state)) if x.ndim]
    return {
        "params": max_diff(full.params, ref.params),
        "opt_state": max_diff(full.opt_state, ref.opt_state),
        "loss": abs(float(metrics["loss"]) - float(ref_metrics["loss"])),
        "graphs": new_graphs,
        "bytes": storage_bytes((state.params, state.opt_state)),
        "full_bytes": storage_bytes((ref.params, ref.opt_state)),
        # Each shard's storage is exactly its own rows: no view into a full tensor.
        "owned": all(x.untyped_storage().nbytes() == x.numel() * x.element_size() for x in sharded),
        "rows": {n: p.to_local().shape[0] for n, p in state.params.items() if p.ndim},
    }


@contextlib.contextmanager
def counting(cls: type, counts: dict[str, int], key: str) -> Iterator[None]:
    """Count `cls`'s instances made inside the block in `counts[key]`.

    Not `mock.patch`: a mock keeps every call's arguments, and a reference
    to a shard held there would send a donating step's update to the pure
    path (it writes in place only into storage nothing else holds).
    """
    original = cls.__init__

    def init(self: Any, *args: Any, **kwargs: Any) -> None:
        counts[key] += 1
        original(self, *args, **kwargs)

    cls.__init__ = init  # type: ignore[misc]
    try:
        yield
    finally:
        cls.__init__ = original  # type: ignore[misc]


def fsdp_regions(mesh: lfd.Mesh) -> dict[str, Any]:
    """Compiled blocks with per-unit gathers: `compile_regions` + an eager FSDP step.

    fp32, bf16-mixed and fp32 with `donate=True` (the update written into
    the shards), against one eager process. Counts the all-gathers and the
    gathered tensors the blocks' backward saved as tokens (released,
    re-gathered for the backward) instead of keeping them.
    """
    import lightfunc._sharded_func as sharded

    out: dict[str, Any] = {}
    runs = {"fp32": (None, False), "bf16": ("bf16-mixed", False), "donated": (None, True)}
    for key, (precision, donate) in runs.items():
        model = make_net()
        before = lf.compile_counts()["graphs"]
        names = lf.compile_regions(model)  # inductor
        step = lf.build(
            train_step_for(model),
            compile=False,
            strategy=lfd.FSDP(mesh),
            precision=precision,
            donate=donate,
        )
        state = step.prepare(lf.TrainState.create(model, optimizer(), seed=None))
        batches = [mine(b, mesh) for b in data()]
        counts = {"gathers": 0, "tokens": 0}
        with (
            counting(sharded._InFlight, counts, "gathers"),
            counting(sharded._Token, counts, "tokens"),
        ):
            state, metrics = train(step, state, batches[:-1])
            storage = [x.to_local().data_ptr() for x in lf.tree_leaves(state.params)]
            state, metrics = step(state, batches[-1])
        ref, ref_metrics = reference(precision)
        full = lfd.gather_state(state)
        out[key] = {
            "regions": names,
            "graphs": lf.compile_counts()["graphs"] - before,
            "gathers_per_step": counts["gathers"] / len(batches),
            "tokens_per_step": counts["tokens"] / len(batches),
            "params": max_diff(full.params, ref.params),
            "opt_state": max_diff(full.opt_state, ref.opt_state),
            "loss": abs(float(metrics["loss"]) - float(ref_metrics["loss"])),
            # The last step wrote its update into the shards' own storage.
            "kept": storage == [x.to_local().data_ptr() for x in lf.tree_leaves(state.params)],
        }
    return out


def gathering(mesh: lfd.Mesh) -> dict[str, Any]:
    """Collectives of one eager step: per unit, and the largest all-gather vs the whole model."""
    model = make_net()
    step = lfd.fully_sharded(train_step_for(model), mesh)
    state = lfd.shard_state(lf.TrainState.create(model, optimizer(), seed=None), mesh)
    with CountCollectives() as per_unit:
        step(state, mine(data(1)[0], mesh))
    set_units(model, [])  # no units: everything gathered at the start of the call
    with CountCollectives() as whole:
        step(state, mine(data(1)[0], mesh))
    set_units(model, [Block])  # by class: the same units as the default
    with CountCollectives() as by_class:
        step(state, mine(data(1)[0], mesh))
    chosen = {}  # the strategy's `units` (it wins over the model's mark)
    for key, units in {
        "names": ["blocks.0", "head"],
        "class": Block,
        "predicate": lambda name, m: isinstance(m, torch.nn.Linear),
        "none": [],
    }.items():
        built = lf.build(train_step_for(model), compile=False, strategy=lfd.FSDP(mesh, units=units))
        with CountCollectives() as counted:
            built(
                built.prepare(lf.TrainState.create(make_net(), optimizer(), seed=None)),
                mine(data(1)[0], mesh),
            )
        chosen[key] = {**counted.counts, "largest": counted.largest_gather}
    return {
        "per_unit": per_unit.counts,
        "whole": whole.counts,
        "by_class": by_class.counts,
        "chosen": chosen,
        "largest_unit_gather": per_unit.largest_gather,
        "largest_whole_gather": whole.largest_gather,
        "units": len(model.blocks),
    }


def plain_gradients(mesh: lfd.Mesh) -> dict[str, float]:
    """A step that builds full-size plain gradients itself: averaged and cut to shards."""
    model = make_net()

    def train_step(state: lf.TrainState, batch: Any) -> Any:
        grads = {n: torch.ones(p.shape) * (1 + mesh.global_rank) for n, p in state.params.items()}
        return state.apply_gradients(grads), {}

    sgd = lf.optim.sgd(0.1)
    step = lf.build(train_step, compile=False, strategy=lfd.FSDP(mesh))
    state = step.prepare(lf.TrainState.create(model, sgd, seed=None))
    state, _ = step(state, None)
    expected = {
        n: p - 0.1 * (1 + mesh.world_size) / 2 for n, p in dict(make_net().state_dict()).items()
    }
    return {"params": max_diff(lfd.gather_state(state).params, expected)}


def mixed_precision(mesh: lfd.Mesh) -> dict[str, float]:
    """bf16-mixed under FSDP (autocast around the per-unit gathers) vs one process."""
    model = make_net()
    step = lf.build(
        train_step_for(model), compile=False, strategy=lfd.FSDP(mesh), precision="bf16-mixed"
    )
    state = step.prepare(lf.TrainState.create(model, optimizer(), seed=None))
    state, _ = train(step, state, [mine(b, mesh) for b in data()])
    ref, _ = reference("bf16-mixed")
    full = lfd.gather_state(state)
    return {
        "params": max_diff(full.params, ref.params),
        "dtype": str(full.params["head.weight"].dtype),
    }


def bf16_gather(mesh: lfd.Mesh) -> dict[str, Any]:
    """bf16-mixed: Linear weights gathered in bfloat16 (half the bytes), vs float32 gathers."""
    out: dict[str, Any] = {}
    ref, _ = reference("bf16-mixed")
    for key, flag in {"bf16": True, "fp32": False}.items():
        model = make_net()
        step = lf.build(
            train_step_for(model),
            compile=False,
            strategy=lfd.FSDP(mesh, gather_in_compute_dtype=flag),
            precision="bf16-mixed",
        )
        state = step.prepare(lf.TrainState.create(model, optimizer(), seed=None))
        batches = [mine(b, mesh) for b in data()]
        with CountCollectives() as counted:
            state, _ = step(state, batches[0])
        state, _ = train(step, state, batches[1:])
        full = lfd.gather_state(state)
        out[key] = {
            "bytes": counted.gathered_bytes,
            "gathers": counted.counts.get("all_gather_into_tensor", 0),
            "params": max_diff(full.params, ref.params),
            "dtypes": sorted({str(g.dtype) for g in lf.tree_leaves(full.params)}),
        }
        out[f"{key}_params"] = full.params
    # Autocast casts those weights at their use anyway: the same values either way.
    out["bf16_vs_fp32"] = max_diff(out.pop("bf16_params"), out.pop("fp32_params"))
    # What the gathers would move if every Linear weight and bias travelled as bfloat16
    # (2 bytes) and the rest (embedding, norms) as float32, counted from the model.
    net = make_net()
    linear = {
        f"{n}.{k}"
        for n, m in net.named_modules()
        if isinstance(m, torch.nn.Linear)
        for k, _ in m.named_parameters()
    }
    rows = {
        n: -(-p.shape[0] // mesh.world_size) * mesh.world_size * p[0].numel()
        for n, p in net.named_parameters()
    }
    blocks = sum(v for n, v in rows.items() if n.startswith("blocks."))
    once = sum(rows.values())  # the root once, each block in forward and again in backward
    out["expected_fp32"] = 4 * (once + blocks)
    out["expected_bf16"] = sum(
        (2 if n in linear else 4) * v * (2 if n.startswith("blocks.") else 1)
        for n, v in rows.items()
    )
    return out


class Reversed(Net):
    """The blocks run in the reverse of their registration order: the gather schedule's guess
    of the next unit is wrong every time."""

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens)
        for block in reversed(self.blocks):
            x = block(x)
        return self.head(x.mean(1))


class IssueOrder(TorchDispatchMode):
    """The all-gathers ("AG"), reduce-scatters ("RS") and matmuls ("mm") in the order issued."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        op = func.name().split("::")[-1]
        if func.namespace == "_c10d_functional" and op == "all_gather_into_tensor":
            self.ops.append("AG")
        elif func.namespace == "_c10d_functional" and op == "reduce_scatter_tensor":
            self.ops.append("RS")
        elif op in ("addmm", "mm"):
            self.ops.append("mm")
        return func(*args, **(kwargs or {}))


def schedule(mesh: lfd.Mesh) -> dict[str, Any]:
    """The order collectives are issued in (the next unit's gather goes ahead), and a model
    whose units run out of the expected order: the same values as one process."""
    model = make_net()
    step = lfd.fully_sharded(train_step_for(model), mesh)
    state = lfd.shard_state(lf.TrainState.create(model, optimizer(), seed=None), mesh)
    with IssueOrder() as order:
        step(state, mine(data(1)[0], mesh))
    torch.manual_seed(0)
    backwards = Reversed()
    ref_state = lf.TrainState.create(backwards, optimizer(), seed=None)
    ref, _ = train(lf.build(train_step_for(backwards), compile=False), ref_state, data())
    torch.manual_seed(0)
    sharded = lf.build(train_step_for(backwards), compile=False, strategy=lfd.FSDP(mesh))
    state = sharded.prepare(lf.TrainState.create(Reversed(), optimizer(), seed=None))
    batches = [mine(b, mesh) for b in data()]
    with CountCollectives() as counted:
        state, _ = sharded(state, batches[0])
    state, _ = train(sharded, state, batches[1:])
    return {
        "order": order.ops,
        "collectives": [op for op in order.ops if op != "mm"],
        "reversed": max_diff(lfd.gather_state(state).params, ref.params),
        "reversed_gathers": counted.counts.get("all_gather_into_tensor", 0),
    }


def meta_init(mesh: lfd.Mesh) -> dict[str, Any]:
    """A meta-device model: shards equal a CPU model's values; no rank holds the whole."""
    with torch.device("meta"):
        model = Net()
    torch.manual_seed(0)
    params, buffers = init_sharded(model, mesh)
    full = lfd.gather_state(lf.TrainState.create(params, optimizer(), buffers=buffers)).params
    step = lf.build(train_step_for(model), compile=False, strategy=lfd.FSDP(mesh))
    state = step.prepare(lf.TrainState.create(params, optimizer(), buffers=buffers, seed=None))
    state, _ = train(step, state, [mine(b, mesh) for b in data()])
    ref, _ = reference()
    return {
        "init": max_diff(full, dict(make_net().state_dict())),
        "trained": max_diff(lfd.gather_state(state).params, ref.params),
        "bytes": storage_bytes(params),
        "model_on_meta": all(p.is_meta for p in model.parameters()),
    }


CHECKS: dict[str, Callable[[lfd.Mesh], Any]] = {
    "fsdp_eager": lambda mesh: fsdp_run(mesh, compile=False),
    "fsdp_compiled": lambda mesh: fsdp_run(mesh, compile=True),
    "fsdp_regions": fsdp_regions,
    "gathering": gathering,
    "plain_gradients": plain_gradients,
    "mixed_precision": mixed_precision,
    "bf16_gather": bf16_gather,
    "meta_init": meta_init,
    "schedule": schedule,
}


def checks(mesh: lfd.Mesh, names: list[str]) -> dict[str, Any]:
    torch._inductor.config.compile_threads = 1  # ranks share 2 cores: no compile worker pools
    results: dict[str, Any] = {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        warnings.filterwarnings("ignore", "`torch.jit.script", DeprecationWarning)
        for name in names:
            try:
                results[name] = ("ok", CHECKS[name](mesh))
            except Exception:
                results[name] = ("error", traceback.format_exc())
    results["warnings"] = [f"{w.category.__name__}: {w.message}" for w in caught]
    return results
