"""`SingleProcess`: the strategy of a run on one process, and how `build` resolves `strategy=`.

A strategy (the `lightfunc.Strategy` protocol in `_contract`) owns
everything that differs between one process and several: how a step is
wrapped (gradient reduction, gathering sharded parameters), how a state is
placed (sharded or not), how it is saved and loaded, and which process
writes shared files. `build(step, strategy=...)` takes one; `loop`, `fit`
and `CheckpointManager` ask it, and never branch on its kind.

    lf.build(train_step)                                   # SingleProcess()
    lf.build(train_step, strategy=lfd.DDP(mesh))            # data parallel
    lf.build(train_step, strategy=lfd.FSDP(mesh))           # fully sharded
    lf.build(train_step, strategy="ddp")                    # shorthand: DDP(init_mesh())
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from . import _checkpoint
from ._contract import Strategy

_SHORTHANDS = ("ddp", "fsdp")


def global_rank() -> int:
    """This process's rank under `torch.distributed` (0 outside it): rank 0 prints and writes."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return 0


class SingleProcess:
    """One process, one device: steps run as written, checkpoints are single files.

    Inside a `torch.distributed` process group (each process training on its
    own), only global rank 0 writes shared files, so the processes never
    write the same checkpoint at once.
    """

    name = "single"
    world_size = 1
    rank = 0
    checkpoint_suffix = ".safetensors"

    @property
    def is_writer(self) -> bool:
        return global_rank() == 0

    def wrap_train(
        self,
        fn: Callable[..., Any],
        *,
        sync: bool = True,
        metric_reductions: Mapping[str, str] | None = None,
    ) -> Callable[..., Any]:
        return fn

    def wrap_eval(
        self, fn: Callable[..., Any], *, metric_reductions: Mapping[str, str] | None = None
    ) -> Callable[..., Any]:
        return fn

    def prepare(self, state: Any) -> Any:
        return state

    def save(self, tree: Any, path: Path, *, metadata: dict[str, Any] | None = None) -> Path:
        return _checkpoint.save(tree, path, metadata=metadata)

    def load(self, path: Path, *, like: Any) -> Any:
        return _checkpoint.load(path, like=like)

    def verify(self, path: Path) -> None:
        _checkpoint.verify(path)

    def agree_to_stop(self, flag: bool) -> bool:
        """`flag`: one process decides alone (each process of a group training on its own, too)."""
        return flag

    def __repr__(self) -> str:
        return "SingleProcess()"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, SingleProcess)

    def __hash__(self) -> int:
        return hash(SingleProcess)


def as_strategy(strategy: Any, mesh: Any = None) -> Strategy:
    """`build`'s `strategy=` argument as a `Strategy` object.

    None is `SingleProcess()`; "ddp" and "fsdp" are shorthand for
    `lightfunc.distributed.DDP(mesh)` / `FSDP(mesh)` (default mesh:
    `init_mesh()`). The distributed package is imported here, by name, only
    when a shorthand is given: the core never depends on it.
    """
    if strategy is None:
        if mesh is not None:
            raise ValueError(
                "`mesh` is only used with a `strategy` ('ddp' or 'fsdp'); pass "
                "strategy=lightfunc.distributed.DDP(mesh) or FSDP(mesh)."
            )
        return SingleProcess()
    if isinstance(strategy, str):
        if strategy not in _SHORTHANDS:
            raise ValueError(
                f"`strategy` must be 'ddp' (data parallel), 'fsdp' (fully sharded), None, or a "
                f"strategy object such as lightfunc.distributed.DDP(mesh), got {strategy!r}."
            )
        distributed = importlib.import_module("lightfunc.distributed")
        return distributed.strategy_from_name(strategy, mesh)
    if mesh is not None:
        raise ValueError(
            f"`mesh` goes with a strategy name ('ddp' / 'fsdp'); {strategy!r} already has its "
            f"mesh. Drop `mesh=`."
        )
    if isinstance(strategy, type):
        raise TypeError(
            f"`strategy` is the class {strategy.__name__}, not a strategy object: pass an "
            f"instance, e.g. `strategy={strategy.__name__}(mesh)` (or the name 'ddp' / 'fsdp')."
        )
    if not isinstance(strategy, Strategy):
        raise TypeError(
            f"`strategy` must be None, 'ddp', 'fsdp' or a strategy object (SingleProcess(), "
            f"lightfunc.distributed.DDP(mesh), FSDP(mesh)), got {type(strategy).__name__}."
        )
    return strategy
