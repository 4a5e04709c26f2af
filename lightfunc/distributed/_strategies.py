"""`DDP(mesh)` and `FSDP(mesh)`: the multi-process strategies as objects.

    mesh = lfd.init_mesh()
    step = lf.build(train_step, strategy=lfd.DDP(mesh))     # or lfd.FSDP(mesh)
    for ls in lf.loop(step, state, loader): ...              # the loop shards / places the state

Each implements the `lightfunc.Strategy` protocol: it wraps train and eval
steps (`data_parallel` / `fully_sharded`), prepares a state (FSDP shards
it), saves and loads it (DDP: one file written by rank 0, read by all;
FSDP: one shard per rank through `save_sharded` / `load_sharded`) and says
which rank writes shared files. On a one-process mesh both run the step as
written.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from .. import _checkpoint
from .._metrics import Reduction
from ._mesh import Mesh, init_mesh
from ._states import check_bucket_cap, check_mesh


class _MeshStrategy:
    """What DDP and FSDP share: the mesh, the ranks, the writer."""

    name = ""

    def __init__(self, mesh: Mesh | None = None, *, bucket_cap_mb: float = 25.0) -> None:
        self.mesh = init_mesh() if mesh is None else check_mesh(mesh, type(self).__name__)
        check_bucket_cap(bucket_cap_mb)
        self.bucket_cap_mb = bucket_cap_mb

    @property
    def world_size(self) -> int:
        return self.mesh.world_size

    @property
    def rank(self) -> int:
        return self.mesh.global_rank

    @property
    def is_writer(self) -> bool:
        return self.mesh.is_global_zero

    def agree_to_stop(self, flag: bool) -> bool:
        """True on every rank when `flag` is on any: one all-reduce (max) of one int, on the CPU."""
        return self.mesh.any(flag)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(world_size={self.world_size})"

    def _transforms(self) -> tuple[Callable[..., Any], Callable[..., Any]]:
        """The train and eval step transforms (imported on first use: FSDP's load DTensor)."""
        raise NotImplementedError

    def wrap_train(
        self,
        fn: Callable[..., Any],
        *,
        sync: bool = True,
        metric_reductions: Mapping[str, Reduction] | None = None,
    ) -> Callable[..., Any]:
        train, _ = self._transforms()
        return train(
            fn,
            self.mesh,
            bucket_cap_mb=self.bucket_cap_mb,
            sync_buffers=sync,
            metric_reductions=metric_reductions,
        )

    def wrap_eval(
        self, fn: Callable[..., Any], *, metric_reductions: Mapping[str, Reduction] | None = None
    ) -> Callable[..., Any]:
        _, evaluate = self._transforms()
        return evaluate(
            fn, self.mesh, bucket_cap_mb=self.bucket_cap_mb, metric_reductions=metric_reductions
        )


class DDP(_MeshStrategy):
    """Data parallel: every rank holds the whole state; gradients are averaged in the step.

    Args:
        mesh: the ranks (default `init_mesh()`).
        bucket_cap_mb: most megabytes per gradient all-reduce.
    """

    name = "ddp"
    checkpoint_suffix = ".safetensors"

    def _transforms(self) -> tuple[Callable[..., Any], Callable[..., Any]]:
        from ._dp import data_parallel, data_parallel_eval

        return data_parallel, data_parallel_eval

    def prepare(self, state: Any) -> Any:
        from ._dp import prepare_gradient_reduction

        return prepare_gradient_reduction(state, self.mesh, bucket_cap_mb=self.bucket_cap_mb)

    def save(self, tree: Any, path: Path, *, metadata: dict[str, Any] | None = None) -> Path:
        # Every rank holds the same state: rank 0 writes, the others return at
        # once (no barrier, so a manager that only rank 0 holds works too).
        if self.is_writer:
            return _checkpoint.save(tree, path, metadata=metadata)
        return Path(path).absolute()

    def load(self, path: Path, *, like: Any) -> Any:
        return _checkpoint.load(path, like=like)

    def verify(self, path: Path) -> None:
        _checkpoint.verify(path)


class FSDP(_MeshStrategy):
    """Fully sharded: parameters and optimizer state split by rows over the ranks.

    Args:
        mesh: the ranks (default `init_mesh()`).
        bucket_cap_mb: most megabytes per collective of plain tensors.
        units: which sub-modules `lf.apply` all-gathers together, one at a
            time: None (default: every child of an `nn.ModuleList` and every
            Transformer layer), a module class or tuple of classes, a
            predicate `(name, module) -> bool`, or a list of sub-module names
            (`["blocks.0", "blocks.1"]`), sub-modules or classes; `[]`: all at
            the start of the call. See `lightfunc.distributed.fully_sharded`.
        gather_in_compute_dtype: under a "-mixed" precision, gather Linear and
            Conv weights in the compute dtype (bfloat16) and reduce their
            gradients in float32.

    Raises:
        TypeError: `units` or `gather_in_compute_dtype` has the wrong form.
    """

    name = "fsdp"
    checkpoint_suffix = ""  # a directory: one shard file per rank and an index

    def __init__(
        self,
        mesh: Mesh | None = None,
        *,
        bucket_cap_mb: float = 25.0,
        units: Any = None,
        gather_in_compute_dtype: bool = True,
    ) -> None:
        from .._sharded_func import check_units

        super().__init__(mesh, bucket_cap_mb=bucket_cap_mb)
        self.units = check_units(units, "FSDP")
        if not isinstance(gather_in_compute_dtype, bool):
            raise TypeError(
                f"`FSDP(gather_in_compute_dtype=...)` must be True or False, got "
                f"{type(gather_in_compute_dtype).__name__} {gather_in_compute_dtype!r}."
            )
        self.gather_in_compute_dtype = gather_in_compute_dtype

    def _transforms(self) -> tuple[Callable[..., Any], Callable[..., Any]]:
        from ._fsdp import fully_sharded, fully_sharded_eval

        how = {"units": self.units, "gather_in_compute_dtype": self.gather_in_compute_dtype}
        return functools.partial(fully_sharded, **how), functools.partial(fully_sharded_eval, **how)

    def prepare(self, state: Any) -> Any:
        from ._fsdp import prepare_sharded_update, shard_state

        # Already-sharded tensors and already-wrapped optimizers are kept as they are.
        sharded = shard_state(state, self.mesh)
        return prepare_sharded_update(sharded, self.mesh, bucket_cap_mb=self.bucket_cap_mb)

    def save(self, tree: Any, path: Path, *, metadata: dict[str, Any] | None = None) -> Path:
        from ._checkpoint import save_sharded

        return save_sharded(tree, path, metadata=metadata)

    def load(self, path: Path, *, like: Any) -> Any:
        from ._checkpoint import load_sharded

        return load_sharded(path, like=like)

    def verify(self, path: Path) -> None:
        from ._checkpoint import verify_sharded

        verify_sharded(path)


def strategy_from_name(name: str, mesh: Mesh | None = None) -> DDP | FSDP:
    """`DDP(mesh)` for "ddp", `FSDP(mesh)` for "fsdp" (what `build(strategy="ddp")` means)."""
    if mesh is not None and not isinstance(mesh, Mesh):
        raise TypeError(
            f"`mesh` must be a lightfunc.distributed.Mesh (from init_mesh()), got "
            f"{type(mesh).__name__}."
        )
    return DDP(mesh) if name == "ddp" else FSDP(mesh)
