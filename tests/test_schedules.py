"""Schedules vs torch.optim.lr_scheduler, their tensor-only form, and their errors."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
from torch.optim import lr_scheduler

import lightfunc.optim as lo

BASE_LR = 0.1


def torch_lrs(make_scheduler: Callable[[torch.optim.Optimizer], object], n: int) -> list[float]:
    """The learning rate torch's scheduler gives each of the first `n` optimizer steps."""
    param = torch.zeros(1, requires_grad=True)
    opt = torch.optim.SGD([param], lr=BASE_LR)
    scheduler = make_scheduler(opt)
    lrs = []
    for _ in range(n):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        scheduler.step()  # type: ignore[attr-defined]
    return lrs


def our_lrs(schedule: lo.Schedule, n: int) -> list[float]:
    return [float(schedule(torch.tensor(k))) for k in range(n)]


def assert_lrs_close(ours: list[float], theirs: list[float], rtol: float = 1e-6) -> None:
    scale = max(abs(x) for x in theirs)
    for k, (a, b) in enumerate(zip(ours, theirs, strict=True)):
        assert abs(a - b) <= rtol * abs(b) + 1e-9 * scale, f"step {k}: ours {a!r}, torch {b!r}"


def test_linear_schedule_matches_linear_lr():
    ours = our_lrs(lo.linear_schedule(BASE_LR * 0.25, BASE_LR * 0.9, 30), 60)
    theirs = torch_lrs(lambda o: lr_scheduler.LinearLR(o, 0.25, 0.9, total_iters=30), 60)
    assert_lrs_close(ours, theirs)


def test_warmup_schedule_matches_linear_lr_and_holds_the_peak():
    ours = our_lrs(lo.warmup_schedule(BASE_LR, 20, init_value=BASE_LR / 10), 50)
    theirs = torch_lrs(lambda o: lr_scheduler.LinearLR(o, 0.1, 1.0, total_iters=20), 50)
    assert_lrs_close(ours, theirs)
    assert our_lrs(lo.warmup_schedule(0.5, 0), 3) == [0.5, 0.5, 0.5]


def test_cosine_decay_schedule_matches_cosine_annealing_lr():
    ours = our_lrs(lo.cosine_decay_schedule(BASE_LR, 80, alpha=0.05), 81)
    theirs = torch_lrs(lambda o: lr_scheduler.CosineAnnealingLR(o, 80, eta_min=BASE_LR * 0.05), 81)
    assert_lrs_close(ours, theirs)


def test_cosine_decay_schedule_holds_its_final_value_past_decay_steps():
    values = our_lrs(lo.cosine_decay_schedule(1.0, 10, alpha=0.1), 30)
    assert values[10:] == pytest.approx([0.1] * 20)


def test_warmup_cosine_decay_matches_sequential_linear_then_cosine():
    ours = our_lrs(lo.warmup_cosine_decay_schedule(BASE_LR / 20, BASE_LR, 15, 100, 1e-3), 100)
    theirs = torch_lrs(
        lambda o: lr_scheduler.SequentialLR(
            o,
            [
                lr_scheduler.LinearLR(o, 1 / 20, 1.0, total_iters=15),
                lr_scheduler.CosineAnnealingLR(o, 85, eta_min=1e-3),
            ],
            milestones=[15],
        ),
        100,
    )
    assert_lrs_close(ours, theirs)


def test_step_decay_schedule_matches_step_lr():
    ours = our_lrs(lo.step_decay_schedule(BASE_LR, 7, 0.5), 50)
    theirs = torch_lrs(lambda o: lr_scheduler.StepLR(o, 7, gamma=0.5), 50)
    assert_lrs_close(ours, theirs)


def test_piecewise_constant_schedule_matches_multi_step_lr():
    ours = our_lrs(lo.piecewise_constant_schedule(BASE_LR, {30: 0.2, 10: 0.2, 31: 0.2}), 45)
    theirs = torch_lrs(lambda o: lr_scheduler.MultiStepLR(o, [10, 30, 31], gamma=0.2), 45)
    assert_lrs_close(ours, theirs)


@pytest.mark.parametrize("total_steps, pct_start", [(100, 0.3), (37, 0.25), (1000, 0.1)])
def test_one_cycle_schedule_matches_one_cycle_lr(total_steps, pct_start):
    ours = our_lrs(lo.one_cycle_schedule(0.8, total_steps, pct_start=pct_start), total_steps)
    theirs = torch_lrs(
        lambda o: lr_scheduler.OneCycleLR(
            o, 0.8, total_steps=total_steps, pct_start=pct_start, cycle_momentum=False
        ),
        total_steps,
    )
    assert_lrs_close(ours, theirs)


def test_join_schedules_matches_sequential_lr():
    schedule = lo.join_schedules(
        [
            lo.constant_schedule(BASE_LR * 0.3),
            lo.step_decay_schedule(BASE_LR, 4, 0.7),
            lo.linear_schedule(BASE_LR, BASE_LR * 0.1, 10),
        ],
        [5, 25],
    )
    theirs = torch_lrs(
        lambda o: lr_scheduler.SequentialLR(
            o,
            [
                lr_scheduler.ConstantLR(o, factor=0.3, total_iters=5),
                lr_scheduler.StepLR(o, 4, gamma=0.7),
                lr_scheduler.LinearLR(o, 1.0, 0.1, total_iters=10),
            ],
            milestones=[5, 25],
        ),
        45,
    )
    assert_lrs_close(our_lrs(schedule, 45), theirs)


