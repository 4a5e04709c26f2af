"""The checkpoint codec: a state pytree as named tensors plus a header of strings, and back.

Every file lightfunc writes about a state goes through here: single-file
checkpoints (`lightfunc.save`), parameter files (`lightfunc.save_params`) and
the index of a sharded checkpoint (`lightfunc.distributed.save_sharded`), so
the header is built in one place, `Header.encode`, and read in one place,
`Header.decode`. The file layer below (`_tensorfile`, `_atomic`) knows
safetensors and atomic renames, not trees.

    flat = flatten(tree, "`tree`")                 # paths, leaves, kinds, tied tensors
    tensors, header = encode(flat, metadata=meta)  # {name: CPU tensor}, {key: str}
    ...                                            # written by the file layer
    h = Header.decode(meta, path, tensors=names)   # parsed and validated
    h.check(flatten(like, "`like`"), path, shape_of)   # mismatches named by tree path
    tree = h.restore(flatten(like, "`like`"), read)    # `like`'s structure, the file's leaves

The header (safetensors metadata: every value a string):

- ``format``: "lightfunc.checkpoint" (a state) or "params" (a state dict);
- ``format_version`` (`FORMAT_VERSION`), ``lightfunc_version``, ``torch_version``;
- ``leaves``: JSON list, every leaf in flattening order: ``path`` (the tree
  path string, a stored tensor's name), ``keys`` (the path entries: dict
  keys, field names, indices), ``kind`` ("tensor", "rng", "int", "float",
  "bool", "str") and, for a non-tensor leaf, its ``value`` (an `RngKey` as
  {"seed", "counter"}; a non-finite float as "nan", "inf" or "-inf", since
  strict JSON has no such numbers);
- ``aliases``: JSON {path: stored path} for a tensor object met again at
  another path (tied weights): stored once, restored as one object;
- ``checksums``: JSON {stored name: CRC-32 of its bytes};
- ``user_metadata``: the JSON document given as `metadata` (or null);
- ``treespec``: the tree structure as text, for readers (loading uses the template);
- ``header_crc32`` (version 2 on): the CRC-32, as 8 hex digits, of every other
  key and value above in canonical JSON (sorted keys, ASCII, no spaces). The
  tensors have their own CRC-32s; this one covers the rest of what changes a
  resume: the step / epoch / batch counters, the `RngKey`s, every non-tensor
  leaf, the paths, the aliases and the tensors' checksums themselves. A
  CRC-32 catches every single-bit flip and every burst of up to 32 bits.

Only leaves are encoded: the structure and static fields (`TrainState.tx`,
`LoopState.strategy`) come from the template given to `restore`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import zlib
from collections.abc import Callable, Collection, Mapping
from pathlib import Path
from typing import Any

import optree
import torch

from ._rng import RngKey
from ._tensorfile import CheckpointError, TensorFile, crc32, dtype_name, to_writable, unshare
from ._tree import NAMESPACE, PyTree, describe_leaf, path_str
from ._version import __version__

CHECKPOINT_FORMAT = "lightfunc.checkpoint"
PARAMS_FORMAT = "params"
#: The newest header version this lightfunc writes and reads (older ones are read too).
#: 2: the header carries ``header_crc32``; 1: it did not (still read, unchecked).
FORMAT_VERSION = 2
HEADER_CRC = "header_crc32"
_PY_KINDS = {bool: "bool", int: "int", float: "float", str: "str"}


@dataclasses.dataclass(frozen=True)
class Leaf:
    """One leaf of a tree, as the header lists it."""

    path: str  # the tree path string (``state.params.0.weight``); a stored tensor's name
    keys: list[Any]  # the optree path entries (dict keys, field names, indices), JSON values
    kind: str  # "tensor", "rng", or a Python type name: "int", "float", "bool", "str"
    value: Any = None  # a non-tensor leaf's value (an int, ..., an RngKey); None for tensors


@dataclasses.dataclass(frozen=True)
class Flat:
    """A tree taken apart: its leaves described, the leaf objects, and its structure."""

    leaves: list[Leaf]  # in flattening order
    objects: list[Any]  # the leaves themselves (tensors, DTensors, ints, RngKeys, ...)
    aliases: dict[str, str]  # path of a tensor met before -> path it was first met at
    spec: optree.PyTreeSpec | None  # the structure; None for a flat state dict

    @property
    def tensors(self) -> dict[str, Any]:
        """The tensors to store, by path: each tensor object once (tied ones at their first path)."""
        return {
            leaf.path: obj
            for leaf, obj in zip(self.leaves, self.objects, strict=True)
            if leaf.kind == "tensor" and leaf.path not in self.aliases
        }


def flatten(tree: PyTree, what: str) -> Flat:
    """`tree`'s leaves with their paths and kinds; a tensor object at several paths is tied.

    Args:
        tree: a pytree whose leaves are tensors, ints, floats, bools, strings or `RngKey`s.
        what: how messages name `tree`, e.g. "`like`".

    Raises:
        TypeError: a leaf of another type (its path is named).
        ValueError: two leaves have the same path string, or a path is
            ``__metadata__`` (reserved by safetensors).
    """
    paths, objects, spec = optree.tree_flatten_with_path(
        tree, is_leaf=lambda x: isinstance(x, RngKey), namespace=NAMESPACE
    )
    leaves: list[Leaf] = []
    aliases: dict[str, str] = {}
    first_path: dict[int, str] = {}  # id(tensor) -> the path it was first met at
    seen: dict[str, tuple[Any, ...]] = {}
    for p, obj in zip(paths, objects, strict=True):
        name = path_str(p)
        _check_name(name, what)
        if name in seen:
            raise ValueError(
                f"{what} has two leaves with the same path string `{name}` (path entries "
                f"{list(seen[name])} and {list(p)}); rename one of the keys so paths stay unique."
            )
        seen[name] = p
        kind = _kind_of(obj, name, what)
        keys = [k if type(k) in (int, str) else str(k) for k in p]
        leaves.append(Leaf(name, keys, kind, None if kind == "tensor" else obj))
        if kind == "tensor" and id(obj) in first_path:
            aliases[name] = first_path[id(obj)]
        elif kind == "tensor":
            first_path[id(obj)] = name
    return Flat(leaves, objects, aliases, spec)


def flatten_named(tensors: Mapping[str, torch.Tensor], what: str) -> Flat:
    """A state dict (name -> tensor) as a flat tree: each name its own leaf, nothing tied.

    A tensor under two names (tied weights in `nn.Module.state_dict()`) is
    stored under both, so a strict `load_state_dict` finds every name.

    Raises:
        TypeError: a value is not a tensor.
        ValueError: a name is ``__metadata__``.
    """
    leaves = []
    for name, value in tensors.items():
        _check_name(name, what)
        if not isinstance(value, torch.Tensor):
            raise TypeError(
                f"{what} entry `{name}` is a {type(value).__name__}, expected a tensor. A state "
                f"dict holds tensors only; save other values with lightfunc.save."
            )
        leaves.append(Leaf(name, [name], "tensor"))
    return Flat(leaves, list(tensors.values()), {}, None)


def _kind_of(leaf: Any, path: str, what: str) -> str:
    """The header's kind of `leaf`: "tensor", "rng", "int", "float", "bool" or "str".

    Raises:
        TypeError: `leaf` is of another type (its `path` is named).
    """
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


def checksums(tensors: Mapping[str, torch.Tensor]) -> dict[str, int]:
    """CRC-32 of each (contiguous CPU) tensor's bytes, by name."""
    return {name: crc32(t) for name, t in tensors.items()}


