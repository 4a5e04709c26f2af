"""The learning-rate range test (`lightfunc.tune.lr_find`), run on a copy-free trial state.

A `TrainState` is immutable, so the sweep needs no save / restore around it
(Lightning's `Tuner.lr_find` writes a checkpoint and reloads it): it runs the
step on a *trial* state whose optimizer is the user's, wrapped by
`sweep_learning_rate`. That wrapper multiplies the inner optimizer's updates
by ``lr_k / base_lr``, where `base_lr` is the constant rate the optimizer was
built with and ``lr_k`` the sweep's rate for its k-th update, read from a
table by the wrapper's own update counter (a tensor in the optimizer state).
The trial state has one tree structure for the whole sweep, so a compiled
step compiles once for it, not once per learning rate.

Scaling the updates is exactly setting the learning rate for every optimizer
whose update is proportional to it: `sgd` (with or without momentum: the
buffer holds gradients, not steps), `adam`, `adamw` (the decoupled decay
``-lr * wd * p`` is proportional too), `lion`, `muon`. It costs one rounding
of each update (a float32 multiply), measured against Lightning in
`bench/lr_find_lightning.py`. Parameter groups with different rates keep
their ratio; the reported rate is the one `learning_rate_of` reads.

The rates, the smoothing, the divergence test and the suggestion are
Lightning's (`lightning.pytorch.tuner.lr_finder`, 2.6), so the two agree on
the same model, data and sweep:

- rate of step k (0-based, N = `num_training`): ``min_lr`` at k = 0, then
  ``min_lr * (max_lr / min_lr) ** ((k + 1) / N)`` (exponential) or
  ``min_lr + (k + 1) / N * (max_lr - min_lr)`` (linear). Lightning's
  scheduler evaluates its first rate at construction, so ``r = 1 / N`` is
  skipped and the last step runs at `max_lr`.
- smoothed loss: ``avg_k = beta * avg_{k-1} + (1 - beta) * loss_k`` divided by
  ``1 - beta ** (k + 2)``: Lightning's bias correction counts one step more
  than the usual ``k + 1`` (its `global_step` has already advanced), which
  makes the first smoothed value about half the first loss, and the early
  curve rise (the symptom in Lightning issue #14167). Kept, so curves and
  suggestions agree; `LRFindResult.losses` has the raw losses.
- divergence: stop after step k >= 1 when the smoothed loss exceeds
  ``early_stop_threshold`` times the best smoothed loss so far (that step's
  loss is kept). Unlike Lightning, a non-finite smoothed loss also stops the
  sweep (Lightning runs on with NaN losses, which it then ignores).
- suggestion: the index of the most negative ``torch.gradient`` of the
  smoothed losses with respect to the rates, in float32, skipping the first
  `skip_begin` and last `skip_end` points and non-finite losses.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, Literal

import torch

from ._build import Step, build
from ._device import to_device
from ._state import TrainState, map_train_states, train_states
from ._tree import register_dataclass, tree_map
from ._validate import check_choice, check_float, check_int
from .optim._base import GradientTransformation, OptState, Params, Updates
from .optim._introspect import learning_rate_of

SweepMode = Literal["exponential", "linear"]
StopReason = Literal["completed", "diverged", "data exhausted"]


@dataclasses.dataclass(frozen=True)
class SweepState:
    """State of `sweep_learning_rate`.

    Attributes:
        inner: the wrapped optimizer's state.
        count: updates applied during the sweep so far; 0-d int64, the
            index into the sweep's table of rates.
    """

    inner: OptState
    count: torch.Tensor


register_dataclass(SweepState)


def sweep_learning_rate(
    tx: GradientTransformation, factors: torch.Tensor
) -> GradientTransformation:
    """`tx` with its k-th update multiplied by ``factors[k]`` (the last factor past the end).

    With ``factors[k] = lr_k / base_lr`` and `tx` built with the constant
    rate `base_lr`, the k-th update is the one `tx` would make at rate
    ``lr_k`` (for an optimizer whose update is proportional to its rate).
    A deferred update (a micro-batch of an accumulated one) passes through
    without advancing the count.

    Args:
        tx: the optimizer to wrap.
        factors: 1-D float32 tensor of per-update factors, on the params' device.

    Returns:
        A `GradientTransformation` whose state is a `SweepState`.
    """
    last = int(factors.numel()) - 1

    def init(params: Params) -> SweepState:
        return SweepState(
            inner=tx.init(params),
            count=torch.zeros((), dtype=torch.int64, device=factors.device),
        )

    def update(
        updates: Updates, state: OptState, params: Params | None = None
    ) -> tuple[Updates, OptState]:
        new, inner = tx.update(updates, state.inner, params)
        if new is None:  # deferred: nothing applied, the sweep does not advance
            return None, SweepState(inner=inner, count=state.count)
        # index_select, not factors[count]: a tensor index stays in the graph (no host read)
        factor = factors.index_select(0, state.count.clamp(max=last).reshape(1)).reshape(())
        new = tree_map(lambda u: u * factor.to(u.dtype), new)
        return new, SweepState(inner=inner, count=state.count + 1)

    update.wraps = tx  # type: ignore[attr-defined]
    return GradientTransformation(init, update)


def sweep_lrs(min_lr: float, max_lr: float, num_training: int, mode: SweepMode) -> list[float]:
    """The rate of each sweep step, as Lightning's `_ExponentialLR` / `_LinearLR` give them.

    Computed in Python floats with Lightning's expressions, so the values
    are bit-identical to Lightning's.
    """
    lrs = [min_lr]
    for k in range(1, num_training):
        r = (k + 1) / num_training
        if mode == "exponential":
            lrs.append(min_lr * (max_lr / min_lr) ** r)
        else:
            lrs.append(min_lr + r * (max_lr - min_lr))
    return lrs


def suggest_index(
    lrs: list[float] | tuple[float, ...],
    smoothed: list[float] | tuple[float, ...],
    skip_begin: int = 10,
    skip_end: int = 1,
) -> int | None:
    """Index of the steepest descent of `smoothed` over `lrs` (Lightning's `suggestion`).

    The gradient of the smoothed loss with respect to the rate
    (`torch.gradient` with the rates as coordinates, float32 as in
    Lightning), over the points left after skipping `skip_begin` at the start
    and `skip_end` at the end and dropping non-finite losses; None when
    fewer than two points remain.
    """
    stop = len(smoothed) - skip_end
    losses = torch.tensor(list(smoothed[skip_begin:stop]))
    rates = torch.tensor(list(lrs[skip_begin:stop]))
    finite = torch.isfinite(losses)
    if int(finite.sum()) < 2:
        return None
    gradient = torch.gradient(losses[finite], spacing=[rates[finite]])[0]
    kept = torch.arange(skip_begin, max(stop, skip_begin))[finite]
    return int(kept[int(torch.argmin(gradient))])


@dataclasses.dataclass(frozen=True)
class LRFindResult:
    """What `lr_find` measured: one entry per sweep step run.

    Attributes:
        lrs: the learning rate of each step.
        losses: the loss each step reported (before its update), raw.
        smoothed: the smoothed losses (Lightning's exponential average).
        suggestion: the suggested learning rate, ``lrs[suggestion_index]``,
            or None when too few finite points remain after skipping.
        suggestion_index: the index of the steepest descent of `smoothed`.
        mode: "exponential" or "linear".
        stop_reason: "completed" (all `num_training` steps), "diverged" (the
            smoothed loss passed the threshold or went non-finite) or "data
            exhausted" (`data` was a one-pass iterator and ran out).
    """

    lrs: tuple[float, ...]
    losses: tuple[float, ...]
    smoothed: tuple[float, ...]
    suggestion: float | None
    suggestion_index: int | None
    mode: str
    stop_reason: StopReason

    def suggest(self, skip_begin: int = 10, skip_end: int = 1) -> int | None:
        """The steepest-descent index with other skips (see `lr_find`); None if too few points."""
        check_int("skip_begin", skip_begin, low=0)
        check_int("skip_end", skip_end, low=0)
        return suggest_index(self.lrs, self.smoothed, skip_begin, skip_end)

    def plot(self, path: str | Path, *, suggest: bool = True) -> Path:
        """Write the smoothed loss against the learning rate to a PNG at `path`.

        The rate axis is logarithmic for an exponential sweep; with
        `suggest`, the suggested point is marked in red. Needs matplotlib
        (`pip install matplotlib`; it is in the `lightfunc[bench]` extra).

        Returns:
            The path written.

        Raises:
            ImportError: matplotlib is not installed.
        """
        try:
            import matplotlib

            matplotlib.use("Agg")  # a file, never a window
            import matplotlib.pyplot as plt
        except ImportError as error:
            raise ImportError(
                "`LRFindResult.plot` needs matplotlib, which is not installed. Install it with "
                "`pip install matplotlib` (it is in the `lightfunc[bench]` extra)."
            ) from error
        path = Path(path)
        fig, ax = plt.subplots(figsize=(6, 4))
        try:
            ax.plot(self.lrs, self.smoothed, label="smoothed loss")
            if self.mode == "exponential":
                ax.set_xscale("log")
            ax.set_xlabel("learning rate")
            ax.set_ylabel("loss")
            if suggest and self.suggestion_index is not None:
                i = self.suggestion_index
                ax.plot(self.lrs[i], self.smoothed[i], "o", color="red", markersize=8)
                ax.set_title(f"suggested learning rate {self.lrs[i]:.3g}")
            fig.tight_layout()
            fig.savefig(path, format="png")
        finally:
            plt.close(fig)
        return path


def lr_find(
    step: Step[Any] | Callable[..., Any],
    state: Any,
    data: Iterable[Any],
    *,
    min_lr: float = 1e-8,
    max_lr: float = 1.0,
    num_training: int = 100,
    mode: SweepMode = "exponential",
    early_stop_threshold: float | None = 4.0,
    beta: float = 0.98,
    loss: str = "loss",
    skip_begin: int = 10,
    skip_end: int = 1,
) -> LRFindResult:
    """Run a learning-rate range test on a trial copy of `state`, which is left untouched.

    The train step runs `num_training` times over `data` (re-iterated when
    it runs out) with the learning rate rising from `min_lr` to `max_lr`,
    starting from `state`'s parameters and optimizer state; each step's
    `metrics[loss]` is read back (one host sync per step), smoothed, and the
    sweep stops early when the smoothed loss diverges. The rates, smoothing,
    stopping rule and suggestion are Lightning's `Tuner.lr_find` ones (see
    `lightfunc._tune_lr`). The state is never modified: every step returns a
    new state, and the sweep's optimizer wrapper lives only in the trial
    state. A compiled step compiles once for the sweep.

    Args:
        step: a train step, built (`lightfunc.build`) or plain (then built here, compiled).
        state: a `TrainState`, or a pytree holding exactly one, whose optimizer
            has a constant learning rate > 0 (e.g. `lightfunc.optim.adamw(1e-3)`;
            its value does not matter: the sweep replaces it).
        data: an iterable of batches (a DataLoader, a list); batches are moved
            to the state's device.
        min_lr: the first rate, > 0.
        max_lr: the last rate, > `min_lr`.
        num_training: the number of steps (rates) to try, >= 1.
        mode: "exponential" (rates evenly spaced on a log scale) or "linear".
        early_stop_threshold: stop once the smoothed loss exceeds this many
            times the best one (> 0); None runs every step.
        beta: the smoothing factor of the loss average, in [0, 1).
        loss: the metric to read the loss from.
        skip_begin: points skipped at the start when suggesting, >= 0.
        skip_end: points skipped at the end when suggesting, >= 0.

    Returns:
        An `LRFindResult` (its `suggestion` is the rate to start from, or
        None when the sweep was too short for one; `plot(path)` draws it).

    Raises:
        TypeError, ValueError: an argument out of range; a state without
            exactly one `TrainState`, or whose optimizer's rate is a schedule
            or zero; `data` without batches; a step whose metrics lack `loss`.

    Example:
        >>> import torch, lightfunc as lf
        >>> model = torch.nn.Linear(4, 1)
        >>> def train_step(state, batch):
        ...     x, y = batch
        ...     def loss_fn(params):
        ...         return torch.nn.functional.mse_loss(lf.apply(model, params, {}, x, train=True)[0], y)
        ...     loss, grads = lf.value_and_grad(loss_fn)(state.params)
        ...     return state.apply_gradients(grads), {"loss": loss}
        >>> state = lf.TrainState.create(model, lf.optim.sgd(0.1))
        >>> data = [(torch.randn(8, 4), torch.randn(8, 1)) for _ in range(4)]
        >>> result = lf.tune.lr_find(lf.build(train_step, compile=False), state, data,
        ...                          min_lr=1e-4, max_lr=1.0, num_training=20)
        >>> len(result.lrs) <= 20
        True
    """
    min_lr = check_float("min_lr", min_lr, low=0.0, low_open=True, hint="E.g. 1e-8.")
    max_lr = check_float(
        "max_lr", max_lr, low=min_lr, low_open=True, hint="It must be above `min_lr`."
    )
    num_training = check_int("num_training", num_training, low=1)
    check_choice("mode", mode, ("exponential", "linear"))
    if early_stop_threshold is not None:
        hint = "E.g. 4.0; None never stops early."
        check_float("early_stop_threshold", early_stop_threshold, low=0.0, low_open=True, hint=hint)
    beta = check_float("beta", beta, low=0.0, high=1.0, high_open=True, hint="E.g. 0.98.")
    check_int("skip_begin", skip_begin, low=0)
    check_int("skip_end", skip_end, low=0)
    if not isinstance(loss, str):
        raise TypeError(f"`loss` must be the name of a metric (a str), got {loss!r}.")

    built = step if isinstance(step, Step) else build(step)
    if built.kind != "train":
        raise TypeError(
            f"`step` must be a train step, got {built!r}. Pass `lightfunc.build(train_step)`."
        )
    built = built.undonated()  # the sweep steps from the caller's state, which must stay intact
    prepared = built.prepare(state)
    base_lr, device = _base_lr_and_device(prepared)
    lrs = sweep_lrs(min_lr, max_lr, num_training, mode)
    factors = torch.tensor([lr / base_lr for lr in lrs], dtype=torch.float32, device=device)
    trial = map_train_states(lambda _, ts: _with_sweep(ts, factors), prepared)

    raw: list[float] = []
    smoothed: list[float] = []
    avg, best, reason = 0.0, 0.0, "completed"
    for k, batch in enumerate(_batches(data, num_training)):
        trial, metrics = built(trial, to_device(batch, device))
        raw.append(_read_loss(metrics, loss, built))
        avg = beta * avg + (1 - beta) * raw[-1]
        value = avg / (1 - beta ** (k + 2))  # Lightning's correction (module docstring)
        smoothed.append(value)
        diverged = not math.isfinite(value) or value > (early_stop_threshold or 0) * best
        if early_stop_threshold is not None and k >= 1 and diverged:
            reason = "diverged"
            break
        if k == 0 or value < best:
            best = value
    if not raw:
        raise ValueError(
            f"`data` yielded no batches; give an iterable of batches (a list or a DataLoader), got "
            f"{type(data).__name__}."
        )
    if reason == "completed" and len(raw) < num_training:
        reason = "data exhausted"
    index = suggest_index(lrs[: len(raw)], smoothed, skip_begin, skip_end)
    return LRFindResult(
        lrs=tuple(lrs[: len(raw)]),
        losses=tuple(raw),
        smoothed=tuple(smoothed),
        suggestion=None if index is None else lrs[index],
        suggestion_index=index,
        mode=mode,
        stop_reason=reason,  # type: ignore[arg-type]
    )


def _base_lr_and_device(state: Any) -> tuple[float, torch.device]:
    """The constant rate of the state's one optimizer, and the device of its step count."""
    found = train_states(state)
    if len(found) != 1:
        raise ValueError(
            f"`state` must hold exactly one TrainState (the sweep sets one optimizer's learning "
            f"rate), got {len(found)}. Run lr_find on each model's state separately."
        )
    ts = found[0]
    rate = learning_rate_of(ts.tx)
    if callable(rate):
        raise ValueError(
            "`state`'s optimizer has a learning-rate schedule; lr_find sets the rate itself and "
            "needs the optimizer built with a constant one. Create the state for the sweep with "
            "a constant rate, e.g. `lf.TrainState.create(model, lf.optim.adamw(1e-3))`."
        )
    if rate is None or not rate > 0:
        raise ValueError(
            f"`state`'s optimizer must have a constant learning rate > 0 for lr_find to scale, got "
            f"{rate!r}. Create the state with e.g. `lf.optim.sgd(0.1)`; its value does not matter."
        )
    return float(rate), ts.step.device


def _with_sweep(ts: TrainState, factors: torch.Tensor) -> TrainState:
    tx = sweep_learning_rate(ts.tx, factors)
    count = torch.zeros((), dtype=torch.int64, device=factors.device)
    return ts.replace(tx=tx, opt_state=SweepState(inner=ts.opt_state, count=count))


def _batches(data: Iterable[Any], limit: int) -> Iterator[Any]:
    """Up to `limit` batches from `data`, re-iterating it when it runs out (as epochs do)."""
    if isinstance(data, torch.Tensor) or not isinstance(data, Iterable):
        raise TypeError(
            f"`data` must be an iterable of batches (a list or a DataLoader), got "
            f"{type(data).__name__}."
        )
    produced = 0
    while produced < limit:
        before = produced
        for batch in itertools.islice(data, limit - produced):
            produced += 1
            yield batch
        if produced == before:  # an empty pass: a spent iterator, or no data at all
            return


def _read_loss(metrics: Any, name: str, step: Step[Any]) -> float:
    if not isinstance(metrics, dict) or name not in metrics:
        have = sorted(metrics) if isinstance(metrics, dict) else type(metrics).__name__
        raise ValueError(
            f"`loss`: the metric {name!r} is not among the metrics `{step.__name__}` returns "
            f"({have}). Return the loss as metrics[{name!r}], or pass `loss=` with its name."
        )
    return float(metrics[name])
