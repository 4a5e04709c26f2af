"""The on-disk format of sharded checkpoints: shard files, the JSON index, reading chunks back.

A checkpoint directory written by `save_sharded` holds (no pickle anywhere;
`safetensors` and `json` read every byte):

- ``shard-RRRRR-of-WWWWW.safetensors``, one per rank: the rank's chunk of each
  tensor it writes, named by tree path; its metadata holds ``format``
  ("lightfunc.shard"), ``rank``, ``world_size``, ``chunks`` ({path: {"offsets":
  global offsets}}) and ``checksums`` ({path: CRC-32 of the chunk's bytes}).
- ``index.json``: ``format`` ("lightfunc.sharded"), ``format_version``,
  ``lightfunc_version``, ``torch_version``, ``world_size``, ``files``, and
  ``leaves``: every leaf in flattening order with its path, path keys and
  kind; a stored tensor also has its global ``shape``, ``dtype`` and
  ``chunks`` (file, offsets, sizes, crc32), a non-tensor leaf its ``value``
  (encoded as `lightfunc.save` encodes it: an `RngKey` as {"seed",
  "counter"}); ``aliases`` ({tied path: stored path}), ``user_metadata``
  and ``treespec`` (for reading, not used to load).

The chunks of a tensor tile it exactly (inside its shape, disjoint, covering
every element): checked when the index is written and when it is read.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch

from .._checkpoint import _check_paths, _decode, _encode, _Entry, _Header, _kind, _user_json
from .._tensorfile import CheckpointError, TensorFile, dtype_name

INDEX = "index.json"
SHARDED_FORMAT = "lightfunc.sharded"
SHARD_FORMAT = "lightfunc.shard"
SHARDED_VERSION = 1


def shard_name(rank: int, world_size: int) -> str:
    """The file name of `rank`'s shard in a checkpoint written by `world_size` ranks."""
    return f"shard-{rank:05d}-of-{world_size:05d}.safetensors"


# -- the index --------------------------------------------------------------------


def build_index(
    tmp: Path,
    world: int,
    names: list[str],
    keys: list[list[Any]],
    leaves: list[Any],
    kinds: list[str],
    metadata: Mapping[str, Any] | None,
    spec: Any,
) -> dict[str, Any]:
    """The index document, from rank 0's leaves and every shard file's chunk list."""
    from .. import __version__

    entries: list[dict[str, Any]] = []
    aliases: dict[str, str] = {}
    by_name: dict[str, dict[str, Any]] = {}
    stored_at: dict[int, str] = {}
    for name, key, leaf, kind in zip(names, keys, leaves, kinds, strict=True):
        entry: dict[str, Any] = {"path": name, "keys": key, "kind": kind}
        if kind == "tensor":
            if id(leaf) in stored_at:
                aliases[name] = stored_at[id(leaf)]
            else:
                stored_at[id(leaf)] = name
                entry |= {"shape": list(leaf.shape), "dtype": dtype_name(leaf.dtype), "chunks": []}
                by_name[name] = entry
        else:
            entry["value"] = _encode(kind, leaf)
        entries.append(entry)
    for rank in range(world):
        file = shard_name(rank, world)
        with TensorFile(tmp / file) as f:
            chunks = json.loads(f.metadata["chunks"])
            checksums = json.loads(f.metadata["checksums"])
            for name, chunk in chunks.items():
                if name not in by_name:
                    raise CheckpointError(
                        f"Rank {rank} wrote a tensor at `{name}`, which rank 0's tree has not: "
                        f"every rank must save a tree of the same structure."
                    )
                by_name[name]["chunks"].append(
                    {
                        "file": file,
                        "offsets": chunk["offsets"],
                        "sizes": list(f.shape(name)),
                        "crc32": checksums[name],
                    }
                )
    for name, entry in by_name.items():
        check_tiling(name, entry["shape"], entry["chunks"])
    return {
        "format": SHARDED_FORMAT,
        "format_version": SHARDED_VERSION,
        "lightfunc_version": __version__,
        "torch_version": torch.__version__,
        "world_size": world,
        "files": [shard_name(r, world) for r in range(world)],
        "leaves": entries,
        "aliases": aliases,
        "user_metadata": json.loads(_user_json(metadata)),
        "treespec": str(spec),
    }


