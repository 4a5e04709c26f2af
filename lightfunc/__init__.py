"""lightfunc: functional-style training for PyTorch.

Write `train_step(state, batch) -> (state, metrics)` as a pure function;
lightfunc compiles it, runs it in a generator loop that yields immutable
trainer states, and keeps the run reproducible.

    import lightfunc as lf
    state = lf.TrainState.create(model, lf.optim.adamw(1e-3))
    step = lf.build(train_step)
    for ts in lf.loop(step, state, loader, max_epochs=3):
        ...
"""

from . import callbacks as callbacks
from . import loggers as loggers
from . import optim as optim
from ._build import Step as Step
from ._build import build as build
from ._build import build_eval as build_eval
from ._checkpoint import CheckpointError as CheckpointError
from ._checkpoint import load as load
from ._checkpoint import read_metadata as read_metadata
from ._checkpoint import save as save
from ._compile import CompileOptions as CompileOptions
from ._compile import compile_counts as compile_counts
from ._compose import ensemble as ensemble
from ._compose import member_count as member_count
from ._compose import per_example_grads as per_example_grads
from ._compose import stack_states as stack_states
from ._compose import unstack_states as unstack_states
from ._compose import vmap_members as vmap_members
from ._data import Loader as Loader
from ._device import resolve_device as resolve_device
from ._device import to_device as to_device
from ._fit import fit as fit
from ._func import apply as apply
from ._func import buffers_of as buffers_of
from ._func import params_of as params_of
from ._func import value_and_grad as value_and_grad
from ._loop import TrainerState as TrainerState
from ._loop import evaluate as evaluate
from ._loop import loop as loop
from ._loop import predict as predict
from ._manager import CheckpointManager as CheckpointManager
from ._params_file import export_params as export_params
from ._params_file import load_params as load_params
from ._precision import LossScale as LossScale
from ._precision import Policy as Policy
from ._precision import apply_if_finite as apply_if_finite
from ._precision import cast_tree as cast_tree
from ._precision import policy as policy
from ._rng import RngKey as RngKey
from ._seed import seed_everything as seed_everything
from ._seed import seed_worker as seed_worker
from ._state import TrainState as TrainState
from ._tree import register_dataclass as register_dataclass
from ._tree import tree_leaves as tree_leaves
from ._tree import tree_map as tree_map
from .callbacks import ProgressBar as ProgressBar

__version__ = "0.1.0.dev0"