ALL_SCHEDULES = {
    "constant": lo.constant_schedule(0.5),
    "linear": lo.linear_schedule(1.0, 0.0, 10),
    "warmup": lo.warmup_schedule(1.0, 10),
    "cosine": lo.cosine_decay_schedule(1.0, 10),
    "warmup_cosine": lo.warmup_cosine_decay_schedule(0.0, 1.0, 3, 10),
    "step_decay": lo.step_decay_schedule(1.0, 3, 0.5),
    "piecewise": lo.piecewise_constant_schedule(1.0, {3: 0.5, 6: 0.5}),
    "one_cycle": lo.one_cycle_schedule(1.0, 10),
    "join": lo.join_schedules([lo.constant_schedule(1.0), lo.linear_schedule(1.0, 0.0, 5)], [4]),
}


@pytest.mark.parametrize("name", sorted(ALL_SCHEDULES))
def test_schedule_returns_float32_scalar_without_data_dependent_control_flow(name):
    schedule = ALL_SCHEDULES[name]
    steps = torch.arange(25)
    one_by_one = torch.stack([schedule(s) for s in steps])
    # vmap rejects Python branching on tensor values, so this also shows the schedule
    # is pure tensor code (the property torch.compile needs to trace it once).
    batched = torch.vmap(schedule)(steps)
    assert one_by_one.dtype == torch.float32 and one_by_one.shape == (25,)
    torch.testing.assert_close(batched, one_by_one, rtol=0, atol=0)
    assert torch.isfinite(one_by_one).all()


def test_schedules_hold_their_final_value_after_the_end():
    assert float(lo.linear_schedule(1.0, 0.25, 10)(torch.tensor(1000))) == 0.25
    assert float(lo.one_cycle_schedule(1.0, 10)(torch.tensor(50))) == pytest.approx(1.0 / 25 / 1e4)
    end = lo.warmup_cosine_decay_schedule(0.0, 1.0, 3, 10, end_value=0.2)(torch.tensor(99))
    assert float(end) == pytest.approx(0.2)


@pytest.mark.parametrize(
    "build, error, match",
    [
        (lambda: lo.constant_schedule("0.1"), TypeError, r"`value` must be a Python float, got str"),
        (lambda: lo.constant_schedule(math.nan), ValueError, r"`value` must be a finite number"),
        (lambda: lo.linear_schedule(1.0, 0.0, 0), ValueError, r"`transition_steps` must be an int >= 1, got 0"),
        (lambda: lo.linear_schedule(1.0, 0.0, 1e3), TypeError, r"`transition_steps` must be an int, got float"),
        (lambda: lo.warmup_schedule(1.0, -1), ValueError, r"`warmup_steps` must be an int >= 0"),
        (lambda: lo.cosine_decay_schedule(1.0, 10, alpha=2.0), ValueError, r"`alpha` must be a finite number in \[0, 1\], got 2.0"),
        (lambda: lo.warmup_cosine_decay_schedule(0.0, 1.0, 10, 10), ValueError, r"`decay_steps` must be an int >= 11, got 10.*warm-up included"),
        (lambda: lo.step_decay_schedule(1.0, 0, 0.1), ValueError, r"`step_size` must be an int >= 1"),
        (lambda: lo.step_decay_schedule(1.0, 5, -0.1), ValueError, r"`gamma` must be a finite number in \[0, inf\)"),
        (lambda: lo.piecewise_constant_schedule(1.0, {-5: 0.1}), ValueError, r"`boundaries_and_scales` must be an int >= 0.*step numbers"),
        (lambda: lo.piecewise_constant_schedule(1.0, {5: "x"}), TypeError, r"`boundaries_and_scales` must be a Python float"),
        (lambda: lo.one_cycle_schedule(1.0, 100, pct_start=1.0), ValueError, r"`pct_start` must be a finite number in \(0, 1\)"),
        (lambda: lo.one_cycle_schedule(1.0, 5, pct_start=0.1), ValueError, r"`pct_start` \* `total_steps` must be > 1"),
        (lambda: lo.one_cycle_schedule(1.0, 10, div_factor=0.0), ValueError, r"`div_factor` must be a finite number in \(0, inf\)"),
        (lambda: lo.join_schedules([lo.constant_schedule(1.0), 0.5], [3]), TypeError, r"`schedules` entries must be schedules.*index 1.*constant_schedule"),
        (lambda: lo.join_schedules([lo.constant_schedule(1.0)], [3]), ValueError, r"`boundaries` must have one entry fewer than `schedules`, got 1 boundaries for 1"),
        (lambda: lo.join_schedules([lo.constant_schedule(1.0)] * 3, [5, 5]), ValueError, r"`boundaries` must be strictly increasing, got \[5, 5\]"),
        (lambda: lo.join_schedules([lo.constant_schedule(1.0)] * 2, [2.5]), TypeError, r"`boundaries` must be an int, got float"),
    ],
)  # fmt: skip
def test_bad_schedule_arguments_raise_clear_errors(build, error, match):
    with pytest.raises(error, match=match):
        build()
