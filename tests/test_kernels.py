"""lightfunc.kernels: each op against its pure-torch reference, opcheck, and fullgraph compiles.

Without a GPU the Triton kernels run in Triton's interpreter, on CPU tensors.
Triton fixes interpreter mode when it is first imported, so this module sets
``TRITON_INTERPRET=1`` before anything imports triton (on a machine without
CUDA). The tests of the Triton paths skip, with the reason, when Triton is not
installed or was imported earlier in the session without the interpreter;
the tests of the reference paths, opcheck and compiles run regardless.

Tolerances, relative to the largest magnitude of the expected tensor (so that
gradient entries near zero are judged on the tensor's scale):

- fp32, kernel vs reference: 1e-5. The kernels sum in a different order and,
  for AdamW, fuse no multiply-adds where torch's CPU kernels fuse some:
  observed differences are below 5e-7.
- bf16: 2e-2 (observed below 1e-2). Inputs and outputs are bf16 (8 bits of
  mantissa, 4e-3 relative); the kernels compute in fp32 and round once, the
  references round the bf16 logits / intermediates the way torch does.
"""

from __future__ import annotations

import functools
import json
import os
import sys

import torch

if not torch.cuda.is_available() and "triton" not in sys.modules:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch.nn.functional as F

import lightfunc.optim as lo
from lightfunc import kernels as K
from lightfunc._tree import tree_structure

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


def _triton_skip_reason() -> str:
    if not K._triton.HAS_TRITON:
        return "triton is not installed (pip install triton)"
    return (
        "triton was imported before this module could set TRITON_INTERPRET=1, so its kernels "
        "cannot run on CPU here; run the kernel tests on their own or with TRITON_INTERPRET=1"
    )


triton_path = pytest.mark.skipif(
    not K.uses_triton(torch.empty(0, device=DEVICE)), reason=_triton_skip_reason()
)


