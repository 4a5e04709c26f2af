"""lightfunc.optim: parity with torch.optim, composition, purity, compilation and errors."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch.optim import lr_scheduler

import lightfunc as lf
import lightfunc.optim as lo
from lightfunc._tree import tree_leaves, tree_map

Params = dict[str, torch.Tensor]
STEPS = 100
TOL = 1e-6


def make_params() -> Params:
    """A small model's parameters: a 0-d scale, biases, weight matrices (Linear-init sizes)."""
    g = torch.Generator().manual_seed(0)
    return {
        "temperature": torch.tensor(0.7),
        "embed": torch.randn(11, 4, generator=g) * 0.3,
        "fc.weight": (torch.rand(6, 4, generator=g) - 0.5),
        "fc.bias": (torch.rand(6, generator=g) - 0.5) * 0.5,
        "out.weight": (torch.rand(3, 6, generator=g) - 0.5) * 0.8,
        "out.bias": torch.zeros(3),
    }


def make_grads(params: Params, n: int = STEPS, seed: int = 1) -> list[Params]:
    """`n` deterministic pseudo-random gradients, of varying scale, for `params`."""
    g = torch.Generator().manual_seed(seed)
    return [
        {k: torch.randn(v.shape, generator=g) * (0.05 + 0.1 * (i % 4)) for k, v in params.items()}
        for i in range(n)
    ]


def run_torch(
    make_opt: Callable[[Any], torch.optim.Optimizer],
    params: Params,
    grads: list[Params],
    make_scheduler: Callable[[torch.optim.Optimizer], Any] | None = None,
    groups: Callable[[dict[str, torch.Tensor]], Any] | None = None,
) -> Params:
    """Feed `grads` to a torch.optim optimizer over copies of `params`; return the final params."""
    ps = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    opt = make_opt(groups(ps) if groups else list(ps.values()))
    scheduler = make_scheduler(opt) if make_scheduler else None
    for grad in grads:
        for k, p in ps.items():
            p.grad = grad[k].clone()
        opt.step()
        if scheduler is not None:
            scheduler.step()
    return {k: v.detach() for k, v in ps.items()}


def run_lightfunc(tx: lo.GradientTransformation, params: Params, grads: list[Params]) -> Params:
    state = tx.init(params)
    for grad in grads:
        updates, state = tx.update(grad, state, params)
        params = lo.apply_updates(params, updates)
    return params


def max_abs_diff(a: Params, b: Params) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def decay_groups(ps: dict[str, torch.Tensor]) -> list[dict[str, Any]]:
    """torch param groups: no weight decay on biases (the lightfunc side uses a mask)."""
    return [
        {"params": [p for k, p in ps.items() if not k.endswith("bias")]},
        {"params": [p for k, p in ps.items() if k.endswith("bias")], "weight_decay": 0.0},
    ]


def no_bias_mask(params: Params) -> dict[str, bool]:
    return {k: not k.endswith("bias") for k in params}


PARITY_CASES = {
    "sgd": (lambda ps: torch.optim.SGD(ps, lr=0.1), lo.sgd(0.1)),
    "sgd_momentum": (
        lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9),
        lo.sgd(0.05, 0.9),
    ),
    "sgd_nesterov_weight_decay": (
        lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.8, nesterov=True, weight_decay=1e-2),
        lo.sgd(0.05, 0.8, nesterov=True, weight_decay=1e-2),
    ),
    "sgd_dampening": (
        lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, dampening=0.3),
        lo.sgd(0.05, 0.9, dampening=0.3),
    ),
    "sgd_weight_decay": (
        lambda ps: torch.optim.SGD(ps, lr=0.1, weight_decay=0.05),
        lo.sgd(0.1, weight_decay=0.05),
    ),
    "adam": (lambda ps: torch.optim.Adam(ps, lr=1e-2), lo.adam(1e-2)),
    "adam_weight_decay": (
        lambda ps: torch.optim.Adam(ps, lr=3e-3, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.1),
        lo.adam(3e-3, 0.8, 0.99, 1e-6, weight_decay=0.1),
    ),
    "adamw": (
        lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1),
        lo.adamw(1e-2, weight_decay=0.1),
    ),
    "adamw_defaults": (lambda ps: torch.optim.AdamW(ps, lr=1e-3), lo.adamw(1e-3)),
}