def check_tiling(name: str, shape: list[int], chunks: list[dict[str, Any]]) -> None:
    """The chunks lie inside `shape`, do not overlap, and hold as many elements as it.

    Overlaps are looked for between every pair of chunks up to 64 chunks, and
    between neighbours in offset order beyond (where a 1-D mesh's `Shard`
    chunks could overlap), so the check stays cheap on large worlds.
    """
    total = 0
    for c in chunks:
        ends = [o + s for o, s in zip(c["offsets"], c["sizes"], strict=True)]
        if len(ends) != len(shape) or any(
            o < 0 or e > n for o, e, n in zip(c["offsets"], ends, shape, strict=True)
        ):
            raise CheckpointError(f"A chunk of `{name}` lies outside its shape {shape}: {c}.")
        total += numel(c["sizes"])
    ordered = sorted(chunks, key=lambda c: list(c["offsets"]))
    for i, c in enumerate(ordered):
        for d in ordered[:i] if len(ordered) <= 64 else ordered[max(i - 1, 0) : i]:
            if all(
                max(o1, o2) < min(o1 + s1, o2 + s2)
                for o1, s1, o2, s2 in zip(
                    c["offsets"], c["sizes"], d["offsets"], d["sizes"], strict=True
                )
            ):
                raise CheckpointError(f"Two chunks of `{name}` overlap: {d} and {c}.")
    if total != numel(shape):
        raise CheckpointError(
            f"The chunks of `{name}` hold {total} elements, its shape {shape} has {numel(shape)}: "
            f"some ranks did not write their part."
        )


