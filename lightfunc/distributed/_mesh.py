"""Ranks and collectives: the `Mesh` a distributed run is described by.

    mesh = lightfunc.distributed.init_mesh()      # under `lightfunc run` / torchrun, or alone
    mesh.print("world size", mesh.world_size)     # rank 0 only
    total = mesh.all_reduce({"loss": loss}, op="sum")

`init_mesh` reads the environment the elastic launcher sets (`RANK`,
`WORLD_SIZE`, `LOCAL_RANK`, `GROUP_RANK`, `MASTER_ADDR`, `MASTER_PORT`,
`TORCHELASTIC_RESTART_COUNT`). Without it (a plain `python train.py`) it
returns a one-process mesh with no process group, whose collectives return
their input: the same script runs on 1 process or N.

The process group's store is prefixed by the restart count. A restarted
attempt (`--max-restarts`) then never reads keys the failed attempt left in
the launcher's store: with torch's plain `env://` default, restarted gloo
groups hung or failed in 5 of 7 tries on torch 2.13; prefixed, 0 of 5.

The collectives here are for the host side of a run (agreeing on a stop
flag, gathering evaluation results, broadcasting a config): eager and
blocking, on pytrees of tensors and small Python values. Inside a step,
`data_parallel` and `fully_sharded` use functional collectives instead,
which `torch.compile` puts in the step's graph.

Every collective of the group, these and the step's, waits at most the
collective timeout for the other ranks (`init_mesh(timeout=...)`, else
`$LIGHTFUNC_COLLECTIVE_TIMEOUT` seconds, else 10 minutes) and then fails
instead of hanging. Ten minutes, not torch's 30: the longest legitimate
wait between two collectives is one rank compiling a step (78 s for a
25M-parameter FSDP step here), writing a checkpoint or evaluating alone, all
well under it; a rank that hung costs the job 10 minutes of every device,
not 30. A host collective that times out raises `TimeoutError` naming the
timeout and how to change it.
"""

from __future__ import annotations

import builtins
import datetime
import math
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Literal

import torch
import torch.distributed as dist

from .._tree import PyTree, tree_flatten_with_paths, tree_unflatten

ReduceOp = Literal["mean", "sum", "max", "min"]
_REDUCE_OPS = ("mean", "sum", "max", "min")
_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
TIMEOUT_ENV = "LIGHTFUNC_COLLECTIVE_TIMEOUT"
DEFAULT_TIMEOUT = datetime.timedelta(minutes=10)


