"""A progress bar over the stream of trainer states.

tqdm draws it on a terminal when installed; otherwise, and whenever the
output is not a terminal (a log file, CI), one plain line is printed every
`log_every_n_steps` steps, so logs stay readable without carriage returns.
Metrics are read from the device only on those logging steps.
"""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO

import torch

from ._loop import TrainerState


class ProgressBar:
    """Shows steps, epoch, steps/s and the latest metrics.

    Args:
        total: the number of steps expected, if known.
        log_every_n_steps: how often metrics are read from the device and shown.
        stream: where to write (default stderr).
    """

    def __init__(
        self, total: int | None = None, *, log_every_n_steps: int = 50, stream: TextIO | None = None
    ) -> None:
        self.total = total
        self.every = max(1, log_every_n_steps)
        self.stream = stream if stream is not None else sys.stderr
        self._start = time.perf_counter()
        self._bar: Any = None
        if _isatty(self.stream):
            try:
                from tqdm.auto import tqdm
            except ImportError:
                pass
            else:
                self._bar = tqdm(
                    total=total, file=self.stream, unit="step", dynamic_ncols=True, leave=True
                )

    def update(self, ts: TrainerState) -> None:
        """Advance to `ts`; reads its metrics only every `log_every_n_steps` steps and after evaluations."""
        show = ts.step % self.every == 0 or ts.evaluated or ts.step == self.total
        if self._bar is not None:
            self._bar.update(ts.step - self._bar.n)
            if show:
                self._bar.set_description(f"epoch {ts.epoch}", refresh=False)
                self._bar.set_postfix_str(_format_metrics(ts), refresh=False)
        elif show:
            elapsed = time.perf_counter() - self._start
            of_total = f"/{self.total}" if self.total else ""
            rate = ts.step / elapsed if elapsed > 0 else 0.0
            print(
                f"epoch {ts.epoch} step {ts.step}{of_total} {rate:.1f} step/s {_format_metrics(ts)}",
                file=self.stream,
                flush=True,
            )

    def close(self) -> None:
        """Finish the bar (a no-op for plain output)."""
        if self._bar is not None:
            self._bar.close()


def _format_metrics(ts: TrainerState) -> str:
    parts = [f"{k}={_scalar(v):.4g}" for k, v in ts.metrics.items()]
    if ts.eval_metrics is not None:
        parts += [f"val_{k}={_scalar(v):.4g}" for k, v in ts.eval_metrics.items()]
    return " ".join(parts)


def _scalar(x: Any) -> float:
    return float(x.detach().float().cpu()) if isinstance(x, torch.Tensor) else float(x)


def _isatty(stream: TextIO) -> bool:
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())
