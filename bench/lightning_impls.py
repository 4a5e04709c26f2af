"""PyTorch Lightning's Trainer on the same workloads: what users would pick instead of lightfunc.

Needs the optional `lightning` package (`pip install -e ".[bench]"`). Each timed
window is one `Trainer.fit` of n+1 steps; a callback times batches 2..n+1, so
Trainer set-up and tear-down (and checkpoint writing at the end of `fit`) are
not counted as step time, while everything Lightning does per step is.
"""

from __future__ import annotations

import contextlib
import io
import logging
import tempfile
import time
from typing import Any, ClassVar

import torch

from .impls import BETAS, EPS, LR, WEIGHT_DECAY, Runner, tensor_bytes
from .workloads import Workload


def available() -> bool:
    try:
        import lightning  # noqa: F401
    except ImportError:
        return False
    return True


def _module_class() -> type:
    import lightning as L

    class Module(L.LightningModule):
        def __init__(self, model: torch.nn.Module, loss_fn: Any) -> None:
            super().__init__()
            self.model = model
            self.loss_fn = loss_fn

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.model(x)

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            x, y = batch
            return self.loss_fn(self(x), y)  # through forward, which Lightning compiles

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.AdamW(
                self.parameters(), lr=LR, betas=BETAS, eps=EPS, weight_decay=WEIGHT_DECAY
            )

    return Module


def _callback_class() -> type:
    import lightning as L

    class StepTimer(L.Callback):
        """Times batches 2..n, and keeps every step's loss."""

        def __init__(self) -> None:
            self.start: float | None = None
            self.end: float | None = None
            self.cpu_start = self.cpu_end = 0.0
            self.first_loss_at = 0.0
            self.losses: list[torch.Tensor] = []

        def on_train_batch_start(
            self, trainer: Any, module: Any, batch: Any, batch_idx: int
        ) -> None:
            if self.start is None and trainer.global_step == 1:
                self.start, self.cpu_start = time.perf_counter(), time.process_time()

        def on_train_batch_end(
            self, trainer: Any, module: Any, outputs: Any, batch: Any, batch_idx: int
        ) -> None:
            self.losses.append(outputs["loss"].detach())
            if module.device.type == "cuda":
                torch.cuda.synchronize(module.device)
            self.end, self.cpu_end = time.perf_counter(), time.process_time()
            self.first_loss_at = self.first_loss_at or self.end

    return StepTimer


class _Batches:
    """The workload's batches as one iterable (Lightning reads a bare list as a list of loaders)."""

    def __init__(self, batches: list[Any]) -> None:
        self.batches = batches

    def __iter__(self) -> Any:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


class LightningTrainer(Runner):
    """`Trainer(...)` with its defaults: progress bar, logger, checkpointing, model summary."""

    name = "lightning_trainer"
    trainer_kwargs: ClassVar[dict[str, Any]] = {}
    compile_module = False

    def __init__(self, workload: Workload) -> None:
        super().__init__(workload)
        logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
        logging.getLogger("lightning.fabric").setLevel(logging.ERROR)
        self.model = workload.make_model().to(self.device)
        self.module = _module_class()(self.model, workload.loss_fn)
        self.fit_module = torch.compile(self.module) if self.compile_module else self.module
        self._root = tempfile.TemporaryDirectory(prefix="lightfunc-bench-lightning-")
        self.root = self._root.name

    def close(self) -> None:
        self._root.cleanup()

    def _fit(self, steps: int) -> Any:
        import lightning as L

        timer = _callback_class()()
        trainer = L.Trainer(
            default_root_dir=self.root,
            accelerator="gpu" if self.device.type == "cuda" else "cpu",
            devices=1,
            max_steps=steps,
            callbacks=[timer],
            **self.trainer_kwargs,
        )
        with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
            trainer.fit(self.fit_module, train_dataloaders=_Batches(self.workload.batches))
        return timer

    def run(self, n: int) -> float:
        timer = self._fit(n + 1)
        assert timer.start is not None and timer.end is not None
        self.last_cpu_s = timer.cpu_end - timer.cpu_start
        return timer.end - timer.start

    def first_losses(self, k: int) -> list[float]:
        timer = self._fit(k)
        self.first_loss_at = self.first_loss_at or timer.first_loss_at
        return [float(loss) for loss in timer.losses]

    def state_bytes(self) -> int:
        # Lightning builds a fresh optimizer per fit; count AdamW's two moments.
        return 3 * tensor_bytes(list(self.model.parameters()))


class LightningBarebones(LightningTrainer):
    """`Trainer(barebones=True)`: Lightning with its extras switched off."""

    name = "lightning_barebones"
    trainer_kwargs: ClassVar[dict[str, Any]] = {"barebones": True}


class LightningCompiled(LightningTrainer):
    """`trainer.fit(torch.compile(module))`, barebones: Lightning's documented compile path."""

    name = "lightning_compiled"
    trainer_kwargs: ClassVar[dict[str, Any]] = {"barebones": True}
    compile_module = True


RUNNERS: dict[str, type[Runner]] = {
    cls.name: cls for cls in (LightningTrainer, LightningBarebones, LightningCompiled)
}