@pytest.mark.parametrize("name", sorted(PARITY_CASES))
def test_optimizer_matches_torch_optim_over_100_steps(name):
    make_opt, tx = PARITY_CASES[name]
    params, grads = make_params(), make_grads(make_params())
    theirs = run_torch(make_opt, params, grads)
    ours = run_lightfunc(tx, params, grads)
    assert max_abs_diff(ours, theirs) <= TOL
    assert max_abs_diff(theirs, params) > 1e-2  # the parameters did move


def test_adam_is_bit_identical_to_torch_adam():
    params, grads = make_params(), make_grads(make_params())
    theirs = run_torch(lambda ps: torch.optim.Adam(ps, lr=1e-2, weight_decay=0.01), params, grads)
    ours = run_lightfunc(lo.adam(1e-2, weight_decay=0.01), params, grads)
    assert max_abs_diff(ours, theirs) == 0.0


@pytest.mark.parametrize("masked", [False, True])
def test_adamw_is_bit_identical_to_torch_adamw(masked):
    params, grads = make_params(), make_grads(make_params())
    theirs = run_torch(
        lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1),
        params,
        grads,
        groups=decay_groups if masked else None,
    )
    tx = lo.adamw(1e-2, weight_decay=0.1, mask=no_bias_mask if masked else None)
    assert max_abs_diff(run_lightfunc(tx, params, grads), theirs) == 0.0


IN_PLACE_CASES = {
    "adamw_masked": (
        lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1),
        decay_groups,
        lambda: lo.adamw(1e-2, weight_decay=0.1, mask=no_bias_mask),
    ),
    "adam_l2": (
        lambda ps: torch.optim.Adam(ps, lr=1e-2, weight_decay=0.01),
        None,
        lambda: lo.adam(1e-2, weight_decay=0.01),
    ),
    "clipped_adamw_schedule": (
        None,  # against the pure update (clipping differs from torch's clip_grad_norm_ order)
        None,
        lambda: lo.chain(
            lo.clip_by_global_norm(0.5), lo.adamw(lo.cosine_decay_schedule(1e-2, STEPS))
        ),
    ),
    "sgd": (lambda ps: torch.optim.SGD(ps, lr=0.1), None, lambda: lo.sgd(0.1)),
    "sgd_momentum_dampening": (
        lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, dampening=0.3),
        None,
        lambda: lo.sgd(0.05, 0.9, dampening=0.3),
    ),
    "sgd_nesterov_weight_decay": (
        lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.8, nesterov=True, weight_decay=1e-2),
        None,
        lambda: lo.sgd(0.05, 0.8, nesterov=True, weight_decay=1e-2),
    ),
    "sgd_momentum_schedule": (
        None,  # against the pure update: `p + (-lr * step)`, one rounding per step from torch's
        None,
        lambda: lo.sgd(lo.cosine_decay_schedule(0.05, STEPS), 0.9),
    ),
}


@pytest.mark.parametrize("in_place", [True, False])
@pytest.mark.parametrize("slice_elements", [1 << 20, 1])  # one slice; one tensor per slice
@pytest.mark.parametrize("name", sorted(IN_PLACE_CASES))
def test_direct_update_is_torch_optims_arithmetic_in_place_or_into_new_tensors(
    monkeypatch, name, slice_elements, in_place
):
    import lightfunc.optim._fused as fused
    from lightfunc.optim._base import update_params

    monkeypatch.setattr(fused, "_SLICE_ELEMENTS", slice_elements)
    make_opt, groups, make_tx = IN_PLACE_CASES[name]
    params, grads = make_params(), make_grads(make_params())
    tx = make_tx()
    ours = {k: v.clone() for k, v in params.items()}
    state = tx.init(ours)
    moments = [id(x) for x in tree_leaves(state) if x.ndim]
    for grad in grads:
        given, given_state = ours, state
        copies = [x.clone() for x in tree_leaves((given, given_state))]
        ours, state, wrote = update_params(tx, grad, state, ours, in_place=in_place)
        assert wrote is in_place and ours is not given
        if in_place:  # written into the given parameters
            assert all(ours[k] is given[k] for k in ours)
        else:  # new tensors; what was given is untouched
            assert not any(ours[k] is given[k] for k in ours)
            for a, b in zip(tree_leaves((given, given_state)), copies, strict=True):
                assert torch.equal(a, b)
    same_moments = [id(x) for x in tree_leaves(state) if x.ndim] == moments
    assert same_moments is (in_place or not moments)
    if make_opt is not None:  # torch.optim's parameters, bit for bit
        assert max_abs_diff(ours, run_torch(make_opt, params, grads, groups=groups)) == 0.0
    else:
        pure = run_lightfunc(make_tx(), params, grads)
        # The additive forms round once more: AdamW's move `new - p`, SGD's `p + (-lr * step)`.
        assert max_abs_diff(ours, pure) <= (1e-7 if "adamw" in name else TOL)
        assert max_abs_diff(ours, params) > 1e-2


