"""The eager fast paths of `lf.apply`, `lf.value_and_grad` and `apply_updates` (issue 18, part 2).

Each one must give exactly what the general path gives (bit for bit:
`torch.func.functional_call`, a `p + u` tree map), keep the module and the
inputs as they were, and step aside wherever it would not be exact: tied
weights, unknown names, transforms, compiling. `lf.apply` keeps per-module
slots between calls, so most tests here change the module after a first call
and check that no stale slot is used. Speed is measured in bench/eager_parts.py.
"""

from __future__ import annotations

import copy
import gc
import weakref
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from helpers import make_data, make_model, make_steps
from torch.func import functional_call

import lightfunc as lf
import lightfunc._func as lf_func
import lightfunc.optim as lo
from lightfunc._tree import tree_leaves, tree_map


def _reference(module: torch.nn.Module, params: Any, buffers: Any, *args: Any, train: bool) -> Any:
    """What `lf.apply` computed before its fast path: torch.func.functional_call on buffer copies."""
    new_buffers = {k: b.clone() for k, b in buffers.items()}
    flags = [m.training for m in module.modules()]
    for m in module.modules():
        m.training = train
    try:
        out = functional_call(module, (params, new_buffers), args, strict=False)
    finally:
        for m, flag in zip(module.modules(), flags, strict=True):
            m.training = flag
    return out, new_buffers


def _assert_same(a: Any, b: Any) -> None:
    for x, y in zip(tree_leaves(a), tree_leaves(b), strict=True):
        assert x.dtype == y.dtype and torch.equal(x, y)


class _Counting:
    """Stands in for `lightfunc._func.functional_call`, counting the calls that reach it."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.calls += 1
        return functional_call(*args, **kwargs)


@pytest.fixture
def general_calls(monkeypatch: pytest.MonkeyPatch) -> _Counting:
    counting = _Counting()
    monkeypatch.setattr(lf_func, "functional_call", counting)
    return counting


def _apply_both(
    model: torch.nn.Module, params: Any, buffers: Any, x: torch.Tensor, train: bool
) -> tuple[Any, Any]:
    """(`lf.apply`'s result, `_reference`'s), from the same random state (dropout)."""
    torch.manual_seed(7)
    got = lf.apply(model, params, buffers, x, train=train)
    torch.manual_seed(7)
    want = _reference(model, params, buffers, x, train=train)
    return got, want


# -- lf.apply: the fast path is exact and pure -------------------------------------------------


@pytest.mark.parametrize("train", [True, False])
def test_apply_fast_path_is_bit_equal_to_functional_call_and_pure(train, general_calls):
    model = make_model(dropout=0.3)  # BatchNorm (buffers updated in train mode) and Dropout
    params = {k: v + 0.01 for k, v in lf.params_of(model).items()}  # not the module's own values
    buffers = lf.buffers_of(model)
    own = {k: v for k, v in [*model.named_parameters(), *model.named_buffers()]}
    own_values = {k: v.clone() for k, v in own.items()}
    inputs = copy.deepcopy((params, buffers))
    x = torch.randn(6, 8)
    for _ in range(3):  # the first call finds the slots, the next ones reuse them
        got, want = _apply_both(model, params, buffers, x, train)
        _assert_same(got, want)
    assert general_calls.calls == 0  # lightfunc never called functional_call
    _assert_same((params, buffers), inputs)  # inputs untouched
    for k, v in [*model.named_parameters(), *model.named_buffers()]:
        assert v is own[k] and torch.equal(v, own_values[k]), k  # the module's own tensors are back


def test_value_and_grad_through_the_fast_apply_equals_torch_func(general_calls):
    model = make_model()
    params, buffers = lf.params_of(model), lf.buffers_of(model)
    x, y = make_data(n=32)[0]

    def loss_of(p: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        out, new_buffers = lf.apply(model, p, buffers, x, train=True)
        return F.cross_entropy(out, y), new_buffers

    def reference(p: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        out, new_buffers = _reference(model, p, buffers, x, train=True)
        return F.cross_entropy(out, y), new_buffers

    (loss, new_buffers), grads = lf.value_and_grad(loss_of, has_aux=True)(params)
    assert general_calls.calls == 0
    ref_grads, (ref_loss, ref_buffers) = torch.func.grad_and_value(reference, has_aux=True)(params)
    # torch.func.grad and torch.autograd.grad may differ in the last bit (summation order).
    torch.testing.assert_close(loss, ref_loss, rtol=0, atol=0)
    _assert_same(new_buffers, ref_buffers)
    for k in params:
        torch.testing.assert_close(grads[k], ref_grads[k], rtol=1e-6, atol=1e-7)
    assert list(grads) == list(params)


def test_apply_restores_the_module_when_forward_raises():
    class Fails(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = torch.nn.Linear(3, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            self.lin(x)
            raise RuntimeError("boom")

    model = Fails()
    own = model.lin.weight
    params = {k: torch.zeros_like(v) for k, v in lf.params_of(model).items()}
    for _ in range(2):
        with pytest.raises(RuntimeError, match="boom"):
            lf.apply(model, params, {}, torch.randn(2, 3), train=False)
        assert model.lin.weight is own and model.training


def test_apply_fast_path_switches_mixed_training_flags_and_restores_them(general_calls):
    model = make_model(dropout=0.5)
    model[1].eval()  # BatchNorm in eval, the rest in train
    flags = [m.training for m in model.modules()]
    params, buffers = lf.params_of(model), lf.buffers_of(model)
    x = torch.randn(6, 8)
    for train in (False, True, False):
        got, want = _apply_both(model, params, buffers, x, train)
        _assert_same(got, want)
        assert [m.training for m in model.modules()] == flags


# -- the cached slots follow every change of the module ---------------------------------------


def _check(model: torch.nn.Module, params: Any, x: torch.Tensor) -> None:
    """`lf.apply` agrees with functional_call, on values that differ from the module's own."""
    moved = {k: v + 0.5 for k, v in params.items()}
    got, want = _apply_both(model, moved, lf.buffers_of(model), x, True)
    _assert_same(got, want)


