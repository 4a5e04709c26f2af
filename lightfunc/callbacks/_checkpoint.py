"""`ModelCheckpoint`: the checkpoint manager under Lightning's name, as a callback;
`SaveHyperparameters`: hyper-parameters carried in every checkpoint."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .._callback import Callback
from .._manager import CheckpointManager

if TYPE_CHECKING:
    from .._contract import LoopState

# Lightning arguments with no lightfunc counterpart, and what to write instead.
_INSTEAD = {
    "save_weights_only": (
        "a lightfunc checkpoint is the whole resumable run (weights, optimizer state, counters); "
        "for the weights alone, write the final state with `lf.save_params(state, path)` (a "
        "plain safetensors state dict)"
    ),
    "auto_insert_metric_name": (
        "the `filename` template names its fields itself: write e.g. "
        '`filename="epoch={epoch}-val_loss={val_loss:.3f}"`'
    ),
    "train_time_interval": "save on steps instead: `every_n_steps=`",
    "save_on_train_epoch_end": (
        '`every_n_epochs=` saves at epoch ends, and a `monitor="val_..."` checkpoint after '
        "every evaluation"
    ),
    "enable_version_counter": (
        "`lf.fit` writes each run into its own `version_N` directory, and checkpoint names "
        "carry the step, so names never collide"
    ),
}


class ModelCheckpoint(CheckpointManager):
    """Save checkpoints on a schedule; see `lightfunc.CheckpointManager` for the arguments.

    It is a `CheckpointManager` (which is a callback) under Lightning's name
    and with Lightning's `dirpath`: passed in `callbacks`, it saves after
    all callbacks have run, so checkpoints hold their state (an
    `EarlyStopping`'s patience counter, ...). It also handles interrupts: on
    SIGTERM the last completed step is saved and the run stops. Passed to
    `lf.fit`, it replaces fit's default checkpointing (as in Lightning).

    Lightning's spellings are accepted: `every_n_train_steps` (lightfunc's
    `every_n_steps`) and `verbose` (print each path saved). Lightning
    arguments with no counterpart (`save_weights_only`,
    `auto_insert_metric_name`, `train_time_interval`,
    `save_on_train_epoch_end`, `enable_version_counter`) raise a `TypeError`
    saying what to write instead.

    Example:
        >>> import tempfile, lightfunc as lf
        >>> cb = lf.callbacks.ModelCheckpoint(tempfile.mkdtemp(), monitor="val_loss", save_top_k=2)
    """

    def __init__(
        self,
        dirpath: str | os.PathLike[str],
        *,
        every_n_train_steps: int | None = None,
        verbose: bool = False,
        **manager_kwargs: Any,
    ) -> None:
        for name in manager_kwargs:
            if name in _INSTEAD:
                raise TypeError(
                    f"ModelCheckpoint has no `{name}` (Lightning's has): {_INSTEAD[name]}."
                )
        if every_n_train_steps is not None:
            if manager_kwargs.get("every_n_steps") is not None:
                raise ValueError(
                    "`every_n_train_steps` (Lightning's name) and `every_n_steps` are the same "
                    "option; give one of them."
                )
            manager_kwargs["every_n_steps"] = every_n_train_steps
        if dirpath is None:
            raise TypeError(
                "`dirpath` is required: lightfunc does not guess a directory. Pass e.g. "
                '`ModelCheckpoint("runs/my_run/checkpoints", ...)`.'
            )
        super().__init__(dirpath, **manager_kwargs)
        self.verbose = verbose

    def save(self, ls: LoopState, *, reason: str = "scheduled") -> Path:
        path = super().save(ls, reason=reason)
        if self.verbose and (ls.strategy is None or ls.strategy.is_writer):
            print(f"ModelCheckpoint: step {ls.step} saved to {path}", flush=True)
        return path

    @property
    def manager(self) -> CheckpointManager:
        """The manager: this object itself (kept for code written when it wrapped one)."""
        return self

    @property
    def best_model_path(self) -> Path | None:
        """The best kept checkpoint by `monitor` (Lightning's name); None without `monitor`."""
        return self.best()

    @property
    def best_model_score(self) -> float | None:
        """The `monitor` value of `best_model_path` (Lightning's name), or None."""
        best = self.best()
        scores = self.best_k_models
        return None if best is None else scores.get(best)

    @property
    def best_k_models(self) -> dict[Path, float]:
        """Path -> `monitor` value of each kept checkpoint with a score (Lightning's name).

        With `save_top_k=k` these are the k best; without `monitor`, empty.
        """
        if self.monitor is None:
            return {}
        return {
            self.directory / e["path"]: float(e["score"])
            for e in self.entries
            if e.get("score") is not None and not math.isnan(e["score"])
        }

    @property
    def last_model_path(self) -> Path | None:
        """The newest checkpoint that verifies."""
        return self.latest()


class SaveHyperparameters(Callback):
    """Carry hyper-parameters in every checkpoint of the run (Lightning's `save_hyperparameters`).

    Its state, the hyper-parameters as one JSON string, is part of every
    `LoopState` the loop yields, so every checkpoint a `CheckpointManager`
    (or `lf.fit`) writes holds it, readable without lightfunc: the
    safetensors header's `leaves` metadata has an entry with path
    `callbacks.hparams.hparams` whose `value` is the JSON. `lf.fit(...,
    hparams=config)` installs one. On resume the hyper-parameters given now
    are kept (the saved ones are not read back).

    Args:
        hparams: a mapping of JSON values (a dataclass: `dataclasses.asdict(config)`;
            argparse: `vars(args)`).

    Raises:
        TypeError: `hparams` is not a mapping of JSON values.

    Example:
        >>> import lightfunc as lf
        >>> cb = lf.callbacks.SaveHyperparameters({"lr": 1e-3, "layers": 4})
    """

    def __init__(self, hparams: Any) -> None:
        from collections.abc import Mapping

        if not isinstance(hparams, Mapping):
            raise TypeError(
                f"`hparams` must be a dict of JSON values, got {type(hparams).__name__}. For a "
                f"dataclass pass `dataclasses.asdict(config)`, for argparse `vars(args)`."
            )
        try:
            self.text = json.dumps(dict(hparams), sort_keys=True)
        except (TypeError, ValueError) as error:
            raise TypeError(
                f"`hparams` must hold JSON values (str, int, float, bool, None, lists, dicts): "
                f"{error}. Convert the others (e.g. `str(path)`)."
            ) from None
        self.hparams = json.loads(self.text)

    @property
    def state_key(self) -> str:
        return "hparams"

    def state_dict(self) -> dict[str, Any]:
        return {"hparams": self.text}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        return None  # the hyper-parameters of this run are the ones given now
