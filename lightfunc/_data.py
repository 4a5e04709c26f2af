"""A resumable loader: the order of every epoch is a pure function of (seed, epoch).

    loader = lightfunc.Loader((x, y), batch_size=64, seed=0)
    for ts in lightfunc.loop(step, state, loader, max_epochs=10):
        ...

Because epoch `e`'s order depends on nothing but `seed` and `e`, a `Loader`
carries no state that a checkpoint must save: `lightfunc.loop` resumes it by
calling `loader.iter_from(ts.epoch, ts.batch_idx)`, which computes the
remaining batches' indices directly and never reads the batches already
trained on. The seed is configuration (build the resumed run's loader with the
same one); the epoch and the position within it live in the `LoopState`,
and so in its checkpoints. That is why `Loader` has no `state_dict`.

A tensor, or a tuple of tensors sharing their leading dimension, is batched
by indexing each tensor with the batch's index tensor: no per-example
`__getitem__`, no collate. Any other map-style dataset (`__len__` and
`__getitem__`) is read example by example and collated, in this process or,
with `num_workers > 0`, by a `torch.utils.data.DataLoader`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Any, Protocol

import torch
from torch.utils.data import DataLoader, IterableDataset, TensorDataset, default_collate

from ._seed import seed_worker
from ._tree import tree_map

_MASK64 = (1 << 64) - 1


class MapDataset(Protocol):
    """A map-style dataset: `len(dataset)` examples, `dataset[i]` for `i` in `range(len(dataset))`."""

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> Any: ...


class Loader:
    """Batches of a dataset in a seeded order that a run can resume mid-epoch, exactly.

    Args:
        dataset: a tensor, a tuple of tensors with the same leading dimension
            (or a `TensorDataset`): batches are those tensors indexed with the
            batch's indices (a tensor, or a tuple). Or a map-style dataset
            (`__len__` and `__getitem__`; a list of examples works): batches
            are `collate_fn([dataset[i] for i in indices])`. A tuple is
            always read as tensor columns, never as a sequence of examples.
        batch_size: examples per batch, per rank.
        shuffle: shuffle each epoch (`torch.randperm` seeded by a hash of
            `seed` and the epoch); False keeps the dataset's order.
        seed: the order's seed, an int >= 0. Same seed, same orders.
        drop_last: drop the last, smaller batch of each epoch, and drop
            (rather than repeat) the examples that do not divide evenly over
            the ranks. A dropped last batch also keeps a compiled step at one
            input shape.
        collate_fn: for map-style datasets, turns a list of examples into a
            batch; defaults to `torch.utils.data.default_collate`. Not
            accepted with tensor datasets, which need none.
        num_workers: for map-style datasets, fetch batches in this many worker
            processes through a `torch.utils.data.DataLoader` (seeded: see
            `iter_from`). Tensor datasets ignore it: indexing a tensor is
            faster than shipping its rows between processes.
        pin_memory: pin each batch's CPU tensors (faster, asynchronous copies
            to a GPU). Ignored when CUDA is not available.
        rank: this process's rank among `world_size` data-parallel ranks.
        world_size: ranks that share each epoch. Rank `r` takes every
            `world_size`-th index of the epoch's order, starting at `r`. So
            that every rank runs the same number of steps, an order that does
            not divide evenly is padded by repeating its first indices (as
            `torch.utils.data.DistributedSampler` does), or, with
            `drop_last=True`, cut at the last multiple of `world_size`.

    Raises:
        TypeError: for a dataset without `__len__` or `__getitem__`, a tuple
            holding something other than tensors, or an argument of the wrong type.
        ValueError: for an empty dataset, tensors of different lengths,
            `batch_size < 1`, `world_size < 1`, `rank` outside
            `[0, world_size)`, `num_workers < 0`, a `collate_fn` with a tensor
            dataset, or `drop_last=True` leaving no batch.

    `len(loader)` is the number of batches in each epoch on this rank.
    Iterating a `Loader` yields the batches of its current epoch, which
    `set_epoch` changes (`lightfunc.loop` calls it, and resumes with
    `iter_from`); like `DistributedSampler`, iterating twice without
    `set_epoch` repeats the same order.

    Example:
        >>> x, y = torch.randn(10, 3), torch.arange(10)
        >>> loader = Loader((x, y), batch_size=4, shuffle=False)
        >>> [len(xb) for xb, yb in loader]
        [4, 4, 2]
        >>> [yb.tolist() for _, yb in loader.iter_from(0, 2)]
        [[8, 9]]
    """

    def __init__(
        self,
        dataset: torch.Tensor | tuple[torch.Tensor, ...] | MapDataset,
        batch_size: int,
        *,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
        collate_fn: Callable[[list[Any]], Any] | None = None,
        num_workers: int = 0,
        pin_memory: bool = False,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        _check_int("batch_size", batch_size, minimum=1)
        _check_int("seed", seed, minimum=0)
        _check_int("num_workers", num_workers, minimum=0)
        _check_int("world_size", world_size, minimum=1)
        _check_int("rank", rank, minimum=0)
        if rank >= world_size:
            raise ValueError(
                f"`rank={rank}` is out of range for `world_size={world_size}`: ranks run from "
                f"0 to {world_size - 1}. Pass the process's rank and the number of data-parallel ranks."
            )
        self._tensors, self._single = _columns(dataset)
        if collate_fn is None:
            _check_not_columns_in_a_list(dataset)
        self._dataset = dataset
        n = _length(dataset, self._tensors)
        if self._tensors is not None and collate_fn is not None:
            raise ValueError(
                "`collate_fn` was given with a tensor dataset, whose batches are indexed straight "
                "from the tensors (no list of examples to collate). Drop `collate_fn`, or transform "
                "the batch in the step."
            )
        if collate_fn is not None and not callable(collate_fn):
            raise TypeError(f"`collate_fn` must be callable, got {collate_fn!r}.")
        self._n = n
        self._batch_size = batch_size
        self._shuffle = bool(shuffle)
        self._seed = seed
        self._drop_last = bool(drop_last)
        self._collate: Callable[[list[Any]], Any] = collate_fn or default_collate
        self._num_workers = num_workers
        self._pin_memory = bool(pin_memory)
        self._rank = rank
        self._world_size = world_size
        self._epoch = 0
        # Examples each rank sees per epoch, then whole-or-partial batches of them.
        if drop_last:
            self._per_rank = n // world_size
            self._len = self._per_rank // batch_size
        else:
            self._per_rank = math.ceil(n / world_size)
            self._len = math.ceil(self._per_rank / batch_size)
        if self._len == 0:
            raise ValueError(
                f"`drop_last=True` leaves no batch: {n} examples over {world_size} rank(s) give "
                f"{self._per_rank} per rank, fewer than `batch_size={batch_size}`. Lower "
                f"`batch_size` or set `drop_last=False`."
            )

    @property
    def batch_size(self) -> int:
        """Examples per batch, per rank."""
        return self._batch_size

    @property
    def seed(self) -> int:
        """The seed of every epoch's order."""
        return self._seed

    @property
    def epoch(self) -> int:
        """The epoch that iterating the loader yields (see `set_epoch`)."""
        return self._epoch

    def __len__(self) -> int:
        """Batches per epoch on this rank."""
        return self._len

    def __repr__(self) -> str:
        kind = "tensors" if self._tensors is not None else type(self._dataset).__name__
        return (
            f"Loader({kind} of {self._n}, batch_size={self._batch_size}, shuffle={self._shuffle}, "
            f"seed={self._seed}, drop_last={self._drop_last}, rank={self._rank}, "
            f"world_size={self._world_size})"
        )

    def set_epoch(self, epoch: int) -> None:
        """Make iteration yield epoch `epoch`'s order (`DistributedSampler.set_epoch`'s contract)."""
        _check_int("epoch", epoch, minimum=0)
        self._epoch = epoch

    def __iter__(self) -> Iterator[Any]:
        """The batches of the current epoch (`iter_from(self.epoch, 0)`)."""
        return self.iter_from(self._epoch, 0)

    def indices(self, epoch: int) -> torch.Tensor:
        """This rank's example indices for epoch `epoch`, in order: 1-D int64, `len(self)` batches' worth."""
        _check_int("epoch", epoch, minimum=0)
        if self._shuffle:
            generator = torch.Generator().manual_seed(_mix(self._seed, epoch))
            order = torch.randperm(self._n, generator=generator)
        else:
            order = torch.arange(self._n)
        total = self._per_rank * self._world_size
        if total > self._n:  # pad with the order's first indices, repeated as often as needed
            order = order.repeat(math.ceil(total / self._n))
        mine = order[:total][self._rank :: self._world_size]
        return mine[: self._len * self._batch_size]

    def iter_from(self, epoch: int, position: int) -> Iterator[Any]:
        """The batches of epoch `epoch` from batch `position` on, without reading the ones before.

        Args:
            epoch: the epoch, counted from 0 (`LoopState.epoch`).
            position: batches of that epoch already consumed, in
                `[0, len(self)]` (`LoopState.batch_idx`).

        Returns:
            An iterator over the batches `position, position + 1, ...` of the
            epoch: the same batches, in the same order, as the tail of
            `iter_from(epoch, 0)`.

        Raises:
            ValueError: if `epoch < 0` or `position` is outside `[0, len(self)]`.

        With `num_workers > 0`, the `DataLoader`'s generator is seeded from
        `(seed, epoch)`, so each worker's torch seed (and, through
        `lightfunc.seed_worker`, its `random` and NumPy seeds) is the same in
        every run. Which worker fetches a batch does depend on `position`, so
        random augmentation in workers repeats exactly on resume only if it
        derives its randomness from the example index.
        """
        _check_int("epoch", epoch, minimum=0)
        _check_int("position", position, minimum=0)
        if position > self._len:
            raise ValueError(
                f"`position={position}` is past the end of the epoch ({self._len} batches). A "
                f"resumed run must use the dataset, `batch_size`, `drop_last` and `world_size` "
                f"it was checkpointed with."
            )
        remaining = self.indices(epoch)[position * self._batch_size :]
        batches = remaining.split(self._batch_size) if len(remaining) else ()
        if self._tensors is not None:
            return self._tensor_batches(self._tensors, batches)
        if self._num_workers == 0:
            return self._collated_batches(batches)
        return self._worker_batches(batches, epoch)

    def _tensor_batches(
        self, tensors: tuple[torch.Tensor, ...], batches: tuple[torch.Tensor, ...]
    ) -> Iterator[Any]:
        for index in batches:
            columns = tuple(t.index_select(0, index.to(t.device)) for t in tensors)
            yield self._pin(columns[0] if self._single else columns)

    def _collated_batches(self, batches: tuple[torch.Tensor, ...]) -> Iterator[Any]:
        # DataLoader's fetcher reads a whole batch at once through `__getitems__` when a dataset has one.
        getitems = getattr(self._dataset, "__getitems__", None)
        for index in batches:
            keys = index.tolist()
            examples = getitems(keys) if callable(getitems) else [self._dataset[i] for i in keys]
            yield self._pin(self._collate(examples))

    def _worker_batches(self, batches: tuple[torch.Tensor, ...], epoch: int) -> Iterator[Any]:
        # A generator, so that workers start on the first batch asked for, not before.
        if not batches:
            return
        loader: DataLoader[Any] = DataLoader(
            self._dataset,  # type: ignore[arg-type]
            batch_sampler=[b.tolist() for b in batches],
            num_workers=self._num_workers,
            collate_fn=self._collate,
            pin_memory=self._pin_memory and torch.cuda.is_available(),
            worker_init_fn=seed_worker,
            generator=torch.Generator().manual_seed(_mix(self._seed, epoch, 1)),
        )
        yield from loader

    def _pin(self, batch: Any) -> Any:
        if not (self._pin_memory and torch.cuda.is_available()):
            return batch
        return tree_map(_pinned, batch)


