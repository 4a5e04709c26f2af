"""The fast paths of issue 18 keep their promises: same numbers, pure, one graph.

Speed itself is measured in bench/, never asserted here. What is checked is
the structure that makes the paths fast and the numbers they must keep:

- eager Adam/AdamW run torch's multi-tensor kernels: the number of operations
  dispatched per update does not grow with the number of parameters, and a
  train step's parameters are torch.optim.AdamW's bit for bit;
- a compiled train step computes Adam's per-step scalars once (not once per
  element of every parameter), compiles once, agrees with the eager step and
  leaves its input state untouched.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F
from helpers import clone_tree, make_data, make_model, make_steps
from torch.utils._python_dispatch import TorchDispatchMode

import lightfunc as lf
import lightfunc.optim as lo
from lightfunc._tree import tree_leaves


class _CountOps(TorchDispatchMode):
    """Counts the aten operations dispatched inside it."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        self.count += 1
        return func(*args, **(kwargs or {}))


def _params(n: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(n)
    return {f"w{i}": torch.randn(3 + i, 4, generator=g) for i in range(n)}


def _ops_per_update(tx: lo.GradientTransformation, n: int, *, direct: bool = False) -> int:
    from lightfunc.optim._base import update_params

    params = _params(n)
    grads = {k: torch.ones_like(v) for k, v in params.items()}
    state = tx.init(params)
    with _CountOps() as counter:
        if direct:  # what `apply_gradients` runs eagerly: the new parameters themselves
            update_params(tx, grads, state, params, in_place=False)
        else:
            tx.update(grads, state, params)
    return counter.count


@pytest.mark.parametrize(
    "make_tx",
    [
        lambda: lo.adamw(1e-3, weight_decay=0.1),
        lambda: lo.adamw(lo.warmup_cosine_decay_schedule(0.0, 1e-3, 5, 50)),
        lambda: lo.adam(1e-3, weight_decay=0.1),
    ],
)
@pytest.mark.parametrize("direct", [False, True])
def test_eager_adam_dispatches_the_same_ops_for_3_and_12_parameters(make_tx, direct):
    assert _ops_per_update(make_tx(), 3, direct=direct) == _ops_per_update(
        make_tx(), 12, direct=direct
    )


@pytest.mark.parametrize("skip_unused", [False, True])
def test_eager_train_step_is_torch_adamw_bit_for_bit_and_is_pure(skip_unused):
    model = make_model(batchnorm=False)
    train_step, _ = make_steps(model)
    step = lf.build(train_step, compile=False)
    state = lf.TrainState.create(model, lo.adamw(1e-2, weight_decay=0.1), skip_unused=skip_unused)
    reference = make_model(batchnorm=False)
    opt = torch.optim.AdamW(reference.parameters(), lr=1e-2, weight_decay=0.1)
    for x, y in make_data(n=96):
        before = clone_tree(state)
        new_state, _ = step(state, (x, y))
        for a, b in zip(tree_leaves(before), tree_leaves(state), strict=True):
            assert torch.equal(a, b)  # the input state is untouched
        state = new_state
        opt.zero_grad()
        F.cross_entropy(reference(x), y).backward()
        opt.step()
    # Eagerly the gradients are `torch.autograd.grad`'s, the ones `loss.backward()` makes,
    # and `apply_gradients` computes the new parameters with torch.optim's arithmetic
    # (not `p + (new - p)`, one rounding away: 9.3e-10 off here before it did).
    for name, p in reference.named_parameters():
        assert torch.equal(state.params[name], p.detach()), name


@pytest.mark.compiled
def test_compiled_step_computes_adam_scalars_once_compiles_once_and_matches_eager():
    from torch._inductor.utils import run_and_get_code

    model = make_model(batchnorm=False)
    train_step, _ = make_steps(model)
    batches = make_data(n=96)
    tx = lo.adamw(lo.warmup_cosine_decay_schedule(0.0, 1e-2, 2, 10), weight_decay=0.1)
    eager = lf.build(train_step, compile=False)
    compiled = lf.build(train_step)
    state_e = lf.TrainState.create(model, tx)
    state_c = lf.TrainState.create(model, tx)
    torch._dynamo.reset()
    before = lf.compile_counts()["graphs"]
    (state_c, _), codes = run_and_get_code(compiled, state_c, batches[0])
    state_e, _ = eager(state_e, batches[0])
    for batch in batches[1:]:
        state_c, _ = compiled(state_c, batch)
        state_e, _ = eager(state_e, batch)
    assert lf.compile_counts()["graphs"] - before == 1
    code = "\n".join(codes)
    # b1 ** t and b2 ** t once per step in all, not once per parameter's loop.
    assert code.count("std::pow(") == 2, code.count("std::pow(")
    # The schedule's cosine: once for Adam's step size and once for the decay
    # factor, not once per parameter's loop (4 parameters here).
    assert code.count("std::cos(") <= 2, code.count("std::cos(")
    for k in state_e.params:
        torch.testing.assert_close(state_c.params[k], state_e.params[k], rtol=0, atol=1e-5)
    torch._dynamo.reset()


def _purity_check(step: Any, state: Any, batch: Any) -> None:
    snapshot = clone_tree(state)
    versions = [x._version for x in tree_leaves(state)]
    step(state, batch)
    assert [x._version for x in tree_leaves(state)] == versions
    for a, b in zip(tree_leaves(snapshot), tree_leaves(state), strict=True):
        assert torch.equal(a, b)


@pytest.mark.compiled
def test_compiled_step_leaves_its_input_state_untouched():
    model = make_model(batchnorm=False)
    train_step, _ = make_steps(model)
    step = lf.build(train_step)
    state = lf.TrainState.create(model, lo.adamw(1e-2))
    torch._dynamo.reset()
    batch = make_data(n=32)[0]
    state, _ = step(state, batch)
    _purity_check(step, state, batch)
    torch._dynamo.reset()


# -- the eager gradient: torch.autograd.grad where no transform needs torch.func ----------------


def _wrapped_inside(fn):  # type: ignore[no-untyped-def]
    """`fn`, recording whether the tensor it is differentiated at arrives wrapped by torch.func."""
    seen: list[bool] = []

    def inner(w, *rest):  # type: ignore[no-untyped-def]
        seen.append(torch._C._functorch.is_functorch_wrapped_tensor(tree_leaves(w)[0]))
        return fn(w, *rest)

    return inner, seen


def test_eager_value_and_grad_runs_autograd_on_plain_tensors_and_equals_torch_func():
    model = make_model(batchnorm=True)
    params, buffers = lf.params_of(model), lf.buffers_of(model)
    x, y = make_data(n=32)[0]

    def loss_fn(p):  # type: ignore[no-untyped-def]
        logits, new_buffers = lf.apply(model, p, buffers, x, train=True)
        return F.cross_entropy(logits, y), (logits, new_buffers)

    traced, seen = _wrapped_inside(loss_fn)
    (loss, (logits, new_buffers)), grads = lf.value_and_grad(traced, has_aux=True)(params)
    assert seen == [False]  # plain tensors: torch.autograd.grad, no torch.func wrappers
    (ref_grads, (ref_loss, (ref_logits, ref_buffers))) = torch.func.grad_and_value(
        loss_fn, has_aux=True
    )(params)
    assert torch.equal(loss, ref_loss) and torch.equal(logits, ref_logits)
    assert not loss.requires_grad and not logits.requires_grad  # value and aux come back detached
    for k in ref_grads:
        assert torch.equal(grads[k], ref_grads[k]), k
        assert not grads[k].requires_grad
    for k in ref_buffers:
        assert torch.equal(new_buffers[k], ref_buffers[k]), k
    for k, v in lf.params_of(model).items():
        assert torch.equal(params[k], v) and not params[k].requires_grad  # inputs untouched


def test_eager_value_and_grad_gives_zeros_to_an_input_the_loss_does_not_reach():
    params = {"used": torch.tensor([1.0, 2.0]), "unused": torch.tensor([3.0])}
    value, grads = lf.value_and_grad(lambda p: (p["used"] ** 2).sum())(params)
    assert value.item() == 5.0
    assert grads["used"].tolist() == [2.0, 4.0] and grads["unused"].tolist() == [0.0]
    value, grads = lf.value_and_grad(lambda p: torch.tensor(7.0))(params)  # reaches no input
    assert value.item() == 7.0
    assert grads["used"].tolist() == [0.0, 0.0] and grads["unused"].tolist() == [0.0]


def test_value_and_grad_keeps_torch_func_where_transforms_compose():
    def cube_sum(w):  # type: ignore[no-untyped-def]
        return (w**3).sum()

    traced, seen = _wrapped_inside(cube_sum)
    w = torch.tensor([1.0, 2.0])
    # grad of grad (MAML): d/dw sum(d/dw w^3) = 6 w
    second = torch.func.grad(lambda v: lf.value_and_grad(traced)(v)[1].sum())(w)
    assert second.tolist() == [6.0, 12.0]
    # vmap (ensembles): one gradient per row
    values, grads = torch.func.vmap(lf.value_and_grad(traced))(torch.tensor([[1.0], [3.0]]))
    assert values.tolist() == [1.0, 27.0] and grads.tolist() == [[3.0], [27.0]]
    # an input that already requires grad (part of an outer autograd graph): torch.func
    leaf = torch.tensor([2.0], requires_grad=True)
    _, g = lf.value_and_grad(traced)(leaf * 1.0)
    assert g.tolist() == [12.0]
    assert seen == [True, True, True]


def test_eager_value_and_grad_with_a_loss_scale_unscales_the_autograd_gradients():
    scale = lf.LossScale.create(2.0**10)
    traced, seen = _wrapped_inside(lambda w: (w * w).sum())
    value, grads = lf.value_and_grad(traced, loss_scale=scale)(torch.tensor([1.0, 3.0]))
    assert seen == [False]
    assert value.item() == 10.0 and grads.tolist() == [2.0, 6.0]


# -- skip_unused: one multi-tensor check for all parameters --------------------------------------


def _as_bools(flags: Any) -> list[bool]:
    return [bool(f) for f in flags]


def test_gradient_flags_are_exact_for_tiny_nan_inf_and_signed_zero_gradients():
    from lightfunc.optim._masking import _gradient_flags

    grads = [
        torch.full((4,), 1e-30),  # its squares underflow in float32: the norm alone says zero
        torch.tensor([0.0, float("nan")]),
        torch.tensor([-float("inf")]),
        torch.tensor([-0.0, 0.0]),
        torch.zeros(3, 2),
        torch.tensor([0.0, -2.0]),
    ]
    assert _as_bools(_gradient_flags(grads)) == [True, True, True, False, False, True]
    assert _as_bools(_gradient_flags(grads[:1])) == [True]  # underflowing norm, exact answer
    assert _gradient_flags([grads[1], grads[2], grads[5]]) == [True, True, True]  # no tensor
    mixed = [torch.full((2,), 1e-300, dtype=torch.float64), torch.zeros(2), torch.ones(1)]
    assert _as_bools(_gradient_flags(mixed)) == [True, False, True]
    flags = torch.func.vmap(lambda g: torch.stack([*_gradient_flags([g, g * 0])]))(
        torch.tensor([[0.0], [1.0]])
    )
    assert flags.tolist() == [[False, False], [True, False]]


def _trainable_ops(n: int, skip_unused: bool) -> int:
    params = _params(n)
    grads = {k: torch.ones_like(v) for k, v in params.items()}
    tx = lo.trainable_only(lo.adamw(1e-3, weight_decay=0.1), skip_unused=skip_unused)
    state = tx.init(params)
    with _CountOps() as counter:
        tx.update(grads, state, params)
    return counter.count


def test_eager_skip_unused_costs_a_fixed_number_of_ops_whatever_the_number_of_parameters():
    with_check = _trainable_ops(3, True), _trainable_ops(12, True)
    assert with_check[0] == with_check[1]
    # the check itself: a multi-tensor norm, a stack, a comparison, a count and its read back
    assert with_check[0] - _trainable_ops(3, False) <= 5


@pytest.mark.parametrize(
    "compile", [False, pytest.param(True, marks=pytest.mark.compiled)], ids=["eager", "compiled"]
)
def test_skip_unused_leaves_an_unused_parameter_and_its_moments_as_they_were(compile):
    params = {"a": torch.tensor([1.0, -2.0]), "b": torch.tensor([0.5]), "c": torch.tensor([3.0])}
    tx = lo.trainable_only(lo.adamw(0.1, weight_decay=0.1))
    state = tx.init(params)
    _, state = tx.update({k: torch.ones_like(v) for k, v in params.items()}, state, params)
    grads = {"a": torch.tensor([0.5, 0.0]), "b": torch.zeros(1), "c": torch.tensor([float("nan")])}

    def update(g, s, p):  # type: ignore[no-untyped-def]
        return tx.update(g, s, p)

    run = torch.compile(update, fullgraph=True) if compile else update
    updates, new_state = run(grads, state, params)
    assert updates["b"].tolist() == [0.0]
    assert torch.equal(new_state[0].mu["b"], state[0].mu["b"])
    assert torch.equal(new_state[0].nu["b"], state[0].nu["b"])
    assert updates["a"].abs().sum() > 0 and torch.isnan(updates["c"]).all()
    assert new_state[0].mu["b"] is not state[0].mu["b"]  # a new tensor: the state stays pure
    torch._dynamo.reset()


def _flags_rank(mesh: Any) -> dict[str, Any]:
    import torch.distributed._functional_collectives as funcol
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    from lightfunc.optim._masking import _gradient_flags

    device_mesh = init_device_mesh("cpu", (mesh.world_size,))
    rank = mesh.global_rank
    # Row shards: "a" is non-zero only on rank 1's rows, "b" nowhere, "c" on both.
    full = {
        "a": torch.tensor([[0.0], [0.0], [1.0], [1.0]]),
        "b": torch.zeros(4, 1),
        "c": torch.ones(4, 2),
    }
    grads = [distribute_tensor(v, device_mesh, [Shard(0)]) for v in full.values()]
    calls: list[int] = []
    real = funcol.all_reduce

    def counting(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        return real(*args, **kwargs)

    funcol.all_reduce = counting
    try:
        flags = _gradient_flags(grads)
    finally:
        funcol.all_reduce = real
    local_zero = not bool(grads[0].to_local().any())
    # Every parameter has a gradient somewhere ("a" only on rank 1): plain Python verdicts, so
    # the update adds no `where` (eagerly on the CPU, as for unsharded gradients).
    all_used = _gradient_flags([grads[0], grads[2]])
    return {"flags": ("ok", [bool(f) for f in flags]), "calls": ("ok", len(calls)), "rank": ("ok", rank),
            "local_zero": ("ok", local_zero), "all_used": ("ok", [repr(f) for f in all_used])}  # fmt: skip


@pytest.mark.multiprocess
def test_sharded_gradients_agree_on_their_flags_in_one_all_reduce():
    from helpers import ok_results

    from lightfunc.distributed._spawn import spawn

    results = spawn(_flags_rank, 2, timeout=120)
    assert ok_results(results, "flags") == [[True, False, True]] * 2
    assert ok_results(results, "calls") == [1, 1]  # one collective for all sharded parameters
    assert ok_results(results, "local_zero") == [True, False]  # rank 0's own rows of "a" are zero
    assert ok_results(results, "all_used") == [["True", "True"]] * 2  # Python bools, not tensors