class Mesh:
    """The processes of a run, one per device, in one data-parallel dimension.

    Created by `init_mesh` (or a one-process mesh by `Mesh.single()`); not
    built by hand. A `Mesh` is configuration: closing over it in a step
    function does not make the step impure.

    Attributes:
        world_size: number of processes.
        global_rank: this process's rank in `[0, world_size)`.
        local_rank: this process's rank on its machine (its device index).
        node_rank: this machine's rank among the machines of the run.
        device: the device this process computes on.
        device_mesh: the 1-D `torch.distributed.DeviceMesh` over all ranks,
            or None for a one-process mesh (no process group).
        timeout: how long a collective waits for the other ranks before it
            fails (`init_mesh`'s `timeout`).
    """

    def __init__(
        self,
        *,
        world_size: int,
        global_rank: int,
        local_rank: int,
        node_rank: int,
        device: torch.device,
        device_mesh: Any = None,
        owns_group: bool = False,
        timeout: datetime.timedelta = DEFAULT_TIMEOUT,
    ) -> None:
        self.world_size = world_size
        self.global_rank = global_rank
        self.local_rank = local_rank
        self.node_rank = node_rank
        self.device = device
        self.device_mesh = device_mesh
        self.timeout = timeout
        self._owns_group = owns_group

    @classmethod
    def single(cls, device: torch.device | str = "cpu") -> Mesh:
        """A one-process mesh: rank 0 of 1, no process group, collectives return their input."""
        return cls(
            world_size=1, global_rank=0, local_rank=0, node_rank=0, device=torch.device(device)
        )

    @property
    def is_global_zero(self) -> bool:
        """True on rank 0, the rank that prints, logs and writes shared files."""
        return self.global_rank == 0

    @property
    def is_distributed(self) -> bool:
        """True when there is more than one process (and so a process group)."""
        return self.world_size > 1

    def __repr__(self) -> str:
        return (
            f"Mesh(world_size={self.world_size}, global_rank={self.global_rank}, "
            f"local_rank={self.local_rank}, node_rank={self.node_rank}, device={self.device})"
        )

    def __enter__(self) -> Mesh:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        self.close(wait_for_others=exc_type is None)

    def close(self, *, wait_for_others: bool = True) -> None:
        """Destroy the process group this mesh created (a no-op for others, and twice).

        By default every rank first waits for the others (a barrier): a rank
        tearing its gloo connections down while a peer was still finishing
        made that peer abort (SIGABRT) or hang at exit, in about one run in
        four of a two-node launch on one machine (torch 2.13); with the
        barrier, none in 24. Pass `wait_for_others=False` on an error path,
        where the other ranks may never arrive (`with` does when its block raised).
        """
        if self._owns_group and dist.is_initialized():
            if wait_for_others:
                with self._collective("close"):
                    dist.barrier()
            dist.destroy_process_group()
        self._owns_group = False

    # Host-side collectives. Every rank must call each of them, in the same order.

    def print(self, *args: Any, **kwargs: Any) -> None:
        """`print` on rank 0 only (flushed); the other ranks print nothing."""
        if self.is_global_zero:
            kwargs.setdefault("flush", True)
            builtins.print(*args, **kwargs)

    def barrier(self) -> None:
        """Wait until every rank has reached this call."""
        if self.is_distributed:
            with self._collective("barrier"):
                dist.barrier()

    def any(self, flag: bool) -> bool:
        """True on every rank when `flag` is True on any rank (one small all-reduce).

        How the ranks agree on a decision one of them made alone, e.g. that
        a signal asked the run to stop. The reduction runs on a CPU tensor
        when the group has a CPU backend (gloo), so it never waits for the
        accelerator's queued work.
        """
        if not self.is_distributed:
            return bool(flag)
        device = torch.device("cpu") if "gloo" in str(dist.get_backend()) else self.device
        buf = torch.tensor([int(bool(flag))], dtype=torch.int32, device=device)
        with self._collective("any"):
            dist.all_reduce(buf, op=dist.ReduceOp.MAX)
        return bool(buf.item())

    @contextmanager
    def _collective(self, name: str) -> Iterator[None]:
        """A timed-out collective as a `TimeoutError` that says which timeout and how to change it."""
        try:
            yield
        except RuntimeError as error:
            if "timed out" not in str(error).lower() and "timeout" not in str(error).lower():
                raise
            seconds = self.timeout.total_seconds()
            raise TimeoutError(
                f"rank {self.global_rank}: the collective `{name}` waited longer than the "
                f"collective timeout ({seconds:g} s) for the other ranks, so the run ends here "
                f"instead of hanging. A rank stopped taking part: it hung, died, or is waiting in "
                f"a different collective (every rank must call the same collectives in the same "
                f"order). If a rank legitimately works alone for longer (compiling, saving, "
                f"evaluating), raise the limit with init_mesh(timeout=...) or "
                f"${TIMEOUT_ENV}=SECONDS. ({error})"
            ) from error

    def _agree(self, what: str, mine: list[str], payload: Any = None) -> list[Any]:
        """Every rank's `payload`, after checking that all ranks passed the same signature.

        Gathered (not broadcast) so that every rank sees a mismatch and raises, not only some.
        """
        everyone: list[Any] = [None] * self.world_size
        with self._collective(what):
            dist.all_gather_object(everyone, (mine, payload))
        for rank, (theirs, _) in enumerate(everyone):
            if theirs != mine:
                diff = next(
                    (
                        f"`{a}` on rank {self.global_rank}, `{b}` on rank {rank}"
                        for a, b in zip(mine, theirs, strict=False)
                        if a != b
                    ),
                    f"{len(mine)} entries on rank {self.global_rank}, {len(theirs)} on rank {rank}",
                )
                raise ValueError(
                    f"`{what}`: the call differs between ranks: {diff}. Every rank must pass "
                    f"a tree of the same structure, shapes and dtypes (and the same `op`)."
                )
        return [payload for _, payload in everyone]

    def all_reduce(self, tree: PyTree, op: ReduceOp = "mean") -> PyTree:
        """Reduce every leaf of `tree` over the ranks; every rank gets the result.

        Args:
            tree: a pytree of tensors and Python numbers (int, float, bool),
                with the same structure, shapes and dtypes on every rank.
            op: "mean", "sum", "max" or "min". "mean" of an integer tensor is
                a float tensor; of a Python number, a float.

        Returns:
            A new tree of the same structure; tensors stay on their devices.
            Inputs are not modified.

        Raises:
            ValueError: for an unknown `op`, or (on every rank) when the
                trees' structures, shapes, dtypes or the `op` differ between
                ranks, naming the first difference; TypeError for a leaf that
                is not a tensor or a number.
        """
        if op not in _REDUCE_OPS:
            raise ValueError(
                f"`op` must be one of {', '.join(map(repr, _REDUCE_OPS))}, got {op!r}."
            )
        paths, leaves, spec = tree_flatten_with_paths(tree)
        tensors = [_as_tensor(path, leaf, op) for path, leaf in zip(paths, leaves, strict=True)]
        if self.is_distributed:
            # One small object gather first: a tree, shape, dtype or op that differs between
            # ranks would otherwise reduce unrelated values silently, hang or abort gloo.
            self._agree("all_reduce", [f"op={op}", *_signature(paths, tensors)])
            reduced = []
            for t in tensors:
                buf = t.detach().to(self.device, copy=True)
                with self._collective("all_reduce"):
                    dist.all_reduce(buf, op=_C10D_OPS[op])
                reduced.append(buf.to(t.device))
            tensors = reduced
        if op == "mean":
            tensors = [t / self.world_size if self.is_distributed else t for t in tensors]
        out = [_like_input(leaf, t, op) for leaf, t in zip(leaves, tensors, strict=True)]
        return tree_unflatten(spec, out)

    def all_gather(self, tree: PyTree) -> PyTree:
        """Every rank's `tree`, leaf by leaf: tensors stacked on a new dim 0, objects as lists.

        Args:
            tree: a pytree with the same structure on every rank; tensor
                leaves with the same shape and dtype on every rank. Other
                leaves are any small picklable objects.

        Returns:
            The tree with each tensor leaf of shape `(world_size, *shape)` (row
            `r` from rank `r`) and each other leaf a list of `world_size` values.
        """
        _, leaves, spec = tree_flatten_with_paths(tree)
        if not self.is_distributed:
            gathered = [x.unsqueeze(0) if isinstance(x, torch.Tensor) else [x] for x in leaves]
            return tree_unflatten(spec, gathered)
        everyone: list[Any] = [None] * self.world_size
        shapes = [
            (tuple(x.shape), x.dtype) if isinstance(x, torch.Tensor) else None for x in leaves
        ]
        with self._collective("all_gather"):
            dist.all_gather_object(
                everyone, (shapes, [None if isinstance(x, torch.Tensor) else x for x in leaves])
            )
        if any(theirs != shapes for theirs, _ in everyone):
            raise ValueError(
                f"`all_gather`: the tree's structure or tensor shapes differ between ranks "
                f"({[theirs for theirs, _ in everyone]}). Gather tensors of one shape, or pad them."
            )
        objects = [objs for _, objs in everyone]
        out: list[Any] = []
        for i, x in enumerate(leaves):
            if isinstance(x, torch.Tensor):
                buf = x.detach().to(self.device)
                parts = [torch.empty_like(buf) for _ in range(self.world_size)]
                with self._collective("all_gather"):
                    dist.all_gather(parts, buf)
                out.append(torch.stack(parts).to(x.device))
            else:
                out.append([objects[r][i] for r in range(self.world_size)])
        return tree_unflatten(spec, out)

    def broadcast(self, tree: PyTree, src: int = 0) -> PyTree:
        """Rank `src`'s values of `tree`'s leaves, on every rank.

        Tensors are sent as tensors, other leaves (ints, strings, small
        objects) by pickling them in torch's object collectives. Every rank
        passes a tree of the same structure, with tensors of the same shapes
        and dtypes (its own values are replaced): e.g. make sure all ranks
        start from rank 0's initial state with `state = mesh.broadcast(state)`.

        Raises:
            ValueError: if `src` is not a rank, or when the trees' structures,
                shapes or dtypes differ between ranks (naming the first
                differing leaf).
        """
        if not 0 <= src < self.world_size:
            raise ValueError(f"`src={src}` is not a rank of a world of size {self.world_size}.")
        if not self.is_distributed:
            return tree
        paths, leaves, spec = tree_flatten_with_paths(tree)
        objects = [None if isinstance(x, torch.Tensor) else x for x in leaves]
        everyone = self._agree(
            "broadcast", _signature(paths, leaves), objects if self.global_rank == src else None
        )
        objects = everyone[src]
        out: list[Any] = []
        for x, obj in zip(leaves, objects, strict=True):
            if isinstance(x, torch.Tensor):
                buf = x.detach().to(self.device, copy=True).contiguous()
                with self._collective("broadcast"):
                    dist.broadcast(buf, src=src)
                out.append(buf.to(x.device))
            else:
                out.append(obj)
        return tree_unflatten(spec, out)