def test_replacing_a_submodule_after_a_call_is_seen():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
    params, x = lf.params_of(model), torch.randn(3, 4)
    _check(model, params, x)
    model[2] = torch.nn.Linear(4, 2)  # same names, a new module: the old slots point at the old one
    _check(model, params, x)
    out, _ = lf.apply(model, params, {}, x, train=True)
    torch.testing.assert_close(
        out,
        F.linear(
            torch.tanh(F.linear(x, params["0.weight"], params["0.bias"])),
            params["2.weight"],
            params["2.bias"],
        ),
        rtol=0,
        atol=0,
    )


def test_a_nested_submodule_added_or_removed_after_a_call_is_seen():
    inner = torch.nn.Sequential(torch.nn.Linear(4, 4))
    model = torch.nn.Sequential(inner, torch.nn.Linear(4, 2))
    x = torch.randn(3, 4)
    _check(model, lf.params_of(model), x)
    inner.append(torch.nn.Linear(4, 4))  # two levels down
    params = lf.params_of(model)
    assert "0.1.weight" in params
    _check(model, {k: v * 2 for k, v in params.items()}, x)
    del inner[1]
    _check(model, lf.params_of(model), x)


def test_a_parameter_or_buffer_registered_after_a_call_is_seen():
    class Scaled(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = torch.nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.lin(x)
            if hasattr(self, "scale"):
                y = y * self.scale
            if hasattr(self, "shift"):
                y = y + self.shift
            return y

    model, x = Scaled(), torch.randn(3, 4)
    _check(model, lf.params_of(model), x)
    model.scale = torch.nn.Parameter(torch.tensor(2.0))
    model.register_buffer("shift", torch.ones(4))
    params = {**lf.params_of(model), "scale": torch.tensor(3.0)}
    assert "scale" in params and "shift" in lf.buffers_of(model)
    _check(model, params, x)
    out, _ = lf.apply(model, params, {"shift": torch.full((4,), 5.0)}, x, train=True)
    torch.testing.assert_close(out, model.lin(x) * 3.0 + 5.0, rtol=0, atol=0)


def test_a_parameter_replaced_by_an_equal_valued_one_is_seen():
    # The snapshot compares tensors by identity, never by value.
    model = torch.nn.Linear(1, 1)
    params, x = lf.params_of(model), torch.randn(3, 1)
    _check(model, params, x)
    model.weight = torch.nn.Parameter(model.weight.detach().clone())
    plan = model.__dict__[lf_func._PLAN_KEY]
    _check(model, params, x)
    assert model.__dict__[lf_func._PLAN_KEY] is not plan  # rebuilt


def test_weights_tied_after_a_call_behave_as_functional_call(general_calls):
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4))
    x = torch.randn(3, 4)
    lf.apply(model, lf.params_of(model), {}, x, train=True)
    assert general_calls.calls == 0
    model[1].weight = model[0].weight  # tied now: `0.weight` must reach both layers
    params = lf.params_of(model)
    assert "1.weight" not in params
    params["0.weight"] = torch.randn(4, 4)
    got, want = _apply_both(model, params, {}, x, True)
    _assert_same(got, want)
    assert general_calls.calls == 1  # the tied module took functional_call, as before
    expected = F.linear(
        F.linear(x, params["0.weight"], params["0.bias"]), params["0.weight"], params["1.bias"]
    )
    torch.testing.assert_close(got[0], expected, rtol=0, atol=0)
    with pytest.raises(ValueError, match="tied"):  # two different values for one tied weight
        lf.apply(model, {**params, "1.weight": torch.randn(4, 4)}, {}, x, train=True)


