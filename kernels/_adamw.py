"""Fused Adam / AdamW step: one kernel launch for a whole list of tensors.

`adamw_update` takes the parameters, gradients and both moments as lists and
returns the updates (``new_param - param``, what `lightfunc.optim` adds with
`apply_updates`) and the new moments; nothing is written in place. On the
Triton path, tensors of one dtype and device are packed into one flat buffer
each (decayed tensors first, so weight decay applies to a prefix of the
buffer), one launch of `_adamw_kernel` updates every element, and the
results come back as views of the flat outputs. Under `torch.compile`, the
packing is a `cat` that Inductor writes into directly.

`adamw_update_reference` is the same step in plain torch ops, tensor by
tensor, written exactly as `lightfunc.optim.adamw` / `adam` compute it, so on
CPU it is bit-identical to them and to torch.optim.AdamW / Adam.

The kernel computes in fp32 and rounds once per output. Against the
reference in fp32 the two differ only by where a multiply-add is fused
(GPUs fuse ``a * b + c``; torch's CPU kernels fuse some, not others): a few
units in the last place of an update. In bf16, the reference rounds every
intermediate to bf16 and the kernel does not.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ._triton import jit, register_op, tl, triton, uses_triton

BLOCK = 1024
NUM_WARPS = 4


@jit
def _adamw_kernel(
    param_ptr, grad_ptr, exp_avg_ptr, exp_avg_sq_ptr, coeffs_ptr,
    update_ptr, exp_avg_out_ptr, exp_avg_sq_out_ptr,
    n_elements, n_decay, lerp_weight, b2, one_minus_b2, eps, weight_decay,
    DECOUPLED: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    # Per element, in fp32, in torch.optim's order of operations:
    #   g  = g + weight_decay * p                      (Adam's L2 term; decayed elements only)
    #   m' = lerp(m, g, 1 - b1)                        v' = v * b2 + (1 - b2) * g * g
    #   s  = step_size * m' / (sqrt(v') / bc2_sqrt + eps)
    #        with step_size = -lr / (1 - b1^t), bc2_sqrt = sqrt(1 - b2^t)
    #   u  = (p * (1 - lr * weight_decay) + s) - p     (AdamW; decayed elements) else u = s
    # Elements [0, n_decay) of the flat buffer are the decayed ones.
    pid = tl.program_id(0).to(tl.int64)
    offsets = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n_elements
    decay = offsets < n_decay
    step_size = tl.load(coeffs_ptr)
    bc2_sqrt = tl.load(coeffs_ptr + 1)
    factor = tl.load(coeffs_ptr + 2)

    p = tl.load(param_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(grad_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    m = tl.load(exp_avg_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    v = tl.load(exp_avg_sq_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    if not DECOUPLED:
        g = tl.where(decay, g + weight_decay * p, g)
    # torch.lerp's two formulas, chosen by the weight as torch does.
    diff = g - m
    m = tl.where(lerp_weight < 0.5, m + lerp_weight * diff, g - diff * (1.0 - lerp_weight))
    v = v * b2 + one_minus_b2 * g * g
    denom = tl.div_rn(tl.sqrt_rn(v), bc2_sqrt) + eps
    step = tl.div_rn(step_size * m, denom)
    if DECOUPLED:
        step = tl.where(decay, (p * factor + step) - p, step)

    tl.store(update_ptr + offsets, step.to(update_ptr.dtype.element_ty), mask=mask)
    tl.store(exp_avg_out_ptr + offsets, m.to(exp_avg_out_ptr.dtype.element_ty), mask=mask)
    tl.store(exp_avg_sq_out_ptr + offsets, v.to(exp_avg_sq_out_ptr.dtype.element_ty), mask=mask)


@register_op("adamw_flat")
def adamw_flat(
    param: torch.Tensor,
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    coeffs: torch.Tensor,
    b1: float,
    b2: float,
    eps: float,
    weight_decay: float,
    n_decay: int,
    decoupled: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One Adam(W) step over flat 1-d buffers: returns (update, exp_avg, exp_avg_sq).

    `coeffs` holds fp32 ``(step_size, bc2_sqrt, decay_factor)`` (see
    `adam_coefficients`); elements before `n_decay` are decayed. The update
    has the dtype of `exp_avg`.
    """
    if not uses_triton(param):
        return adamw_flat_reference(
            param, grad, exp_avg, exp_avg_sq, coeffs, b1, b2, eps, weight_decay, n_decay, decoupled
        )
    param, grad = param.contiguous(), grad.contiguous()
    exp_avg, exp_avg_sq = exp_avg.contiguous(), exp_avg_sq.contiguous()
    update = torch.empty_like(exp_avg)
    exp_avg_out, exp_avg_sq_out = torch.empty_like(exp_avg), torch.empty_like(exp_avg_sq)
    n = param.numel()
    if n == 0:
        return update, exp_avg_out, exp_avg_sq_out
    torch.library.wrap_triton(_adamw_kernel)[(triton.cdiv(n, BLOCK),)](
        param, grad, exp_avg, exp_avg_sq, coeffs.contiguous(),
        update, exp_avg_out, exp_avg_sq_out,
        n, n_decay, 1 - b1, b2, 1 - b2, eps, weight_decay,
        DECOUPLED=decoupled, BLOCK=BLOCK, num_warps=NUM_WARPS,
    )  # fmt: skip
    return update, exp_avg_out, exp_avg_sq_out


