"""Implementations of one AdamW training step, all on the same workload.

Each is a `Runner`: `step()` runs one step on the next batch and returns the
loss (not synced); `run(n)` times n steps; `first_losses(k)` runs k steps from
the initial state (used to check that every implementation computes the same
thing before it is timed); `state_bytes()` is the memory its training state
holds (parameters, optimizer state).
"""

from __future__ import annotations

import contextlib
import io
import tempfile
import time
from collections.abc import Callable
from typing import Any, ClassVar

import torch

import lightfunc as lf

from .workloads import Batch, Workload

LR, WEIGHT_DECAY, BETAS, EPS = 1e-3, 1e-2, (0.9, 0.999), 1e-8


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def tensor_bytes(tensors: Any) -> int:
    return sum(
        t.numel() * t.element_size() for t in lf.tree_leaves(tensors) if isinstance(t, torch.Tensor)
    )


class Runner:
    """One implementation of the training step, positioned in the workload's batch cycle."""

    name = "runner"

    def __init__(self, workload: Workload) -> None:
        self.workload = workload
        self.device = workload.batches[0][0].device
        self._next = 0

    def next_batch(self) -> Batch:
        batch = self.workload.batches[self._next % len(self.workload.batches)]
        self._next += 1
        return batch

    def step(self) -> torch.Tensor:
        raise NotImplementedError

    #: Process CPU seconds (all threads) of the window the last `run` timed.
    last_cpu_s = 0.0

    def run(self, n: int) -> float:
        """Seconds for `n` steps, device work included (CPU seconds in `last_cpu_s`)."""
        cpu, start = time.process_time(), time.perf_counter()
        for _ in range(n):
            self.step()
        sync(self.device)
        self.last_cpu_s = time.process_time() - cpu
        return time.perf_counter() - start

    #: `time.perf_counter()` when `first_losses` had its first loss (time to first step).
    first_loss_at = 0.0

    def first_losses(self, k: int) -> list[float]:
        losses = []
        for _ in range(k):
            losses.append(float(self.step()))
            self.first_loss_at = self.first_loss_at or time.perf_counter()
        return losses

    def close(self) -> None:
        """Release what the runner holds outside the process (its scratch folder, if any)."""

    def state_bytes(self) -> int:
        raise NotImplementedError


class RawEager(Runner):
    """The usual PyTorch loop body: module, torch.optim.AdamW (its CPU default: per-tensor)."""

    name = "raw_eager"

    def __init__(self, workload: Workload, *, compile_model: bool = False) -> None:
        super().__init__(workload)
        self.model = workload.make_model().to(self.device).train()
        self.forward = torch.compile(self.model) if compile_model else self.model
        self.optimizer = torch.optim.AdamW(
            self.model.parameters(), lr=LR, betas=BETAS, eps=EPS, weight_decay=WEIGHT_DECAY
        )

    def step(self) -> torch.Tensor:
        x, y = self.next_batch()
        loss = self.workload.loss_fn(self.forward(x), y)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return loss.detach()

    def state_bytes(self) -> int:
        # The gradients too: `zero_grad` before `backward` (the usual loop) keeps each step's
        # gradients alive until the next step's backward, so they are held between steps
        # like the parameters (before 2026-11-30 they were left out: 12.3 MB on `wide`).
        params = list(self.model.parameters())
        grads = [p.grad for p in params if p.grad is not None]
        return (
            tensor_bytes(params)
            + tensor_bytes(grads)
            + tensor_bytes(list(self.optimizer.state.values()))
        )


class RawCompiledModule(RawEager):
    """`torch.compile(model)`, the optimizer still eager: what most users try first."""

    name = "raw_compiled_module"

    def __init__(self, workload: Workload) -> None:
        super().__init__(workload, compile_model=True)


