"""Mixed precision as data: a dtype `Policy` and a dynamic `LossScale` kept in the state.

A precision string (Lightning's spelling) parses to a `Policy` of three dtypes:
the parameters are *stored* in `param_dtype` (the "master weights"), the model
*computes* in `compute_dtype`, and its outputs (logits, hence the loss) are
returned in `output_dtype`.

    =============  ========  ========  ========  ============
    string         param     compute   output    loss scaling
    =============  ========  ========  ========  ============
    "64-true"      float64   float64   float64   no
    "32-true"      float32   float32   float32   no
    "bf16-mixed"   float32   bfloat16  float32   no
    "16-mixed"     float32   float16   float32   yes
    "bf16-true"    bfloat16  bfloat16  bfloat16  no
    "16-true"      float16   float16   float16   yes
    =============  ========  ========  ========  ============

float16 has a narrow range: small gradients underflow to zero. A `LossScale`
multiplies the loss by a large factor before differentiating and divides the
gradients by it afterwards; a step whose gradients overflow is skipped and the
scale halved, and after `growth_interval` good steps in a row it is doubled.
The scale is a tensor in the state, so a compiled step never recompiles for it.

`lightfunc.build(step, precision="16-mixed")` does all of it: the state's
optimizer is wrapped in `lightfunc.optim.apply_if_finite`, which holds the
scale, skips updates whose gradients overflowed and counts them, and the
step scales its loss with `lightfunc.value_and_grad(loss_fn,
loss_scale=state.loss_scale)`. A hand-written step that keeps its own scale
uses the same pieces: `scale.scale_loss`, `scale.unscale`,
`scale.all_finite`, `scale.update` and `select_if_finite` (a whole tree,
new or old, chosen leaf by leaf without a host sync).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch

from ._tree import PyTree, register_dataclass, tree_leaves, tree_map


@dataclasses.dataclass(frozen=True)
class Policy:
    """The dtypes of a mixed-precision run.

    Attributes:
        param_dtype: dtype the parameters (and so the optimizer state) are stored in.
        compute_dtype: dtype the forward and backward passes run in.
        output_dtype: dtype the model's outputs, and so the loss, are returned in.
    """

    param_dtype: torch.dtype
    compute_dtype: torch.dtype
    output_dtype: torch.dtype

    @property
    def needs_loss_scaling(self) -> bool:
        """Whether gradients pass through float16, whose range needs a `LossScale`."""
        return torch.float16 in (self.compute_dtype, self.param_dtype)

    def cast_to_compute(self, tree: PyTree) -> PyTree:
        """`tree`'s floating tensors in `compute_dtype` (parameters, inputs before the forward)."""
        return cast_tree(tree, self.compute_dtype)

    def cast_to_param(self, tree: PyTree) -> PyTree:
        """`tree`'s floating tensors in `param_dtype` (gradients, initial parameters)."""
        return cast_tree(tree, self.param_dtype)

    def cast_to_output(self, tree: PyTree) -> PyTree:
        """`tree`'s floating tensors in `output_dtype` (model outputs before the loss)."""
        return cast_tree(tree, self.output_dtype)


_F64, _F32, _BF16, _F16 = torch.float64, torch.float32, torch.bfloat16, torch.float16

#: Lightning's precision strings and the policies they parse to.
PRECISIONS: dict[str, Policy] = {
    "64-true": Policy(_F64, _F64, _F64),
    "32-true": Policy(_F32, _F32, _F32),
    "bf16-mixed": Policy(_F32, _BF16, _F32),
    "16-mixed": Policy(_F32, _F16, _F32),
    "bf16-true": Policy(_BF16, _BF16, _BF16),
    "16-true": Policy(_F16, _F16, _F16),
}

# Lightning's short forms.
_ALIASES = {"64": "64-true", "32": "32-true", "16": "16-mixed", "bf16": "bf16-mixed"}


