"""Checkpoints: any lightfunc pytree as one safetensors file, written atomically, verified on load.

File layout (a plain safetensors file; `safetensors.safe_open` reads it without lightfunc):

- one tensor per tensor leaf, named by its tree path (``state.params.0.weight``,
  ``state.opt_state[1].mu.0.weight``); a tensor object that appears at several
  paths (tied weights) is stored once, the other paths listed in ``aliases``;
- string metadata: the header of `lightfunc._codec` (``format``
  "lightfunc.checkpoint", ``format_version``, ``lightfunc_version``,
  ``torch_version``, and JSON documents: ``leaves``, with the values of
  ints, floats, bools, strings and `RngKey`s; ``aliases``; ``checksums``,
  a CRC-32 per tensor; ``user_metadata``; ``treespec``; ``header_crc32``, a
  CRC-32 over all of the header, counters included).

What a load checks, before any tensor is read: the container (every
tensor's declared byte range lies inside the file), the header's own CRC-32,
its format and version, and the template (paths, kinds, shapes, dtypes).
Then each tensor's CRC-32 as it is read.

Only the leaves are stored: the structure, and static fields such as
`TrainState.tx`, come from the template given to `load`. No pickle is
written or read. The same header is what a parameters file
(`lightfunc.save_params`) and a sharded checkpoint's index carry.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from os import PathLike
from pathlib import Path
from typing import Any

import torch

from ._codec import Header, encode, flatten, place
from ._tensorfile import CheckpointError as CheckpointError  # re-exported: the package's error
from ._tensorfile import TensorFile, write_file
from ._tree import PyTree


def save(
    tree: PyTree,
    path: str | PathLike[str],
    *,
    metadata: Mapping[str, Any] | None = None,
    verify_fsync: bool = True,
) -> Path:
    """Write `tree` (a `LoopState`, a `TrainState`, any pytree) to one safetensors file.

    The file is written under a temporary name in the same directory, flushed
    and renamed, so a reader sees the old file or the new one, never half of
    one. Tensors are copied to the CPU; their values, dtypes and shapes
    round-trip exactly.

    Args:
        tree: a pytree whose leaves are tensors, ints, floats, bools, strings
            or `RngKey`s. Tied tensors (one object at several paths) are
            stored once and come back tied; distinct views of one storage
            are stored as separate copies.
        path: the file to create or replace; parent directories are created.
        metadata: JSON-serialisable data kept with the checkpoint (read it
            back with `read_metadata`).
        verify_fsync: fsync the file and its directory before returning, so
            the checkpoint survives a power loss (False: faster, still atomic).

    Returns:
        The absolute path written.

    Raises:
        TypeError: a leaf cannot be saved (its path is named), or `metadata`
            is not a JSON-serialisable dict.
        ValueError: two leaves have the same path string, or a path is
            ``__metadata__`` (reserved by safetensors).

    Example:
        >>> import tempfile, torch, lightfunc as lf
        >>> state = lf.TrainState.create(torch.nn.Linear(3, 2), lf.optim.adamw(1e-3))
        >>> path = lf.save(state, tempfile.mkdtemp() + "/ckpt.safetensors")
        >>> int(lf.load(path, like=state).step)
        0
    """
    tensors, header = encode(flatten(tree, "`tree`"), metadata=metadata)
    return write_file(tensors, header, Path(path), fsync=verify_fsync)


def load(
    path: str | PathLike[str],
    *,
    like: PyTree,
    verify: bool = True,
    device: torch.device | str | None = None,
) -> PyTree:
    """Read a checkpoint written by `save` into the structure of `like`.

    Tensors take the file's values and `like`'s devices (whose dtypes and
    shapes must match the file's); ints, floats, strings and `RngKey`s take
    the file's values; static fields (the optimizer of a `TrainState`) come
    from `like`. Everything is checked before any tensor is read.

    Args:
        path: a file written by `save`.
        like: a tree of the saved structure, e.g. the freshly built state the
            run started from. Its tensor values are not used.
        verify: compare each tensor's CRC-32 with the one saved. False skips
            it (faster; a damaged file then loads damaged values silently).
        device: put every tensor there instead of on `like`'s devices (a
            template on the meta device loads onto the CPU).

    Returns:
        A new tree with `like`'s structure and the file's leaves.

    Raises:
        FileNotFoundError: no file at `path`.
        CheckpointError: the file is unreadable, truncated, corrupted (a
            checksum differs), not written by `save`, or does not match
            `like` (missing or extra paths, shape, dtype or leaf type).

    Example:
        >>> import tempfile, torch, lightfunc as lf
        >>> state = lf.TrainState.create(torch.nn.Linear(3, 2), lf.optim.sgd(0.1))
        >>> path = lf.save(state, tempfile.mkdtemp() + "/ckpt.safetensors")
        >>> restored = lf.load(path, like=state)
        >>> torch.equal(restored.params["weight"], state.params["weight"])
        True
    """
    path = Path(path)
    target = None if device is None else torch.device(device)
    flat = flatten(like, "`like`")
    with TensorFile(path) as f:
        header = Header.read(f)
        header.check(flat, path, lambda name: (f.shape(name), f.dtype(name)))

        def read(name: str, leaf: torch.Tensor) -> torch.Tensor:
            return place(f.read(name, header.checksums[name] if verify else None), leaf, target)

        return header.restore(flat, read)


def verify(path: str | PathLike[str]) -> None:
    """Check that `path` is a complete, uncorrupted checkpoint, without a template.

    Checks the header (its CRC-32 and structure), then reads every tensor
    in chunks of at most `CHUNK_BYTES` and compares its CRC-32 with the
    saved one: memory stays bounded whatever the file declares.

    Raises:
        FileNotFoundError, CheckpointError: as `load`.
    """
    with TensorFile(Path(path)) as f:
        header = Header.read(f)
        for name in f.names:
            f.check(name, header.checksums[name])


def read_header(path: str | PathLike[str]) -> tuple[Header, dict[str, TensorInfo]]:
    """The checked header of the checkpoint at `path`, and each stored tensor's shape, dtype, size.

    Reads no tensor data: cheap enough to list what a directory holds.

    Raises:
        FileNotFoundError, CheckpointError: as `load`.
    """
    with TensorFile(Path(path)) as f:
        header = Header.read(f)
        infos = {n: TensorInfo(f.shape(n), f.dtype(n), f.nbytes(n)) for n in f.names}
        return header, infos


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    """What a checkpoint's header says about one stored tensor."""

    shape: tuple[int, ...]
    dtype: torch.dtype | str  # the safetensors code when this torch lacks the dtype
    nbytes: int  # bytes in the file


def read_metadata(path: str | PathLike[str]) -> Any:
    """The `metadata` given to `save` for the checkpoint at `path` (None if none was given).

    Raises:
        FileNotFoundError, CheckpointError: as `load`.
    """
    with TensorFile(Path(path)) as f:
        return Header.read(f).user