class RawCompiledFunctional(Runner):
    """The "no library" limit: torch.func gradients and a hand-written AdamW, in one compiled graph."""

    name = "raw_compiled_functional"

    def __init__(self, workload: Workload) -> None:
        super().__init__(workload)
        model = workload.make_model().to(self.device)
        self.params = {k: v.detach().clone() for k, v in model.named_parameters()}
        self.m = {k: torch.zeros_like(v) for k, v in self.params.items()}
        self.v = {k: torch.zeros_like(v) for k, v in self.params.items()}
        self.t = torch.zeros((), device=self.device)
        loss_fn = workload.loss_fn
        b1, b2 = BETAS

        def loss_of(
            params: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor
        ) -> torch.Tensor:
            return loss_fn(torch.func.functional_call(model, params, (x,)), y)

        def train_step(params, m, v, t, x, y):  # type: ignore[no-untyped-def]
            grads, loss = torch.func.grad_and_value(loss_of)(params, x, y)
            t = t + 1
            step_size = LR / (1 - b1**t)
            root_bc2 = torch.sqrt(1 - b2**t)
            new_p, new_m, new_v = {}, {}, {}
            for k, g in grads.items():
                new_m[k] = b1 * m[k] + (1 - b1) * g
                new_v[k] = b2 * v[k] + (1 - b2) * g * g
                decayed = params[k] * (1 - LR * WEIGHT_DECAY)
                new_p[k] = decayed - step_size * new_m[k] / (torch.sqrt(new_v[k]) / root_bc2 + EPS)
            return new_p, new_m, new_v, t, loss

        self._step = torch.compile(train_step, fullgraph=True)

    def step(self) -> torch.Tensor:
        x, y = self.next_batch()
        self.params, self.m, self.v, self.t, loss = self._step(
            self.params, self.m, self.v, self.t, x, y
        )
        return loss

    def state_bytes(self) -> int:
        return tensor_bytes([self.params, self.m, self.v])


def lightfunc_train_step(workload: Workload, model: torch.nn.Module) -> Callable[..., Any]:
    """The step a lightfunc user writes for `workload`."""
    loss_fn = workload.loss_fn

    def train_step(
        state: lf.TrainState, batch: Batch
    ) -> tuple[lf.TrainState, dict[str, torch.Tensor]]:
        x, y = batch

        def loss_of(params: dict[str, torch.Tensor]) -> torch.Tensor:
            out, _ = lf.apply(model, params, state.buffers, x, train=True)
            return loss_fn(out, y)

        loss, grads = lf.value_and_grad(loss_of, loss_scale=state.loss_scale)(state.params)
        return state.apply_gradients(grads), {"loss": loss}

    return train_step


# Keyed by the workload object, held in the value too: keyed by its id alone, a freed
# workload's id could be taken by the next one, which would then get the old model's step.
_SHARED: dict[
    tuple[str, int, bool | str, bool],
    tuple[Workload, torch.nn.Module, lf.optim.GradientTransformation, lf.Step[Any]],
] = {}


def shared_step(
    workload: Workload, compile: bool | str, donate: bool = False
) -> tuple[torch.nn.Module, lf.optim.GradientTransformation, lf.Step[Any]]:
    """One model, optimizer and built step per workload and compile setting, shared by the lightfunc runners.

    Two builds of one step function over two model objects, or two states
    holding two optimizer objects, are two dynamo cache entries for one code
    object, and every call to the second entry first fails the guards of the
    first: a cost of holding several runners in one process, not of lightfunc.
    """
    key = (workload.name, id(workload), compile, donate)
    if key not in _SHARED:
        model = workload.make_model().to(workload.batches[0][0].device)
        tx = lf.optim.adamw(LR, b1=BETAS[0], b2=BETAS[1], eps=EPS, weight_decay=WEIGHT_DECAY)
        step = lf.build(lightfunc_train_step(workload, model), compile=compile, donate=donate)
        _SHARED[key] = workload, model, tx, step
    _, model, tx, step = _SHARED[key]
    return model, tx, step


class LightfuncStep(Runner):
    """`lf.build(train_step)` called in a bare Python loop."""

    name = "lightfunc_compiled"

    def __init__(
        self, workload: Workload, *, compile: bool | str = True, donate: bool = False
    ) -> None:
        super().__init__(workload)
        model, tx, self._step = shared_step(workload, compile, donate)
        self.state = lf.TrainState.create(model, tx)

    def step(self) -> torch.Tensor:
        self.state, metrics = self._step(self.state, self.next_batch())
        return metrics["loss"]

    def state_bytes(self) -> int:
        return tensor_bytes(self.state)


class LightfuncEager(LightfuncStep):
    name = "lightfunc_eager"

    def __init__(self, workload: Workload) -> None:
        super().__init__(workload, compile=False)


class LightfuncCompiledDonate(LightfuncStep):
    """`lf.build(train_step, donate=True)`: the new state written into the old one's storage."""

    name = "lightfunc_compiled_donate"

    def __init__(self, workload: Workload) -> None:
        super().__init__(workload, donate=True)


class LightfuncEagerDonate(LightfuncStep):
    name = "lightfunc_eager_donate"

    def __init__(self, workload: Workload) -> None:
        super().__init__(workload, compile=False, donate=True)


class LightfuncMaxAutotune(LightfuncStep):
    name = "lightfunc_max_autotune"

    def __init__(self, workload: Workload) -> None:
        super().__init__(workload, compile="max-autotune")


