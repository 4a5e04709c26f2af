"""Sharded checkpoints: one safetensors file per rank plus a JSON index, resharded on load.

    save_sharded(state, "runs/x/step=100")             # every rank calls it
    state = load_sharded("runs/x/step=100", like=state)  # any world size, any sharding
    verify_sharded("runs/x/step=100")                  # complete and uncorrupted? no template
    export_full("runs/x/step=100", "model.safetensors")  # one file, for `lf.load` / inference

A checkpoint is a directory: ``shard-RRRRR-of-WWWWW-GGGGGGGG.safetensors``, one
file per rank with the chunks of the tensors that rank holds, and
``index.json``, which holds the tree's header, encoded by `lightfunc._codec`
exactly as `lf.save` encodes it (leaves, the values of ints, floats, strings
and `RngKey`s, tied paths, user metadata), every tensor's global shape, dtype
and chunks (file, offsets, sizes, CRC-32), and a CRC-32 of all of that. No
pickle is written or read; the format, and why it is not torch's distributed
checkpoint engine (measured), is described in `_shard_format`. A DTensor's
chunk is its local tensor (`__create_chunk_list__`, the protocol torch's DCP
uses), written only by the ranks at coordinate 0 of the mesh dimensions it is
replicated over, so each element is stored once; plain tensors count as
replicated and rank 0 writes them.

The same calls work in one process without a process group (a state of
plain tensors: one shard file) and on a `LoopState` (its strategy is static,
not saved), so a checkpoint manager needs no second code path.

Writing is atomic, and at every instant the path holds a complete checkpoint
(the old one or the new one) once it held one. The commit is one rename:

- a new path: every rank writes into a hidden temporary directory next to it
  (named by `lightfunc._atomic.temp_name`, so only a dead writer's is ever
  cleaned up); rank 0 checks that the chunks tile every tensor, writes the
  index, fsyncs and renames the directory into place;
- an existing checkpoint: every rank writes its shard under a new generation's
  name beside the old files, and rank 0 atomically replaces ``index.json``
  (write, fsync, rename): until that rename the old index and its files are
  untouched, after it the new ones are complete. Only then are the files the
  index does not list removed, so no save ever deletes the only good copy; a
  crash at any point leaves a loadable checkpoint at the path, and the next
  save removes the debris.

An error on any rank makes every rank raise (no rank is left waiting in a
collective). All ranks must see the same filesystem.

Loading reads, on each rank, only the chunks overlapping the part of each
tensor that the template (`like`) holds there, checking each chunk's CRC-32,
so a checkpoint saved by 2 ranks loads on 1, 3 or 8, sharded or not, bit for bit.
"""

from __future__ import annotations

import dataclasses
import json
import os
import secrets
import shutil
import warnings
from collections.abc import Mapping
from os import PathLike
from pathlib import Path
from typing import Any

import torch

from .._atomic import atomic_write, fsync_dir, remove_orphans, temp_name
from .._codec import CHECKPOINT_FORMAT, Header, checksums, flatten, place, user_metadata
from .._tensorfile import CheckpointError, to_writable, unshare, write_file
from .._tree import PyTree
from ._shard_format import INDEX, Index, ShardReader, build_index, shard_header, shard_name


