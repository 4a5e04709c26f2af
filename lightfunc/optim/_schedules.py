"""Learning-rate schedules: pure functions of the step count.

Each factory checks its arguments once and returns a function ``step ->
value`` taking a 0-d int64 tensor (the number of updates applied so far, 0
at the first update) and returning a 0-d float32 tensor on the same device.
There is no Python branching on the step: regimes are selected with
`torch.where` and `clamp`, so a compiled step that evaluates a schedule
compiles once for the whole run.

Values are computed in float64 and rounded once to float32, which keeps them
within float32 rounding of torch.optim.lr_scheduler's Python-float results.
Past their last step, schedules hold their final value (torch's
CosineAnnealingLR would start rising again; OneCycleLR would raise).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence

import torch

from ._base import Schedule
from ._validate import check_float, check_int


def _f64(step: torch.Tensor) -> torch.Tensor:
    return step.to(torch.float64)


def _cosine(start: float, end: float, frac: torch.Tensor) -> torch.Tensor:
    """``end + (start - end) / 2 * (1 + cos(pi * frac))``, torch's `_annealing_cos` order."""
    return end + (start - end) / 2.0 * (torch.cos(math.pi * frac) + 1)


def constant_schedule(value: float) -> Schedule:
    """The same value at every step.

    Raises:
        TypeError, ValueError: `value` is not a finite float.
    """
    value = check_float("value", value)

    def schedule(step: torch.Tensor) -> torch.Tensor:
        return torch.full((), value, dtype=torch.float32, device=step.device)

    return schedule


def linear_schedule(init_value: float, end_value: float, transition_steps: int) -> Schedule:
    """Linear from `init_value` at step 0 to `end_value` at `transition_steps`, then constant.

    torch's ``LinearLR(start_factor, end_factor, total_iters)`` with
    ``init_value = lr * start_factor``, ``end_value = lr * end_factor``.

    Args:
        init_value: the value at step 0.
        end_value: the value from `transition_steps` on.
        transition_steps: the length of the ramp, an int >= 1.

    Returns:
        A schedule.

    Raises:
        TypeError, ValueError: a value is not finite, or `transition_steps` < 1.
    """
    init_value = check_float("init_value", init_value)
    end_value = check_float("end_value", end_value)
    transition_steps = check_int("transition_steps", transition_steps, low=1)

    def schedule(step: torch.Tensor) -> torch.Tensor:
        frac = torch.clamp(_f64(step) / transition_steps, 0.0, 1.0)
        return (init_value + (end_value - init_value) * frac).to(torch.float32)

    return schedule


def warmup_schedule(peak_value: float, warmup_steps: int, init_value: float = 0.0) -> Schedule:
    """Linear warm-up from `init_value` to `peak_value` over `warmup_steps`, then constant.

    Args:
        peak_value: the value from `warmup_steps` on.
        warmup_steps: the length of the warm-up, >= 0 (0: constant `peak_value`).
        init_value: the value at step 0.

    Returns:
        A schedule.

    Raises:
        TypeError, ValueError: a value is not finite, or `warmup_steps` < 0.
    """
    warmup_steps = check_int("warmup_steps", warmup_steps, low=0)
    if warmup_steps == 0:
        return constant_schedule(peak_value)
    return linear_schedule(init_value, peak_value, warmup_steps)


def cosine_decay_schedule(init_value: float, decay_steps: int, alpha: float = 0.0) -> Schedule:
    """Cosine decay from `init_value` to ``alpha * init_value`` over `decay_steps`, then constant.

    torch's ``CosineAnnealingLR(T_max=decay_steps, eta_min=alpha * lr)`` up to
    `decay_steps`.

    Args:
        init_value: the value at step 0.
        decay_steps: the length of the decay, an int >= 1.
        alpha: the final value as a fraction of `init_value`, in [0, 1].

    Returns:
        A schedule.

    Raises:
        TypeError, ValueError: bad arguments.
    """
    init_value = check_float("init_value", init_value)
    decay_steps = check_int("decay_steps", decay_steps, low=1)
    alpha = check_float("alpha", alpha, low=0.0, high=1.0)
    end_value = alpha * init_value

    def schedule(step: torch.Tensor) -> torch.Tensor:
        frac = torch.clamp(_f64(step) / decay_steps, 0.0, 1.0)
        return _cosine(init_value, end_value, frac).to(torch.float32)

    return schedule


