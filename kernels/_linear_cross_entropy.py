"""Fused linear + cross-entropy: ``cross_entropy(x @ weight.T + bias, target)`` without the logits.

A language model's last layer and loss, ``F.cross_entropy(F.linear(x, W, b), y)``,
materialises an ``N x V`` logits matrix (and autograd keeps it, plus its
gradient): at N = 8192 tokens and V = 128k words that is 4 GiB in fp32. Here
the rows are taken a chunk at a time: for each chunk, the logits come from
one matmul, a Triton kernel turns them in place into the loss of each row and
the gradient of the loss with respect to them (softmax minus the smoothed
one-hot target), and two more matmuls turn that gradient into the chunk's
share of ``grad_x``, ``grad_weight`` and ``grad_bias``. Only one chunk of
logits ever exists; the gradients are computed with the loss (Liger-Kernel's
approach), and the backward only scales them by the incoming gradient.

The op ``lightfunc::linear_cross_entropy`` returns ``(loss, grad_x, grad_weight,
grad_bias)`` and carries that autograd formula. `linear_cross_entropy` (the
function to call) instead attaches the gradients to the loss with a term that
is exactly zero but carries them (``s - s.detach()`` with ``s = sum(x * grad_x)
+ ...``), plain torch ops that differentiate the same way under
`torch.autograd`, `torch.func.grad` and `torch.compile`. In torch 2.13 a
custom op's autograd formula does not work under torch.func transforms
(pytorch#168393), which `lightfunc.value_and_grad` uses.

Without Triton (or on CPU without the interpreter) the same chunked algorithm
runs in torch ops, so the memory saving holds on every device.
`linear_cross_entropy_reference` is the unchunked ``F.cross_entropy(F.linear(...))``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from ._triton import jit, next_power_of_2, register_op, tl, uses_triton

BLOCK_V = 4096  # vocabulary entries a program holds at once
NUM_WARPS = 16
REDUCTIONS = ("mean", "sum")
MIN_CHUNK_ROWS = 256


@jit
def _cross_entropy_kernel(
    logits_ptr, target_ptr, loss_ptr, scale_ptr, n_cols, ignore_index, label_smoothing,
    COMPUTE_GRAD: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    # One program per row of logits z (fp32 math), with target y, V = n_cols, e = label_smoothing:
    #   lse  = log(sum_j exp(z_j))
    #   loss = lse - (1 - e) * z_y - e / V * sum_j z_j
    #   dloss/dz_j = (softmax(z)_j - (1 - e) * [j == y] - e / V) * scale,  written over z in place
    # scale is the reduction's: 1 / (rows not ignored) for "mean", 1 for "sum".
    # Rows whose target is ignore_index get loss 0 and gradient 0.
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * n_cols
    y = tl.load(target_ptr + row)
    if y == ignore_index:
        tl.store(loss_ptr + row, 0.0)
        if COMPUTE_GRAD:
            for start in range(0, n_cols, BLOCK):
                cols = start + tl.arange(0, BLOCK)
                zero = tl.zeros([BLOCK], dtype=tl.float32)
                tl.store(row_ptr + cols, zero.to(logits_ptr.dtype.element_ty), mask=cols < n_cols)
        return

    # Pass 1: online max and sum of exponentials (and the plain sum, for smoothing).
    m = -float("inf")
    s = 0.0
    z_sum = 0.0
    for start in range(0, n_cols, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        mask = cols < n_cols
        z = tl.load(row_ptr + cols, mask=mask, other=-float("inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(z, axis=0))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new), axis=0)
        z_sum += tl.sum(tl.where(mask, z, 0.0), axis=0)
        m = m_new
    lse = m + tl.log(s)
    z_y = tl.load(row_ptr + y).to(tl.float32)
    loss = lse - (1.0 - label_smoothing) * z_y - label_smoothing / n_cols * z_sum
    tl.store(loss_ptr + row, loss)

    # Pass 2: the gradient with respect to the logits, over the logits.
    if COMPUTE_GRAD:
        scale = tl.load(scale_ptr)
        for start in range(0, n_cols, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            mask = cols < n_cols
            z = tl.load(row_ptr + cols, mask=mask, other=0.0).to(tl.float32)
            grad = tl.exp(z - lse) - label_smoothing / n_cols
            grad = tl.where(cols == y, grad - (1.0 - label_smoothing), grad)
            tl.store(row_ptr + cols, (grad * scale).to(logits_ptr.dtype.element_ty), mask=mask)


def _chunk_reference(
    logits: torch.Tensor,
    target: torch.Tensor,
    ignore_index: int,
    label_smoothing: float,
    scale: torch.Tensor,
    compute_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The kernel's work on one chunk, in torch ops: per-row losses (fp32) and the logits' gradient."""
    z = logits.float()
    n_cols = z.shape[-1]
    valid = target != ignore_index
    safe_target = torch.where(valid, target, 0).long().unsqueeze(-1)
    lse = torch.logsumexp(z, dim=-1, keepdim=True)
    loss = lse.squeeze(-1) - (1 - label_smoothing) * z.gather(-1, safe_target).squeeze(-1)
    if label_smoothing != 0:
        loss = loss - label_smoothing / n_cols * z.sum(-1)
    loss = torch.where(valid, loss, 0.0)
    if not compute_grad:
        return loss, None
    # In place on one fresh buffer: a chunk's logits are the largest tensors here.
    grad = torch.sub(z, lse).exp_()
    if label_smoothing != 0:
        grad.sub_(label_smoothing / n_cols)
    grad.scatter_add_(-1, safe_target, grad.new_full(safe_target.shape, label_smoothing - 1))
    grad.mul_(torch.where(valid, scale, 0.0).unsqueeze(-1))
    return loss, grad.to(logits.dtype)