def parse_precision(spec: str | int | Policy) -> Policy:
    """Parse a precision setting, spelled as in Lightning's `Trainer(precision=...)`.

    Args:
        spec: one of "64-true", "32-true", "bf16-mixed", "16-mixed",
            "bf16-true", "16-true"; the short forms 64, 32, 16 (= "16-mixed")
            and "bf16" (= "bf16-mixed"); or a `Policy`, returned unchanged.

    Returns:
        The `Policy`.

    Raises:
        ValueError: `spec` is none of these.

    Example:
        >>> import lightfunc as lf
        >>> lf.parse_precision("bf16-mixed").compute_dtype
        torch.bfloat16
    """
    if isinstance(spec, Policy):
        return spec
    key = str(spec) if isinstance(spec, int) and not isinstance(spec, bool) else spec
    if isinstance(key, str):
        key = _ALIASES.get(key, key)
        if key in PRECISIONS:
            return PRECISIONS[key]
    valid = ", ".join(repr(s) for s in PRECISIONS)
    raise ValueError(
        f"`precision` must be one of {valid} (or 64, 32, 16, 'bf16', or a lightfunc.Policy), "
        f"got {spec!r}."
    )


def cast_tree(tree: PyTree, dtype: torch.dtype) -> PyTree:
    """`tree` with every floating-point tensor cast to `dtype`.

    Integer and bool tensors (labels, counters) and non-tensor leaves are
    returned as they are; a tensor already in `dtype` is returned itself.
    """
    return tree_map(
        lambda x: x.to(dtype) if isinstance(x, torch.Tensor) and x.is_floating_point() else x,
        tree,
    )


@dataclasses.dataclass(frozen=True)
class LossScale:
    """Dynamic loss scaling, as an immutable pytree carried in the train state.

    Every method is pure and tensor-only (no `.item()`), so it runs inside a
    compiled step without graph breaks or recompiles.

    Attributes:
        scale: the factor the loss is multiplied by; 0-d float32 tensor.
        good_steps: finite steps since the scale last changed; 0-d int64 tensor.
        skipped: steps skipped so far because their gradients were not finite;
            0-d int64 tensor.
        growth_interval: after this many finite steps in a row the scale grows (static).
        growth_factor: the scale is multiplied by this when it grows (static).
        backoff_factor: the scale is multiplied by this after a non-finite step (static).
        dynamic: False keeps the scale fixed (static); such a scale of 1.0 only
            counts and skips non-finite steps (`build(..., skip_nonfinite=True)`
            under bf16 or fp32).
    """

    scale: torch.Tensor
    good_steps: torch.Tensor
    skipped: torch.Tensor
    growth_interval: int = 2000
    growth_factor: float = 2.0
    backoff_factor: float = 0.5
    dynamic: bool = True

    @classmethod
    def create(
        cls,
        init: float = 2.0**16,
        *,
        growth_interval: int = 2000,
        growth_factor: float = 2.0,
        backoff_factor: float = 0.5,
        dynamic: bool = True,
        device: torch.device | str | None = None,
    ) -> LossScale:
        """A fresh scale (defaults as `torch.amp.GradScaler`'s).

        Raises:
            ValueError: `init` is not a finite positive number, `growth_interval`
                not a positive int, `growth_factor` not above 1 or
                `backoff_factor` not in (0, 1).

        Example:
            >>> import lightfunc as lf
            >>> float(lf.LossScale.create(1024.0).scale)
            1024.0
        """
        if not (math.isfinite(init) and init > 0):
            raise ValueError(f"`init` must be a finite positive number, got {init!r}.")
        if isinstance(growth_interval, bool) or not (
            isinstance(growth_interval, int) and growth_interval >= 1
        ):
            raise ValueError(f"`growth_interval` must be a positive int, got {growth_interval!r}.")
        if not growth_factor > 1:
            raise ValueError(f"`growth_factor` must be above 1, got {growth_factor!r}.")
        if not 0 < backoff_factor < 1:
            raise ValueError(f"`backoff_factor` must be in (0, 1), got {backoff_factor!r}.")
        return cls(
            scale=torch.tensor(float(init), dtype=torch.float32, device=device),
            good_steps=torch.zeros((), dtype=torch.int64, device=device),
            skipped=torch.zeros((), dtype=torch.int64, device=device),
            growth_interval=growth_interval,
            growth_factor=float(growth_factor),
            backoff_factor=float(backoff_factor),
            dynamic=bool(dynamic),
        )

    @classmethod
    def fixed(cls, value: float = 1.0, *, device: torch.device | str | None = None) -> LossScale:
        """A scale that never changes; with 1.0 it only skips and counts non-finite steps."""
        return cls.create(value, dynamic=False, device=device)

    def scale_loss(self, loss: torch.Tensor) -> torch.Tensor:
        """`loss * scale`, in at least float32 (a float16 loss would overflow at 2**16)."""
        dtype = torch.promote_types(loss.dtype, torch.float32)
        return loss.to(dtype) * self.scale.to(dtype)

    def unscale(self, grads: PyTree) -> PyTree:
        """`grads / scale`, leaf by leaf, computed in at least float32, in each leaf's dtype."""
        inv = 1.0 / self.scale

        def one(g: torch.Tensor) -> torch.Tensor:
            dtype = torch.promote_types(g.dtype, torch.float32)
            return (g.to(dtype) * inv.to(dtype)).to(g.dtype)

        return tree_map(one, grads)

    def all_finite(self, grads: PyTree) -> torch.Tensor:
        """Whether every element of every gradient is finite; a 0-d bool tensor."""
        return all_finite(grads, device=self.scale.device)

    def update(self, finite: torch.Tensor) -> LossScale:
        """The scale after a step whose gradients were `finite` (0-d bool tensor).

        Non-finite: `skipped` counts up; a dynamic scale is multiplied by
        `backoff_factor` and `good_steps` reset. Finite: `good_steps` counts
        up; on reaching `growth_interval` a dynamic scale is multiplied by
        `growth_factor` (unless that would overflow float32) and `good_steps`
        restarts from 0.
        """
        zero = torch.zeros_like(self.good_steps)
        skipped = self.skipped + (~finite).to(self.skipped.dtype)
        good = torch.where(finite, self.good_steps + 1, zero)
        if not self.dynamic:
            return dataclasses.replace(self, good_steps=good, skipped=skipped)
        grow = good >= self.growth_interval
        grown = self.scale * self.growth_factor
        grown = torch.where(torch.isfinite(grown), grown, self.scale)
        scale = torch.where(
            finite, torch.where(grow, grown, self.scale), self.scale * self.backoff_factor
        )
        return dataclasses.replace(
            self, scale=scale, good_steps=torch.where(grow, zero, good), skipped=skipped
        )


