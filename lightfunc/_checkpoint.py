"""Checkpoints: any lightfunc pytree as one safetensors file, written atomically, verified on load.

File layout (a plain safetensors file; `safetensors.safe_open` reads it without lightfunc):

- one tensor per tensor leaf, named by its tree path (``state.params.0.weight``,
  ``state.opt_state[1].mu.0.weight``); a tensor object that appears at several
  paths (tied weights) is stored once, the other paths listed in ``aliases``;
- string metadata: ``format`` ("lightfunc.checkpoint"), ``format_version``,
  ``lightfunc_version``, ``torch_version``, and JSON documents: ``leaves``
  (every leaf in flattening order: path, path keys, kind, and the value of
  non-tensor leaves: ints, floats, bools, strings, `RngKey`s), ``aliases``
  ({alias path: stored path}), ``checksums`` ({tensor name: CRC-32 of its
  bytes}), ``user_metadata``, and ``treespec`` (the tree structure, for reading).

Only the leaves are stored: the structure, and static fields such as
`TrainState.tx`, come from the template given to `load`. No pickle is
written or read.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping
from os import PathLike
from pathlib import Path
from typing import Any

import optree
import torch

from ._rng import RngKey
from ._tensorfile import (
    CheckpointError,
    TensorFile,
    crc32,
    dtype_name,
    to_writable,
    unshare,
    write_file,
)
from ._tree import NAMESPACE, PyTree, describe_leaf, path_str

CHECKPOINT_FORMAT = "lightfunc.checkpoint"
PARAMS_FORMAT = "params"
FORMAT_VERSION = 1
_PY_KINDS = {bool: "bool", int: "int", float: "float", str: "str"}


def save(
    tree: PyTree,
    path: str | PathLike[str],
    *,
    metadata: Mapping[str, Any] | None = None,
    verify_fsync: bool = True,
) -> Path:
    """Write `tree` (a `TrainerState`, a `TrainState`, any pytree) to one safetensors file.

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
    from . import __version__  # lazily: lightfunc/__init__ imports this module

    names, keys, leaves, spec = _flatten(tree, "`tree`")
    entries: list[dict[str, Any]] = []
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    stored_at: dict[int, str] = {}  # id(tensor) -> path it is stored under
    for name, key, leaf in zip(names, keys, leaves, strict=True):
        kind = _kind(leaf, name, "`tree`")
        entry: dict[str, Any] = {"path": name, "keys": key, "kind": kind}
        if kind == "tensor":
            if id(leaf) in stored_at:
                aliases[name] = stored_at[id(leaf)]
            else:
                stored_at[id(leaf)] = name
                tensors[name] = to_writable(leaf, name)
        else:
            entry["value"] = _encode(kind, leaf)
        entries.append(entry)
    tensors = unshare(tensors)
    header = {
        "format": CHECKPOINT_FORMAT,
        "format_version": str(FORMAT_VERSION),
        "lightfunc_version": __version__,
        "torch_version": torch.__version__,
        "leaves": json.dumps(entries, allow_nan=False),
        "aliases": json.dumps(aliases),
        "checksums": json.dumps({n: crc32(t) for n, t in tensors.items()}),
        "user_metadata": _user_json(metadata),
        "treespec": str(spec),
    }
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
    names, _, leaves, spec = _flatten(like, "`like`")
    with TensorFile(path) as f:
        header = _Header.parse(f)
        _check_paths(path, header, names)
        _check_leaves(path, f, header, names, leaves)
        loaded: dict[str, torch.Tensor] = {}
        out: list[Any] = []
        for name, leaf in zip(names, leaves, strict=True):
            entry = header.entries[name]
            if entry.kind != "tensor":
                out.append(entry.value)
                continue
            stored = header.aliases.get(name, name)
            if stored not in loaded:
                tensor = f.read(stored, header.checksums[stored] if verify else None)
                loaded[stored] = _place(tensor, leaf, target)
            out.append(loaded[stored])
    return optree.tree_unflatten(spec, out)


def verify(path: str | PathLike[str]) -> None:
    """Check that `path` is a complete, uncorrupted checkpoint, without a template.

    Reads every tensor and compares its CRC-32 with the saved one.

    Raises:
        FileNotFoundError, CheckpointError: as `load`.
    """
    with TensorFile(Path(path)) as f:
        header = _Header.parse(f)
        for name in f.names:
            f.read(name, header.checksums[name])


def read_metadata(path: str | PathLike[str]) -> Any:
    """The `metadata` given to `save` for the checkpoint at `path` (None if none was given).

    Raises:
        FileNotFoundError, CheckpointError: as `load`.
    """
    with TensorFile(Path(path)) as f:
        return _Header.parse(f).user