def _pinned(x: Any) -> Any:
    return x.pin_memory() if isinstance(x, torch.Tensor) and x.device.type == "cpu" else x


def _columns(dataset: Any) -> tuple[tuple[torch.Tensor, ...] | None, bool]:
    """The dataset's tensors and whether it was a single tensor; (None, False) for a map-style dataset."""
    if isinstance(dataset, torch.Tensor):
        tensors: tuple[torch.Tensor, ...] = (dataset,)
    elif isinstance(dataset, TensorDataset):
        tensors = tuple(dataset.tensors)
    elif isinstance(dataset, tuple):
        bad = [i for i, t in enumerate(dataset) if not isinstance(t, torch.Tensor)]
        if not dataset or bad:
            what = f"holds a {type(dataset[bad[0]]).__name__} at [{bad[0]}]" if bad else "is empty"
            raise TypeError(
                f"a tuple `dataset` is read as columns of tensors, but it {what}. Pass tensors "
                f"with a shared leading dimension, or a list of examples for a map-style dataset."
            )
        tensors = dataset
    else:
        return None, False
    for i, t in enumerate(tensors):
        if t.ndim == 0 or t.shape[0] != tensors[0].shape[0]:
            shapes = ", ".join(f"dataset[{j}]: {tuple(u.shape)}" for j, u in enumerate(tensors))
            raise ValueError(
                f"the tensors of `dataset` must share their leading (example) dimension, but "
                f"`dataset[{i}]` has shape {tuple(t.shape)} ({shapes}). Give every tensor one row "
                f"per example."
            )
    return tensors, isinstance(dataset, torch.Tensor)


