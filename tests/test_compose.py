"""Ensembles (stacked states, vmapped steps) and per-example gradients, against their references."""

from __future__ import annotations

import doctest

import pytest
import torch
import torch.nn.functional as F
from helpers import make_data, make_model, make_steps

import lightfunc as lf
from lightfunc import _compose
from lightfunc._rng import RngKey, seeded
from lightfunc.testing import assert_trees_close

K = 3


def member_states(tx, *, dropout: float = 0.0, batchnorm: bool = True) -> list[lf.TrainState]:
    """K states of differently initialised models (seeds 0..K-1) sharing `tx`."""
    return [
        lf.TrainState.create(make_model(k, dropout=dropout, batchnorm=batchnorm), tx, seed=k)
        for k in range(K)
    ]


def contents(state: lf.TrainState):
    """Everything a member's training changes (its `rng` key aside)."""
    return state.params, state.buffers, state.opt_state, state.step


def run(step, state, batches):
    for batch in batches:
        state, metrics = step(state, batch)
    return state, metrics


# stack_states / unstack_states ------------------------------------------------------


def test_stack_then_unstack_gives_back_the_members():
    states = member_states(lf.optim.adamw(1e-3))
    stacked = lf.stack_states(states)
    assert stacked.params["0.weight"].shape == (K, 16, 8)
    assert stacked.step.shape == (K,)
    assert stacked.rng == states[0].rng  # the first member's key seeds the ensemble
    assert lf.member_count(stacked) == K
    for member, state in zip(lf.unstack_states(stacked), states, strict=True):
        assert_trees_close(contents(member), contents(state))  # torch.equal on every leaf


def test_a_stacked_state_checkpoints_like_any_state(tmp_path):
    stacked = lf.stack_states(member_states(lf.optim.adam(1e-3)))
    lf.save(stacked, tmp_path / "ensemble.safetensors")
    loaded = lf.load(tmp_path / "ensemble.safetensors", like=stacked)
    assert_trees_close(contents(loaded), contents(stacked))


def test_stack_states_rejects_no_states():
    with pytest.raises(ValueError, match="`states` is empty"):
        lf.stack_states([])


def test_stack_states_rejects_members_with_different_optimizers():
    a = lf.TrainState.create(make_model(0), lf.optim.sgd(0.1))
    b = lf.TrainState.create(make_model(1), lf.optim.sgd(0.1))  # another tx object
    with pytest.raises(
        ValueError,
        match=r"`states\[1\]` has a different structure .*: its optimizer \(`tx`\) is another object",
    ):
        lf.stack_states([a, b])


def test_stack_states_names_the_entries_one_member_lacks():
    tx = lf.optim.sgd(0.1)
    a = lf.TrainState.create(torch.nn.Linear(8, 3), tx)
    b = lf.TrainState.create(torch.nn.Sequential(torch.nn.Linear(8, 3)), tx)
    with pytest.raises(
        ValueError,
        match=r"it lacks \['params\.bias', 'params\.weight'\] and has \['params\.0\.bias'",
    ):
        lf.stack_states([a, b])


def test_stack_states_names_the_leaf_whose_shape_differs():
    tx = lf.optim.sgd(0.1)
    a = lf.TrainState.create(torch.nn.Linear(8, 3), tx)
    b = lf.TrainState.create(torch.nn.Linear(8, 4), tx)
    with pytest.raises(ValueError, match=r"`states\[1\]` differs .* at `params\.weight`.*\(4, 8\)"):
        lf.stack_states([a, b])


def test_member_count_rejects_states_that_are_not_stacked():
    state = lf.TrainState.create(torch.nn.Linear(8, 3), lf.optim.sgd(0.1))
    with pytest.raises(
        ValueError,
        match=r"has a 0-d tensor at `opt_state\[0\]\.count`, so it is not a stacked state",
    ):
        lf.unstack_states(state)
    stacked = lf.stack_states([state, state])
    lopsided = stacked.replace(params={**stacked.params, "bias": torch.zeros(5, 3)})
    with pytest.raises(
        ValueError, match=r"disagree on the member dimension: 2 at .* 5 at `params\.bias`"
    ):
        lf.member_count(lopsided)
    with pytest.raises(ValueError, match="holds no tensors"):
        lf.member_count({})


# ensemble: each member trains as it would alone -------------------------------------


def test_ensemble_member_matches_a_model_trained_alone():
    # BatchNorm (buffers), AdamW with a schedule (a per-member step count), a smaller last batch.
    tx = lf.optim.adamw(lf.optim.warmup_cosine_decay_schedule(0.0, 1e-2, 3, 20), weight_decay=0.1)
    train_step, _ = make_steps(make_model(0))
    batches = make_data(100, 32) * 3
    stacked, _ = run(
        lf.build(lf.ensemble(train_step), compile=False),
        lf.stack_states(member_states(tx)),
        batches,
    )

    single = lf.build(train_step, compile=False)
    for k, member in enumerate(lf.unstack_states(stacked)):
        alone, _ = run(single, member_states(tx)[k], batches)
        assert_trees_close(contents(member), contents(alone), atol=1e-6)
    assert stacked.step.tolist() == [len(batches)] * K