def encode(
    flat: Flat, *, fmt: str = CHECKPOINT_FORMAT, metadata: Mapping[str, Any] | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors to write (dense, contiguous, CPU, no shared storage) and the header.

    Args:
        flat: the tree, from `flatten` or `flatten_named`.
        fmt: the header's ``format``: `CHECKPOINT_FORMAT` or `PARAMS_FORMAT`.
        metadata: JSON-serialisable data kept as ``user_metadata``.

    Returns:
        (stored name -> tensor, header), ready for `_tensorfile.write_file`.

    Raises:
        TypeError: `metadata` is not a JSON-serialisable dict, or a tensor
            cannot be written (sparse, a DTensor, meta, an unsupported dtype).
    """
    user = user_metadata(metadata)
    tensors = unshare({name: to_writable(t, name) for name, t in flat.tensors.items()})
    header = Header.of(flat, fmt=fmt, checksums=checksums(tensors), user=user)
    return tensors, header.encode()


def user_metadata(metadata: Mapping[str, Any] | None) -> Any:
    """`metadata` as the JSON document the header keeps (None stays None).

    Raises:
        TypeError: `metadata` is not a dict, or not JSON-serialisable.
    """
    if metadata is not None and not isinstance(metadata, Mapping):
        raise TypeError(f"`metadata` must be a dict, got {type(metadata).__name__}.")
    try:
        return json.loads(json.dumps(None if metadata is None else dict(metadata)))
    except (TypeError, ValueError) as e:
        raise TypeError(
            f"`metadata` must be JSON-serialisable (str keys; numbers, strings, lists, dicts): {e}. "
            f"Convert tensors with `.item()` / `.tolist()`."
        ) from e


def place(
    tensor: torch.Tensor, like: torch.Tensor, device: torch.device | None = None
) -> torch.Tensor:
    """`tensor` on `device` (default: `like`'s, the CPU for a meta template), as a
    Parameter if `like` is one, with `like`'s `requires_grad`."""
    if device is None:
        device = like.device if like.device.type != "meta" else torch.device("cpu")
    tensor = tensor.to(device)
    if isinstance(like, torch.nn.Parameter):
        return torch.nn.Parameter(tensor, requires_grad=like.requires_grad)
    return tensor.requires_grad_(like.requires_grad)


@dataclasses.dataclass(frozen=True)
class Header:
    """The decoded header of a checkpoint: what `encode` writes and `decode` reads."""

    fmt: str  # CHECKPOINT_FORMAT or PARAMS_FORMAT
    leaves: dict[str, Leaf]  # path -> leaf, in flattening order
    aliases: dict[str, str]  # tied path -> stored tensor name
    checksums: dict[str, int]  # stored tensor name -> CRC-32 ({} in a sharded index)
    user: Any  # the `metadata` given when saving (a JSON document), or None
    treespec: str = ""  # the saved tree's structure as text; not used to load
    lightfunc_version: str = __version__  # of the lightfunc that wrote it
    torch_version: str = torch.__version__

    @classmethod
    def of(cls, flat: Flat, *, fmt: str, checksums: Mapping[str, int], user: Any) -> Header:
        """The header of `flat`, written by this lightfunc and torch.

        Args:
            flat: the tree being saved.
            fmt: `CHECKPOINT_FORMAT` or `PARAMS_FORMAT`.
            checksums: CRC-32 of each stored tensor (empty where chunks carry them).
            user: a JSON document from `user_metadata`.
        """
        treespec = "" if flat.spec is None else str(flat.spec)
        leaves = {leaf.path: leaf for leaf in flat.leaves}
        return cls(fmt, leaves, dict(flat.aliases), dict(checksums), user, treespec)

    @property
    def stored(self) -> list[str]:
        """The names of the stored tensors (tensor leaves that are not aliases)."""
        return [p for p, e in self.leaves.items() if e.kind == "tensor" and p not in self.aliases]

    def encode(self) -> dict[str, str]:
        """The header as safetensors metadata (string values); the one place it is built."""
        entries = [_leaf_json(leaf) for leaf in self.leaves.values()]
        meta = {
            "format": self.fmt,
            "format_version": str(FORMAT_VERSION),
            "lightfunc_version": self.lightfunc_version,
            "torch_version": self.torch_version,
            "leaves": json.dumps(entries, allow_nan=False),
            "aliases": json.dumps(self.aliases),
            "checksums": json.dumps(self.checksums),
            "user_metadata": json.dumps(self.user),
            "treespec": self.treespec,
        }
        return {**meta, HEADER_CRC: header_crc32(meta)}

    @classmethod
    def decode(
        cls,
        meta: Mapping[str, str],
        source: Path,
        *,
        tensors: Collection[str],
        fmt: str = CHECKPOINT_FORMAT,
        checksummed: bool = True,
    ) -> Header:
        """Parse and validate a header written by `encode` (any version up to `FORMAT_VERSION`).

        Args:
            meta: the metadata read from the file.
            source: the file it was read from, for messages.
            tensors: the names of the tensors the file (or index) holds: they
                must be exactly the header's stored tensors.
            fmt: the format expected.
            checksummed: every stored tensor must have a checksum (False for
                a sharded index, whose chunks carry theirs).

        Raises:
            CheckpointError: another format, a newer version, or malformed
                metadata (a missing key, invalid JSON, tensors that do not
                match the leaves), naming `source`.
        """
        found = meta.get("format")
        if found != fmt:
            raise _wrong_format(source, found, fmt)
        if fmt == PARAMS_FORMAT and "format_version" not in meta:
            return cls._params_v0(meta, source, tensors)
        _check_version(meta, source)
        if int(meta["format_version"]) >= 2:
            _check_header_crc(meta, source)
        raw_leaves, raw_aliases = _json(meta, "leaves", source), _json(meta, "aliases", source)
        raw_checksums = _json(meta, "checksums", source)
        try:
            leaves = {str(e["path"]): _leaf_of(e) for e in raw_leaves}
            aliases = {str(a): str(s) for a, s in raw_aliases.items()}
            sums = {str(n): int(c) for n, c in raw_checksums.items()}
        except (KeyError, TypeError, ValueError, AttributeError, RecursionError) as e:
            problem = f"the `leaves`/`aliases`/`checksums` metadata is invalid ({e!r})"
            raise _malformed(source, problem) from e
        header = cls(
            fmt,
            leaves,
            aliases,
            sums,
            _json(meta, "user_metadata", source),
            str(meta.get("treespec", "")),
            str(meta.get("lightfunc_version", "")),
            str(meta.get("torch_version", "")),
        )
        stored = set(header.stored)
        if (
            stored != set(tensors)
            or not set(aliases.values()) <= stored
            or (checksummed and stored - set(sums))
        ):
            raise _malformed(
                source, "its tensors do not match the `leaves` and `checksums` metadata"
            )
        return header

    @classmethod
    def read(cls, f: TensorFile, *, fmt: str = CHECKPOINT_FORMAT) -> Header:
        """The validated header of the open safetensors file `f`."""
        return cls.decode(f.metadata, f.path, tensors=f.names, fmt=fmt)

    @classmethod
    def _params_v0(cls, meta: Mapping[str, str], source: Path, tensors: Collection[str]) -> Header:
        """A parameters file of lightfunc <= 0.1.0.dev0: only ``checksums``, no leaves."""
        try:
            sums = {str(n): int(c) for n, c in _json(meta, "checksums", source).items()}
        except (AttributeError, TypeError, ValueError, RecursionError) as e:
            raise CheckpointError(
                f"The parameters file '{source}' has a malformed `checksums` metadata entry "
                f"({e!r}); it was edited or corrupted."
            ) from e
        leaves = {name: Leaf(name, [name], "tensor") for name in tensors}
        version = str(meta.get("lightfunc_version", ""))
        return cls(PARAMS_FORMAT, leaves, {}, sums, None, "", version, "")

    def check(
        self,
        like: Flat,
        source: Path,
        shape_of: Callable[[str], tuple[tuple[int, ...], torch.dtype | str]],
        *,
        note: str = "",
    ) -> None:
        """Raise unless `like` has this header's paths, leaf kinds, shapes and dtypes.

        Args:
            like: the template, flattened.
            source: the checkpoint, for messages.
            shape_of: stored tensor name -> (shape, dtype) in the checkpoint.
            note: a sentence added to a shape / dtype / kind mismatch message.

        Raises:
            CheckpointError: naming every path missing on either side, or every
                leaf whose kind, shape or dtype differs (both sides given).
        """
        self._check_paths(like, source)
        problems = []
        for leaf, obj in zip(like.leaves, like.objects, strict=True):
            entry = self.leaves[leaf.path]
            if leaf.kind != entry.kind:
                problems.append(
                    f"{leaf.path}: the file has a leaf of kind {entry.kind!r}, the template "
                    f"{describe_leaf(obj)}"
                )
            elif leaf.kind == "tensor":
                shape, dtype = shape_of(self.aliases.get(leaf.path, leaf.path))
                if shape != tuple(obj.shape) or dtype != obj.dtype:
                    have = dtype_name(dtype) if isinstance(dtype, torch.dtype) else dtype
                    problems.append(
                        f"{leaf.path}: the file has shape {shape} dtype {have}, the template "
                        f"shape {tuple(obj.shape)} dtype {dtype_name(obj.dtype)}"
                    )
        if problems:
            raise CheckpointError(
                f"The checkpoint '{source}' does not match `like` at {len(problems)} leaves:\n  "
                + "\n  ".join(problems)
                + "\nBuild `like` with the saved run's configuration (model sizes, dtypes, "
                "precision), or convert after loading into a template that matches the file."
                + (f" {note}" if note else "")
            )

    def _check_paths(self, like: Flat, source: Path) -> None:
        names = [leaf.path for leaf in like.leaves]
        missing = [n for n in names if n not in self.leaves]
        known = set(names)
        extra = [n for n in self.leaves if n not in known]
        if not missing and not extra:
            return
        raise CheckpointError(
            f"The checkpoint '{source}' does not match the structure of `like`: "
            f"missing in the file: {_some(missing)}; not in the template: {_some(extra)}.\n"
            f"  file ({len(self.leaves)} leaves): {_some(list(self.leaves))}\n"
            f"  template ({len(names)} leaves): {_some(names)}\n"
            f"Build `like` the way the saved tree was built (same model, optimizer and wrapper: a "
            f"LoopState checkpoint needs a LoopState template), or read the parameters alone "
            f"with lightfunc.load_params."
        )

    def restore(self, like: Flat, read: Callable[[str, Any], Any]) -> PyTree:
        """`like`'s structure holding this header's leaves; call `check` first.

        Args:
            like: the template, flattened by `flatten`.
            read: (stored tensor name, the template's tensor) -> the tensor to
                put there; called once per stored tensor, so tied paths share it.
        """
        assert like.spec is not None, "`restore` needs a template from `flatten`"
        loaded: dict[str, Any] = {}
        out: list[Any] = []
        for leaf, obj in zip(like.leaves, like.objects, strict=True):
            entry = self.leaves[leaf.path]
            if entry.kind != "tensor":
                out.append(entry.value)
                continue
            stored = self.aliases.get(leaf.path, leaf.path)
            if stored not in loaded:
                loaded[stored] = read(stored, obj)
            out.append(loaded[stored])
        return optree.tree_unflatten(like.spec, out)


# -- pieces ------------------------------------------------------------------------


def _check_name(name: str, what: str) -> None:
    if name == "__metadata__":
        raise ValueError(
            f"{what} has a leaf at path `__metadata__`, a name safetensors reserves for its "
            f"header. Rename that key (e.g. to `metadata`)."
        )


def _leaf_json(leaf: Leaf) -> dict[str, Any]:
    entry: dict[str, Any] = {"path": leaf.path, "keys": leaf.keys, "kind": leaf.kind}
    if leaf.kind == "rng":
        entry["value"] = {"seed": leaf.value.seed, "counter": leaf.value.counter}
    elif leaf.kind == "float" and not math.isfinite(leaf.value):
        entry["value"] = str(leaf.value)  # "nan", "inf", "-inf": strict JSON has no such numbers
    elif leaf.kind != "tensor":
        entry["value"] = leaf.value
    return entry


def _leaf_of(entry: Mapping[str, Any]) -> Leaf:
    """A `Leaf` from its JSON entry (raises KeyError / TypeError / ValueError if malformed)."""
    kind: str = entry["kind"]
    value: Any = entry.get("value")
    if kind == "tensor":
        value = None
    elif kind == "rng" and type(value["seed"]) is int and type(value["counter"]) is int:
        value = RngKey(value["seed"], value["counter"])
    elif kind == "float" and (type(value) in (int, float) or value in ("nan", "inf", "-inf")):
        value = float(value)
    elif not (kind in ("int", "bool", "str") and type(value).__name__ == kind):
        raise ValueError(f"bad {kind} leaf value {value!r}")
    return Leaf(str(entry["path"]), list(entry["keys"]), kind, value)


def header_crc32(meta: Mapping[str, str]) -> str:
    """The CRC-32 of `meta` (without ``header_crc32``) in canonical JSON, as 8 hex digits."""
    body = {k: v for k, v in meta.items() if k != HEADER_CRC}
    text = json.dumps(body, sort_keys=True, ensure_ascii=True, separators=(",", ":"))
    return f"{zlib.crc32(text.encode()):08x}"


def _check_header_crc(meta: Mapping[str, str], source: Path) -> None:
    stored = meta.get(HEADER_CRC)
    if stored is None:
        raise _malformed(source, f"the metadata key {HEADER_CRC!r} is missing")
    actual = header_crc32(meta)
    if stored != actual:
        raise CheckpointError(
            f"The checkpoint '{source}' has a damaged header: its CRC-32 is {actual}, the one "
            f"stored is {stored!r}. The step / epoch counters, RNG keys or other non-tensor "
            f"values may have changed since it was written, so it cannot be trusted to resume "
            f"from; use another checkpoint."
        )


def _check_version(meta: Mapping[str, str], source: Path) -> None:
    version = meta.get("format_version", "")
    if not (isinstance(version, str) and version.isascii() and version.isdigit()) or not (
        1 <= len(version) <= 6 and int(version) >= 1
    ):
        raise _malformed(source, f"`format_version` is {version!r}, expected an integer >= 1")
    if int(version) > FORMAT_VERSION:
        raise CheckpointError(
            f"'{source}' has checkpoint format version {version}, written by lightfunc "
            f"{meta.get('lightfunc_version')}; this lightfunc reads versions up to "
            f"{FORMAT_VERSION}. Upgrade lightfunc to load it."
        )


def _wrong_format(source: Path, found: str | None, expected: str) -> CheckpointError:
    if expected != CHECKPOINT_FORMAT:
        return CheckpointError(
            f"'{source}' is not a lightfunc {expected!r} file (metadata `format` is {found!r})."
        )
    hint = (
        "it is a parameters file written by lightfunc.save_params: read it with "
        "lightfunc.load_params"
        if found == PARAMS_FORMAT
        else "it was not written by lightfunc.save. Read plain parameter files with "
        "lightfunc.load_params or safetensors.torch.load_file"
    )
    return CheckpointError(
        f"'{source}' is not a lightfunc checkpoint (metadata `format` is {found!r}, expected "
        f"{CHECKPOINT_FORMAT!r}): {hint}."
    )


def _malformed(source: Path, problem: str) -> CheckpointError:
    return CheckpointError(
        f"The checkpoint '{source}' has malformed lightfunc metadata: {problem}. The file was "
        f"edited or corrupted; use another checkpoint."
    )


def _json(meta: Mapping[str, str], key: str, source: Path) -> Any:
    if key not in meta:
        raise _malformed(source, f"the metadata key {key!r} is missing")
    try:
        return json.loads(meta[key])
    except (TypeError, ValueError, RecursionError) as e:  # also over-long ints, deep nesting
        raise _malformed(source, f"the metadata key {key!r} is not valid JSON ({e!r:.200})") from e


def _some(items: list[str], limit: int = 8) -> str:
    if not items:
        return "none"
    more = f", ... ({len(items) - limit} more)" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more