def test_apply_gradients_gives_torch_optims_parameters_bit_for_bit_where_adding_the_update_does_not():
    # Parameters far smaller than their steps: `p + (new - p)` is not `new` there.
    g = torch.Generator().manual_seed(0)
    params = {"small": torch.randn(500, generator=g) * 1e-3, "large": torch.randn(500, generator=g)}
    grads = make_grads(params, n=20)
    cases: list[tuple[Callable[[Any], torch.optim.Optimizer], Callable[[], Any]]] = [
        (
            lambda ps: torch.optim.AdamW(ps, lr=0.1, weight_decay=0.1),
            lambda: lo.adamw(0.1, weight_decay=0.1),
        ),
        (lambda ps: torch.optim.SGD(ps, lr=0.5, momentum=0.9), lambda: lo.sgd(0.5, 0.9)),
    ]
    for make_opt, make_tx in cases:
        theirs = run_torch(make_opt, params, grads)
        additive = run_lightfunc(make_tx(), params, grads)
        if make_tx is cases[0][1]:  # AdamW: the case this test is about
            assert max_abs_diff(additive, theirs) > 0.0
        state = lf.TrainState.create(params, make_tx())
        for grad in grads:
            state = state.apply_gradients(grad)
        assert max_abs_diff(state.params, theirs) == 0.0


def with_float64_leaf(params: Params) -> Params:
    """`params` plus a float64 leaf: mixed dtypes send the eager update leaf by leaf."""
    return {**params, "extra": torch.linspace(-1.0, 1.0, 5, dtype=torch.float64)}


@pytest.mark.parametrize(
    "make_tx",
    [
        lambda: lo.adamw(1e-2, weight_decay=0.1, mask=no_bias_mask),
        lambda: lo.adam(lo.warmup_cosine_decay_schedule(0.0, 1e-2, 3, 20), weight_decay=0.1),
        lambda: lo.chain(
            lo.scale_by_adam(), lo.scale_by_learning_rate(lo.cosine_decay_schedule(1e-2, 20))
        ),
    ],
)
def test_multi_tensor_and_leaf_by_leaf_updates_agree_bit_for_bit(make_tx):
    # One dtype: the eager `torch._foreach_*` path. A float64 leaf more: every
    # leaf goes through the per-leaf code (the one torch.compile traces).
    params = make_params()
    mixed = with_float64_leaf(params)
    grads = [{k: g.to(mixed[k].dtype) for k, g in grad.items()} for grad in make_grads(mixed, n=10)]
    fast = run_lightfunc(make_tx(), params, [{k: g[k] for k in params} for g in grads])
    slow = run_lightfunc(make_tx(), mixed, grads)
    for k in params:
        assert torch.equal(fast[k], slow[k]), k


def test_adamw_with_cosine_schedule_matches_cosine_annealing_lr():
    params, grads = make_params(), make_grads(make_params())
    theirs = run_torch(
        lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1),
        params,
        grads,
        make_scheduler=lambda opt: lr_scheduler.CosineAnnealingLR(opt, STEPS, eta_min=1e-4),
    )
    tx = lo.adamw(lo.cosine_decay_schedule(1e-2, STEPS, alpha=1e-2), weight_decay=0.1)
    assert max_abs_diff(run_lightfunc(tx, params, grads), theirs) <= TOL


