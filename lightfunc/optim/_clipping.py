"""Gradient clipping: by value and by global norm, as torch.nn.utils does it."""

from __future__ import annotations

import torch

from .._tree import tree_leaves, tree_map
from ._base import GradientTransformation, OptState, Params, Updates
from ._transforms import stateless_init
from ._validate import check_float


def clip_by_value(clip_value: float) -> GradientTransformation:
    """Clamp every update element to ``[-clip_value, clip_value]``.

    The functional form of ``torch.nn.utils.clip_grad_value_``.

    Args:
        clip_value: the bound, > 0.

    Returns:
        A stateless `GradientTransformation`.

    Raises:
        TypeError, ValueError: `clip_value` is not a float > 0.
    """
    bound = check_float("clip_value", clip_value, low=0.0, low_open=True, hint="E.g. 1.0.")

    def update(
        updates: Updates, state: OptState, params: Params | None = None
    ) -> tuple[Updates, OptState]:
        del params
        return tree_map(lambda u: torch.clamp(u, -bound, bound), updates), state

    return GradientTransformation(stateless_init, update)


def global_norm(updates: Updates) -> torch.Tensor:
    """The L2 norm of all leaves together, computed as torch.nn.utils.clip_grad_norm_ does.

    That is the norm of the per-tensor norms (not the root of one big sum of
    squares), each in float32 or wider.

    Args:
        updates: a pytree of tensors.

    Returns:
        A 0-d tensor (0.0 on the CPU when the tree has no leaves).
    """
    leaves = tree_leaves(updates)
    if not leaves:
        return torch.zeros(())
    norms = [
        torch.linalg.vector_norm(u, dtype=torch.promote_types(u.dtype, torch.float32))
        for u in leaves
    ]
    device = norms[0].device
    return torch.linalg.vector_norm(torch.stack([n.to(device) for n in norms]))


def clip_by_global_norm(max_norm: float) -> GradientTransformation:
    """Scale all updates down together so that their global L2 norm is at most `max_norm`.

    The functional form of ``torch.nn.utils.clip_grad_norm_``: the factor is
    ``min(max_norm / (norm + 1e-6), 1)``, so updates are never scaled up.
    Non-finite norms are not special-cased (as in torch, NaNs propagate).

    Args:
        max_norm: the largest global norm let through, > 0.

    Returns:
        A stateless `GradientTransformation`.

    Raises:
        TypeError, ValueError: `max_norm` is not a float > 0.
    """
    max_norm = check_float("max_norm", max_norm, low=0.0, low_open=True, hint="E.g. 1.0.")

    def update(
        updates: Updates, state: OptState, params: Params | None = None
    ) -> tuple[Updates, OptState]:
        del params
        if not tree_leaves(updates):
            return updates, state
        factor = torch.clamp(max_norm / (global_norm(updates) + 1e-6), max=1.0)
        # `u * factor` keeps u's dtype (a 0-d factor does not promote), like torch's in-place mul_.
        return tree_map(lambda u: u * factor, updates), state

    return GradientTransformation(stateless_init, update)
