"""`EarlyStopping`: stop when a monitored metric stops improving (or crosses a threshold)."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Literal

import torch

from .._callback import Callback
from .._validate import check_non_negative_int

if TYPE_CHECKING:
    from .._contract import LoopState


class EarlyStopping(Callback):
    """Stop the run when `monitor` has not improved for `patience` checks.

    A check happens whenever the metric is fresh: after each evaluation for
    an evaluation metric (`"val_<name>"`, read from `ls.eval_metrics`), at the
    end of each epoch for a train metric (`"<name>"`, from `ls.metrics`).
    The metric leaves the device only at checks.

    Args:
        monitor: `"val_<name>"` or a train metric name.
        patience: checks without improvement before stopping.
        mode: "min" or "max".
        min_delta: an improvement must beat the best by more than this.
        stopping_threshold: stop as soon as the metric is better than this.
        divergence_threshold: stop as soon as the metric is worse than this.
        check_finite: stop when the metric is NaN or infinite.
        verbose: print why the run stops when it does (rank 0 only with
            `log_rank_zero_only`, Lightning's spelling).
        strict: raise when `monitor` is not among the metrics (True, as
            Lightning); False skips the check instead.
        check_on_train_epoch_end: Lightning's switch, fixed by the metric in
            lightfunc: None (the default), False for a `"val_..."` metric
            (checked after every evaluation), True for a train metric
            (checked at every epoch's end); the other combination raises.
        log_rank_zero_only: with `verbose`, print on rank 0 only.

    Attributes:
        best: best value seen; `wait`: checks since it improved;
        stopped_step: the step at which it asked to stop (-1: not yet);
        reason: why it stopped, for logs.

    Raises:
        ValueError: for a bad `mode`, negative `patience` or `min_delta`.
    """

    def __init__(
        self,
        monitor: str,
        *,
        patience: int = 3,
        mode: Literal["min", "max"] = "min",
        min_delta: float = 0.0,
        stopping_threshold: float | None = None,
        divergence_threshold: float | None = None,
        check_finite: bool = True,
        verbose: bool = False,
        strict: bool = True,
        check_on_train_epoch_end: bool | None = None,
        log_rank_zero_only: bool = False,
    ) -> None:
        evaluation = monitor.startswith("val_") if isinstance(monitor, str) else False
        if check_on_train_epoch_end is not None and check_on_train_epoch_end == evaluation:
            kind, when, other = (
                ("an evaluation", "after every evaluation", "a train metric")
                if evaluation
                else ("a train", "at the end of every epoch", "a 'val_...' metric")
            )
            raise ValueError(
                f"`check_on_train_epoch_end={check_on_train_epoch_end}` with `monitor={monitor!r}`: "
                f"lightfunc checks {kind} metric {when}, when it is fresh. Drop "
                f"`check_on_train_epoch_end`, or monitor {other}."
            )
        if mode not in ("min", "max"):
            raise ValueError(f"`mode` must be 'min' or 'max', got {mode!r}.")
        check_non_negative_int("patience", patience)
        if min_delta < 0:
            raise ValueError(
                f"`min_delta` must be >= 0 (the direction comes from `mode`), got {min_delta}."
            )
        self.monitor, self.patience, self.mode, self.min_delta = monitor, patience, mode, min_delta
        self.stopping_threshold, self.divergence_threshold = (
            stopping_threshold,
            divergence_threshold,
        )
        self.check_finite = check_finite
        self.verbose, self.strict, self.log_rank_zero_only = verbose, strict, log_rank_zero_only
        self.best = math.inf if mode == "min" else -math.inf
        self.wait = 0
        self.stopped_step = -1
        self.reason = ""

    def describe(self) -> str:
        return f"monitor={self.monitor},mode={self.mode}"

    def state_dict(self) -> dict[str, Any]:
        return {"best": float(self.best), "wait": self.wait, "stopped_step": self.stopped_step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best, self.wait, self.stopped_step = (
            float(state["best"]),
            int(state["wait"]),
            int(state["stopped_step"]),
        )

    def on_step(self, ls: LoopState) -> bool | None:
        value = self._fresh_value(ls)
        if value is None:
            return None
        stop, self.reason = self._check(value)
        if stop:
            self.stopped_step = ls.step
            rank = ls.strategy.rank if ls.strategy is not None else 0
            if self.verbose and (rank == 0 or not self.log_rank_zero_only):
                print(f"EarlyStopping: stopping at step {ls.step}: {self.reason}.", flush=True)
        return stop

    def _fresh_value(self, ls: LoopState) -> float | None:
        evaluation = self.monitor.startswith("val_")
        fresh = ls.evaluated and ls.eval_metrics is not None if evaluation else ls.epoch_end
        if not fresh:
            return None
        value = ls.metric(self.monitor)
        if value is None and not self.strict:
            return None
        if value is None:
            source = (ls.eval_metrics or {}) if evaluation else ls.metrics
            available = ", ".join(sorted(source)) or "none"
            raise KeyError(
                f"EarlyStopping: `monitor={self.monitor!r}` is not among the "
                f"{'evaluation' if evaluation else 'train'} metrics ({available}). "
                f"Use 'val_<name>' for evaluation metrics, or pass `strict=False` to skip the "
                f"check while the metric is missing."
            )
        return (
            float(value.detach().float().cpu()) if isinstance(value, torch.Tensor) else float(value)
        )

    def _check(self, value: float) -> tuple[bool, str]:
        better = (lambda a, b: a < b) if self.mode == "min" else (lambda a, b: a > b)
        if self.check_finite and not math.isfinite(value):
            return True, f"{self.monitor} = {value} is not finite"
        if self.stopping_threshold is not None and better(value, self.stopping_threshold):
            return (
                True,
                f"{self.monitor} = {value:.6g} reached the stopping threshold {self.stopping_threshold}",
            )
        if self.divergence_threshold is not None and better(self.divergence_threshold, value):
            return True, f"{self.monitor} = {value:.6g} diverged past {self.divergence_threshold}"
        shift = -self.min_delta if self.mode == "min" else self.min_delta
        if better(value, self.best + shift):
            self.best, self.wait = value, 0
            return False, ""
        self.wait += 1
        if self.wait >= self.patience:
            return (
                True,
                f"{self.monitor} did not improve for {self.wait} checks (best {self.best:.6g})",
            )
        return False, ""
