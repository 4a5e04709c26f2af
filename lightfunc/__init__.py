"""lightfunc: functional-style training for PyTorch.

Write `train_step(state, batch) -> (state, metrics)` as a pure function;
lightfunc compiles it, runs it in a generator loop that yields immutable
loop states, and keeps the run reproducible.

    import lightfunc as lf
    state = lf.TrainState.create(model, lf.optim.adamw(1e-3))
    step = lf.build(train_step)
    for ls in lf.loop(step, state, loader, max_epochs=3):
        ...

This module only re-exports; nothing inside the package imports it (the
version lives in `lightfunc._version`). Renamed names still resolve here for
one release, with a `DeprecationWarning` naming the new one.
"""

import warnings
from typing import Any

from . import callbacks as callbacks
from . import loggers as loggers
from . import optim as optim
from . import tune as tune
from ._build import Step as Step
from ._build import build as build
from ._build import build_eval as build_eval
from ._checkpoint import CheckpointError as CheckpointError
from ._checkpoint import load as load
from ._checkpoint import read_metadata as read_metadata
from ._checkpoint import save as save
from ._compile import CompileOptions as CompileOptions
from ._compile import compile_counts as compile_counts
from ._compile import compile_regions as compile_regions
from ._compile_cache import CompileCacheInfo as CompileCacheInfo
from ._compile_cache import load_compile_cache as load_compile_cache
from ._compile_cache import save_compile_cache as save_compile_cache
from ._compose import ensemble as ensemble
from ._compose import member_count as member_count
from ._compose import per_example_grads as per_example_grads
from ._compose import stack_states as stack_states
from ._compose import unstack_states as unstack_states
from ._compose import vmap_members as vmap_members
from ._contract import EvalStep as EvalStep
from ._contract import LoopState as LoopState
from ._contract import Metrics as Metrics
from ._contract import Strategy as Strategy
from ._contract import TrainStep as TrainStep
from ._data import Loader as Loader
from ._device import resolve_device as resolve_device
from ._device import to_device as to_device
from ._donate import DonatedStateError as DonatedStateError
from ._evaluate import evaluate as evaluate
from ._evaluate import predict as predict
from ._fit import fit as fit
from ._func import apply as apply
from ._func import buffers_of as buffers_of
from ._func import params_of as params_of
from ._func import value_and_grad as value_and_grad
from ._lightning_ckpt import from_lightning_checkpoint as from_lightning_checkpoint
from ._loop import loop as loop
from ._manager import CheckpointManager as CheckpointManager
from ._params_file import load_params as load_params
from ._params_file import save_params as save_params
from ._precision import LossScale as LossScale
from ._precision import Policy as Policy
from ._precision import cast_tree as cast_tree
from ._precision import parse_precision as parse_precision
from ._precision import select_if_finite as select_if_finite
from ._rng import RngKey as RngKey
from ._seed import seed_everything as seed_everything
from ._seed import seed_worker as seed_worker
from ._state import TrainState as TrainState
from ._strategy import SingleProcess as SingleProcess
from ._tree import register_dataclass as register_dataclass
from ._tree import tree_leaves as tree_leaves
from ._tree import tree_map as tree_map
from ._version import __version__ as __version__

# Old name -> (new spelling, shown in the warning; its value).
_DEPRECATED = {
    "TrainerState": ("lightfunc.LoopState", LoopState),
    "ProgressBar": ("lightfunc.callbacks.ProgressBar", callbacks.ProgressBar),
    "export_params": ("lightfunc.save_params", save_params),
    "policy": ("lightfunc.parse_precision", parse_precision),
    # lightfunc.optim.apply_if_finite is now the optimizer wrapper of that name.
    "apply_if_finite": ("lightfunc.select_if_finite", select_if_finite),
}


def __getattr__(name: str) -> Any:
    """The renamed public names, for one release: warn, then return the new object.

    Raises:
        AttributeError: `name` is neither a public name nor a deprecated one.
    """
    if name not in _DEPRECATED:
        raise AttributeError(f"module 'lightfunc' has no attribute {name!r}")
    new, value = _DEPRECATED[name]
    warnings.warn(
        f"`lightfunc.{name}` is deprecated and will be removed in the next release; use `{new}`.",
        DeprecationWarning,
        stacklevel=2,
    )
    return value