def _check_not_columns_in_a_list(dataset: Any) -> None:
    """Refuse `[x, y]`: a few tensors of different shapes sharing their leading dimension.

    A list is read as examples, so `Loader([x, y], 16)` would be a dataset of
    two examples whose batches fail to stack only when iterated. Lists of
    same-shaped tensors (real examples, or columns that cannot be told from
    them) pass.
    """
    if type(dataset) is not list or not 2 <= len(dataset) <= 16:
        return
    if not all(isinstance(t, torch.Tensor) and t.ndim >= 1 for t in dataset):
        return
    shapes = [tuple(t.shape) for t in dataset]
    if len(set(shapes)) > 1 and len({s[0] for s in shapes}) == 1 and shapes[0][0] > len(dataset):
        names = ", ".join(f"t{i}" for i in range(len(dataset)))
        raise TypeError(
            f"`dataset` is a list of {len(dataset)} tensors of shapes {shapes}, sharing their "
            f"leading dimension: columns (inputs, targets) given as a list. A list is read as "
            f"examples; pass the columns as a tuple, `lf.Loader(({names}), batch_size)` (or give a `collate_fn` if these really are {len(dataset)} examples)."
        )


def _length(dataset: Any, tensors: tuple[torch.Tensor, ...] | None) -> int:
    if tensors is not None:
        n = int(tensors[0].shape[0])
    else:
        if isinstance(dataset, IterableDataset) or not hasattr(dataset, "__getitem__"):
            raise TypeError(
                f"`dataset` must be map-style (`__len__` and `__getitem__`) or tensors, got a "
                f"{type(dataset).__name__}, which cannot be indexed. Pass an iterable straight to "
                f"lightfunc.loop instead (resuming then re-reads the skipped batches)."
            )
        try:
            n = len(dataset)
        except TypeError:
            raise TypeError(
                f"`dataset` must have a length (`__len__`) to be shuffled and resumed, got a "
                f"{type(dataset).__name__} without one. Add `__len__`, or pass an iterable straight "
                f"to lightfunc.loop (resuming then re-reads the skipped batches)."
            ) from None
    if n == 0:
        raise ValueError(f"`dataset` is empty (a {type(dataset).__name__} of length 0).")
    return n


def _check_int(name: str, value: Any, *, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"`{name}` must be an int, got {value!r} ({type(value).__name__}).")
    if value < minimum:
        raise ValueError(f"`{name}` must be >= {minimum}, got {value}.")


def _mix(*values: int) -> int:
    """A 64-bit hash of non-negative ints (SplitMix64's finaliser after each): a generator seed."""
    h = 0
    for v in values:
        h = (h + (v & _MASK64) + 0x9E3779B97F4A7C15) & _MASK64
        h = ((h ^ (h >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        h = ((h ^ (h >> 27)) * 0x94D049BB133111EB) & _MASK64
        h ^= h >> 31
    return h