def test_a_submodule_used_twice_is_tied_and_takes_functional_call(general_calls):
    shared = torch.nn.Linear(3, 3)
    model = torch.nn.Sequential(shared, torch.nn.ReLU(), shared)
    params, x = lf.params_of(model), torch.randn(2, 3)
    assert sorted(params) == ["0.bias", "0.weight"]
    got, want = _apply_both(model, {k: v + 1 for k, v in params.items()}, {}, x, False)
    _assert_same(got, want)
    assert general_calls.calls == 1


def test_a_deep_copy_applies_its_own_tensors_and_sees_its_own_changes():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    x = torch.randn(3, 4)
    _check(model, lf.params_of(model), x)
    twin = copy.deepcopy(model)  # carries the cached slots, copied with the module
    _check(twin, {k: v * 3 for k, v in lf.params_of(twin).items()}, x)
    own = model[0].weight
    twin[0] = torch.nn.Linear(4, 4)
    _check(twin, lf.params_of(twin), x)
    assert model[0].weight is own
    _check(model, lf.params_of(model), x)


def test_the_cached_slots_keep_no_reference_cycle():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU())
    lf.apply(model, lf.params_of(model), {}, torch.randn(2, 4), train=True)
    assert lf_func._PLAN_KEY in model.__dict__
    alive = weakref.ref(model)
    enabled = gc.isenabled()
    gc.disable()
    try:
        del model
        assert alive() is None  # freed by reference counting, without the cycle collector
    finally:
        if enabled:
            gc.enable()


def test_parametrized_modules_take_the_fast_path_exactly(general_calls):
    class Doubled(torch.nn.Module):
        def forward(self, w: torch.Tensor) -> torch.Tensor:
            return 2 * w

    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    x = torch.randn(3, 4)
    lf.apply(model, lf.params_of(model), {}, x, train=True)
    torch.nn.utils.parametrize.register_parametrization(model[0], "weight", Doubled())
    params = lf.params_of(model)
    assert "0.parametrizations.weight.original" in params
    got, want = _apply_both(model, {k: v - 1 for k, v in params.items()}, {}, x, True)
    _assert_same(got, want)
    assert general_calls.calls == 0


# -- lf.apply: where the fast path steps aside, behaviour is functional_call's ---------------


