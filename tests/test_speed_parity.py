"""The fast paths of issue 18 keep their promises: same numbers, pure, one graph.

Speed itself is measured in bench/, never asserted here. What is checked is
the structure that makes the paths fast and the numbers they must keep:

- eager Adam/AdamW run torch's multi-tensor kernels: the number of operations
  dispatched per update does not grow with the number of parameters, and a
  train step follows torch.optim.AdamW's (the update itself is bit-exact:
  tests/test_optim.py);
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


def _ops_per_update(tx: lo.GradientTransformation, n: int) -> int:
    params = _params(n)
    grads = {k: torch.ones_like(v) for k, v in params.items()}
    state = tx.init(params)
    with _CountOps() as counter:
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
def test_eager_adam_dispatches_the_same_ops_for_3_and_12_parameters(make_tx):
    assert _ops_per_update(make_tx(), 3) == _ops_per_update(make_tx(), 12)


def test_eager_train_step_matches_torch_adamw_and_is_pure():
    model = make_model(batchnorm=False)
    train_step, _ = make_steps(model)
    step = lf.build(train_step, compile=False)
    state = lf.TrainState.create(model, lo.adamw(1e-2, weight_decay=0.1), skip_unused=False)
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
    # The optimizer is bit-exact (tests/test_optim.py); the gradients of torch.func
    # and of loss.backward() may differ in the last bit (summation order).
    for name, p in reference.named_parameters():
        torch.testing.assert_close(state.params[name], p.detach(), rtol=0, atol=1e-6)


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