def randn(*shape: int, dtype: torch.dtype = torch.float32, seed: int = 0) -> torch.Tensor:
    """Normal random values (never exactly zero), reproducible per seed."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g).to(device=DEVICE, dtype=dtype)


def assert_close_scaled(
    actual: torch.Tensor, expected: torch.Tensor, tol: float, scale: float | None = None
) -> None:
    """|actual - expected| <= tol * scale elementwise; `scale` defaults to max|expected|."""
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    a, e = actual.double(), expected.double()
    if scale is None:
        scale = max(e.abs().max().item(), 1e-30) if e.numel() else 1.0
    err = (a - e).abs().max().item() if e.numel() else 0.0
    assert err <= tol * scale, f"max |error| {err:.3g} > {tol} * max |expected| ({scale:.3g})"


# AdamW ---------------------------------------------------------------------------------------

SHAPES = [(1,), (7,), (1023,), (33, 5)]


def _adam_inputs(dtype: torch.dtype) -> tuple[list[torch.Tensor], ...]:
    params = [randn(*s, dtype=dtype, seed=i) for i, s in enumerate(SHAPES)]
    grads = [randn(*s, dtype=dtype, seed=10 + i) for i, s in enumerate(SHAPES)]
    mus = [0.1 * randn(*s, dtype=dtype, seed=20 + i) for i, s in enumerate(SHAPES)]
    nus = [0.01 * randn(*s, dtype=dtype, seed=30 + i) ** 2 + 1e-4 for i, s in enumerate(SHAPES)]
    return params, grads, mus, nus


@triton_path
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("decoupled", [True, False])
def test_adamw_kernel_matches_its_reference(dtype, decoupled):
    params, grads, mus, nus = _adam_inputs(dtype)
    before = [t.clone() for t in params + grads + mus + nus]
    step, decay = torch.tensor(3, device=DEVICE), [True, False, True, False]
    hyper = {"weight_decay": 0.1, "decay": decay, "decoupled": decoupled}
    lr = torch.tensor(1e-2, device=DEVICE)
    fused = K.adamw_update(params, grads, mus, nus, step, lr, **hyper)
    if dtype == torch.float32:
        expected = K.adamw_update_reference(params, grads, mus, nus, step, lr, **hyper)
    else:  # the reference in fp32 math, rounded once: what the kernel computes
        expected = _flat_reference_per_tensor(params, grads, mus, nus, step, lr, **hyper)
    for got, want in zip(fused, expected, strict=True):
        for a, e in zip(got, want, strict=True):
            assert a.dtype == e.dtype
            assert_close_scaled(a, e, TOL[dtype])
    for t, b in zip(params + grads + mus + nus, before, strict=True):
        assert torch.equal(t, b), "adamw_update wrote into its inputs"


def _flat_reference_per_tensor(
    params, grads, mus, nus, step, lr, *, weight_decay, decay, decoupled
):
    step_size, bc2, factor = K._adamw.adam_coefficients(step, lr, 0.9, 0.999, weight_decay)
    factor = torch.as_tensor(factor, dtype=torch.float64, device=DEVICE)
    coeffs = torch.stack([step_size, bc2, factor]).float()
    outs: tuple[list[torch.Tensor], ...] = ([], [], [])
    for p, g, m, v, d in zip(params, grads, mus, nus, decay, strict=True):
        n = p.numel() if d and weight_decay else 0
        flat = (t.reshape(-1) for t in (p, g, m, v))
        results = K._adamw.adamw_flat_reference(
            *flat, coeffs, 0.9, 0.999, 1e-8, weight_decay, n, decoupled
        )
        for out, r in zip(outs, results, strict=True):
            out.append(r.view(p.shape))
    return outs


def _run_optimizer(tx, params, steps, seed=0):
    state = tx.init(params)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        grads = {k: torch.randn(v.shape, generator=g).to(v) for k, v in params.items()}
        updates, state = tx.update(grads, state, params)
        params = lo.apply_updates(params, updates)
    return params, state


def _params():
    return {"w": randn(33, 17, seed=1), "b": randn(17, seed=2), "e": randn(1023, seed=3)}


OPTIMIZERS = {
    "adamw_schedule_mask": lambda fused: lo.adamw(
        lo.cosine_decay_schedule(1e-2, 50),
        weight_decay=0.1,
        fused=fused,
        mask=lambda p: {k: v.ndim > 1 for k, v in p.items()},
    ),
    "adamw_no_decay": lambda fused: lo.adamw(1e-2, weight_decay=0.0, fused=fused),
    "adam_l2": lambda fused: lo.adam(1e-2, weight_decay=0.1, fused=fused),
}


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_fused_optimizer_reference_path_is_bit_identical_to_the_unfused_one(name):
    with K.disabled():
        fused, fused_state = _run_optimizer(OPTIMIZERS[name](True), _params(), 10)
    unfused, unfused_state = _run_optimizer(OPTIMIZERS[name](False), _params(), 10)
    assert tree_structure(fused_state) == tree_structure(unfused_state)  # checkpoints interchange
    for k in unfused:
        assert torch.equal(fused[k], unfused[k]), k


@triton_path
@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_fused_optimizer_triton_path_tracks_the_unfused_one(name):
    fused, _ = _run_optimizer(OPTIMIZERS[name](True), _params(), 10)
    unfused, _ = _run_optimizer(OPTIMIZERS[name](False), _params(), 10)
    for k in unfused:  # ten steps of ~1e-2 on O(1) params: a few fp32 ulps apart
        torch.testing.assert_close(fused[k], unfused[k], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", ["adam", "adamw"])
def test_fused_optimizer_matches_torch_optim_on_cpu(name):
    params = {k: v.cpu() for k, v in _params().items()}
    torch_params = {k: v.clone().requires_grad_() for k, v in params.items()}
    groups = [
        {"params": [torch_params["w"], torch_params["e"]]},
        {"params": [torch_params["b"]], "weight_decay": 0.0},
    ]
    if name == "adam":
        tx = lo.adam(1e-2, weight_decay=0.1, fused=True)
        opt: torch.optim.Optimizer = torch.optim.Adam(
            list(torch_params.values()), 1e-2, weight_decay=0.1
        )
    else:
        tx = lo.adamw(1e-2, weight_decay=0.1, fused=True, mask={"w": True, "b": False, "e": True})
        opt = torch.optim.AdamW(groups, lr=1e-2, weight_decay=0.1)
    state = tx.init(params)
    g = torch.Generator().manual_seed(0)
    with K.disabled():  # the path a CPU takes (this module may run the interpreter)
        for _ in range(10):
            grads = {k: torch.randn(v.shape, generator=g) for k, v in params.items()}
            updates, state = tx.update(grads, state, params)
            params = lo.apply_updates(params, updates)
            for k, p in torch_params.items():
                p.grad = grads[k]
            opt.step()
    for k, p in torch_params.items():
        if name == "adam":  # bit for bit, as the unfused adam
            assert torch.equal(params[k], p.detach()), k
        else:  # as the unfused adamw (tests/test_optim.py): within 1e-6
            torch.testing.assert_close(params[k], p.detach(), rtol=0, atol=1e-6)


def test_fused_needs_params_for_weight_decay_and_a_bool_switch():
    tx = lo.adamw(1e-2, weight_decay=0.1, fused=True)
    params = _params()
    with pytest.raises(ValueError, match="needs the parameters"):
        tx.update(params, tx.init(params))
    with pytest.raises(TypeError, match="`fused` must be a bool"):
        lo.adamw(1e-2, fused="yes")  # type: ignore[arg-type]
    no_decay = lo.adam(1e-2, fused=True)  # Adam without weight decay needs no params
    no_decay.update(params, no_decay.init(params))


def test_adamw_update_rejects_mismatched_lists():
    params, grads, mus, nus = _adam_inputs(torch.float32)
    step = torch.tensor(1)
    with pytest.raises(ValueError, match=r"`grads` has 3 entries but `params` has 4"):
        K.adamw_update(params, grads[:3], mus, nus, step, 1e-3)
    with pytest.raises(ValueError, match=r"`exp_avgs\[1\]` has shape \(8,\)"):
        K.adamw_update(params, grads, [mus[0], randn(8), *mus[2:]], nus, step, 1e-3)
    with pytest.raises(ValueError, match=r"`decay` has 1 entries"):
        K.adamw_update(params, grads, mus, nus, step, 1e-3, decay=[True])


def test_adamw_flat_passes_opcheck():
    n = 100
    flat = (randn(n), randn(n, seed=1), 0.1 * randn(n, seed=2), randn(n, seed=3) ** 2)
    coeffs = torch.tensor([-0.01, 0.1, 0.999], device=DEVICE)
    for decoupled in (True, False):
        args = (*flat, coeffs, 0.9, 0.999, 1e-8, 0.1, 37, decoupled)
        torch.library.opcheck(torch.ops.lightfunc.adamw_flat.default, args)


def test_adamw_flat_vmap_rule_maps_over_parameters_and_coefficients():
    batch, n = 3, 50
    flat = [randn(batch, n, seed=i) for i in range(3)] + [randn(batch, n, seed=3) ** 2]
    coeffs = torch.tensor([[-0.01, 0.1, 0.999], [-0.02, 0.2, 0.998], [-0.03, 0.3, 0.997]])
    coeffs = coeffs.to(DEVICE)

    def step(p, g, m, v, c):
        return torch.ops.lightfunc.adamw_flat(p, g, m, v, c, 0.9, 0.999, 1e-8, 0.1, 20, True)

    batched = torch.vmap(step)(*flat, coeffs)
    for i in range(batch):
        for got, want in zip(batched, step(*(t[i] for t in flat), coeffs[i]), strict=True):
            assert_close_scaled(got[i], want, TOL[torch.float32])


@pytest.mark.compiled
def test_fused_adamw_compiles_fullgraph_once_and_matches_eager(fresh_dynamo):
    from torch._dynamo.utils import counters

    tx = lo.adamw(lo.warmup_cosine_decay_schedule(0.0, 1e-2, 3, 50), weight_decay=0.1, fused=True)
    params = _params()
    state = tx.init(params)

    def step(params, state, grads):
        updates, state = tx.update(grads, state, params)
        return lo.apply_updates(params, updates), state

    compiled = torch.compile(step, fullgraph=True)
    eager_params, eager_state = params, state
    g = torch.Generator().manual_seed(0)
    for _ in range(4):
        grads = {k: torch.randn(v.shape, generator=g).to(v) for k, v in params.items()}
        params, state = compiled(params, state, grads)
        eager_params, eager_state = step(eager_params, eager_state, grads)
    assert counters["stats"]["unique_graphs"] == 1
    for k in params:
        torch.testing.assert_close(params[k], eager_params[k], rtol=1e-6, atol=1e-6)


# RMSNorm -------------------------------------------------------------------------------------

RMS_SHAPES = [(1, 7), (7, 1023), (3, 5, 33), (4, 1)]


@triton_path
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", RMS_SHAPES, ids=str)
@pytest.mark.parametrize("with_weight", [True, False])
def test_rms_norm_kernels_match_the_reference(shape, dtype, with_weight):
    x = randn(*shape, dtype=dtype).requires_grad_()
    w = randn(shape[-1], dtype=dtype, seed=1).requires_grad_() if with_weight else None
    grad_y = randn(*shape, dtype=dtype, seed=2)
    y = K.rms_norm(x, w)
    y.backward(grad_y)
    x32 = x.detach().float().requires_grad_()
    w32 = w.detach().float().requires_grad_() if w is not None else None
    y32 = K.rms_norm_reference(x32, w32)
    y32.backward(grad_y.float())
    assert y.dtype == dtype
    assert_close_scaled(y, y32, TOL[dtype])
    # grad_x is a difference of terms of size |grad_y * w| * rstd that cancel (exactly, for
    # rows of one element): judge it on the scale of those terms.
    xf = x.detach().float()
    rstd = torch.rsqrt(xf.pow(2).mean(-1) + 1e-6).max().item()
    terms = grad_y.float() * (w.detach().float() if w is not None else 1.0)
    assert_close_scaled(x.grad, x32.grad, TOL[dtype], scale=terms.abs().max().item() * rstd)
    if w is not None:
        assert_close_scaled(w.grad, w32.grad, TOL[dtype])


def _rms_loss(norm):
    return lambda x, w: norm(x, w).sin().sum()


@pytest.mark.parametrize("transform", ["autograd", "func.grad"])
def test_rms_norm_differentiates_under_autograd_and_torch_func(transform):
    x, w = randn(5, 33), randn(33, seed=1)
    expected = torch.func.grad(_rms_loss(K.rms_norm_reference), argnums=(0, 1))(x, w)
    if transform == "func.grad":
        got = torch.func.grad(_rms_loss(K.rms_norm), argnums=(0, 1))(x, w)
    else:
        xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
        _rms_loss(K.rms_norm)(xr, wr).backward()
        got = (xr.grad, wr.grad)
    for a, e in zip(got, expected, strict=True):
        assert_close_scaled(a, e, TOL[torch.float32])


# torch 2.13's dynamo instantiates the autograd.Function it traces, and warns about it.
TRACES_AUTOGRAD_FUNCTION = pytest.mark.filterwarnings(
    "ignore:<class 'torch.autograd.function.Function'> should not be instantiated:DeprecationWarning"
)


@pytest.mark.compiled
@TRACES_AUTOGRAD_FUNCTION
@pytest.mark.parametrize("transform", ["autograd", "func.grad"])
def test_rms_norm_compiles_fullgraph_with_correct_gradients(transform, fresh_dynamo):
    x, w = randn(5, 33), randn(33, seed=1)
    expected = torch.func.grad(_rms_loss(K.rms_norm_reference), argnums=(0, 1))(x, w)
    if transform == "func.grad":
        fn = torch.compile(torch.func.grad(_rms_loss(K.rms_norm), argnums=(0, 1)), fullgraph=True)
        got = fn(x, w)
    else:
        xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
        torch.compile(_rms_loss(K.rms_norm), fullgraph=True)(xr, wr).backward()
        got = (xr.grad, wr.grad)
    for a, e in zip(got, expected, strict=True):
        assert_close_scaled(a, e, TOL[torch.float32])


def test_rms_norm_ops_pass_opcheck():
    x, w = randn(3, 7).requires_grad_(), randn(7, seed=1).requires_grad_()
    torch.library.opcheck(torch.ops.lightfunc.rms_norm.default, (x, w, 1e-6))
    torch.library.opcheck(torch.ops.lightfunc.rms_norm.default, (x, None, 1e-6))
    rstd = torch.rand(3, device=DEVICE) + 0.5
    args = (randn(3, 7, seed=2), x.detach(), w.detach(), rstd)
    torch.library.opcheck(torch.ops.lightfunc.rms_norm_backward.default, args)


def test_rms_norm_rejects_bad_shapes():
    with pytest.raises(ValueError, match=r"`weight` must have shape \(7,\)"):
        K.rms_norm(randn(3, 7), randn(6))
    with pytest.raises(ValueError, match="at least one dimension"):
        K.rms_norm(torch.tensor(1.0))


# Linear + cross-entropy ----------------------------------------------------------------------

# (rows, features, vocab, chunk_size, bias, ignore_index, label_smoothing, reduction)
CE_CASES = [
    (1, 16, 7, None, True, -100, 0.0, "mean"),
    (7, 16, 1023, 3, True, -100, 0.1, "mean"),
    (13, 8, 4099, 4, False, 2, 0.0, "sum"),
    (33, 8, 37, 8, True, 5, 0.2, "mean"),
]


def _ce_inputs(rows, features, vocab, bias, ignore_index, dtype):
    x = randn(rows, features, dtype=dtype)
    w = 0.3 * randn(vocab, features, dtype=dtype, seed=1)
    b = randn(vocab, dtype=dtype, seed=2) if bias else None
    target = torch.randint(0, vocab, (rows,), generator=torch.Generator().manual_seed(3))
    if rows > 1:
        target[::3] = ignore_index  # some rows ignored, never all
    return x, w, b, target.to(DEVICE)


def _ce_check(case, dtype):
    rows, features, vocab, chunk, bias, ignore_index, smoothing, reduction = case
    x, w, b, target = _ce_inputs(rows, features, vocab, bias, ignore_index, dtype)
    kw = {"ignore_index": ignore_index, "label_smoothing": smoothing, "reduction": reduction}
    leaves = [t.clone().requires_grad_() for t in (x, w, b) if t is not None]
    loss = K.linear_cross_entropy(
        leaves[0], leaves[1], target, leaves[2] if bias else None, chunk_size=chunk, **kw
    )
    loss.backward()
    ref_leaves = [t.detach().float().requires_grad_() for t in (x, w, b) if t is not None]
    ref = K.linear_cross_entropy_reference(
        ref_leaves[0], ref_leaves[1], target, ref_leaves[2] if bias else None, **kw
    )
    ref.backward()
    assert loss.dtype == dtype
    assert_close_scaled(loss, ref, TOL[dtype])
    for got, want in zip(leaves, ref_leaves, strict=True):
        assert got.grad.dtype == dtype
        assert_close_scaled(got.grad, want.grad, TOL[dtype])


@triton_path
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", CE_CASES, ids=lambda c: f"{c[0]}x{c[1]}->{c[2]}")
def test_linear_cross_entropy_kernel_matches_the_reference(case, dtype):
    _ce_check(case, dtype)


@pytest.mark.parametrize("case", CE_CASES, ids=lambda c: f"{c[0]}x{c[1]}->{c[2]}")
def test_linear_cross_entropy_chunked_reference_path_matches_the_unfused_loss(case):
    with K.disabled():
        _ce_check(case, torch.float32)


def test_linear_cross_entropy_takes_any_leading_shape_and_skips_grads_without_grad_mode():
    x, w, b, target = _ce_inputs(6, 8, 11, True, -100, torch.float32)
    x3, t2 = x.view(2, 3, 8), target.view(2, 3)
    with torch.no_grad():
        loss = K.linear_cross_entropy(x3, w, t2, b)
    assert loss.grad_fn is None
    torch.testing.assert_close(loss, K.linear_cross_entropy_reference(x, w, target, b))


def test_linear_cross_entropy_all_ignored_is_nan_with_zero_gradients_like_torch():
    x, w, _, _ = _ce_inputs(4, 8, 11, False, -100, torch.float32)
    target = torch.full((4,), -100, device=DEVICE)
    xr = x.clone().requires_grad_()
    loss = K.linear_cross_entropy(xr, w, target)
    loss.backward()
    assert loss.isnan() and K.linear_cross_entropy_reference(x, w, target).isnan()
    assert torch.equal(xr.grad, torch.zeros_like(x))


def _ce_loss(fn, **kw):
    return lambda x, w, b, t: fn(x, w, t, b, label_smoothing=0.1, ignore_index=2, **kw)


def test_linear_cross_entropy_differentiates_under_torch_func_grad():
    x, w, b, target = _ce_inputs(9, 8, 37, True, 2, torch.float32)
    grad = torch.func.grad(_ce_loss(K.linear_cross_entropy), argnums=(0, 1, 2))
    expected = torch.func.grad(_ce_loss(K.linear_cross_entropy_reference), argnums=(0, 1, 2))
    for a, e in zip(grad(x, w, b, target), expected(x, w, b, target), strict=True):
        assert_close_scaled(a, e, TOL[torch.float32])


@pytest.mark.compiled
def test_linear_cross_entropy_compiles_fullgraph_under_torch_func_grad(fresh_dynamo):
    x, w, b, target = _ce_inputs(9, 8, 37, True, 2, torch.float32)
    loss_fn = _ce_loss(K.linear_cross_entropy, chunk_size=5)  # two chunks: keep the graph small
    grad_and_value = torch.func.grad_and_value(loss_fn, argnums=(0, 1, 2))
    (grads, loss) = torch.compile(grad_and_value, fullgraph=True)(x, w, b, target)
    expected = torch.func.grad_and_value(
        _ce_loss(K.linear_cross_entropy_reference), argnums=(0, 1, 2)
    )(x, w, b, target)
    assert_close_scaled(loss, expected[1], TOL[torch.float32])
    for a, e in zip(grads, expected[0], strict=True):
        assert_close_scaled(a, e, TOL[torch.float32])


def test_linear_cross_entropy_op_passes_opcheck():
    x, w, b, _ = _ce_inputs(5, 8, 11, True, -100, torch.float32)
    target = torch.tensor([1, -100, 3, 10, 0], device=DEVICE)
    x, w, b = (t.requires_grad_() for t in (x, w, b))
    op = torch.ops.lightfunc.linear_cross_entropy.default
    torch.library.opcheck(op, (x, w, b, target, -100, 0.1, "mean", 2, True))
    torch.library.opcheck(op, (x.detach(), w.detach(), None, target, -100, 0.0, "sum", 4, False))


@pytest.mark.parametrize(
    ("change", "error", "match"),
    [
        ({"w": randn(11, 7)}, ValueError, r"`weight` must have shape \(V, 8\)"),
        (
            {"target": torch.zeros(4, dtype=torch.long)},
            ValueError,
            r"`target` must have shape \(6,\)",
        ),
        ({"target": torch.zeros(6)}, TypeError, "class indices"),
        ({"b": randn(10)}, ValueError, r"`bias` must have shape \(11,\)"),
        ({"reduction": "none"}, ValueError, "`reduction` must be one of"),
        ({"label_smoothing": 1.5}, ValueError, r"`label_smoothing` must be in \[0, 1\]"),
        ({"chunk_size": 0}, ValueError, "`chunk_size` must be a positive int"),
    ],
)
def test_linear_cross_entropy_rejects_bad_arguments(change, error, match):
    x, w, b, target = _ce_inputs(6, 8, 11, True, -100, torch.float32)
    args = {"x": x, "w": w, "target": target.to(DEVICE), "b": b} | change
    args["target"] = args["target"].to(DEVICE)
    options = {k: args.pop(k) for k in ("reduction", "label_smoothing", "chunk_size") if k in args}
    with pytest.raises(error, match=match):
        K.linear_cross_entropy(args["x"], args["w"], args["target"], args["b"], **options)


def test_switching_the_triton_paths_off_and_on():
    x = torch.empty(1, device=DEVICE)
    available = K.uses_triton(x)
    with K.disabled():
        assert not K.uses_triton(x)
    assert K.uses_triton(x) == available
    with pytest.raises(TypeError, match="`enabled` must be a bool"):
        K.set_enabled(1)  # type: ignore[arg-type]


def test_reference_cross_entropy_is_f_cross_entropy_of_the_linear_layer():
    x, w, b, target = _ce_inputs(6, 8, 11, True, -100, torch.float32)
    torch.testing.assert_close(
        K.linear_cross_entropy_reference(x, w, target, b),
        F.cross_entropy(x @ w.T + b, target),
    )


# All three in a lightfunc step -----------------------------------------------------------------


def _lm_state(fused: bool):
    import lightfunc as lf

    vocab, features = 37, 16
    params = {
        "embed": randn(vocab, features, seed=5),
        "norm": 1 + 0.1 * randn(features, seed=6),
        "head": 0.3 * randn(vocab, features, seed=7),
    }
    return lf.TrainState.create(params, lo.adamw(1e-2, weight_decay=0.1, fused=fused), seed=None)


def _lm_step(norm, cross_entropy):
    import lightfunc as lf

    def train_step(state, batch):
        tokens, targets = batch

        def loss_fn(params):
            h = norm(params["embed"][tokens], params["norm"])
            return cross_entropy(h, params["head"], targets, ignore_index=0)

        loss, grads = lf.value_and_grad(loss_fn)(state.params)
        return state.apply_gradients(grads), {"loss": loss}

    return train_step


@pytest.mark.compiled
@TRACES_AUTOGRAD_FUNCTION
def test_a_compiled_lightfunc_language_model_step_runs_every_kernel_like_the_references(
    fresh_dynamo,
):
    import lightfunc as lf

    one_chunk = functools.partial(K.linear_cross_entropy, chunk_size=16)  # a smaller graph
    fast = lf.build(_lm_step(K.rms_norm, one_chunk))
    slow = lf.build(_lm_step(K.rms_norm_reference, K.linear_cross_entropy_reference), compile=False)
    fast_state, slow_state = _lm_state(fused=True), _lm_state(fused=False)
    g = torch.Generator().manual_seed(8)
    for _ in range(3):
        tokens = torch.randint(0, 37, (2, 6), generator=g).to(DEVICE)
        batch = (tokens, tokens.roll(-1, dims=1))
        fast_state, fast_metrics = fast(fast_state, batch)
        slow_state, slow_metrics = slow(slow_state, batch)
        torch.testing.assert_close(fast_metrics["loss"], slow_metrics["loss"], rtol=1e-5, atol=0)
    for k in slow_state.params:
        torch.testing.assert_close(fast_state.params[k], slow_state.params[k], rtol=1e-4, atol=1e-6)


def test_the_kernel_benchmark_runs_and_writes_its_tables(tmp_path):
    from bench import kernels as bench_kernels

    bench_kernels.main(["--quick", "--out", str(tmp_path)])
    results = json.loads((tmp_path / "kernels.json").read_text())
    methods = {(r["op"], r["method"]) for r in results["records"]}
    assert ("linear_cross_entropy", "chunked (torch ops)") in methods
    assert {op for op, _ in methods} == {"adamw", "rms_norm", "linear_cross_entropy"}
    assert "| reference |" in (tmp_path / "kernels.md").read_text()