def numel(shape: list[int]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


@dataclasses.dataclass(frozen=True)
class Index:
    """A parsed, validated ``index.json``."""

    directory: Path
    entries: dict[str, _Entry]  # path -> entry, in flattening order
    shapes: dict[str, list[int]]  # stored tensor path -> global shape
    dtypes: dict[str, torch.dtype]
    chunks: dict[str, list[dict[str, Any]]]  # stored tensor path -> its chunks
    aliases: dict[str, str]
    files: list[str]
    user: Any
    treespec: str

    @classmethod
    def read(cls, directory: Path) -> Index:
        path = directory / INDEX
        if not path.is_file():
            if not directory.is_dir():
                raise FileNotFoundError(
                    f"No sharded checkpoint at '{directory}': the directory does not exist "
                    f"(working directory '{Path.cwd()}')."
                )
            hint = (
                " It holds shard files but no index: the save was interrupted before its commit."
                if any(directory.glob("shard-*.safetensors"))
                else ""
            )
            raise FileNotFoundError(
                f"No sharded checkpoint at '{directory}': '{INDEX}' is missing.{hint} Directories "
                f"written by lightfunc.distributed.save_sharded hold one."
            )
        try:
            doc = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise _bad_index(path, f"it is not readable JSON ({e})") from e
        if not isinstance(doc, dict) or doc.get("format") != SHARDED_FORMAT:
            raise _bad_index(path, f"its `format` is not {SHARDED_FORMAT!r}")
        version = doc.get("format_version")
        if type(version) is not int or version > SHARDED_VERSION:
            raise CheckpointError(
                f"'{path}' has sharded format version {version!r}; this lightfunc reads up to "
                f"{SHARDED_VERSION}. Upgrade lightfunc to load it."
            )
        try:
            return cls._parse(directory, doc)
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            if isinstance(e, CheckpointError):
                raise
            raise _bad_index(path, f"an entry is invalid ({e!r})") from e

    @classmethod
    def _parse(cls, directory: Path, doc: dict[str, Any]) -> Index:
        files = [str(f) for f in doc["files"]]
        entries, shapes, dtypes, chunks = {}, {}, {}, {}
        for e in doc["leaves"]:
            name, kind = str(e["path"]), str(e["kind"])
            entries[name] = _Entry(list(e["keys"]), kind, _decode(kind, e.get("value")))
            if kind != "tensor" or "shape" not in e:
                continue
            shapes[name] = [int(s) for s in e["shape"]]
            dtype = getattr(torch, str(e["dtype"]), None)
            if not isinstance(dtype, torch.dtype):
                raise ValueError(f"unknown dtype {e['dtype']!r} at `{name}`")
            dtypes[name] = dtype
            chunks[name] = list(e["chunks"])
            for c in chunks[name]:
                if c["file"] not in files:
                    raise ValueError(f"a chunk of `{name}` names an unknown file {c['file']!r}")
            check_tiling(name, shapes[name], chunks[name])
        aliases = {str(a): str(s) for a, s in doc["aliases"].items()}
        if not set(aliases.values()) <= set(shapes) or set(aliases) & set(shapes):
            raise ValueError("`aliases` do not match the stored tensors")
        stored = {n for n, e in entries.items() if e.kind == "tensor" and n not in aliases}
        if stored != set(shapes):
            raise ValueError("some tensor leaves have no shape, dtype and chunks")
        return cls(
            directory,
            entries,
            shapes,
            dtypes,
            chunks,
            aliases,
            files,
            doc.get("user_metadata"),
            str(doc.get("treespec", "")),
        )

    def check(self, names: list[str], leaves: list[Any]) -> None:
        """Raise CheckpointError if `like`'s paths, kinds, shapes or dtypes differ from the index."""
        header = _Header(self.entries, self.aliases, {}, self.user)
        _check_paths(self.directory / INDEX, header, names)
        problems = []
        for name, leaf in zip(names, leaves, strict=True):
            entry, kind = self.entries[name], _kind(leaf, name, "`like`")
            if kind != entry.kind:
                problems.append(
                    f"{name}: the checkpoint has a {entry.kind!r} leaf, the template a {kind!r}"
                )
            elif kind == "tensor":
                stored = self.aliases.get(name, name)
                shape, dtype = self.shapes[stored], self.dtypes[stored]
                if shape != list(leaf.shape) or dtype != leaf.dtype:
                    problems.append(
                        f"{name}: the checkpoint has shape {tuple(shape)} dtype {dtype_name(dtype)}, "
                        f"the template shape {tuple(leaf.shape)} dtype {dtype_name(leaf.dtype)}"
                    )
        if problems:
            raise CheckpointError(
                f"The sharded checkpoint '{self.directory}' does not match `like` at "
                f"{len(problems)} leaves:\n  "
                + "\n  ".join(problems)
                + "\nBuild `like` with the saved run's configuration (model sizes, dtypes); global "
                "shapes must match, the sharding and world size may differ."
            )


def _bad_index(path: Path, problem: str) -> CheckpointError:
    return CheckpointError(
        f"The sharded checkpoint index '{path}' is malformed: {problem}. It was edited or "
        f"corrupted; use another checkpoint."
    )


# -- reading chunks ---------------------------------------------------------------


class ShardReader:
    """Opens shard files on first use; assembles any box of a tensor from its chunks."""

    def __init__(self, index: Index, verify: bool) -> None:
        self.index, self.verify = index, verify
        self._stack = ExitStack()
        self._files: dict[str, TensorFile] = {}

    def __enter__(self) -> ShardReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()

    def _file(self, name: str) -> TensorFile:
        if name not in self._files:
            path = self.index.directory / name
            if not path.is_file():
                raise CheckpointError(
                    f"The shard file '{path}' listed in '{self.index.directory / INDEX}' is "
                    f"missing: the checkpoint is incomplete. Use another checkpoint."
                )
            f = self._stack.enter_context(TensorFile(path))
            if f.metadata.get("format") != SHARD_FORMAT:
                raise CheckpointError(
                    f"'{path}' is not a lightfunc shard file (metadata `format` is "
                    f"{f.metadata.get('format')!r}); the checkpoint was edited or corrupted."
                )
            self._files[name] = f
        return self._files[name]

    def assemble(self, name: str, offsets: list[int], sizes: list[int]) -> torch.Tensor:
        """The box [offsets, offsets + sizes) of stored tensor `name`, as a new CPU tensor."""
        out = torch.empty(sizes, dtype=self.index.dtypes[name])
        covered = 0
        for chunk in self.index.chunks[name]:
            box = _overlap(offsets, sizes, chunk["offsets"], chunk["sizes"])
            if box is None:
                continue
            f = self._file(chunk["file"])
            if list(f.shape(name)) != chunk["sizes"]:
                raise CheckpointError(
                    f"The shard file '{f.path}' holds `{name}` with shape {f.shape(name)}, the "
                    f"index says {tuple(chunk['sizes'])}: the checkpoint was edited or corrupted."
                )
            data = f.read(name, chunk["crc32"] if self.verify else None)
            into, take = box
            out[into] = data[take]
            covered += out[into].numel()
        if covered != numel(sizes):
            raise CheckpointError(
                f"The chunks of `{name}` in '{self.index.directory}' do not cover the part "
                f"{offsets}+{sizes}: the index is corrupted."
            )
        return out


def _overlap(
    offsets: list[int], sizes: list[int], chunk_offsets: list[int], chunk_sizes: list[int]
) -> tuple[tuple[slice, ...], tuple[slice, ...]] | None:
    """Slices of the box and of the chunk where they intersect, or None (empty intersection)."""
    into, take = [], []
    for o, s, co, cs in zip(offsets, sizes, chunk_offsets, chunk_sizes, strict=True):
        lo, hi = max(o, co), min(o + s, co + cs)
        if hi <= lo:
            return None
        into.append(slice(lo - o, hi - o))
        take.append(slice(lo - co, hi - co))
    return tuple(into), tuple(take)