def warmup_cosine_decay_schedule(
    init_value: float,
    peak_value: float,
    warmup_steps: int,
    decay_steps: int,
    end_value: float = 0.0,
) -> Schedule:
    """Linear warm-up to `peak_value`, then cosine decay to `end_value`.

    The warm-up runs over steps ``[0, warmup_steps]`` and the cosine over
    ``[warmup_steps, decay_steps]``: `decay_steps` is the length of the whole
    schedule, warm-up included (as in optax).

    Args:
        init_value: the value at step 0.
        peak_value: the value at `warmup_steps`.
        warmup_steps: the length of the warm-up, >= 0.
        decay_steps: the step where `end_value` is reached, > `warmup_steps`.
        end_value: the value from `decay_steps` on.

    Returns:
        A schedule.

    Raises:
        TypeError, ValueError: bad arguments, or `decay_steps` <= `warmup_steps`.
    """
    init_value = check_float("init_value", init_value)
    peak_value = check_float("peak_value", peak_value)
    end_value = check_float("end_value", end_value)
    warmup_steps = check_int("warmup_steps", warmup_steps, low=0)
    decay_steps = check_int(
        "decay_steps",
        decay_steps,
        low=warmup_steps + 1,
        hint="It counts the whole schedule, warm-up included: use warmup_steps + the decay length.",
    )
    cosine_steps = decay_steps - warmup_steps

    def schedule(step: torch.Tensor) -> torch.Tensor:
        t = _f64(step)
        warm = init_value + (peak_value - init_value) * torch.clamp(
            t / max(warmup_steps, 1), 0.0, 1.0
        )
        cos = _cosine(
            peak_value, end_value, torch.clamp((t - warmup_steps) / cosine_steps, 0.0, 1.0)
        )
        return torch.where(t < warmup_steps, warm, cos).to(torch.float32)

    return schedule


def step_decay_schedule(init_value: float, step_size: int, gamma: float) -> Schedule:
    """Multiply the value by `gamma` every `step_size` steps (torch's ``StepLR``).

    ``init_value * gamma ** (step // step_size)``; `step_size=1` is torch's ``ExponentialLR``.

    Args:
        init_value: the value at step 0.
        step_size: steps between decays, an int >= 1.
        gamma: the factor, >= 0.

    Returns:
        A schedule.

    Raises:
        TypeError, ValueError: bad arguments.
    """
    init_value = check_float("init_value", init_value)
    step_size = check_int("step_size", step_size, low=1)
    gamma = check_float("gamma", gamma, low=0.0, hint="E.g. 0.1 to divide by 10.")

    def schedule(step: torch.Tensor) -> torch.Tensor:
        decays = torch.div(step, step_size, rounding_mode="floor").clamp(min=0)
        return (init_value * torch.pow(gamma, _f64(decays))).to(torch.float32)

    return schedule


def piecewise_constant_schedule(
    init_value: float, boundaries_and_scales: Mapping[int, float] | None = None
) -> Schedule:
    """Multiply the value by a scale at each boundary step (torch's ``MultiStepLR``).

    Args:
        init_value: the value at step 0.
        boundaries_and_scales: step -> factor; from each step on, the value is
            multiplied by its factor, e.g. ``{1000: 0.1, 2000: 0.1}``.

    Returns:
        A schedule.

    Raises:
        TypeError, ValueError: a boundary is not an int >= 0 or a scale not a finite float.
    """
    init_value = check_float("init_value", init_value)
    pairs = sorted(
        (
            check_int("boundaries_and_scales", b, low=0, hint="Keys are step numbers."),
            check_float("boundaries_and_scales", s, hint="Values are scale factors."),
        )
        for b, s in (boundaries_and_scales or {}).items()
    )

    def schedule(step: torch.Tensor) -> torch.Tensor:
        value = torch.full((), init_value, dtype=torch.float64, device=step.device)
        for boundary, factor in pairs:
            value = torch.where(step >= boundary, value * factor, value)
        return value.to(torch.float32)

    return schedule


