"""`NonFiniteCheck`: notice a NaN or infinite loss at the logging interval, with no per-step sync."""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Any, Literal

import torch

from .._callback import Callback
from .._validate import check_choice, check_positive_int

if TYPE_CHECKING:
    from .._contract import LoopState


class NonFiniteCheck(Callback):
    """Raise (or warn) when a train metric is NaN or infinite, read every `every_n_steps` steps.

    One NaN batch is enough to turn every weight into NaN for the rest of a
    run, silently. This reads the step's floating metrics (the loss, a
    gradient norm you return, ...) at the steps where a logger reads them
    anyway (`lf.fit` installs it with `log_every_n_steps`), so it adds no
    device sync of its own, and stops the run naming the step. A run that
    skips non-finite updates on purpose (`skip_nonfinite=True`, float16 loss
    scaling: its metrics carry `skipped_steps`) is left alone.

    Args:
        every_n_steps: check every this many steps (1: every step, which syncs
            with the device every step; what `fit(detect_anomaly=True)` uses).
        action: "raise" (a `FloatingPointError`) or "warn" (a `RuntimeWarning`,
            once per run).

    Raises:
        ValueError: a bad `every_n_steps` or `action`.
        FloatingPointError: (during the run, with action="raise") a metric is
            not finite.

    Example:
        >>> import lightfunc as lf
        >>> check = lf.callbacks.NonFiniteCheck(every_n_steps=100)
    """

    def __init__(
        self, every_n_steps: int = 50, *, action: Literal["raise", "warn"] = "raise"
    ) -> None:
        check_positive_int("every_n_steps", every_n_steps, optional=False)
        check_choice("action", action, ("raise", "warn"))
        self.every_n_steps, self.action = every_n_steps, action
        self._checked_at = 0  # the last step checked (and found finite)
        self._warned = False

    def describe(self) -> str:
        return f"every_n_steps={self.every_n_steps}"

    def on_start(self, ls: LoopState) -> None:
        self._checked_at = ls.step

    def on_step(self, ls: LoopState) -> bool | None:
        if ls.step % self.every_n_steps != 0 and not ls.epoch_end:
            return None
        self.check(ls)
        return None

    def check(self, ls: LoopState) -> None:
        """Read `ls`'s floating train metrics (one device sync) and act if any is not finite."""
        metrics = ls.metrics
        if "skipped_steps" in metrics:  # non-finite updates are skipped and counted on purpose
            return
        floats = {
            k: v
            for k, v in metrics.items()
            if isinstance(v, torch.Tensor) and v.is_floating_point()
        }
        if not floats:
            return
        finite = torch.stack([torch.isfinite(v.detach()).all() for v in floats.values()]).all()
        if bool(finite):
            self._checked_at = ls.step
            return
        bad = ", ".join(f"{k}={float(v)}" for k, v in floats.items() if not torch.isfinite(v).all())
        since = (
            f"at step {ls.step}"
            if ls.step - self._checked_at <= 1
            else f"at step {ls.step} (checked every {self.every_n_steps} steps: the first "
            f"non-finite value came after step {self._checked_at})"
        )
        message = (
            f"Non-finite train metric {bad} {since}. The update of such a step writes NaN into the "
            f"weights and the rest of the run trains nothing. Fixes: `skip_nonfinite=True` (on "
            f"lf.fit, lf.loop or lf.build) skips and counts those updates; "
            f"`fit(..., detect_anomaly=True)` checks every step and, for an eager step "
            f"(compile=False), names the backward operation that produced the NaN; a lower "
            f"learning rate or gradient clipping (lf.optim.clip_by_global_norm) avoids it."
        )
        if self.action == "raise":
            raise FloatingPointError(message)
        if not self._warned:
            self._warned = True
            warnings.warn(message, RuntimeWarning, stacklevel=2)

    def on_end(self, ls: LoopState) -> None:
        if ls.step != self._checked_at and ls.metrics:
            self.check(ls)

    def state_dict(self) -> dict[str, Any] | None:
        return None
