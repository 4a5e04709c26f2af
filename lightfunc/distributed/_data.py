"""Each rank its own slice of the data: a `DistributedSampler` put into a plain DataLoader.

    loader = lightfunc.distributed.setup_dataloader(DataLoader(ds, batch_size=32, shuffle=True), mesh)

Lightning Fabric's `setup_dataloaders`, for plain `torch.utils.data.DataLoader`s.
A `lightfunc.Loader` shards itself: give it `rank=mesh.global_rank,
world_size=mesh.world_size`, and it also resumes mid-epoch without reading
the batches already seen.
"""

from __future__ import annotations

from typing import Any

from torch.utils.data import (
    BatchSampler,
    DataLoader,
    IterableDataset,
    RandomSampler,
    SequentialSampler,
)
from torch.utils.data.distributed import DistributedSampler

from ._mesh import Mesh
from ._states import check_mesh


def setup_dataloader(dataloader: DataLoader[Any], mesh: Mesh, *, seed: int = 0) -> DataLoader[Any]:
    """`dataloader` re-made to read this rank's slice of every epoch.

    The new DataLoader keeps the batch size, workers, collate function and
    other options, with a `DistributedSampler` in place of the sampler:
    shuffled (seeded by `seed` and the epoch, which `lightfunc.loop` sets
    each epoch) if the original shuffled, in order otherwise. Each rank
    gets `ceil(len(dataset) / world_size)` examples per epoch, the first
    ones repeated to fill up the last ranks, or, with the DataLoader's
    `drop_last=True`, `floor(len(dataset) / world_size)` (the rest dropped):
    every rank runs the same number of steps.

    Args:
        dataloader: a plain `torch.utils.data.DataLoader` over a map-style
            dataset, with the default sampler (`shuffle=True` or False).
        mesh: the ranks. On a one-process mesh `dataloader` is returned as it is.
        seed: the shuffling seed, the same on every rank.

    Returns:
        A new `DataLoader` (the given one is left as it is); one already
        using a `DistributedSampler` is returned unchanged.

    Raises:
        TypeError: not a plain `DataLoader`, or a custom sampler or batch
            sampler (shard it yourself, or use `lightfunc.Loader`).
        ValueError: an iterable-style dataset, which cannot be sharded by index.
    """
    check_mesh(mesh, "setup_dataloader")
    if type(dataloader) is not DataLoader:
        raise TypeError(
            f"`setup_dataloader` re-makes plain torch.utils.data.DataLoaders, got "
            f"{type(dataloader).__name__}. Pass a DataLoader, or build a "
            f"lightfunc.Loader(..., rank=mesh.global_rank, world_size=mesh.world_size)."
        )
    if isinstance(dataloader.sampler, DistributedSampler):
        return dataloader
    # Checked on one process too, so that a script fails the same way on 1 or N.
    if isinstance(dataloader.dataset, IterableDataset):
        raise ValueError(
            "`setup_dataloader` cannot shard an IterableDataset by index: make the dataset "
            "yield only this rank's examples (mesh.global_rank of mesh.world_size)."
        )
    if type(dataloader.batch_sampler) is not BatchSampler:
        raise TypeError(
            f"`setup_dataloader` replaces the default sampler, but this DataLoader has a custom "
            f"batch_sampler ({type(dataloader.batch_sampler).__name__}). Give each rank its own "
            f"batches yourself, or use a lightfunc.Loader."
        )
    if not isinstance(dataloader.sampler, RandomSampler | SequentialSampler):
        raise TypeError(
            f"`setup_dataloader` replaces the default sampler, but this DataLoader has a custom "
            f"sampler ({type(dataloader.sampler).__name__}). Shard it yourself (e.g. wrap it in a "
            f"DistributedSampler) or use a lightfunc.Loader."
        )
    if not mesh.is_distributed:
        return dataloader
    sampler: DistributedSampler[Any] = DistributedSampler(
        dataloader.dataset,
        num_replicas=mesh.world_size,
        rank=mesh.global_rank,
        shuffle=isinstance(dataloader.sampler, RandomSampler),
        seed=seed,
        drop_last=dataloader.drop_last,
    )
    options: dict[str, Any] = dict(
        batch_size=dataloader.batch_size,
        sampler=sampler,
        num_workers=dataloader.num_workers,
        collate_fn=dataloader.collate_fn,
        pin_memory=dataloader.pin_memory,
        drop_last=dataloader.drop_last,
        timeout=dataloader.timeout,
        worker_init_fn=dataloader.worker_init_fn,
        multiprocessing_context=dataloader.multiprocessing_context,
        generator=dataloader.generator,
        persistent_workers=dataloader.persistent_workers,
        pin_memory_device=dataloader.pin_memory_device,
    )
    if dataloader.num_workers > 0:
        options["prefetch_factor"] = dataloader.prefetch_factor
    return DataLoader(dataloader.dataset, **options)