def test_unknown_names_behave_as_functional_call(general_calls):
    model = torch.nn.Linear(3, 2)
    x = torch.randn(2, 3)
    lf.apply(model, lf.params_of(model), {}, x, train=True)
    with pytest.raises(AttributeError, match="has no attribute `nope`"):
        lf.apply(model, {"nope.weight": torch.ones(2, 3)}, {}, x, train=True)
    with pytest.raises(AttributeError, match="has no attribute `nope`"):
        functional_call(model, {"nope.weight": torch.ones(2, 3)}, (x,), strict=False)
    assert general_calls.calls == 1
    # A subset of names: the module's own tensors fill in, on the fast path.
    got, want = _apply_both(model, {"bias": torch.zeros(2)}, {}, x, True)
    _assert_same(got, want)
    assert general_calls.calls == 1  # the subset took the fast path


def test_a_name_in_both_dicts_raises_as_functional_call():
    model = make_model()
    params, buffers = lf.params_of(model), lf.buffers_of(model)
    lf.apply(model, params, buffers, torch.randn(4, 8), train=True)
    with pytest.raises(ValueError, match="appeared in multiple dictionaries"):
        lf.apply(
            model,
            params,
            {**buffers, "0.weight": params["0.weight"]},
            torch.randn(4, 8),
            train=True,
        )


def test_vmap_over_parameters_takes_functional_call_and_matches_a_loop(general_calls):
    model = torch.nn.Linear(3, 2)
    x = torch.randn(4, 3)
    stacked = {k: torch.stack([v, v + 1, v * 2]) for k, v in lf.params_of(model).items()}

    def run(p: dict[str, torch.Tensor]) -> torch.Tensor:
        return lf.apply(model, p, {}, x, train=False)[0]

    outs = torch.func.vmap(run)(stacked)
    assert general_calls.calls == 1
    for i in range(3):
        _assert_same(outs[i], F.linear(x, stacked["weight"][i], stacked["bias"][i]))


def test_tensor_subclass_values_take_functional_call(general_calls):
    class Tagged(torch.Tensor):
        pass

    model = torch.nn.Linear(3, 2)
    params = {k: v.as_subclass(Tagged) for k, v in lf.params_of(model).items()}
    lf.apply(model, params, {}, torch.randn(2, 3), train=False)
    assert general_calls.calls == 1


@pytest.mark.compiled
def test_eager_apply_calls_between_compiled_steps_cause_no_recompile():
    model = make_model(batchnorm=True)
    train_step, _ = make_steps(model)
    compiled = lf.build(train_step)
    batches = make_data(n=96)
    state = lf.TrainState.create(model, lo.adamw(1e-2))
    params, buffers = state.params, state.buffers
    torch._dynamo.reset()
    before = lf.compile_counts()["graphs"]
    for i, batch in enumerate(batches):
        state, _ = compiled(state, batch)
        if i == 1:  # the next eager call finds the slots again and stores them
            del model.__dict__[lf_func._PLAN_KEY]
        lf.apply(model, params, buffers, batch[0], train=False)  # eager: the fast path
        assert lf_func._PLAN_KEY in model.__dict__
    assert lf.compile_counts()["graphs"] - before == 1
    torch._dynamo.reset()


# -- lf.value_and_grad: the plain-dict path ---------------------------------------------------


def test_value_and_grad_of_a_dict_keeps_its_order_and_runs_under_no_grad():
    g = torch.Generator().manual_seed(0)
    params = {"b": torch.randn(3, generator=g), "a": torch.randn(2, 3, generator=g)}

    def loss_of(p: dict[str, torch.Tensor]) -> torch.Tensor:
        return (p["a"] @ p["b"]).square().sum()

    with torch.no_grad():
        loss, grads = lf.value_and_grad(loss_of)(params)
    ref_grads, ref_loss = torch.func.grad_and_value(loss_of)(params)
    assert list(grads) == ["b", "a"] and not loss.requires_grad
    torch.testing.assert_close(loss, ref_loss, rtol=0, atol=0)
    for k in params:
        torch.testing.assert_close(grads[k], ref_grads[k], rtol=1e-6, atol=0)
        assert not grads[k].requires_grad and not params[k].requires_grad


