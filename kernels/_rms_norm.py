"""RMSNorm, forward and backward: ``y = x / sqrt(mean(x^2) + eps) * weight`` over the last dimension.

Two ops: ``lightfunc::rms_norm`` returns ``(y, rstd)`` (``rstd = 1 / sqrt(mean(x^2)
+ eps)`` per row, fp32, saved for the backward) and carries an autograd
formula; ``lightfunc::rms_norm_backward`` returns ``(grad_x, grad_weight)``.
Both compute in fp32 and round once to the input's dtype. Rows longer than
`MAX_BLOCK` elements take the reference path.

`rms_norm` (the function to call) wraps them in an `autograd.Function` so
the op also differentiates under `torch.func.grad` (which `lightfunc.value_and_grad`
uses): in torch 2.13 a custom op's own autograd formula does not work under
torch.func transforms (pytorch#168393), and a `torch.compile`d `torch.func.grad`
traces an `autograd.Function`'s forward instead of calling its backward
(pytorch#193279). In that one case the forward adds a term that is exactly
zero but carries the exact gradient (the linearisation of RMSNorm around the
input), so the compiled gradient is right, computed by Inductor from torch
ops instead of by the backward kernel.
"""

from __future__ import annotations

from typing import Any

import torch

from ._triton import (
    jit,
    next_power_of_2,
    num_programs,
    num_warps_for,
    register_op,
    tl,
    triton,
    uses_triton,
)

MAX_BLOCK = 65536


