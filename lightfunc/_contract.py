"""The contract every layer of lightfunc shares: the loop's record, metrics, steps, strategies.

Everything else imports its types from here (optax keeps its contract in
one `base.py` the same way), so data flows one way: user code and the
transforms below the loop, the loop above them, callbacks, loggers and the
checkpoint manager above the loop, all speaking these types.

    train_step(state, batch) -> (state, metrics)     # `TrainStep`
    eval_step(state, batch)  -> metrics              # `EvalStep`
    for ls in lightfunc.loop(step, state, data):     # yields `LoopState`s
        ...

`Metrics` are a dict of 0-d tensors, left on the device until someone reads
them. How each metric is combined over batches, micro-batches and ranks is
declared once, in `lightfunc._metrics`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Protocol, TypeVar, runtime_checkable

import torch

from ._tree import register_dataclass, replace_fields

S = TypeVar("S")
S_contra = TypeVar("S_contra", contravariant=True)

#: A step's metrics: name -> 0-d tensor, on the device, not synced.
Metrics = dict[str, torch.Tensor]


class TrainStep(Protocol[S]):
    """`train_step(state, batch) -> (new_state, metrics)`: pure, no in-place writes, no syncs."""

    def __call__(self, state: S, batch: Any, /) -> tuple[S, Metrics]: ...


class EvalStep(Protocol[S_contra]):
    """`eval_step(state, batch) -> metrics` (or, for `predict`, any outputs)."""

    def __call__(self, state: S_contra, batch: Any, /) -> Any: ...


@runtime_checkable
class Strategy(Protocol):
    """How a built step runs over processes, and how its states are placed and stored.

    One process is `lightfunc.SingleProcess`; `lightfunc.distributed.DDP(mesh)`
    and `FSDP(mesh)` are the others. `build(..., strategy=...)` wraps the
    step with it; `loop`, `fit` and `CheckpointManager` only ever call these
    methods, so they never branch on which strategy runs.

    Attributes:
        name: a short name for messages ("single", "ddp", "fsdp").
        world_size: number of processes taking part.
        rank: this process's global rank.
        is_writer: whether this process writes files that all ranks share
            (logs, checkpoint indexes): global rank 0.
        checkpoint_suffix: the name suffix of one checkpoint (".safetensors"
            for a file; "" for a sharded directory).
    """

    @property
    def name(self) -> str: ...

    @property
    def world_size(self) -> int: ...

    @property
    def rank(self) -> int: ...

    @property
    def is_writer(self) -> bool: ...

    @property
    def checkpoint_suffix(self) -> str: ...

    def wrap_train(
        self,
        fn: Callable[..., Any],
        *,
        sync: bool = True,
        metric_reductions: Mapping[str, str] | None = None,
    ) -> Callable[..., Any]:
        """`fn` (a train step) run under the strategy. `sync=False` for a micro-batch that
        does not complete an update (no buffer averaging); metrics are combined over the
        ranks by their reductions (`lightfunc._metrics`), `metric_reductions` overriding."""
        ...

    def wrap_eval(
        self, fn: Callable[..., Any], *, metric_reductions: Mapping[str, str] | None = None
    ) -> Callable[..., Any]:
        """`fn` (an eval or predict step) run under the strategy (metrics combined over ranks)."""
        ...

    def prepare(self, state: Any) -> Any:
        """`state` placed as the strategy needs it (sharded, ...); idempotent."""
        ...

    def save(self, tree: Any, path: Path, *, metadata: dict[str, Any] | None = None) -> Path:
        """Write `tree` (a `LoopState` or any state) at `path`; every rank calls it."""
        ...

    def load(self, path: Path, *, like: Any) -> Any:
        """Read what `save` wrote into the structure of `like`; every rank calls it."""
        ...

    def verify(self, path: Path) -> None:
        """Raise `lightfunc.CheckpointError` unless `path` is a complete, uncorrupted checkpoint."""
        ...

    def agree_to_stop(self, flag: bool) -> bool:
        """True on every rank when `flag` is True on any rank; every rank calls it.

        How the ranks agree to stop at a step boundary when a signal reached
        only some of them (`loop` calls it after every step while a callback
        handles interrupts, so that all of them save and stop together). One
        process returns `flag`; several reduce it with one small collective.
        """
        ...


@dataclasses.dataclass(frozen=True)
class LoopState:
    """A snapshot of a run, yielded by `lightfunc.loop` after every train step.

    Attributes:
        state: the user's state (a `TrainState` or any pytree), on the run's device.
        step: train steps the loop has run, over all epochs (host int).
        epoch: the current epoch, counted from 0 (host int).
        batch_idx: batches consumed in the current epoch (host int); equals
            the epoch's length right after its last batch.
        metrics: the last train step's metrics, device tensors, not synced.
        eval_metrics: the last evaluation's mean metrics (device tensors), or None.
        eval_at_step: the `step` at which `eval_metrics` were computed, or -1.
        epoch_end: True on the state yielded after the last batch of an epoch.
        callbacks: each stateful callback's `state_dict()`, by `state_key`
            (saved in checkpoints, handed back to the callbacks on resume).
        strategy: the `Strategy` the run's step was built with (static: not
            a leaf, never saved); None for one process.
    """

    state: Any
    step: int = 0
    epoch: int = 0
    batch_idx: int = 0
    metrics: Metrics = dataclasses.field(default_factory=dict)
    eval_metrics: Metrics | None = None
    eval_at_step: int = -1
    epoch_end: bool = False
    callbacks: dict[str, Any] = dataclasses.field(default_factory=dict)
    strategy: Strategy | None = None

    @property
    def evaluated(self) -> bool:
        """True on the state yielded right after an evaluation ran."""
        return self.eval_at_step == self.step

    def metric(self, name: str) -> torch.Tensor | None:
        """The metric called `name`: `"val_<m>"` is evaluation metric `m`, anything else a
        train metric; None when it is not there (yet). Not synced.

        Evaluation metrics are found under their own name when the eval step
        already returns them prefixed (`{"val_loss": ...}` is `"val_loss"`,
        not `"val_val_loss"`).
        """
        evals = self.eval_metrics or {}
        if name in evals and name.startswith("val_"):
            return evals[name]
        if name.startswith("val_"):
            return evals.get(name[4:])
        return self.metrics.get(name)

    def replace(self, **changes: Any) -> LoopState:
        """A copy with the given fields replaced (like `dataclasses.replace`, faster: it runs every step)."""
        unknown = changes.keys() - _LOOP_FIELDS
        if unknown:
            raise TypeError(
                f"LoopState has no field(s) {sorted(unknown)}; fields are {sorted(_LOOP_FIELDS)}."
            )
        return replace_fields(self, **changes)


def eval_metric_name(name: str) -> str:
    """The name evaluation metric `name` is shown and logged under: `"val_<name>"`.

    A metric the eval step already calls `"val_..."` keeps its name (not
    `"val_val_..."`): the reverse of `LoopState.metric`.
    """
    return name if name.startswith("val_") else f"val_{name}"


# Counters are children (int leaves), so a checkpoint of a LoopState holds them;
# the strategy is static: it says how to store the state, it is not part of it.
register_dataclass(LoopState, static=("strategy",))
_LOOP_FIELDS = frozenset(f.name for f in dataclasses.fields(LoopState))