@dataclasses.dataclass(frozen=True)
class _Entry:
    keys: list[Any]  # the optree path entries (dict keys, field names, indices)
    kind: str  # "tensor", "rng", or a Python type name in _PY_KINDS
    value: Any  # decoded value of a non-tensor leaf; None for tensors


@dataclasses.dataclass(frozen=True)
class _Header:
    """The parsed lightfunc metadata of a checkpoint file."""

    entries: dict[str, _Entry]  # path -> entry, in flattening order
    aliases: dict[str, str]  # alias path -> stored tensor name
    checksums: dict[str, int]  # stored tensor name -> CRC-32
    user: Any

    @classmethod
    def parse(cls, f: TensorFile) -> _Header:
        meta, path = f.metadata, f.path
        fmt = meta.get("format")
        if fmt != CHECKPOINT_FORMAT:
            hint = (
                "it is a parameters file written by lightfunc.export_params: read it with "
                "lightfunc.load_params"
                if fmt == PARAMS_FORMAT
                else "it was not written by lightfunc.save. Read plain parameter files with "
                "lightfunc.load_params or safetensors.torch.load_file"
            )
            raise CheckpointError(
                f"'{path}' is not a lightfunc checkpoint (metadata `format` is {fmt!r}, expected "
                f"{CHECKPOINT_FORMAT!r}): {hint}."
            )
        version = meta.get("format_version", "")
        if not version.isdigit() or int(version) < 1:
            raise _malformed(path, f"`format_version` is {version!r}, expected an integer >= 1")
        if int(version) > FORMAT_VERSION:
            raise CheckpointError(
                f"'{path}' has checkpoint format version {version}, written by lightfunc "
                f"{meta.get('lightfunc_version')}; this lightfunc reads versions up to "
                f"{FORMAT_VERSION}. Upgrade lightfunc to load it."
            )
        raw_leaves, raw_aliases = _json(f, "leaves"), _json(f, "aliases")
        raw_checksums = _json(f, "checksums")
        try:
            entries = {
                e["path"]: _Entry(list(e["keys"]), e["kind"], _decode(e["kind"], e.get("value")))
                for e in raw_leaves
            }
            aliases = {str(a): str(s) for a, s in raw_aliases.items()}
            checksums = {str(n): int(c) for n, c in raw_checksums.items()}
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            problem = f"the `leaves`/`aliases`/`checksums` metadata is invalid ({e!r})"
            raise _malformed(path, problem) from e
        header = cls(entries, aliases, checksums, _json(f, "user_metadata"))
        stored = {p for p, e in entries.items() if e.kind == "tensor" and p not in aliases}
        if stored != set(f.names) or not set(aliases.values()) <= stored or stored - set(checksums):
            raise _malformed(path, "its tensors do not match the `leaves` and `checksums` metadata")
        return header


def _malformed(path: Path, problem: str) -> CheckpointError:
    return CheckpointError(
        f"The checkpoint '{path}' has malformed lightfunc metadata: {problem}. The file was edited "
        f"or corrupted; use another checkpoint."
    )


def _json(f: TensorFile, key: str) -> Any:
    if key not in f.metadata:
        raise _malformed(f.path, f"the metadata key {key!r} is missing")
    try:
        return json.loads(f.metadata[key])
    except json.JSONDecodeError as e:
        raise _malformed(f.path, f"the metadata key {key!r} is not valid JSON ({e})") from e


def _flatten(tree: PyTree, what: str) -> tuple[list[str], list[list[Any]], list[Any], Any]:
    """Path strings, JSON-able path keys, leaves (`RngKey`s included) and structure of `tree`."""
    paths, leaves, spec = optree.tree_flatten_with_path(
        tree, is_leaf=lambda x: isinstance(x, RngKey), namespace=NAMESPACE
    )
    names = [path_str(p) for p in paths]
    seen: dict[str, tuple[Any, ...]] = {}
    for name, p in zip(names, paths, strict=True):
        if name == "__metadata__":
            raise ValueError(
                f"{what} has a leaf at path `__metadata__`, a name safetensors reserves for its "
                f"header. Rename that key (e.g. to `metadata`)."
            )
        if name in seen:
            raise ValueError(
                f"{what} has two leaves with the same path string `{name}` (path entries "
                f"{list(seen[name])} and {list(p)}); rename one of the keys so paths stay unique."
            )
        seen[name] = p
    keys = [[k if type(k) in (int, str) else str(k) for k in p] for p in paths]
    return names, keys, leaves, spec