register_dataclass(
    LossScale, static=("growth_interval", "growth_factor", "backoff_factor", "dynamic")
)


def select_if_finite(finite: torch.Tensor, new_tree: PyTree, old_tree: PyTree) -> PyTree:
    """`new_tree` where `finite` holds, else `old_tree`, selected leaf by leaf without branching.

    Used to skip an update whose gradients overflowed: passing the whole
    `TrainState` keeps its params, optimizer state, buffers and step count
    unchanged on a non-finite step. Both trees must have the same structure;
    non-tensor leaves are taken from `new_tree`.

    Args:
        finite: 0-d bool tensor, e.g. from `LossScale.all_finite`.
        new_tree: the state after the update.
        old_tree: the state before it.

    Returns:
        A tree of `torch.where(finite, new, old)`.
    """

    def pick(new: Any, old: Any) -> Any:
        if isinstance(new, torch.Tensor) and isinstance(old, torch.Tensor):
            return torch.where(finite, new, old)
        return new

    return tree_map(pick, new_tree, old_tree)


def all_finite(tree: PyTree, *, device: torch.device | None = None) -> torch.Tensor:
    """Whether every element of every tensor in `tree` is finite; a 0-d bool tensor, no sync."""
    leaves = [g for g in tree_leaves(tree) if isinstance(g, torch.Tensor)]
    if not leaves:
        return torch.ones((), dtype=torch.bool, device=device)
    return torch.stack([torch.isfinite(g).all() for g in leaves]).all()