def init_mesh(
    *,
    accelerator: Literal["auto", "cpu", "gpu", "cuda"] = "auto",
    backend: str | None = None,
    timeout: datetime.timedelta | float | None = None,
) -> Mesh:
    """The mesh of this process: all ranks of a launched run, or a one-process mesh.

    Under `lightfunc run`, `torchrun` or `lightfunc.distributed.launch` (the
    `RANK`, `WORLD_SIZE`, `LOCAL_RANK`, `MASTER_ADDR` and `MASTER_PORT`
    environment variables set) this creates the process group, prefixing its
    store by `TORCHELASTIC_RESTART_COUNT`, and a 1-D `DeviceMesh` over it.
    Without them it returns `Mesh.single(device)`. If a default process group
    already exists, it is used as it is (and left open by `Mesh.close`).

    Args:
        accelerator: "auto" (CUDA when available, else CPU), "cpu", or
            "gpu"/"cuda" (one GPU per process: `cuda:LOCAL_RANK`).
        backend: the torch.distributed backend; default "gloo" on CPU,
            "cuda:nccl,cpu:gloo" on GPUs (NCCL for tensors on the GPU, gloo
            for the host-side collectives on CPU tensors).
        timeout: how long any collective of the group (the mesh's and the
            steps') may wait for the other ranks before it fails instead of
            hanging: a `timedelta` or seconds. Default: the environment
            variable `LIGHTFUNC_COLLECTIVE_TIMEOUT` (seconds), else 10
            minutes (see the module's docstring for why). On NCCL, torch's
            watchdog ends the process after it.

    Returns:
        A `Mesh`. Close it (`mesh.close()`, or `with init_mesh() as mesh:`)
        to destroy the process group it created.

    Raises:
        ValueError: for an unknown accelerator, CUDA asked for but not
            available, a timeout that is not a positive duration, or an
            incomplete or inconsistent launch environment.
        TypeError: a timeout that is neither a timedelta nor a number.
    """
    timeout = collective_timeout(timeout)
    device = _device(accelerator, int(os.environ.get("LOCAL_RANK", "0")))
    if dist.is_available() and dist.is_initialized():
        return _mesh_of_group(device, owns_group=False, timeout=timeout)
    present = [name for name in _ENV if name in os.environ]
    if not present or (os.environ.get("WORLD_SIZE") == "1" and len(present) < len(_ENV)):
        return Mesh.single(device)
    missing = [name for name in _ENV if name not in os.environ]
    if missing:
        raise ValueError(
            f"the environment describes a distributed launch ({', '.join(present)} set) but "
            f"lacks {', '.join(missing)}. Start the script with `lightfunc run` (or torchrun), "
            f"which sets all of them."
        )
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if not 0 <= rank < world_size:
        raise ValueError(f"RANK={rank} is out of range for WORLD_SIZE={world_size}.")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if backend is None:
        backend = "cuda:nccl,cpu:gloo" if device.type == "cuda" else "gloo"
    store = _store(rank, world_size, timeout)
    dist.init_process_group(backend, store=store, rank=rank, world_size=world_size, timeout=timeout)
    return _mesh_of_group(device, owns_group=True, timeout=timeout)