def _kind(leaf: Any, path: str, what: str) -> str:
    if isinstance(leaf, torch.Tensor):
        return "tensor"
    if isinstance(leaf, RngKey):
        return "rng"
    kind = _PY_KINDS.get(type(leaf))
    if kind is None:
        raise TypeError(
            f"{what} has a leaf of type {type(leaf).__name__} at `{path}` ({leaf!r:.60}); a "
            f"checkpoint holds tensors, int, float, bool, str and RngKey leaves. Make it a tensor, "
            f"convert it (`int(x)`), or make its field static (register_dataclass(static=...))."
        )
    return kind


def _encode(kind: str, value: Any) -> Any:
    if kind == "rng":
        return {"seed": value.seed, "counter": value.counter}
    if kind == "float" and not math.isfinite(value):
        return str(value)  # "nan", "inf", "-inf": strict JSON has no such numbers
    return value


def _decode(kind: str, value: Any) -> Any:
    if kind == "tensor":
        return None
    if kind == "rng" and type(value["seed"]) is int and type(value["counter"]) is int:
        return RngKey(value["seed"], value["counter"])
    if kind == "float" and (type(value) in (int, float) or value in ("nan", "inf", "-inf")):
        return float(value)
    if kind in ("int", "bool", "str") and type(value).__name__ == kind:
        return value
    raise ValueError(f"bad {kind} leaf value {value!r}")


def _user_json(metadata: Mapping[str, Any] | None) -> str:
    if metadata is not None and not isinstance(metadata, Mapping):
        raise TypeError(f"`metadata` must be a dict, got {type(metadata).__name__}.")
    try:
        return json.dumps(None if metadata is None else dict(metadata))
    except (TypeError, ValueError) as e:
        raise TypeError(
            f"`metadata` must be JSON-serialisable (str keys; numbers, strings, lists, dicts): {e}. "
            f"Convert tensors with `.item()` / `.tolist()`."
        ) from e


def _check_paths(path: Path, header: _Header, names: list[str]) -> None:
    missing = [n for n in names if n not in header.entries]
    known = set(names)
    extra = [n for n in header.entries if n not in known]
    if not missing and not extra:
        return
    raise CheckpointError(
        f"The checkpoint '{path}' does not match the structure of `like`: "
        f"missing in the file: {_some(missing)}; not in the template: {_some(extra)}.\n"
        f"  file ({len(header.entries)} leaves): {_some(list(header.entries))}\n"
        f"  template ({len(names)} leaves): {_some(names)}\n"
        f"Build `like` the way the saved tree was built (same model, optimizer and wrapper: a "
        f"TrainerState checkpoint needs a TrainerState template), or read the parameters alone "
        f"with lightfunc.load_params."
    )


def _some(items: list[str], limit: int = 8) -> str:
    if not items:
        return "none"
    more = f", ... ({len(items) - limit} more)" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more


def _check_leaves(
    path: Path, f: TensorFile, header: _Header, names: list[str], leaves: list[Any]
) -> None:
    problems = []
    for name, leaf in zip(names, leaves, strict=True):
        entry = header.entries[name]
        kind = _kind(leaf, name, "`like`")
        if kind != entry.kind:
            problems.append(
                f"{name}: the file has a leaf of kind {entry.kind!r}, the template {describe_leaf(leaf)}"
            )
            continue
        if kind != "tensor":
            continue
        stored = header.aliases.get(name, name)
        shape, dtype = f.shape(stored), f.dtype(stored)
        if shape != tuple(leaf.shape) or dtype != leaf.dtype:
            have = dtype_name(dtype) if isinstance(dtype, torch.dtype) else dtype
            problems.append(
                f"{name}: the file has shape {shape} dtype {have}, the template shape "
                f"{tuple(leaf.shape)} dtype {dtype_name(leaf.dtype)}"
            )
    if problems:
        raise CheckpointError(
            f"The checkpoint '{path}' does not match `like` at {len(problems)} leaves:\n  "
            + "\n  ".join(problems)
            + "\nBuild `like` with the saved run's configuration (model sizes, dtypes, "
            "precision), or convert after loading into a template that matches the file."
        )


def _place(tensor: torch.Tensor, like: torch.Tensor, device: torch.device | None) -> torch.Tensor:
    if device is None:
        device = like.device if like.device.type != "meta" else torch.device("cpu")
    tensor = tensor.to(device)
    if isinstance(like, torch.nn.Parameter):
        return torch.nn.Parameter(tensor, requires_grad=like.requires_grad)
    return tensor.requires_grad_(like.requires_grad)
