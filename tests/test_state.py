import dataclasses

import pytest
import torch
from helpers import clone_tree, make_model

import lightfunc as lf
from lightfunc._tree import tree_structure
from lightfunc.testing import assert_trees_close


def test_create_copies_the_module_and_starts_at_step_zero():
    model = make_model()
    state = lf.TrainState.create(model, lf.optim.sgd(0.1), seed=3)
    assert state.step.dtype == torch.int64 and state.step.shape == ()
    assert int(state.step) == 0
    assert state.rng == lf.RngKey(3, 0)
    assert set(state.params) == {n for n, _ in model.named_parameters()}
    assert set(state.buffers) == {n for n, _ in model.named_buffers()}


def test_state_is_frozen():
    state = lf.TrainState.create(make_model(), lf.optim.sgd(0.1))
    with pytest.raises(dataclasses.FrozenInstanceError):
        state.step = torch.tensor(1)  # type: ignore[misc]


def test_state_is_a_pytree_whose_leaves_are_its_tensors():
    state = lf.TrainState.create(make_model(), lf.optim.adamw(1e-3))
    leaves = lf.tree_leaves(state)
    assert all(isinstance(x, torch.Tensor) for x in leaves)
    assert any(x is state.step for x in leaves)
    doubled = lf.tree_map(lambda x: x * 2, state)
    assert (
        isinstance(doubled, lf.TrainState) and doubled.tx is state.tx and doubled.rng == state.rng
    )


def test_apply_gradients_returns_a_new_state_and_leaves_the_old_one_alone():
    state = lf.TrainState.create(make_model(), lf.optim.sgd(0.5))
    before = clone_tree(state)
    grads = lf.tree_map(torch.ones_like, state.params)
    new = state.apply_gradients(grads)
    assert_trees_close(state, before)
    assert int(new.step) == 1
    for name in state.params:
        torch.testing.assert_close(new.params[name], state.params[name] - 0.5)


def test_apply_gradients_replaces_other_fields_at_the_same_time():
    state = lf.TrainState.create(make_model(), lf.optim.sgd(0.5))
    buffers = {k: v + 1 for k, v in state.buffers.items()}
    new = state.apply_gradients(lf.tree_map(torch.zeros_like, state.params), buffers=buffers)
    assert new.buffers is buffers


def test_create_from_a_dict_of_tensors():
    state = lf.TrainState.create({"w": torch.zeros(2)}, lf.optim.sgd(0.1), seed=None)
    assert state.rng is None and state.buffers == {}


def test_create_rejects_a_torch_optimizer():
    model = make_model()
    with pytest.raises(
        TypeError, match=r"`tx` must be a lightfunc.optim GradientTransformation.*got SGD"
    ):
        lf.TrainState.create(model, torch.optim.SGD(model.parameters(), lr=0.1))  # type: ignore[arg-type]


def test_create_rejects_an_unknown_model_type():
    with pytest.raises(
        TypeError, match=r"`model` must be an nn.Module or a dict of tensors, got list"
    ):
        lf.TrainState.create([torch.zeros(2)], lf.optim.sgd(0.1))  # type: ignore[arg-type]


def test_create_wraps_the_optimizer_so_states_created_alike_have_equal_structures():
    model = make_model()
    model[0].requires_grad_(False)
    tx = lf.optim.adam(1e-3)
    a, b = lf.TrainState.create(model, tx), lf.TrainState.create(model, tx)
    assert tree_structure(a) == tree_structure(b)
    assert a.tx == b.tx and a.tx != tx


def test_trainable_only_rejects_a_torch_optimizer():
    with pytest.raises(
        TypeError, match=r"`inner` must be a lightfunc.optim GradientTransformation, got SGD"
    ):
        lf.optim.trainable_only(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1))