def collective_timeout(timeout: datetime.timedelta | float | None = None) -> datetime.timedelta:
    """`timeout` (a timedelta or seconds) checked; None: `$LIGHTFUNC_COLLECTIVE_TIMEOUT`, else 10 min.

    Raises:
        ValueError: not a positive, finite duration (naming where it came from).
        TypeError: neither a timedelta nor a number.
    """
    where = "`timeout`"
    if timeout is None:
        text = os.environ.get(TIMEOUT_ENV)
        if text is None:
            return DEFAULT_TIMEOUT
        where = f"${TIMEOUT_ENV}"
        try:
            timeout = float(text)
        except ValueError:
            raise ValueError(
                f"{where} must be a number of seconds, got {text!r}; e.g. {TIMEOUT_ENV}=600."
            ) from None
    if isinstance(timeout, datetime.timedelta):
        seconds = timeout.total_seconds()
    elif isinstance(timeout, int | float) and not isinstance(timeout, bool):
        seconds = float(timeout)
    else:
        raise TypeError(
            f"{where} must be a datetime.timedelta or seconds, got {type(timeout).__name__}."
        )
    if not (math.isfinite(seconds) and seconds > 0):
        raise ValueError(
            f"{where} must be a positive, finite duration, got {timeout!r}; e.g. 600 (seconds)."
        )
    return datetime.timedelta(seconds=seconds)