class LightfuncLoop(LightfuncStep):
    """The compiled step driven by `lf.loop` instead of a bare `for`: the loop's own overhead."""

    name = "lightfunc_loop"

    def __init__(self, workload: Workload) -> None:
        super().__init__(workload)
        self.trainer_state = lf.LoopState(state=self.state)

    def run(self, n: int) -> float:
        cpu, start = time.process_time(), time.perf_counter()
        target = self.trainer_state.step + n
        for ts in lf.loop(
            self._step, self.trainer_state, self.workload.batches, max_steps=target, max_epochs=None
        ):
            self.trainer_state = ts
        sync(self.device)
        self.last_cpu_s = time.process_time() - cpu
        return time.perf_counter() - start

    def first_losses(self, k: int) -> list[float]:
        losses = []
        target = self.trainer_state.step + k
        for ts in lf.loop(self._step, self.trainer_state, self.workload.batches, max_steps=target):
            losses.append(float(ts.metrics["loss"]))
            self.first_loss_at = self.first_loss_at or time.perf_counter()
            self.trainer_state = ts
        return losses

    def state_bytes(self) -> int:
        return tensor_bytes(self.trainer_state.state)


class _StepTimer(lf.callbacks.Callback):
    """Times steps 2..n of a `fit` call, like the Lightning runners' timer."""

    def __init__(self, first: int) -> None:
        self.first, self.start, self.end = first, 0.0, 0.0
        self.cpu_start, self.cpu_end = 0.0, 0.0

    def on_step_end(self, ls: lf.LoopState) -> None:
        if ls.step == self.first + 1:
            self.start, self.cpu_start = time.perf_counter(), time.process_time()
        self.end, self.cpu_end = time.perf_counter(), time.process_time()


class LightfuncFit(LightfuncStep):
    """`lf.fit` with its defaults (progress bar, summary, logger, last checkpoint), one call per window."""

    name = "lightfunc_fit"
    fit_kwargs: ClassVar[dict[str, Any]] = {}

    def __init__(self, workload: Workload) -> None:
        super().__init__(workload)
        self.trainer_state = lf.LoopState(state=self.state)
        self._root = tempfile.TemporaryDirectory(prefix="lightfunc-bench-fit-")
        self.root = self._root.name

    def close(self) -> None:
        # Each window's fit writes a logger version and a last checkpoint
        # (hundreds of MB over a run): removed with the runner.
        self._root.cleanup()

    def _fit(self, steps: int, timer: _StepTimer | None = None) -> lf.LoopState:
        kwargs = dict(self.fit_kwargs)
        if not kwargs.get("barebones"):
            kwargs.update(default_root_dir=self.root, callbacks=[timer] if timer else [])
        elif timer is not None:
            raise RuntimeError("barebones fit takes no callbacks; timed by the caller")
        with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
            return lf.fit(self._step, self.trainer_state, self.workload.batches,
                          max_steps=self.trainer_state.step + steps, max_epochs=None, **kwargs)  # fmt: skip

    def run(self, n: int) -> float:
        timer = _StepTimer(self.trainer_state.step)
        self.trainer_state = self._fit(n + 1, timer)
        sync(self.device)
        self.last_cpu_s = timer.cpu_end - timer.cpu_start
        return timer.end - timer.start

    def first_losses(self, k: int) -> list[float]:
        losses = []
        for _ in range(k):
            self.trainer_state = self._fit(1)
            losses.append(float(self.trainer_state.metrics["loss"]))
            self.first_loss_at = self.first_loss_at or time.perf_counter()
        return losses

    def state_bytes(self) -> int:
        return tensor_bytes(self.trainer_state.state)


class LightfuncFitBarebones(LightfuncFit):
    """`lf.fit(barebones=True)`: no bar, logger, summary or checkpoints; whole call timed."""

    name = "lightfunc_fit_barebones"
    fit_kwargs: ClassVar[dict[str, Any]] = {"barebones": True}

    def run(self, n: int) -> float:
        cpu, start = time.process_time(), time.perf_counter()
        self.trainer_state = self._fit(n)
        sync(self.device)
        self.last_cpu_s = time.process_time() - cpu
        return time.perf_counter() - start


RUNNERS: dict[str, type[Runner]] = {
    cls.name: cls
    for cls in (
        RawEager,
        RawCompiledModule,
        RawCompiledFunctional,
        LightfuncEager,
        LightfuncStep,
        LightfuncCompiledDonate,
        LightfuncEagerDonate,
        LightfuncMaxAutotune,
        LightfuncLoop,
        LightfuncFit,
        LightfuncFitBarebones,
    )
}