def test_ensemble_members_can_train_on_their_own_batches():
    tx = lf.optim.adam(1e-2)
    train_step, _ = make_steps(make_model(0))
    data = [make_data(96, 32, seed=10 + k) for k in range(K)]  # member k's own data
    stacked_batches = [
        tuple(torch.stack(parts) for parts in zip(*member_batches, strict=True))
        for member_batches in zip(*data, strict=True)
    ]  # each (K, 32, ...)
    ensemble_step = lf.build(lf.ensemble(train_step, member_axis=0), compile=False)
    stacked, _ = run(ensemble_step, lf.stack_states(member_states(tx)), stacked_batches)

    single = lf.build(train_step, compile=False)
    for k, member in enumerate(lf.unstack_states(stacked)):
        alone, _ = run(single, member_states(tx)[k], data[k])
        assert_trees_close(contents(member), contents(alone), atol=1e-6)


def test_ensemble_metrics_are_member_means_and_optionally_per_member():
    train_step, _ = make_steps(make_model(0))
    states = member_states(lf.optim.sgd(0.1))
    batch = make_data(32, 32)[0]
    step = lf.build(lf.ensemble(train_step, member_metrics=True), compile=False)
    _, metrics = step(lf.stack_states(states), batch)
    single = lf.build(train_step, compile=False)
    losses = [single(state, batch)[1]["loss"] for state in states]
    assert sorted(metrics) == ["loss", "loss/0", "loss/1", "loss/2"]
    for k in range(K):
        torch.testing.assert_close(metrics[f"loss/{k}"], losses[k], rtol=0, atol=1e-6)
    torch.testing.assert_close(metrics["loss"], torch.stack(losses).mean(), rtol=0, atol=1e-6)


# ensemble: randomness --------------------------------------------------------------


def _dropout_step(state, batch):
    """Writes a fresh dropout mask (of ones) into the state: what the step drew."""
    return state.replace(params={"mask": F.dropout(torch.ones(5, 7), 0.5, training=True)}), {}


def test_member_k_draws_slice_k_of_one_batched_draw_from_the_ensemble_key():
    state = lf.TrainState.create({"mask": torch.zeros(5, 7)}, lf.optim.sgd(0.1), seed=3)
    stacked, _ = lf.build(lf.ensemble(_dropout_step), compile=False)(
        lf.stack_states([state] * 4), None
    )
    with seeded(RngKey(3)):
        expected = F.dropout(torch.ones(4, 5, 7), 0.5, training=True)
    assert torch.equal(stacked.params["mask"], expected)
    masks = stacked.params["mask"]
    assert all(not torch.equal(masks[0], masks[k]) for k in (1, 2, 3))  # distinct per member
    assert stacked.rng == RngKey(3, 1)  # one key for the ensemble, advanced once

    same, _ = lf.build(lf.ensemble(_dropout_step, randomness="same"), compile=False)(
        lf.stack_states([state] * 4), None
    )
    assert all(torch.equal(same.params["mask"][0], same.params["mask"][k]) for k in (1, 2, 3))

    with pytest.raises(RuntimeError, match="randomness"):
        lf.build(lf.ensemble(_dropout_step, randomness="error"), compile=False)(
            lf.stack_states([state] * 4), None
        )


def test_ensemble_with_dropout_is_reproducible_and_members_diverge():
    train_step, _ = make_steps(make_model(0, dropout=0.5))
    same_init = [lf.TrainState.create(make_model(0, dropout=0.5), lf.optim.sgd(0.1), seed=0)] * K
    step = lf.build(lf.ensemble(train_step), compile=False)
    first, _ = run(step, lf.stack_states(same_init), make_data(64, 32))
    second, _ = run(step, lf.stack_states(same_init), make_data(64, 32))
    assert_trees_close(contents(first), contents(second))
    weights = first.params["0.weight"]
    assert not torch.equal(weights[0], weights[1])  # same init, different masks


# ensemble: errors -------------------------------------------------------------------


@pytest.mark.parametrize(
    "make",
    [
        lambda: lf.ensemble(_dropout_step, randomness="sometimes"),
        lambda: lf.vmap_members(_dropout_step, randomness="sometimes"),
        lambda: lf.per_example_grads(lambda w: w.sum(), randomness="sometimes"),
    ],
)
def test_unknown_randomness_is_rejected(make):
    with pytest.raises(
        ValueError,
        match="`randomness` must be one of 'error', 'different', 'same', got 'sometimes'",
    ):
        make()


def test_ensemble_rejects_a_non_function():
    with pytest.raises(TypeError, match="`train_step` must be a function"):
        lf.ensemble(3)