def default_chunk_size(n_rows: int, n_features: int, vocab: int) -> int:
    """Rows per chunk: a chunk of logits about the size of `x`, and at least `MIN_CHUNK_ROWS`.

    The first rule (Liger-Kernel's) bounds the memory; the floor keeps each
    chunk's matmuls large enough to pay for adding the chunk's share into
    `grad_weight` (V x H, read and written once per chunk).
    """
    per_row = max(1, -(-vocab // max(1, n_features)))  # ceil(V / H)
    return max(MIN_CHUNK_ROWS, next_power_of_2(-(-n_rows // per_row)))


@register_op("linear_cross_entropy")
def linear_cross_entropy_forward(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    target: torch.Tensor,
    ignore_index: int,
    label_smoothing: float,
    reduction: str,
    chunk_size: int,
    compute_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(loss, grad_x, grad_weight, grad_bias)`` for 2-d `x` and 1-d `target`, chunk by chunk.

    The gradients are of the (reduced) loss; they are empty when not
    `compute_grad`, and `grad_bias` is empty without a bias. The loss has
    `x`'s dtype; gradients their input's, accumulated over chunks in fp32.
    """
    n_rows, vocab = x.shape[0], weight.shape[0]
    on_triton = uses_triton(x)
    valid_rows = (target != ignore_index).sum()
    scale = (1.0 / valid_rows.float()) if reduction == "mean" else torch.ones((), device=x.device)
    losses = []  # per chunk, the fp32 loss of each row
    if compute_grad:
        grad_x = torch.empty_like(x)
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=x.device)
        grad_b = torch.zeros(vocab if bias is not None else 0, dtype=torch.float32, device=x.device)
    for start in range(0, n_rows, chunk_size):
        end = min(start + chunk_size, n_rows)
        x_chunk = x[start:end]
        logits = F.linear(x_chunk, weight, bias).contiguous()
        if on_triton:
            chunk_losses = torch.empty(end - start, dtype=torch.float32, device=x.device)
            torch.library.wrap_triton(_cross_entropy_kernel)[(end - start,)](
                logits, target[start:end].contiguous(), chunk_losses, scale, vocab,
                ignore_index, label_smoothing,
                COMPUTE_GRAD=compute_grad, BLOCK=min(BLOCK_V, next_power_of_2(vocab)),
                num_warps=NUM_WARPS,
            )  # fmt: skip
            grad_logits = logits if compute_grad else None
        else:
            chunk_losses, grad_logits = _chunk_reference(
                logits, target[start:end], ignore_index, label_smoothing, scale, compute_grad
            )
        losses.append(chunk_losses)
        if grad_logits is not None:
            torch.mm(grad_logits, weight, out=grad_x[start:end])
            if grad_logits.dtype == torch.float32:
                grad_w.addmm_(grad_logits.t(), x_chunk)
            else:
                grad_w.add_(grad_logits.t() @ x_chunk)
            if bias is not None:
                grad_b.add_(torch.sum(grad_logits, 0, dtype=torch.float32))
    if not losses:
        losses.append(torch.zeros(0, dtype=torch.float32, device=x.device))
    loss = (torch.cat(losses).sum() * scale).to(x.dtype)
    if not compute_grad:  # outputs may not alias each other: three distinct empty tensors
        return loss, x.new_empty(0), weight.new_empty(0), x.new_empty(0)
    if bias is not None:
        return loss, grad_x, grad_w.to(weight.dtype), grad_b.to(bias.dtype)
    return loss, grad_x, grad_w.to(weight.dtype), x.new_empty(0)


def _setup_context(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
    ctx.has_bias = inputs[2] is not None
    ctx.compute_grad = inputs[8]
    _, grad_x, grad_w, grad_b = output
    ctx.save_for_backward(grad_x, grad_w, grad_b)
    ctx.mark_non_differentiable(grad_x, grad_w, grad_b)


def _backward(ctx: Any, grad_loss: torch.Tensor, *_: Any) -> tuple[Any, ...]:
    if not ctx.compute_grad:
        raise RuntimeError(
            "lightfunc::linear_cross_entropy was called with compute_grad=False, so it has no "
            "gradients to give: call it with compute_grad=True to differentiate it."
        )
    grad_x, grad_w, grad_b = ctx.saved_tensors
    grad_bias = grad_loss * grad_b if ctx.has_bias else None
    return grad_loss * grad_x, grad_loss * grad_w, grad_bias, None, None, None, None, None, None


linear_cross_entropy_forward.register_autograd(_backward, setup_context=_setup_context)


def linear_cross_entropy_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    reduction: str = "mean",
) -> torch.Tensor:
    """The unfused computation: ``F.cross_entropy(F.linear(x, weight, bias), target, ...)``.

    The logits are taken in fp32 (``.float()``) before the loss, as the
    fused op's kernel reads them.
    """
    logits = F.linear(x, weight, bias).float()
    loss = F.cross_entropy(
        logits.reshape(-1, weight.shape[0]),
        target.reshape(-1),
        ignore_index=ignore_index,
        label_smoothing=label_smoothing,
        reduction=reduction,
    )
    return loss.to(x.dtype)


def linear_cross_entropy(
    x: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    reduction: str = "mean",
    chunk_size: int | None = None,
) -> torch.Tensor:
    """``F.cross_entropy(F.linear(x, weight, bias), target)``, without materialising the logits.

    The rows of `x` are processed `chunk_size` at a time; the gradients with
    respect to `x`, `weight` and `bias` are computed with the loss whenever
    grad mode is on (so evaluate under `torch.no_grad()` to skip them), and
    attached so that `torch.autograd`, `torch.func.grad` and
    `torch.compile(fullgraph=True)` all see them. First order only; not
    under `vmap`.

    Args:
        x: features, shape ``(..., H)``.
        weight: the output projection, shape ``(V, H)``.
        target: class indices in ``[0, V)`` (or `ignore_index`), shape ``x.shape[:-1]``.
        bias: optional, shape ``(V,)``.
        ignore_index: targets equal to it contribute neither loss nor gradient.
        label_smoothing: in [0, 1], as in `F.cross_entropy`.
        reduction: ``"mean"`` (over the rows not ignored) or ``"sum"``.
        chunk_size: rows per chunk; default: ``N * H / V`` rounded up to a power
            of two (a chunk of logits about the size of `x`), at least 256.

    Returns:
        The loss, a 0-d tensor of `x`'s dtype (NaN for "mean" if every target is ignored).

    Raises:
        ValueError: shapes that do not fit together, a bad `reduction`,
            `label_smoothing` or `chunk_size`.
        TypeError: `target` is not an integer tensor.
    """
    _check_inputs(x, weight, target, bias, label_smoothing, reduction, chunk_size)
    x2, target1 = x.reshape(-1, x.shape[-1]), target.reshape(-1)
    if chunk_size is None:
        chunk_size = default_chunk_size(x2.shape[0], x2.shape[1], weight.shape[0])
    compute_grad = torch.is_grad_enabled()
    detached_bias = bias.detach() if bias is not None else None
    loss, grad_x, grad_w, grad_b = linear_cross_entropy_forward(
        x2.detach(), weight.detach(), detached_bias, target1,
        ignore_index, float(label_smoothing), reduction, chunk_size, compute_grad,
    )  # fmt: skip
    if not compute_grad:
        return loss
    # s - s.detach() is exactly zero, and its gradient is (grad_x, grad_w, grad_b).
    s = (x2 * grad_x).sum() + (weight * grad_w).sum()
    if bias is not None:
        s = s + (bias * grad_b).sum()
    return loss + (s - s.detach()).to(loss.dtype)


def _check_inputs(
    x: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    bias: torch.Tensor | None,
    label_smoothing: float,
    reduction: str,
    chunk_size: int | None,
) -> None:
    if x.dim() < 1 or weight.dim() != 2 or weight.shape[1] != x.shape[-1]:
        raise ValueError(
            f"`weight` must have shape (V, {x.shape[-1] if x.dim() else 'H'}) to project `x` of "
            f"shape {tuple(x.shape)} onto V classes, got {tuple(weight.shape)}."
        )
    if tuple(target.shape) != tuple(x.shape[:-1]):
        raise ValueError(
            f"`target` must have shape {tuple(x.shape[:-1])} (one class per row of `x`), "
            f"got {tuple(target.shape)}."
        )
    if target.dtype.is_floating_point or target.dtype.is_complex or target.dtype == torch.bool:
        raise TypeError(
            f"`target` must hold class indices (an integer tensor, e.g. int64), got {target.dtype}."
        )
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"`bias` must have shape ({weight.shape[0]},), got {tuple(bias.shape)}.")
    if reduction not in REDUCTIONS:
        raise ValueError(
            f"`reduction` must be one of {REDUCTIONS}, got {reduction!r}. (Per-row losses, "
            f"'none', need the unfused `F.cross_entropy`.)"
        )
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"`label_smoothing` must be in [0, 1], got {label_smoothing}.")
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(
            f"`chunk_size` must be a positive int (rows per chunk), got {chunk_size!r}."
        )