def save_sharded(
    tree: PyTree,
    directory: str | PathLike[str],
    *,
    metadata: Mapping[str, Any] | None = None,
    verify_fsync: bool = True,
) -> Path:
    """Write `tree`, whose tensors may be DTensors, as a sharded checkpoint directory.

    A collective: every rank of the DTensors' mesh (or of the default process
    group, if the tree holds no DTensor) calls it with a tree of the same
    structure. Each rank writes only what it holds; nothing is gathered.
    Without a process group (one process) it writes one shard.

    Args:
        tree: a pytree (a `LoopState`, a `TrainState`, ...) of tensors,
            DTensors (any `Shard(d)` / `Replicate()` placements), ints,
            floats, bools, strings and `RngKey`s.
        directory: the checkpoint directory to create, or a checkpoint
            directory to replace (any other existing path is refused).
        metadata: JSON-serialisable data kept in the index (``user_metadata``).
        verify_fsync: fsync every file and directory before returning.

    Returns:
        The absolute path of the checkpoint directory.

    Raises:
        TypeError: a leaf cannot be saved (its path is named), e.g. a DTensor
            with a `Partial` placement, or DTensors on different meshes; or
            `metadata` is not a JSON-serialisable dict.
        FileExistsError: `directory` is a file, or a directory holding other files.
        CheckpointError: writing failed on some rank (the others name it).

    Example:
        >>> import tempfile, torch
        >>> path = save_sharded({"w": torch.ones(3)}, tempfile.mkdtemp() + "/ckpt")
        >>> load_sharded(path, like={"w": torch.zeros(3)})["w"]
        tensor([1., 1., 1.])
    """
    final = Path(directory).absolute()
    flat = flatten(tree, "`tree`")
    stored = flat.tensors  # each tensor object once: tied paths are aliases in the header
    group = _Group.of([t for t in stored.values() if _is_dtensor(t)])

    def collect() -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, str]]:
        """This rank's chunks and the header: validates everything before anything is written."""
        user = user_metadata(metadata)
        header = Header.of(flat, fmt=CHECKPOINT_FORMAT, checksums={}, user=user).encode()
        tensors: dict[str, torch.Tensor] = {}
        chunks: dict[str, Any] = {}
        for name, leaf in stored.items():
            chunk = _local_chunk(leaf, name, group)
            if chunk is not None and chunk[1].numel():
                chunks[name] = {"offsets": chunk[0]}
                tensors[name] = to_writable(chunk[1], name)
        return unshare(tensors), chunks, header

    def plan() -> str:
        """Rank 0 decides where the shards go: beside an existing checkpoint, or into a new
        temporary directory; and the save's generation (the shard files' name suffix)."""
        if group.rank != 0:
            return ""
        _check_replaceable(final)
        if (final / INDEX).is_file():
            into = final
        else:
            into = final.parent / temp_name(final.name)
            into.mkdir(parents=True)
        return json.dumps({"into": str(into), "generation": secrets.token_hex(4)})

    def write_shard() -> None:
        meta = shard_header(group.rank, group.size, chunks, tensors)
        file = into / shard_name(group.rank, group.size, generation)
        write_file(tensors, meta, file, fsync=verify_fsync)

    def commit() -> None:
        if group.rank != 0:
            return
        doc = build_index(into, group.size, generation, stored, header)
        text = json.dumps(doc, indent=1, allow_nan=False)

        def write_index(path: Path) -> None:
            path.write_text(text)

        if into == final:  # the index's rename commits; then the old generation goes
            atomic_write(final / INDEX, write_index, fsync=verify_fsync)
            _sweep(final)
            return
        atomic_write(into / INDEX, write_index, fsync=verify_fsync)
        if verify_fsync:
            fsync_dir(into)
        if final.exists():  # a directory without an index (checked): it holds nothing loadable
            shutil.rmtree(final)
        os.replace(into, final)  # the directory's rename commits
        if verify_fsync:
            fsync_dir(final.parent)

    tensors, chunks, header = group.together(collect, f"save '{final}'")
    where = json.loads(group.share(group.together(plan, f"prepare to write '{final}'")))
    into, generation = Path(where["into"]), str(where["generation"])
    try:
        group.together(write_shard, f"write its shard of '{final}'")
        group.together(commit, f"commit '{final}'")
    except BaseException:
        if group.rank == 0:
            if into == final:
                _sweep(final)  # this generation's files, unless its index was committed
            else:
                shutil.rmtree(into, ignore_errors=True)
        raise
    return final