@jit
def _rms_norm_fwd_kernel(
    x_ptr, weight_ptr, y_ptr, rstd_ptr, n_cols, eps,
    HAS_WEIGHT: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    # One program per row, in fp32:
    #   rstd = 1 / sqrt(mean(x^2) + eps);   y = x * rstd * weight
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(x_ptr + row * n_cols + cols, mask=mask, other=0.0).to(tl.float32)
    rstd = tl.rsqrt(tl.sum(x * x, axis=0) / n_cols + eps)
    y = x * rstd
    if HAS_WEIGHT:
        y = y * tl.load(weight_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + row * n_cols + cols, y.to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(rstd_ptr + row, rstd)


@jit
def _rms_norm_bwd_kernel(
    grad_y_ptr, x_ptr, weight_ptr, rstd_ptr, grad_x_ptr, grad_w_partial_ptr,
    n_rows, n_cols, rows_per_program,
    HAS_WEIGHT: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    # Each program takes a contiguous run of rows, in fp32, with x_hat = x * rstd, g = grad_y * weight:
    #   grad_x = rstd * (g - x_hat * mean(g * x_hat))
    #   grad_weight = sum over rows of grad_y * x_hat   (this program's partial sum -> one row of
    #                                                    grad_w_partial; the caller sums those)
    pid = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    row_start = pid * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, n_rows)
    if HAS_WEIGHT:
        w = tl.load(weight_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    grad_w = tl.zeros([BLOCK], dtype=tl.float32)
    for row in range(row_start, row_end):
        grad_y = tl.load(grad_y_ptr + row * n_cols + cols, mask=mask, other=0.0).to(tl.float32)
        x = tl.load(x_ptr + row * n_cols + cols, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(rstd_ptr + row)
        x_hat = x * rstd
        g = grad_y * w if HAS_WEIGHT else grad_y
        grad_x = rstd * (g - x_hat * (tl.sum(g * x_hat, axis=0) / n_cols))
        tl.store(
            grad_x_ptr + row * n_cols + cols, grad_x.to(grad_x_ptr.dtype.element_ty), mask=mask
        )
        if HAS_WEIGHT:
            grad_w += grad_y * x_hat
    if HAS_WEIGHT:
        tl.store(grad_w_partial_ptr + pid * n_cols + cols, grad_w, mask=mask)


def rms_norm_reference(
    x: torch.Tensor, weight: torch.Tensor | None = None, eps: float = 1e-6
) -> torch.Tensor:
    """RMSNorm in torch ops, in fp32, rounded once to `x`'s dtype (differentiable by autograd)."""
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    if weight is not None:
        y = y * weight.float()
    return y.to(x.dtype)


def _takes_triton(x: torch.Tensor) -> bool:
    return uses_triton(x) and x.shape[-1] <= MAX_BLOCK and x.numel() > 0


@register_op("rms_norm")
def rms_norm_forward(
    x: torch.Tensor, weight: torch.Tensor | None, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(y, rstd)``: RMSNorm of `x` over its last dimension, and the fp32 ``1 / rms`` per row."""
    if not _takes_triton(x):
        xf = x.float()
        rstd = torch.rsqrt(xf.pow(2).mean(-1) + eps)
        y = xf * rstd.unsqueeze(-1)
        if weight is not None:
            y = y * weight.float()
        return y.to(x.dtype), rstd
    n_cols = x.shape[-1]
    x2 = x.reshape(-1, n_cols).contiguous()
    y = torch.empty_like(x2)
    rstd = torch.empty(x2.shape[0], dtype=torch.float32, device=x.device)
    block = next_power_of_2(n_cols)
    w = weight.contiguous() if weight is not None else x2  # x2: a placeholder, never read
    torch.library.wrap_triton(_rms_norm_fwd_kernel)[(x2.shape[0],)](
        x2, w, y, rstd, n_cols, eps,
        HAS_WEIGHT=weight is not None, BLOCK=block, num_warps=num_warps_for(block),
    )  # fmt: skip
    return y.view(x.shape), rstd.view(x.shape[:-1])


@register_op("rms_norm_backward")
def rms_norm_backward(
    grad_y: torch.Tensor, x: torch.Tensor, weight: torch.Tensor | None, rstd: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(grad_x, grad_weight)`` of RMSNorm; `grad_weight` is empty when there is no weight."""
    n_cols = x.shape[-1]
    if not _takes_triton(x):
        xf = x.float()
        x_hat = xf * rstd.unsqueeze(-1)
        g = grad_y.float() * weight.float() if weight is not None else grad_y.float()
        grad_x = rstd.unsqueeze(-1) * (g - x_hat * (g * x_hat).mean(-1, keepdim=True))
        if weight is None:
            return grad_x.to(x.dtype), x.new_empty(0)
        grad_w = (grad_y.float() * x_hat).reshape(-1, n_cols).sum(0)
        return grad_x.to(x.dtype), grad_w.to(weight.dtype)
    x2 = x.reshape(-1, n_cols).contiguous()
    grad_y2 = grad_y.reshape(-1, n_cols).contiguous()
    n_rows = x2.shape[0]
    programs = min(num_programs(x.device), n_rows)
    rows_per_program = triton.cdiv(n_rows, programs)
    grad_x = torch.empty_like(x2)
    grad_w_partial = torch.empty(
        (programs, n_cols) if weight is not None else (0,), dtype=torch.float32, device=x.device
    )
    block = next_power_of_2(n_cols)
    w = weight.contiguous() if weight is not None else x2  # a placeholder, never read
    torch.library.wrap_triton(_rms_norm_bwd_kernel)[(programs,)](
        grad_y2, x2, w, rstd.contiguous(), grad_x, grad_w_partial,
        n_rows, n_cols, rows_per_program,
        HAS_WEIGHT=weight is not None, BLOCK=block, num_warps=num_warps_for(block),
    )  # fmt: skip
    if weight is None:
        return grad_x.view(x.shape), x.new_empty(0)
    return grad_x.view(x.shape), grad_w_partial.sum(0).to(weight.dtype)


def _setup_context(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
    x, weight, _ = inputs
    _, rstd = output
    ctx.save_for_backward(x, weight, rstd)
    ctx.mark_non_differentiable(rstd)


def _backward(ctx: Any, grad_y: torch.Tensor, _grad_rstd: Any) -> tuple[Any, ...]:
    x, weight, rstd = ctx.saved_tensors
    with torch.no_grad():  # the backward op has no formula of its own: first order only
        grad_x, grad_w = rms_norm_backward(grad_y, x, weight, rstd)
    return grad_x, grad_w if weight is not None else None, None


rms_norm_forward.register_autograd(_backward, setup_context=_setup_context)


def _linearisation(
    x: torch.Tensor, weight: torch.Tensor | None, rstd: torch.Tensor
) -> torch.Tensor:
    """Zero, with RMSNorm's exact gradient at (x, weight): ``L - L.detach()``, L linear in x and weight.

    With r = rstd and x_hat = x * r held fixed, RMSNorm's Jacobian maps a
    change dx to ``w * r * (dx - x_hat * mean(x_hat * dx))`` and a change dw to
    ``x_hat * dw``; L applies exactly those maps to (x, weight).
    """
    r = rstd.unsqueeze(-1)
    x_hat = x.detach().float() * r
    xf = x.float()
    lin = r * (xf - x_hat * (x_hat * xf).mean(-1, keepdim=True))
    if weight is not None:
        lin = lin * weight.detach().float() + x_hat * weight.float()
    return (lin - lin.detach()).to(x.dtype)


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> Any:
        y, rstd = rms_norm_forward(x.detach(), None if weight is None else weight.detach(), eps)
        if torch.is_grad_enabled():
            # Eagerly, and when compiled without torch.func, `forward` runs with grad off
            # and `backward` gives the gradient. Grad is on only when torch.compile inlines
            # this forward under torch.func.grad and differentiates it directly (see above).
            y = y + _linearisation(x, weight, rstd)
        return y, rstd

    setup_context = staticmethod(_setup_context)
    backward = staticmethod(_backward)


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor | None = None, eps: float = 1e-6
) -> torch.Tensor:
    """RMSNorm over the last dimension: ``x / sqrt(mean(x^2) + eps) * weight``.

    Computed in fp32 and returned in `x`'s dtype. Runs the Triton kernels
    where they can run (see `uses_triton`), else `rms_norm_reference`;
    differentiable with `torch.autograd`, `torch.func.grad` and under
    `torch.compile(fullgraph=True)` (first order; not under `vmap`).

    Args:
        x: the input, at least 1-d.
        weight: optional scale of shape ``(x.shape[-1],)``.
        eps: added to the mean square, >= 0.

    Returns:
        A tensor like `x`.

    Raises:
        ValueError: `x` is 0-d, or `weight`'s shape is not ``(x.shape[-1],)``.

    Example:
        >>> import torch, lightfunc.kernels as K
        >>> K.rms_norm(torch.tensor([[3.0, 4.0]]), eps=0.0)
        tensor([[0.8485, 1.1314]])
    """
    if x.dim() == 0:
        raise ValueError(
            "`x` must have at least one dimension to normalise over, got a 0-d tensor."
        )
    if weight is not None and tuple(weight.shape) != (x.shape[-1],):
        raise ValueError(
            f"`weight` must have shape ({x.shape[-1]},) to scale the last dimension of `x` "
            f"(shape {tuple(x.shape)}), got {tuple(weight.shape)}."
        )
    return _RMSNorm.apply(x, weight, eps)[0]