def test_sgd_with_step_decay_matches_step_lr():
    params, grads = make_params(), make_grads(make_params())
    theirs = run_torch(
        lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, weight_decay=1e-3),
        params,
        grads,
        make_scheduler=lambda opt: lr_scheduler.StepLR(opt, 30, gamma=0.3),
    )
    tx = lo.sgd(lo.step_decay_schedule(0.1, 30, 0.3), 0.9, weight_decay=1e-3)
    assert max_abs_diff(run_lightfunc(tx, params, grads), theirs) <= TOL


def test_adam_with_one_cycle_matches_one_cycle_lr():
    params, grads = make_params(), make_grads(make_params())
    theirs = run_torch(
        lambda ps: torch.optim.Adam(ps, lr=1e-2),
        params,
        grads,
        make_scheduler=lambda opt: lr_scheduler.OneCycleLR(
            opt, 1e-2, total_steps=STEPS, cycle_momentum=False
        ),
    )
    tx = lo.adam(lo.one_cycle_schedule(1e-2, STEPS))
    assert max_abs_diff(run_lightfunc(tx, params, grads), theirs) <= TOL


def test_adamw_mask_skips_biases_like_a_torch_param_group_without_decay():
    params, grads = make_params(), make_grads(make_params())
    theirs = run_torch(
        lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.5),
        params,
        grads,
        groups=decay_groups,
    )
    ours = run_lightfunc(lo.adamw(1e-2, weight_decay=0.5, mask=no_bias_mask), params, grads)
    assert max_abs_diff(ours, theirs) <= TOL
    # With decay everywhere the biases would have ended elsewhere.
    decayed = run_lightfunc(lo.adamw(1e-2, weight_decay=0.5), params, grads)
    assert float((decayed["fc.bias"] - theirs["fc.bias"]).abs().max()) > 1e-4


def lion_reference(params: Params, grads: list[Params], lr: float, b1: float, b2: float, wd: float):
    """Lion as published (Chen et al. 2023, Program 1), written as an in-place torch loop."""
    ps = {k: v.clone() for k, v in params.items()}
    exp_avg = {k: torch.zeros_like(v) for k, v in params.items()}
    for grad in grads:
        for k, p in ps.items():
            p.mul_(1 - lr * wd)
            update = (exp_avg[k] * b1 + grad[k] * (1 - b1)).sign_()
            p.add_(update, alpha=-lr)
            exp_avg[k].mul_(b2).add_(grad[k], alpha=1 - b2)
    return ps


@pytest.mark.parametrize("weight_decay", [0.0, 0.3])
def test_lion_matches_the_published_update_rule(weight_decay):
    params, grads = make_params(), make_grads(make_params())
    expected = lion_reference(params, grads, 1e-3, 0.9, 0.99, weight_decay)
    ours = run_lightfunc(lo.lion(1e-3, weight_decay=weight_decay), params, grads)
    assert max_abs_diff(ours, expected) <= TOL


@pytest.mark.parametrize("max_norm", [0.5, 1e3])
def test_clip_by_global_norm_matches_clip_grad_norm(max_norm):
    params = make_params()
    grads = make_grads(params, n=1)[0]
    tx = lo.clip_by_global_norm(max_norm)
    ours, _ = tx.update(grads, tx.init(params), params)
    # In the order of lightfunc's leaves (optree sorts dict keys): the norm sums in that order.
    ps = {k: params[k].clone().requires_grad_(True) for k in sorted(params)}
    for k, p in ps.items():
        p.grad = grads[k].clone()
    norm = torch.nn.utils.clip_grad_norm_(list(ps.values()), max_norm)
    assert float(lo.global_norm(grads)) == float(norm)
    for k, p in ps.items():
        torch.testing.assert_close(ours[k], p.grad, rtol=0, atol=0)


def test_clip_by_value_clamps_like_clip_grad_value():
    params = make_params()
    grads = make_grads(params, n=4)[3]
    tx = lo.clip_by_value(0.1)
    ours, _ = tx.update(grads, tx.init(params))
    ps = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    for k, p in ps.items():
        p.grad = grads[k].clone()
    torch.nn.utils.clip_grad_value_(list(ps.values()), 0.1)
    for k, p in ps.items():
        torch.testing.assert_close(ours[k], p.grad, rtol=0, atol=0)
        torch.testing.assert_close(ours[k], grads[k].clamp(-0.1, 0.1), rtol=0, atol=0)


