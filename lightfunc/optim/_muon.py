"""Muon: Newton-Schulz orthogonalised momentum for matrices, AdamW for the other parameters.

The arithmetic follows torch.optim.Muon's CPU code operation by operation:
the momentum buffer is ``lerp(buf, grad, 1 - momentum)``, the Nesterov
direction ``lerp(grad, buf, momentum)``, the Newton-Schulz iteration runs in
bfloat16 with the same quintic coefficients and ``addmm`` calls (so the
orthogonalised direction is bit-identical to torch's, eager), the learning
rate is multiplied by the same shape-dependent ratio and the weight decay is
decoupled and uses the *unadjusted* learning rate, as in torch. The update
returned is torch's new parameter minus the old one (`muon_step`), so eagerly
`apply_updates` lands on torch's parameter bit for bit, but for the rare
element that moves by more than its own size (one rounding there). Compiled,
inductor rounds the fused bfloat16 arithmetic once instead of after every op,
so the direction differs from torch's at bfloat16 resolution.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch

from .._tree import register_dataclass, tree_map
from .._validate import check_choice
from ._alias import adamw
from ._base import GradientTransformation, OptState, Params, ScalarOrSchedule, Updates
from ._masking import MaskOrFn, multi_transform
from ._transforms import ScaleByScheduleState, chain, host_scalar, once_per_step, zero_count
from ._validate import check_float, check_int, check_learning_rate
from ._weight_decay import factor_for

#: torch.optim.Muon's quintic Newton-Schulz coefficients (Keller Jordan's).
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
ADJUST_LR_FNS = ("original", "match_rms_adamw")


@register_dataclass
@dataclasses.dataclass(frozen=True)
class ScaleByMuonState:
    """State of `scale_by_muon` (torch.optim.Muon's `momentum_buffer`)."""

    # Momentum buffer; like params: same shapes and dtypes (zeros at init, as torch).
    momentum_buffer: Updates


def orthogonalize(
    g: torch.Tensor, coefficients: tuple[float, float, float], steps: int, eps: float
) -> torch.Tensor:
    """`steps` quintic Newton-Schulz iterations on `g` in bfloat16: roughly ``U V^T`` of its SVD.

    torch.optim.Muon's `_zeropower_via_newtonschulz`, op for op; returns bfloat16.
    """
    a, b, c = coefficients
    x = g.bfloat16()
    tall = g.size(0) > g.size(1)
    if tall:
        x = x.T
    x = x / x.norm().clamp(min=eps)  # spectral norm <= Frobenius norm <= 1
    for _ in range(steps):
        gram = x @ x.T
        poly = torch.addmm(gram, gram, gram, beta=b, alpha=c)
        x = torch.addmm(x, poly, x, beta=a)
    return x.T if tall else x


def scale_by_muon(
    momentum: float = 0.95,
    *,
    nesterov: bool = True,
    ns_coefficients: tuple[float, float, float] = NS_COEFFICIENTS,
    ns_steps: int = 5,
    eps: float = 1e-7,
) -> GradientTransformation:
    """Muon's direction for 2-D parameters: the orthogonalised (Nesterov) momentum, in bfloat16.

    Follow it with `muon_step`. Every parameter it sees must
    be a matrix (`muon` routes the others to AdamW).

    Args:
        momentum: the buffer's decay, in [0, 1).
        nesterov: use the Nesterov direction ``lerp(grad, buf, momentum)``.
        ns_coefficients: the quintic's ``(a, b, c)``.
        ns_steps: Newton-Schulz iterations, in [1, 99].
        eps: lower bound of the norm the direction is divided by, > 0.

    Returns:
        A `GradientTransformation` with `ScaleByMuonState`.

    Raises:
        TypeError, ValueError: a hyper-parameter out of range; (at `init`) a
            parameter that is not 2-D.
    """
    momentum = check_float(
        "momentum", momentum, low=0.0, high=1.0, high_open=True, hint="A typical value is 0.95."
    )
    coefficients = _check_coefficients(ns_coefficients)
    steps = check_int("ns_steps", ns_steps, low=1, hint="torch.optim.Muon uses 5.")
    if steps >= 100:
        raise ValueError(
            f"`ns_steps` must be < 100, got {steps}. Five iterations suffice (torch's default)."
        )
    eps = check_float("eps", eps, low=0.0, low_open=True, hint="torch.optim.Muon uses 1e-7.")

    def init(params: Params) -> OptState:
        def zeros(p: torch.Tensor) -> torch.Tensor:
            if p.ndim != 2:
                raise ValueError(
                    f"`scale_by_muon` orthogonalises matrices only, got a parameter of shape "
                    f"{tuple(p.shape)}. Use `lightfunc.optim.muon`, which sends the others to "
                    f"AdamW, or mask them out with `masked`."
                )
            return torch.zeros_like(p)

        return ScaleByMuonState(momentum_buffer=tree_map(zeros, params))

    def update(
        updates: Updates, state: OptState, params: Params | None = None
    ) -> tuple[Updates, OptState]:
        del params
        buf = tree_map(lambda b, g: torch.lerp(b, g, 1 - momentum), state.momentum_buffer, updates)
        direction = (
            tree_map(lambda g, b: torch.lerp(g, b, momentum), updates, buf) if nesterov else buf
        )
        out = tree_map(lambda d: orthogonalize(d, coefficients, steps, eps), direction)
        return out, ScaleByMuonState(momentum_buffer=buf)

    return GradientTransformation(init, update)


def lr_ratio(shape: torch.Size, adjust_lr_fn: str) -> float:
    """torch.optim.Muon's learning-rate multiplier for a ``(A, B)`` matrix."""
    rows, cols = shape[:2]
    if adjust_lr_fn == "original":
        return math.sqrt(max(1, rows / cols))
    return 0.2 * math.sqrt(max(rows, cols))


def muon_step(
    learning_rate: ScalarOrSchedule, weight_decay: float, adjust_lr_fn: str = "original"
) -> GradientTransformation:
    """Turn orthogonalised directions into Muon's move: decoupled decay, then ``-lr * ratio * o``.

    The update is ``new - p`` with ``new = (p * (1 - lr * weight_decay)) +
    alpha * o`` and ``alpha = -lr * ratio(shape)``, torch.optim.Muon's two
    in-place ops: the decay uses the unadjusted learning rate, the ratio is
    ``sqrt(max(1, A / B))`` ("original") or ``0.2 * sqrt(max(A, B))``
    ("match_rms_adamw", Moonshot's: reuse AdamW's learning rate and weight
    decay). With a float learning rate (or a schedule, eagerly on CPU) the
    add is torch's own ``torch.add(..., alpha=...)`` kernel, so after
    `apply_updates` the parameter is torch's bit for bit (``p + (new - p)``
    is exact while ``new`` is within a factor 2 of ``p``); otherwise the
    multiply and the add round separately, one fp32 rounding apart.

    Args:
        learning_rate: a float >= 0, or a schedule of the step count.
        weight_decay: the decoupled decay coefficient, >= 0.
        adjust_lr_fn: "original" or "match_rms_adamw".

    Returns:
        A `GradientTransformation` whose state holds the update count.

    Raises:
        TypeError, ValueError: a bad learning rate, `weight_decay` or `adjust_lr_fn`.
        ValueError: (at `update`) `params` is None.
    """
    lr = check_learning_rate("learning_rate", learning_rate)
    weight_decay = check_float("weight_decay", weight_decay, low=0.0, hint="Use 0.0 for no decay.")
    check_choice("adjust_lr_fn", adjust_lr_fn, ADJUST_LR_FNS)

    def init(params: Params) -> OptState:
        return ScaleByScheduleState(count=zero_count(params))

    def update(
        updates: Updates, state: OptState, params: Params | None = None
    ) -> tuple[Updates, OptState]:
        if params is None:
            raise ValueError(
                "`muon_step` needs the parameters: call `update(grads, state, params)`."
            )
        rate: Any = lr
        if callable(lr):
            rate = host_scalar(lr(state.count))
            if isinstance(rate, torch.Tensor):
                (rate,) = once_per_step(rate.to(torch.float64))
        factor = 1 - rate * weight_decay  # torch: p.mul_(1 - lr * weight_decay)

        def move(o: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
            # torch: p.add_(o, alpha=-lr * ratio), the bfloat16 `o` read in p's precision.
            alpha = -(rate * lr_ratio(p.shape, adjust_lr_fn))
            decayed = p * factor_for(factor, p.dtype)
            if isinstance(alpha, torch.Tensor):
                new = decayed + o.to(p.dtype) * factor_for(alpha, p.dtype)
            else:
                new = torch.add(decayed, o.to(p.dtype), alpha=alpha)
            return new - p

        return tree_map(move, updates, params), ScaleByScheduleState(count=state.count + 1)

    return GradientTransformation(init, update)


def _check_coefficients(value: Any) -> tuple[float, float, float]:
    if not isinstance(value, (tuple, list)) or len(value) != 3:
        raise ValueError(
            f"`ns_coefficients` must be a tuple of three floats (a, b, c), got {value!r}. "
            f"torch.optim.Muon's are {NS_COEFFICIENTS}."
        )
    a, b, c = (check_float(f"ns_coefficients[{i}]", v) for i, v in enumerate(value))
    return a, b, c


def _matrices(params: Params) -> Any:
    return tree_map(lambda p: "muon" if p.ndim == 2 else "adamw", params)


def muon(
    lr: ScalarOrSchedule = 1e-3,
    weight_decay: float = 0.1,
    momentum: float = 0.95,
    *,
    nesterov: bool = True,
    ns_coefficients: tuple[float, float, float] = NS_COEFFICIENTS,
    eps: float = 1e-7,
    ns_steps: int = 5,
    adjust_lr_fn: str = "original",
    adamw_lr: ScalarOrSchedule = 3e-4,
    adamw_b1: float = 0.9,
    adamw_b2: float = 0.999,
    adamw_eps: float = 1e-8,
    adamw_weight_decay: float = 0.01,
    labels: MaskOrFn | None = None,
) -> GradientTransformation:
    """Muon for the matrices, AdamW for the rest: torch.optim.Muon plus torch.optim.AdamW.

    Each 2-D parameter gets torch.optim.Muon's step (same defaults):
    ``p *= 1 - lr * weight_decay`` then ``p -= lr * ratio * NS(momentum)``;
    every other parameter gets `adamw` with the ``adamw_*`` settings (torch's
    advice: biases, norm scales and, through `labels`, embeddings and the
    output layer, belong with AdamW). A `multi_transform` of the two, so each
    group's state holds tensors for its own parameters only.

    Args:
        lr: Muon's learning rate, a float >= 0 or a schedule of the step count.
        weight_decay: Muon's decoupled weight decay (uses `lr`, not the adjusted rate), >= 0.
        momentum: Muon's momentum, in [0, 1).
        nesterov: use the Nesterov direction.
        ns_coefficients: the Newton-Schulz quintic's ``(a, b, c)``.
        eps: lower bound of the norm the direction is divided by, > 0.
        ns_steps: Newton-Schulz iterations, in [1, 99].
        adjust_lr_fn: "original" (``sqrt(max(1, A/B))``) or "match_rms_adamw" (``0.2 sqrt(max(A, B))``).
        adamw_lr, adamw_b1, adamw_b2, adamw_eps, adamw_weight_decay: AdamW's
            settings for the other parameters (as `adamw`'s).
        labels: which parameters use Muon: a pytree of "muon" / "adamw" like
            the params (or a prefix), or a function params -> such a tree;
            default "muon" for every 2-D parameter. "muon" on a non-2-D
            parameter raises at `init`.

    Returns:
        A `GradientTransformation` with `MultiTransformState` (keys "muon", "adamw").

    Raises:
        TypeError, ValueError: a hyper-parameter out of range; (at `init`) bad labels.

    Example:
        >>> import torch, lightfunc.optim as lo
        >>> params = {"w": torch.ones(4, 2), "b": torch.ones(2)}
        >>> tx = lo.muon(0.02)
        >>> updates, _ = tx.update({"w": torch.eye(4, 2), "b": torch.ones(2)}, tx.init(params), params)
        >>> sorted(tx.init(params).inner_states)
        ['adamw', 'muon']
    """
    lr = check_learning_rate("lr", lr)
    weight_decay = check_float(
        "weight_decay", weight_decay, low=0.0, hint="torch's default is 0.1."
    )
    muon_tx = chain(
        scale_by_muon(
            momentum, nesterov=nesterov, ns_coefficients=ns_coefficients, ns_steps=ns_steps, eps=eps
        ),
        muon_step(lr, weight_decay, adjust_lr_fn),
    )
    other = adamw(adamw_lr, adamw_b1, adamw_b2, adamw_eps, adamw_weight_decay)
    return multi_transform(
        {"muon": muon_tx, "adamw": other}, _matrices if labels is None else labels
    )