def adamw_flat_reference(
    param: torch.Tensor,
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    coeffs: torch.Tensor,
    b1: float,
    b2: float,
    eps: float,
    weight_decay: float,
    n_decay: int,
    decoupled: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`adamw_flat` in torch ops: the kernel's fp32 arithmetic, over the last dimension.

    Leading dimensions (and a leading dimension of `coeffs`) broadcast, which
    is how the op's vmap rule uses it.
    """
    p, g = param.float(), grad.float()
    m, v = exp_avg.float(), exp_avg_sq.float()
    step_size, bc2_sqrt, factor = (c[..., None] for c in coeffs.float().unbind(-1))
    decay = torch.arange(p.shape[-1], device=p.device) < n_decay
    if not decoupled:
        g = torch.where(decay, torch.add(g, p, alpha=weight_decay), g)
    m = torch.lerp(m, g, 1 - b1)
    v = torch.addcmul(v * b2, g, g, value=1 - b2)
    step = (step_size * m) / (torch.sqrt(v) / bc2_sqrt + eps)
    if decoupled:
        step = torch.where(decay, (p * factor + step) - p, step)
    return step.to(exp_avg.dtype), m.to(exp_avg.dtype), v.to(exp_avg_sq.dtype)


def _adamw_flat_vmap(info: Any, in_dims: tuple[int | None, ...], *args: Any) -> Any:
    """vmap rule: batch the five tensors along dim 0 and run the reference over the batch."""
    tensors = [
        t.movedim(d, 0) if d is not None else t.expand(info.batch_size, *t.shape)
        for t, d in zip(args[:5], in_dims[:5], strict=True)
    ]
    return adamw_flat_reference(*tensors, *args[5:]), (0, 0, 0)


adamw_flat.register_vmap(_adamw_flat_vmap)


def adam_coefficients(
    step: torch.Tensor, lr: float | torch.Tensor, b1: float, b2: float, weight_decay: float
) -> tuple[torch.Tensor, torch.Tensor, float | torch.Tensor]:
    """``(step_size, bc2_sqrt, decay_factor)`` in float64, as torch.optim computes them.

    torch computes the bias corrections from a Python float step (double
    precision) and rounds them once to the parameter's precision; so do we.
    """
    t = step.to(torch.float64)
    if isinstance(lr, torch.Tensor):
        lr64 = lr.to(torch.float64)
        return -lr64 / (1 - b1**t), torch.sqrt(1 - b2**t), 1 - lr64 * weight_decay
    return -lr / (1 - b1**t), torch.sqrt(1 - b2**t), 1 - lr * weight_decay


def _opmath(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def adamw_update_reference(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    exp_avgs: Sequence[torch.Tensor],
    exp_avg_sqs: Sequence[torch.Tensor],
    step: torch.Tensor,
    lr: float | torch.Tensor,
    *,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    decay: Sequence[bool] | None = None,
    decoupled: bool = True,
) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
    """`adamw_update` in plain torch ops, tensor by tensor (see `adamw_update` for the arguments).

    The operations are `lightfunc.optim`'s, in its order, so the result is
    bit-identical to ``lightfunc.optim.adamw`` (``decoupled=True``) or
    ``adam`` (``decoupled=False``) and, on CPU, to torch.optim's.
    """
    decay = _check_lists(params, grads, exp_avgs, exp_avg_sqs, decay)
    step_size, bc2_sqrt, factor = adam_coefficients(step, lr, b1, b2, weight_decay)
    updates, new_exp_avgs, new_exp_avg_sqs = [], [], []
    for p, g, m, v, decayed in zip(params, grads, exp_avgs, exp_avg_sqs, decay, strict=True):
        if decayed and not decoupled and weight_decay != 0:
            g = torch.add(g, p, alpha=weight_decay)  # torch.optim.Adam's L2 term
        m = torch.lerp(m, g, 1 - b1)
        v = torch.addcmul(v * b2, g, g, value=1 - b2)
        denom = torch.sqrt(v) / bc2_sqrt.to(v.dtype) + eps
        u = (step_size.to(m.dtype) * m) / denom
        if decayed and decoupled and weight_decay != 0:
            f = factor.to(_opmath(p.dtype)) if isinstance(factor, torch.Tensor) else factor
            u = ((p * f + u.to(p.dtype)) - p).to(u.dtype)  # torch: p.mul_(f); p.add_(step)
        updates.append(u)
        new_exp_avgs.append(m)
        new_exp_avg_sqs.append(v)
    return updates, new_exp_avgs, new_exp_avg_sqs


def adamw_update(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    exp_avgs: Sequence[torch.Tensor],
    exp_avg_sqs: Sequence[torch.Tensor],
    step: torch.Tensor,
    lr: float | torch.Tensor,
    *,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    decay: Sequence[bool] | None = None,
    decoupled: bool = True,
) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
    """One AdamW (or Adam) step for lists of tensors, in one kernel launch per dtype.

    Pure: returns ``(updates, exp_avgs, exp_avg_sqs)``, new tensors, with the
    updates to be added to the parameters. Where the Triton kernel cannot run
    (see `uses_triton`) this is `adamw_update_reference`.

    Args:
        params, grads, exp_avgs, exp_avg_sqs: lists of the same length, the
            i-th tensors of the same shape.
        step: the step being taken, counting from 1: a 0-d integer tensor.
        lr: the learning rate of this step: a float, or a 0-d tensor (a schedule's value).
        b1, b2, eps: Adam's hyper-parameters.
        weight_decay: the decay coefficient (0: none).
        decay: per tensor, whether it is decayed (default: all).
        decoupled: True for AdamW's decoupled decay, False for Adam's L2 term.

    Returns:
        The updates (``new_param - param``, in each `exp_avg`'s dtype) and the new moments.

    Raises:
        ValueError: the lists differ in length, or the i-th tensors in shape.
    """
    decay = _check_lists(params, grads, exp_avgs, exp_avg_sqs, decay)
    n = len(params)
    out: list[list[torch.Tensor | None]] = [[None] * n, [None] * n, [None] * n]
    groups: dict[tuple[object, ...], list[int]] = {}
    for i, (p, g, m, v) in enumerate(zip(params, grads, exp_avgs, exp_avg_sqs, strict=True)):
        groups.setdefault((p.device, p.dtype, g.dtype, m.dtype, v.dtype), []).append(i)
    for members in groups.values():
        if not uses_triton(params[members[0]]):
            results = adamw_update_reference(
                [params[i] for i in members], [grads[i] for i in members],
                [exp_avgs[i] for i in members], [exp_avg_sqs[i] for i in members],
                step, lr, decay=[decay[i] for i in members],
                b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, decoupled=decoupled,
            )  # fmt: skip
        else:
            members = sorted(members, key=lambda i: not decay[i])  # decayed first
            results = _fused_group(
                [params[i] for i in members], [grads[i] for i in members],
                [exp_avgs[i] for i in members], [exp_avg_sqs[i] for i in members],
                step, lr, sum(params[i].numel() for i in members if decay[i] and weight_decay),
                b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, decoupled=decoupled,
            )  # fmt: skip
        for slot, values in zip(out, results, strict=True):
            for i, value in zip(members, values, strict=True):
                slot[i] = value
    updates, new_exp_avgs, new_exp_avg_sqs = ([t for t in slot if t is not None] for slot in out)
    return updates, new_exp_avgs, new_exp_avg_sqs


def _fused_group(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    exp_avgs: list[torch.Tensor],
    exp_avg_sqs: list[torch.Tensor],
    step: torch.Tensor,
    lr: float | torch.Tensor,
    n_decay: int,
    *,
    b1: float,
    b2: float,
    eps: float,
    weight_decay: float,
    decoupled: bool,
) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
    """Pack one dtype group into flat buffers, launch once, unpack as views."""
    device = params[0].device
    step_size, bc2_sqrt, factor = adam_coefficients(step, lr, b1, b2, weight_decay)
    coeffs = torch.stack(
        [step_size, bc2_sqrt, torch.as_tensor(factor, dtype=torch.float64, device=device)]
    ).to(device=device, dtype=torch.float32)
    flat = [torch.cat([t.reshape(-1) for t in ts]) for ts in (params, grads, exp_avgs, exp_avg_sqs)]
    outputs = adamw_flat(*flat, coeffs, b1, b2, eps, weight_decay, n_decay, decoupled)
    sizes = [p.numel() for p in params]
    unpacked = tuple(
        [chunk.view(p.shape) for chunk, p in zip(buf.split(sizes), params, strict=True)]
        for buf in outputs
    )
    return unpacked[0], unpacked[1], unpacked[2]


def _check_lists(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    exp_avgs: Sequence[torch.Tensor],
    exp_avg_sqs: Sequence[torch.Tensor],
    decay: Sequence[bool] | None,
) -> list[bool]:
    lists = {"grads": grads, "exp_avgs": exp_avgs, "exp_avg_sqs": exp_avg_sqs}
    if decay is not None:
        lists["decay"] = decay  # type: ignore[assignment]
    for name, items in lists.items():
        if len(items) != len(params):
            raise ValueError(
                f"`{name}` has {len(items)} entries but `params` has {len(params)}: pass one "
                f"per parameter, in the same order."
            )
    for name, items in lists.items():
        if name == "decay":
            continue
        for i, (p, t) in enumerate(zip(params, items, strict=True)):
            if t.shape != p.shape:
                raise ValueError(
                    f"`{name}[{i}]` has shape {tuple(t.shape)} but `params[{i}]` has "
                    f"{tuple(p.shape)}: each must match its parameter."
                )
    return [True] * len(params) if decay is None else [bool(d) for d in decay]