def test_clip_by_global_norm_passes_an_empty_tree_through():
    tx = lo.clip_by_global_norm(1.0)
    assert tx.update({}, tx.init({}))[0] == {}
    assert float(lo.global_norm({})) == 0.0


def test_scale_and_scale_by_learning_rate_with_a_schedule():
    params = {"w": torch.ones(2)}
    tx = lo.chain(lo.scale(2.0), lo.scale_by_learning_rate(lo.linear_schedule(1.0, 0.0, 4)))
    state = tx.init(params)
    steps = []
    for _ in range(5):
        updates, state = tx.update({"w": torch.ones(2)}, state, params)
        steps.append(float(updates["w"][0]))
    assert steps == pytest.approx([-2.0, -1.5, -1.0, -0.5, 0.0])
    count = state[1].count
    assert count.dtype == torch.int64 and count.shape == () and int(count) == 5


def test_freeze_keeps_frozen_leaves_unchanged():
    params, grads = make_params(), make_grads(make_params(), n=10)
    frozen = {k: k.startswith("embed") for k in params}
    ours = run_lightfunc(lo.chain(lo.adamw(1e-2), lo.freeze(frozen)), params, grads)
    assert torch.equal(ours["embed"], params["embed"])
    assert not torch.equal(ours["fc.weight"], params["fc.weight"])


def test_masked_leaves_pass_through_and_carry_no_state():
    params = make_params()
    mask = {k: k.startswith("fc") for k in params}
    tx = lo.masked(lo.adam(1e-2), mask)
    state = tx.init(params)
    n_state = sum(x.numel() for x in tree_leaves(state) if x.dim() > 0)
    n_fc = sum(v.numel() for k, v in params.items() if k.startswith("fc"))
    assert n_state == 2 * n_fc  # Adam's two moments for the fc parameters only
    grads = make_grads(params, n=1)[0]
    updates, _ = tx.update(grads, state, params)
    assert updates["embed"] is grads["embed"]
    expected, _ = lo.adam(1e-2).update(grads, lo.adam(1e-2).init(params), params)
    torch.testing.assert_close(updates["fc.weight"], expected["fc.weight"], rtol=0, atol=0)


def test_mask_may_be_a_prefix_of_the_params():
    params = {"encoder": {"w": torch.ones(2), "b": torch.ones(1)}, "head": {"w": torch.ones(3)}}
    tx = lo.freeze({"encoder": True, "head": False})
    grads = tree_map(torch.ones_like, params)
    updates, _ = tx.update(grads, tx.init(params), params)
    assert torch.equal(updates["encoder"]["w"], torch.zeros(2))
    assert torch.equal(updates["head"]["w"], torch.ones(3))


def test_multi_transform_equals_running_each_group_separately():
    params, grads = make_params(), make_grads(make_params(), n=30)
    gen = ["embed", "fc.weight", "fc.bias"]
    labels = {k: "generator" if k in gen else "discriminator" for k in params}
    tx = lo.multi_transform(
        {"generator": lo.sgd(0.05, momentum=0.9), "discriminator": lo.adam(1e-2)}, labels
    )
    ours = run_lightfunc(tx, params, grads)

    def part(tree: Params, keys: list[str]) -> Params:
        return {k: tree[k] for k in keys}

    disc = [k for k in params if k not in gen]
    sep_g = run_lightfunc(
        lo.sgd(0.05, momentum=0.9), part(params, gen), [part(g, gen) for g in grads]
    )
    sep_d = run_lightfunc(lo.adam(1e-2), part(params, disc), [part(g, disc) for g in grads])
    for k in params:
        torch.testing.assert_close(ours[k], {**sep_g, **sep_d}[k], rtol=0, atol=0)


def test_multi_transform_accepts_a_label_function_and_prefix_labels():
    params = {"generator": {"w": torch.ones(2)}, "discriminator": {"w": torch.ones(2)}}
    tx = lo.multi_transform(
        {"g": lo.sgd(1.0), "d": lo.sgd(0.5)}, lambda p: {"generator": "g", "discriminator": "d"}
    )
    grads = tree_map(torch.ones_like, params)
    updates, _ = tx.update(grads, tx.init(params), params)
    assert torch.equal(updates["generator"]["w"], -torch.ones(2))
    assert torch.equal(updates["discriminator"]["w"], torch.full((2,), -0.5))