def load_sharded(directory: str | PathLike[str], *, like: PyTree, verify: bool = True) -> PyTree:
    """Read a checkpoint written by `save_sharded` into the structure and layout of `like`.

    Each DTensor in `like` comes back with `like`'s mesh, placements and
    global shape, holding the saved values of its own part; plain tensors
    come back whole. The saving run's world size and sharding do not matter.
    A collective over the DTensors' mesh when `like` holds DTensors (a failure
    on one rank makes all raise); otherwise each process reads on its own.

    Args:
        directory: a directory written by `save_sharded`.
        like: a tree of the saved structure (a `LoopState`, a `TrainState`,
            ...); its tensor values are not used.
        verify: compare the CRC-32 of every chunk read with the saved one.

    Returns:
        A new tree with `like`'s structure and layout and the saved values.

    Raises:
        FileNotFoundError: no directory or no ``index.json`` at `directory`.
        CheckpointError: a shard file is missing, truncated or corrupted (the
            file is named), the index is malformed, or the checkpoint does
            not match `like` (paths, shapes, dtypes, kinds are named).
    """
    directory = _resolve(Path(directory))
    index = Index.read(directory)
    flat = flatten(like, "`like`")
    dtensors = [leaf for leaf in flat.objects if _is_dtensor(leaf)]
    group = _Group.of(dtensors) if dtensors else _Group.single()

    def read() -> Any:
        index.check(flat)
        with ShardReader(index, verify) as reader:
            return index.header.restore(
                flat, lambda name, leaf: _restore_tensor(reader, name, leaf)
            )

    return group.together(read, f"load '{directory}'")


def verify_sharded(directory: str | PathLike[str]) -> None:
    """Check that `directory` is a complete, uncorrupted sharded checkpoint, without a template.

    Every check `load_sharded` makes that needs no template: the index is
    readable and well formed, every shard file it lists is present and is a
    shard file, every chunk has the shape the index gives and its CRC-32,
    and the chunks tile every tensor. Runs in one process; reads every chunk
    once.

    Raises:
        FileNotFoundError: no directory or no ``index.json`` at `directory`.
        CheckpointError: naming the file (the index or a shard) that is
            missing, truncated, corrupted or malformed.
    """
    index = Index.read(_resolve(Path(directory)))
    with ShardReader(index, verify=True) as reader:
        reader.check_all()


def export_full(
    directory: str | PathLike[str],
    path: str | PathLike[str],
    *,
    verify: bool = True,
    verify_fsync: bool = True,
) -> Path:
    """Write the full state of a sharded checkpoint as one `lf.save` file, for inference.

    Runs in one process (no process group needed). The file is a regular
    lightfunc checkpoint with the index's header (and a checksum per
    tensor): `lf.load(path, like=plain_state)` restores it into a tree of
    plain tensors, and `lf.load_params(path, model)` reads the parameters of
    a `TrainState` into an `nn.Module`. Holds the whole state in memory
    while writing.

    Args:
        directory: a directory written by `save_sharded`.
        path: the file to create or replace (atomically).
        verify: check every chunk's CRC-32 while reading.
        verify_fsync: fsync the file and its directory before returning.

    Returns:
        The absolute path written.

    Raises:
        FileNotFoundError, CheckpointError: as `load_sharded`.
    """
    index = Index.read(_resolve(Path(directory)))
    with ShardReader(index, verify) as reader:
        tensors = {
            name: reader.assemble(name, [0] * len(shape), shape)
            for name, shape in index.shapes.items()
        }
    header = dataclasses.replace(index.header, checksums=checksums(tensors))
    return write_file(tensors, header.encode(), Path(path), fsync=verify_fsync)


# -- ranks and collectives ------------------------------------------------------


def _is_dtensor(x: Any) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(x, DTensor)


_SHARE_BYTES = 4096  # `_Group.share`'s most bytes: a path and a generation