def test_value_and_grad_of_nested_and_mixed_arguments_matches_torch_func():
    g = torch.Generator().manual_seed(0)
    w = {"layer": {"w": torch.randn(3, generator=g)}, "s": torch.randn((), generator=g)}
    v = torch.randn(3, generator=g)

    def loss_of(w: Any, v: torch.Tensor) -> torch.Tensor:
        return (w["layer"]["w"] * v).sum() * w["s"]

    value, (gw, gv) = lf.value_and_grad(loss_of, argnums=(0, 1))(w, v)
    ref, ref_value = torch.func.grad_and_value(loss_of, argnums=(0, 1))(w, v)
    torch.testing.assert_close(value, ref_value, rtol=0, atol=0)
    _assert_same((gw, gv), ref)
    # nothing to differentiate: torch.func's answer, an empty tree of gradients
    value, grads = lf.value_and_grad(lambda p: torch.ones(()))({})
    assert grads == {} and torch.equal(value, torch.ones(()))


# -- apply_updates: one foreach_add, the same sums --------------------------------------------


def _tree_add(params: Any, updates: Any) -> Any:
    return tree_map(lambda p, u: p + u.to(p.dtype), params, updates)


def test_apply_updates_equals_the_per_leaf_sum_bit_for_bit():
    g = torch.Generator().manual_seed(0)
    params = {
        "w": torch.randn(5, 4, generator=g),
        "nested": {
            "bf16": torch.randn(7, generator=g).bfloat16(),
            "f64": torch.randn(3, generator=g).double(),
        },
        "t": (torch.randn(2, 2, generator=g),),
    }
    updates = tree_map(
        lambda p: torch.randn(p.shape, generator=g) * 1e-3, params
    )  # float32 updates
    out = lo.apply_updates(params, updates)
    _assert_same(out, _tree_add(params, updates))
    assert out["nested"]["bf16"].dtype == torch.bfloat16
    for p, o in zip(tree_leaves(params), tree_leaves(out), strict=True):
        assert o is not p and o.data_ptr() != p.data_ptr()


@pytest.mark.parametrize(
    "make",
    [
        lambda: ({"w": torch.ones(3, 4)}, {"w": torch.full((4,), 0.5)}),  # a broadcast update
        lambda: ({"n": torch.arange(3)}, {"n": torch.ones(3, dtype=torch.int64)}),  # integers
        lambda: ({"w": torch.ones(3, requires_grad=True)}, {"w": torch.ones(3)}),  # autograd
        lambda: ({"w": torch.nn.Parameter(torch.ones(3))}, {"w": torch.ones(3)}),  # a Parameter
    ],
)
def test_apply_updates_keeps_the_tree_map_where_foreach_does_not_apply(make):
    params, updates = make()
    out = lo.apply_updates(params, updates)
    want = _tree_add(params, updates)
    _assert_same(out, want)
    assert (
        out["w" if "w" in out else "n"].requires_grad
        == want["w" if "w" in want else "n"].requires_grad
    )


def test_apply_updates_of_mismatched_trees_raises_as_before():
    with pytest.raises(ValueError, match="dictionary key mismatch"):
        lo.apply_updates({"a": torch.ones(2)}, {"b": torch.ones(2)})


# -- bench/eager_parts.py, the per-part timing these paths were measured with ------------------


def test_eager_parts_times_every_part_against_raw_pytorch(capsys):
    from bench.eager_parts import main

    main(["--workloads", "mlp", "--rounds", "1", "--calls", "2"])
    rows = [line.split(" | ") for line in capsys.readouterr().out.splitlines()[2:]]
    parts = {(r[1], r[2]) for r in rows}
    assert ("forward", "lf.apply") in parts and ("whole step", "lightfunc eager step") in parts
    for r in rows:  # the first variant of each part is the reference: ratio 1.00 exactly
        if r[2] in (
            "model(x)",
            "zero_grad + backward",
            "AdamW.step",
            "p + u tree map",
            "raw eager step",
        ):
            assert r[4].startswith("1.00 (1.00-1.00)")