def _mesh_of_group(
    device: torch.device, *, owns_group: bool, timeout: datetime.timedelta = DEFAULT_TIMEOUT
) -> Mesh:
    from torch.distributed.device_mesh import init_device_mesh

    world_size, rank = dist.get_world_size(), dist.get_rank()
    device_mesh = init_device_mesh(device.type, (world_size,)) if world_size > 1 else None
    return Mesh(
        world_size=world_size,
        global_rank=rank,
        local_rank=int(os.environ.get("LOCAL_RANK", device.index or 0)),
        node_rank=int(os.environ.get("GROUP_RANK", os.environ.get("NODE_RANK", "0"))),
        device=device,
        device_mesh=device_mesh,
        owns_group=owns_group,
        timeout=timeout,
    )


def _store(rank: int, world_size: int, timeout: datetime.timedelta) -> dist.Store:
    """The TCP store of the process group, under a prefix unique to this restart attempt."""
    host, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    # The elastic agent hosts the store and every worker is a client; without
    # an agent (a hand-set environment) rank 0 hosts it.
    agent = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    store = dist.TCPStore(
        host,
        port,
        world_size,
        is_master=not agent and rank == 0,
        timeout=timeout,
        wait_for_workers=False,
    )
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    return dist.PrefixStore(f"lightfunc/attempt_{attempt}/", store)


def _device(accelerator: str, local_rank: int) -> torch.device:
    accelerators = ("auto", "cpu", "gpu", "cuda")
    if accelerator not in accelerators:
        raise ValueError(
            f"`accelerator` must be one of {', '.join(map(repr, accelerators))}, got {accelerator!r}."
        )
    if accelerator == "cpu" or (accelerator == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ValueError(
            f"`accelerator={accelerator!r}` was asked for but CUDA is not available. "
            f"Use accelerator='auto' or 'cpu'."
        )
    return torch.device("cuda", local_rank)


_C10D_OPS = {
    "mean": dist.ReduceOp.SUM,
    "sum": dist.ReduceOp.SUM,
    "max": dist.ReduceOp.MAX,
    "min": dist.ReduceOp.MIN,
}


def _as_tensor(path: str, leaf: Any, op: str) -> torch.Tensor:
    if isinstance(leaf, torch.Tensor):
        if op == "mean" and not (leaf.is_floating_point() or leaf.is_complex()):
            return leaf.double()
        return leaf
    if isinstance(leaf, bool | int | float):
        return torch.tensor(
            leaf, dtype=torch.float64 if isinstance(leaf, float) or op == "mean" else torch.int64
        )
    raise TypeError(
        f"`all_reduce` reduces tensors and numbers, got {type(leaf).__name__} at `{path}`. "
        f"Gather other values with `all_gather`."
    )


def _like_input(leaf: Any, reduced: torch.Tensor, op: str) -> Any:
    if isinstance(leaf, torch.Tensor):
        return reduced
    value = reduced.item()
    if isinstance(leaf, bool) and op in ("max", "min"):
        return bool(value)
    return float(value) if op == "mean" or isinstance(leaf, float) else int(value)


def _signature(paths: list[str], leaves: list[Any]) -> list[str]:
    return [
        f"{p}: {tuple(x.shape)} {x.dtype}" if isinstance(x, torch.Tensor) else f"{p}: object"
        for p, x in zip(paths, leaves, strict=True)
    ]