@dataclasses.dataclass(frozen=True)
class _Group:
    """The ranks a sharded save or load runs on, and how they agree on success."""

    group: Any  # a ProcessGroup, or None for a single process
    rank: int  # this process's rank in `group`
    size: int
    device: torch.device  # where the agreement tensor lives (cuda for NCCL)
    coordinate: tuple[int, ...]  # this rank's coordinate on the DTensors' mesh, () without

    @classmethod
    def single(cls) -> _Group:
        return cls(None, 0, 1, torch.device("cpu"), ())

    @classmethod
    def of(cls, dtensors: list[Any]) -> _Group:
        """The mesh's ranks when there are DTensors, else the default group (if any)."""
        import torch.distributed as dist

        if not dtensors:
            if not (dist.is_available() and dist.is_initialized()):
                return cls.single()
            group = dist.group.WORLD
            nccl = dist.get_backend(group) == "nccl"
            device = (
                torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")
            )
            return cls(group, dist.get_rank(group), dist.get_world_size(group), device, ())
        mesh = dtensors[0].device_mesh
        for d in dtensors[1:]:
            if d.device_mesh != mesh:
                raise TypeError(
                    f"The DTensors in the tree live on different device meshes ({mesh} and "
                    f"{d.device_mesh}); a sharded checkpoint is written over one mesh. Save each "
                    f"mesh's part separately."
                )
        if mesh.ndim == 1:
            group = mesh.get_group()
        elif mesh.size() == dist.get_world_size():
            group = dist.group.WORLD
        else:
            raise TypeError(
                f"DTensors on a {mesh.ndim}-D mesh of {mesh.size()} ranks out of "
                f"{dist.get_world_size()}: a multi-dimensional mesh must span all ranks to be "
                f"checkpointed."
            )
        device = torch.device(mesh.device_type)
        if device.type == "cuda":
            device = torch.device("cuda", torch.cuda.current_device())
        coordinate = tuple(mesh.get_coordinate() or ())
        return cls(group, dist.get_rank(group), dist.get_world_size(group), device, coordinate)

    def share(self, text: str) -> str:
        """Rank 0's `text` on every rank (a tensor collective: no pickle)."""
        if self.group is None:
            return text
        import torch.distributed as dist

        raw = text.encode()
        if len(raw) > _SHARE_BYTES:
            raise ValueError(
                f"`directory` is too long for a sharded save: where the ranks write takes "
                f"{len(raw)} bytes to tell them, at most {_SHARE_BYTES}. Use a shorter path."
            )
        buffer = torch.zeros(_SHARE_BYTES + 4, dtype=torch.uint8, device=self.device)
        if self.rank == 0:
            buffer[:4] = torch.tensor(list(len(raw).to_bytes(4, "little")), dtype=torch.uint8)
            buffer[4 : 4 + len(raw)] = torch.frombuffer(bytearray(raw), dtype=torch.uint8)
        dist.all_reduce(buffer, group=self.group)  # the others add zeros
        data = bytes(buffer.cpu().tolist())
        return data[4 : 4 + int.from_bytes(data[:4], "little")].decode()

    def together(self, fn: Any, what: str) -> Any:
        """`fn()` on every rank, then agree: if it raised anywhere, raise everywhere.

        The rank that failed raises its own exception; the others raise a
        `CheckpointError` naming it, so no rank waits in a later collective.
        """
        result, error = None, None
        try:
            result = fn()
        except Exception as e:
            error = e
        if self.group is None:
            if error is not None:
                raise error
            return result
        import torch.distributed as dist

        flags = torch.zeros(self.size, dtype=torch.int32, device=self.device)
        flags[self.rank] = int(error is not None)
        dist.all_reduce(flags, group=self.group)
        if error is not None:
            raise error
        failed = [r for r, f in enumerate(flags.tolist()) if f]
        if failed:
            raise CheckpointError(
                f"Could not {what}: rank{'s' if len(failed) > 1 else ''} "
                f"{', '.join(map(str, failed))} failed (see {'their' if len(failed) > 1 else 'its'} "
                f"error); this rank stopped too."
            )
        return result