PURITY_CASES = {
    "adamw_schedule_mask": lambda: lo.adamw(
        lo.warmup_cosine_decay_schedule(0.0, 1e-2, 3, 20), weight_decay=0.1, mask=no_bias_mask
    ),
    "sgd_nesterov": lambda: lo.sgd(0.1, 0.9, nesterov=True, weight_decay=0.01),
    "lion": lambda: lo.lion(1e-3, weight_decay=0.1),
    "clip_then_adam": lambda: lo.chain(lo.clip_by_global_norm(0.1), lo.adam(1e-2)),
    "multi": lambda: lo.multi_transform(
        {"a": lo.adam(1e-2), "b": lo.sgd(0.1, 0.5)},
        lambda p: {k: "a" if k.startswith("fc") else "b" for k in p},
    ),
}


@pytest.mark.parametrize("name", sorted(PURITY_CASES))
def test_update_mutates_nothing_and_old_states_stay_valid(name):
    tx = PURITY_CASES[name]()
    params, grads = make_params(), make_grads(make_params(), n=3)
    _, state = tx.update(grads[0], tx.init(params), params)  # one step in: non-zero state
    inputs = (grads[1], state, params)
    snapshot = tree_map(torch.clone, inputs)
    versions = [x._version for x in tree_leaves(inputs)]
    updates_a, _ = tx.update(*inputs)
    updates_b, _ = tx.update(*inputs)  # the same inputs give the same step again
    assert [x._version for x in tree_leaves(inputs)] == versions
    for old, now in zip(tree_leaves(snapshot), tree_leaves(inputs), strict=True):
        assert torch.equal(old, now)
    for a, b in zip(tree_leaves(updates_a), tree_leaves(updates_b), strict=True):
        assert torch.equal(a, b)


@pytest.mark.compiled
def test_compiled_adamw_update_matches_eager_and_compiles_once():
    from torch._dynamo.utils import counters

    tx = lo.adamw(
        lo.warmup_cosine_decay_schedule(1e-4, 1e-2, 5, 20), weight_decay=0.1, mask=no_bias_mask
    )

    def step(params: Params, grads: Params, state: Any) -> tuple[Params, Any]:
        updates, state = tx.update(grads, state, params)
        return lo.apply_updates(params, updates), state

    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(step, fullgraph=True, dynamic=False)
    params = make_params()
    eager_p, eager_s = params, tx.init(params)
    comp_p, comp_s = params, tx.init(params)
    for grad in make_grads(params, n=20):
        eager_p, eager_s = step(eager_p, grad, eager_s)
        comp_p, comp_s = compiled(comp_p, grad, comp_s)
    assert counters["stats"]["unique_graphs"] == 1
    assert max_abs_diff(comp_p, eager_p) <= TOL
    for a, b in zip(tree_leaves(comp_s), tree_leaves(eager_s), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=TOL)
    torch._dynamo.reset()


@pytest.mark.compiled
def test_compiled_adam_computes_its_bias_corrections_once_per_step():
    # Without `once_per_step` inductor inlines the float64 `b ** t` into every
    # parameter's update loop (one `pow` pair per loop); with it, one pair in all.
    from torch._inductor.utils import run_and_get_code

    tx = lo.adamw(1e-2, weight_decay=0.1)
    params = make_params()
    grads = make_grads(params, n=1)[0]

    def step(params: Params, grads: Params, state: Any) -> tuple[Params, Any]:
        updates, state = tx.update(grads, state, params)
        return lo.apply_updates(params, updates), state

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, dynamic=False)
    (new_params, _), codes = run_and_get_code(compiled, params, grads, tx.init(params))
    eager_params, _ = step(params, grads, tx.init(params))
    code = "\n".join(codes)
    assert code.count("std::pow(") == 2  # b1 ** t and b2 ** t, once
    assert max_abs_diff(new_params, eager_params) <= TOL
    torch._dynamo.reset()


def _init_with(tx: lo.GradientTransformation, params: Any = None) -> Any:
    return tx.init(make_params() if params is None else params)


