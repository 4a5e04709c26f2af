"""lightfunc on several processes: ranks and collectives, data-parallel and fully-sharded steps.

    import lightfunc as lf
    import lightfunc.distributed as lfd

    mesh = lfd.init_mesh()                          # from `lightfunc run`'s environment, or 1 process
    loader = lf.Loader(data, 32, rank=mesh.global_rank, world_size=mesh.world_size)
    step = lf.build(train_step, strategy=lfd.DDP(mesh))     # or lfd.FSDP(mesh)
    for ls in lf.loop(step, state, loader, max_epochs=3):
        ...

The same script runs on one process (`python train.py`: a one-process mesh,
every transform returns its step unchanged) or N (`lightfunc run
--nproc-per-node N train.py`, or `launch(fn, nproc_per_node=N)` from Python).
Sharded states are checkpointed with `save_sharded` / `load_sharded`
(resharding to any world size) and exported with `export_full`.
"""

from typing import TYPE_CHECKING, Any

from ._checkpoint import export_full as export_full
from ._checkpoint import load_sharded as load_sharded
from ._checkpoint import save_sharded as save_sharded
from ._checkpoint import verify_sharded as verify_sharded
from ._data import setup_dataloader as setup_dataloader
from ._dp import data_parallel as data_parallel
from ._dp import data_parallel_eval as data_parallel_eval
from ._dp import reduce_gradients as reduce_gradients
from ._launch import launch as launch
from ._mesh import Mesh as Mesh
from ._mesh import init_mesh as init_mesh
from ._strategies import DDP as DDP
from ._strategies import FSDP as FSDP
from ._strategies import strategy_from_name as strategy_from_name

if TYPE_CHECKING:
    from ._fsdp import fully_sharded as fully_sharded
    from ._fsdp import fully_sharded_eval as fully_sharded_eval
    from ._fsdp import gather_state as gather_state
    from ._fsdp import set_units as set_units
    from ._fsdp import shard_state as shard_state
    from ._sharded_init import init_sharded as init_sharded

# The fully-sharded names import DTensor (about 1.4 s): only when first used.
_FSDP = ("fully_sharded", "fully_sharded_eval", "gather_state", "set_units", "shard_state")


def __getattr__(name: str) -> Any:
    if name in _FSDP:
        from . import _fsdp

        return getattr(_fsdp, name)
    if name == "init_sharded":
        from . import _sharded_init

        return _sharded_init.init_sharded
    raise AttributeError(f"module 'lightfunc.distributed' has no attribute {name!r}")