def _local_chunk(
    leaf: torch.Tensor, name: str, group: _Group
) -> tuple[list[int], torch.Tensor] | None:
    """(global offsets, local data) of the part of `leaf` this rank writes, or None."""
    from torch.distributed.tensor import DTensor, Replicate, Shard

    if not isinstance(leaf, DTensor):
        return ([0] * leaf.ndim, leaf) if group.rank == 0 else None

    for placement in leaf.placements:
        if not isinstance(placement, (Shard, Replicate)):
            raise TypeError(
                f"Cannot save the DTensor at `{name}`: its placement {placement!r} is not Shard or "
                f"Replicate. Reduce it first, e.g. `t.redistribute(placements=[Replicate()])`."
            )
    replicated_on = [i for i, p in enumerate(leaf.placements) if isinstance(p, Replicate)]
    if any(group.coordinate[i] != 0 for i in replicated_on):
        return None  # another rank holds the same chunk and writes it
    (chunk,) = leaf.__create_chunk_list__()
    local = leaf.to_local()
    if tuple(local.shape) != tuple(chunk.sizes):
        raise TypeError(
            f"Cannot save the DTensor at `{name}`: its local tensor has shape "
            f"{tuple(local.shape)}, but its placements give {tuple(chunk.sizes)}. Build it with "
            f"`distribute_tensor` or `DTensor.from_local(..., shape=, stride=)`."
        )
    return list(chunk.offsets), local


def _check_replaceable(final: Path) -> None:
    """Refuse to overwrite anything but a sharded checkpoint (or an empty directory)."""
    if not final.exists():
        return
    if not final.is_dir():
        raise FileExistsError(
            f"Cannot save a sharded checkpoint at '{final}': it is an existing file. A sharded "
            f"checkpoint is a directory; give a new path (e.g. '{final.with_suffix('')}-sharded')."
        )
    others = [p.name for p in final.iterdir() if not _belongs(p.name)]
    if others:
        raise FileExistsError(
            f"Cannot save a sharded checkpoint at '{final}': it is a directory holding other "
            f"files ({', '.join(sorted(others)[:5])}), and saving replaces the whole directory. "
            f"Give the checkpoint its own directory, e.g. '{final / 'step=100'}'."
        )


def _belongs(name: str) -> bool:
    """Whether a file named `name` is part of (or debris of) a sharded checkpoint directory:
    the index, shard files, and the temporary files of their atomic writes."""
    return name == INDEX or name.startswith(("shard-", f".{INDEX}.", ".shard-"))


def _sweep(directory: Path) -> None:
    """Remove the shard files `directory`'s index does not list (an older generation, or a
    save that did not commit) and dead writers' temporary files. With no valid index,
    nothing: what is there may be the only copy."""
    try:
        keep = set(Index.read(directory).files)
    except (OSError, CheckpointError):
        return
    for path in directory.iterdir():
        if path.name.startswith("shard-") and path.name not in keep:
            path.unlink(missing_ok=True)
    remove_orphans(directory)


def _resolve(directory: Path) -> Path:
    """`directory`, or, when it is missing, the copy an interrupted save of lightfunc
    0.1.0.dev0 left beside it (it renamed the old checkpoint to ``.<name>.sharded.old``,
    then the new one from ``.<name>.sharded.tmp``; a crash between left neither at the path)."""
    if directory.exists():
        return directory
    for kind in ("tmp", "old"):  # the new copy is complete once it has its index
        copy = directory.parent / f".{directory.name}.sharded.{kind}"
        if (copy / INDEX).is_file():
            warnings.warn(
                f"No sharded checkpoint at '{directory}': a save was interrupted while it "
                f"renamed the new copy into place. Reading the surviving copy '{copy}'; rename "
                f"it to '{directory}' to keep it.",
                RuntimeWarning,
                stacklevel=3,
            )
            return copy
    return directory


def _restore_tensor(reader: ShardReader, name: str, like: torch.Tensor) -> torch.Tensor:
    """The saved tensor `name` in `like`'s layout: its local part for a DTensor, else whole."""
    from torch.distributed.tensor import DTensor

    if not isinstance(like, DTensor):
        full = reader.assemble(name, [0] * like.ndim, list(like.shape))
        return place(full, like)

    (chunk,) = like.__create_chunk_list__()
    local_like = like.to_local()
    local = reader.assemble(name, list(chunk.offsets), list(chunk.sizes)).to(local_like.device)
    out = DTensor.from_local(
        local,
        like.device_mesh,
        like.placements,
        run_check=False,
        shape=like.shape,
        stride=like.stride(),
    )
    return out.requires_grad_(like.requires_grad)