@pytest.mark.parametrize(
    "build, error, match",
    [
        (lambda: lo.sgd(-0.1), ValueError, r"`lr` must be a finite number in \[0, inf\), got -0.1"),
        (lambda: lo.adam(torch.tensor(1e-3)), TypeError, r"`lr` must be a float or a schedule.*got Tensor"),
        (lambda: lo.adam(1e-3, b1=1.0), ValueError, r"`b1` must be a finite number in \[0, 1\), got 1.0"),
        (lambda: lo.adamw(1e-3, b2=-0.5), ValueError, r"`b2` must be a finite number in \[0, 1\)"),
        (lambda: lo.adamw(1e-3, eps=math.inf), ValueError, r"`eps` must be a finite number"),
        (lambda: lo.adam(1e-3, weight_decay=-1.0), ValueError, r"`weight_decay` must be a finite number in \[0, inf\)"),
        (lambda: lo.adamw(1e-3, b1="0.9"), TypeError, r"`b1` must be a Python float, got str"),
        (lambda: lo.sgd(0.1, momentum=-0.9), ValueError, r"`momentum` must be a finite number in \[0, inf\)"),
        (lambda: lo.sgd(0.1, nesterov=True), ValueError, r"`nesterov=True` needs `momentum` > 0"),
        (lambda: lo.sgd(0.1, 0.9, nesterov=True, dampening=0.1), ValueError, r"`nesterov=True` needs .*`dampening` == 0"),
        (lambda: lo.sgd(0.1, 0.9, dampening=2.0), ValueError, r"`dampening` must be a finite number in \[0, 1\]"),
        (lambda: lo.lion(1e-4, b1=1.5), ValueError, r"`b1` must be a finite number in \[0, 1\]"),
        (lambda: lo.scale_by_learning_rate("fast"), TypeError, r"`learning_rate` must be a float or a schedule"),
        (lambda: lo.clip_by_global_norm(0.0), ValueError, r"`max_norm` must be a finite number in \(0, inf\)"),
        (lambda: lo.clip_by_value(-1.0), ValueError, r"`clip_value` must be a finite number in \(0, inf\)"),
        (lambda: lo.scale(math.nan), ValueError, r"`factor` must be a finite number"),
        (lambda: lo.chain(lo.sgd(0.1), lo.scale_by_adam), TypeError, r"`chain` argument 1 must be a GradientTransformation.*forget to call it"),
        (lambda: lo.chain(torch.optim.SGD), TypeError, r"`chain` argument 0 must be a GradientTransformation"),
        (lambda: lo.multi_transform([lo.sgd(0.1)], {}), TypeError, r"`transforms` must be a dict label \(str\) -> GradientTransformation, got a list"),
        (lambda: _init_with(lo.masked(lo.sgd(0.1), {"fc.weight": True})), ValueError, r"(?s)`mask` must have the structure of the params.*params with no entry in `mask`: \['embed'"),
        (lambda: _init_with(lo.adamw(1e-3, mask={"typo": True})), ValueError, r"(?s)`mask` must have the structure.*entries of `mask` matching no params: \['typo'\]"),
        (lambda: _init_with(lo.freeze(lambda p: {k: 1 for k in p})), TypeError, r"`mask` leaves must be Python bools, got int \(1\) at `embed`"),
        (lambda: _init_with(lo.multi_transform({"a": lo.sgd(0.1)}, {"x": "a"})), ValueError, r"`labels` must have the structure of the params"),
        (lambda: _init_with(lo.multi_transform({"a": lo.sgd(0.1)}, lambda p: {k: 0 for k in p})), TypeError, r"`labels` leaves must be Python strings, got int"),
        (lambda: _init_with(lo.multi_transform({"g": lo.sgd(0.1)}, lambda p: {k: "d" if k == "out.bias" else "g" for k in p})), ValueError, r"`labels` has label 'd' at `out.bias`, but `transforms` has no entry for it \(known labels: \['g'\]\)"),
        (lambda: lo.add_decayed_weights(0.1).update({}, lo.EmptyState()), ValueError, r"`add_decayed_weights` needs the parameters"),
        (lambda: lo.adamw(1e-3).update({}, _init_with(lo.adamw(1e-3), {})), ValueError, r"`add_decoupled_weight_decay` needs the parameters"),
    ],
)  # fmt: skip
def test_bad_arguments_raise_clear_errors(build, error, match):
    with pytest.raises(error, match=match):
        build()