def test_ensemble_rejects_a_step_that_changes_the_state_structure():
    train_step, _ = make_steps(make_model(0))

    def dropping_buffers(state, batch):
        new_state, metrics = train_step(state, batch)
        return new_state.replace(buffers={}), metrics

    step = lf.build(lf.ensemble(dropping_buffers), compile=False)
    with pytest.raises(ValueError, match="returned a state with 7 tensors from one with 10"):
        step(lf.stack_states(member_states(lf.optim.sgd(0.1))), make_data(32, 32)[0])


def test_ensemble_rejects_metrics_that_are_not_a_dict():
    def list_metrics(state, batch):
        return state, [state.step.float()]

    step = lf.build(lf.ensemble(list_metrics), compile=False)
    with pytest.raises(TypeError, match="metrics as a dict of 0-d tensors, got list"):
        step(lf.stack_states(member_states(lf.optim.sgd(0.1))), None)


# vmap_members -------------------------------------------------------------------------


def test_vmap_members_runs_each_member_on_shared_or_own_inputs():
    model = make_model(0)
    states = member_states(lf.optim.sgd(0.1))
    stacked = lf.stack_states(states)
    x = make_data(32, 32)[0][0]

    def predict(state, x):
        return lf.apply(model, state.params, state.buffers, x, train=False)[0]

    shared = lf.vmap_members(predict)(stacked, x)
    own = lf.vmap_members(predict, member_axis=0)(stacked, torch.stack([x, 2 * x, 3 * x]))
    for k, state in enumerate(states):
        torch.testing.assert_close(shared[k], predict(state, x), rtol=0, atol=1e-6)
        torch.testing.assert_close(own[k], predict(state, (k + 1) * x), rtol=0, atol=1e-6)


# per_example_grads ----------------------------------------------------------------------


def test_per_example_grads_match_a_loop_over_examples():
    model = make_model(0, batchnorm=False)
    x, y = make_data(16, 16)[0]

    def example_loss(params, x, y):  # one example
        logits, _ = lf.apply(model, params, {}, x[None], train=False)
        return F.cross_entropy(logits, y[None]), logits[0]

    (losses, logits), grads = lf.per_example_grads(example_loss, has_aux=True)(
        lf.params_of(model), x, y
    )
    assert losses.shape == (16,) and logits.shape == (16, 3)
    for i in range(16):  # the reference: plain autograd on the module, one example at a time
        model.zero_grad()
        loss = F.cross_entropy(model(x[i : i + 1]), y[i : i + 1])
        loss.backward()
        torch.testing.assert_close(losses[i], loss.detach(), rtol=0, atol=1e-6)
        for name, p in model.named_parameters():
            torch.testing.assert_close(grads[name][i], p.grad, rtol=0, atol=1e-6)


def test_per_example_grads_differentiates_several_shared_arguments():
    w, b = torch.tensor([1.0, -2.0]), torch.tensor(0.5)
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])

    def loss_fn(w, b, x, *, scale):
        return scale * (x @ w + b) ** 2

    values, (grad_w, grad_b) = lf.per_example_grads(loss_fn, argnums=(0, 1))(w, b, x, scale=2.0)
    residual = x @ w + b  # d/dw 2 r^2 = 4 r x, d/db = 4 r
    torch.testing.assert_close(values, 2 * residual**2)
    torch.testing.assert_close(grad_w, 4 * residual[:, None] * x)
    torch.testing.assert_close(grad_b, 4 * residual)


def test_per_example_grads_rejects_a_loss_that_is_not_a_scalar():
    fn = lf.per_example_grads(lambda w, x: w * x)
    with pytest.raises(ValueError, match=r"must be a 0-d tensor, got shape \(2,\)"):
        fn(torch.ones(2), torch.ones(4, 2))


def test_per_example_grads_with_has_aux_needs_a_pair():
    fn = lf.per_example_grads(lambda w, x: (w * x).sum(), has_aux=True)
    with pytest.raises(
        TypeError, match=r"has_aux=True\)` expects `loss_fn` to return \(loss, aux\)"
    ):
        fn(torch.ones(2), torch.ones(4, 2))


# compiled -----------------------------------------------------------------------------


@pytest.mark.compiled
def test_compiled_ensemble_matches_eager_and_compiles_once(fresh_dynamo):
    tx = lf.optim.sgd(0.1, momentum=0.9)
    train_step, _ = make_steps(make_model(0))
    batches = make_data(96, 32) * 2  # one shape
    stacked = lf.stack_states(member_states(tx))
    eager, _ = run(lf.build(lf.ensemble(train_step), compile=False), stacked, batches)
    compiled, metrics = run(lf.build(lf.ensemble(train_step)), stacked, batches)
    assert_trees_close(contents(compiled), contents(eager), atol=1e-5)
    assert lf.compile_counts()["graphs"] == 1
    assert metrics["loss"].shape == ()


def test_docstring_examples_run():
    result = doctest.testmod(_compose, extraglobs={"lf": lf})
    assert result.failed == 0 and result.attempted > 0