def one_cycle_schedule(
    peak_value: float,
    total_steps: int,
    *,
    pct_start: float = 0.3,
    div_factor: float = 25.0,
    final_div_factor: float = 1e4,
) -> Schedule:
    """The 1cycle policy, as torch's ``OneCycleLR`` (cosine annealing, two phases).

    Rises from ``peak_value / div_factor`` to `peak_value` by step
    ``pct_start * total_steps - 1``, then falls to ``peak_value / div_factor /
    final_div_factor`` at step ``total_steps - 1``. Momentum is not cycled.

    Args:
        peak_value: the highest value (torch's `max_lr`).
        total_steps: the length of the cycle, an int >= 2.
        pct_start: the fraction of the cycle spent rising, in (0, 1), with
            ``pct_start * total_steps > 1``.
        div_factor: ``peak_value / initial value``, > 0.
        final_div_factor: ``initial value / final value``, > 0.

    Returns:
        A schedule.

    Raises:
        TypeError, ValueError: bad arguments.
    """
    peak_value = check_float("peak_value", peak_value)
    total_steps = check_int("total_steps", total_steps, low=2)
    pct_start = check_float(
        "pct_start", pct_start, low=0.0, high=1.0, low_open=True, high_open=True
    )
    div_factor = check_float("div_factor", div_factor, low=0.0, low_open=True)
    final_div_factor = check_float("final_div_factor", final_div_factor, low=0.0, low_open=True)
    rise_end = pct_start * total_steps - 1  # torch's float end step of the first phase
    fall_end = float(total_steps - 1)
    if rise_end <= 0:
        raise ValueError(
            f"`pct_start` * `total_steps` must be > 1 so the rising phase has a length, got "
            f"{pct_start} * {total_steps}. Increase `pct_start` or `total_steps`."
        )
    initial_value = peak_value / div_factor
    final_value = initial_value / final_div_factor

    def schedule(step: torch.Tensor) -> torch.Tensor:
        t = _f64(step)
        rise = _cosine(initial_value, peak_value, torch.clamp(t / rise_end, 0.0, 1.0))
        fall = _cosine(
            peak_value, final_value, torch.clamp((t - rise_end) / (fall_end - rise_end), 0.0, 1.0)
        )
        return torch.where(t <= rise_end, rise, fall).to(torch.float32)

    return schedule


def join_schedules(schedules: Sequence[Schedule], boundaries: Sequence[int]) -> Schedule:
    """Run `schedules` one after the other, switching at `boundaries` (torch's ``SequentialLR``).

    From ``boundaries[i]`` on, ``schedules[i + 1]`` is used, evaluated at
    ``step - boundaries[i]`` (each schedule starts from its own step 0).

    Args:
        schedules: the schedules, in order.
        boundaries: increasing step numbers, one fewer than `schedules`.

    Returns:
        A schedule.

    Raises:
        TypeError: a schedule is not callable or a boundary not an int.
        ValueError: the lengths do not fit or the boundaries are not increasing.
    """
    schedules, boundaries = list(schedules), list(boundaries)
    for i, s in enumerate(schedules):
        if not callable(s):
            raise TypeError(
                f"`schedules` entries must be schedules (functions of the step), got "
                f"{type(s).__name__} ({s!r}) at index {i}. Wrap a constant in `constant_schedule`."
            )
    if not schedules or len(boundaries) != len(schedules) - 1:
        raise ValueError(
            f"`boundaries` must have one entry fewer than `schedules`, got {len(boundaries)} "
            f"boundaries for {len(schedules)} schedules. Give the step where each schedule after "
            f"the first starts."
        )
    for b in boundaries:
        check_int("boundaries", b, low=0)
    if any(b >= c for b, c in itertools.pairwise(boundaries)):
        raise ValueError(f"`boundaries` must be strictly increasing, got {boundaries}. Sort them.")

    def schedule(step: torch.Tensor) -> torch.Tensor:
        value = schedules[0](step)
        for boundary, later in zip(boundaries, schedules[1:], strict=True):
            value = torch.where(step >= boundary, later(step - boundary), value)
        return value.to(torch.float32)

    return schedule
