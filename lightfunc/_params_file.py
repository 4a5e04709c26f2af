"""Parameters alone, as a plain state-dict file any PyTorch code can load.

`export_params` writes a model's parameters and buffers under module-style
names (``0.weight``, ``1.running_mean``), the file `safetensors.torch.load_file`
returns and `nn.Module.load_state_dict` accepts. `load_params` reads such a
file, or pulls the parameters out of a full checkpoint written by `save`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from os import PathLike
from pathlib import Path
from typing import Any

import torch

from ._checkpoint import CHECKPOINT_FORMAT, PARAMS_FORMAT, _Header, _json
from ._loop import TrainerState
from ._tensorfile import CheckpointError, TensorFile, crc32, to_writable, unshare, write_file

_FIELDS = ("params", "buffers")


def export_params(
    state_or_params: Any, path: str | PathLike[str], *, verify_fsync: bool = True
) -> Path:
    """Write parameters (and buffers) alone as a plain safetensors state-dict file.

    Written atomically like `save`. Tied parameters are stored as separate
    copies, so `load_state_dict` (strict) finds every name.

    Args:
        state_or_params: a `TrainState` or `TrainerState` (its `params` and
            `buffers`, merged), an `nn.Module` (its `state_dict()`), or a dict
            name -> tensor.
        path: the file to create or replace.
        verify_fsync: fsync the file and its directory before returning.

    Returns:
        The absolute path written.

    Raises:
        TypeError: `state_or_params` is none of the above, or holds a
            non-tensor or unsavable tensor.
        ValueError: a name is both a parameter and a buffer, or is ``__metadata__``.

    Example:
        >>> import tempfile, torch, lightfunc as lf
        >>> from safetensors.torch import load_file
        >>> state = lf.TrainState.create(torch.nn.Linear(3, 2), lf.optim.sgd(0.1))
        >>> path = lf.export_params(state, tempfile.mkdtemp() + "/model.safetensors")
        >>> torch.nn.Linear(3, 2).load_state_dict(load_file(path))
        <All keys matched successfully>
    """
    from . import __version__  # lazily: lightfunc/__init__ imports this module

    tensors = {}
    for name, value in _state_dict_of(state_or_params).items():
        if name == "__metadata__":
            raise ValueError(
                "A parameter is named `__metadata__`, a name safetensors reserves; rename it."
            )
        if not isinstance(value, torch.Tensor):
            raise TypeError(
                f"`state_or_params` entry `{name}` is a {type(value).__name__}, expected a tensor."
            )
        tensors[name] = to_writable(value, name)
    tensors = unshare(tensors)
    header = {
        "format": PARAMS_FORMAT,
        "lightfunc_version": __version__,
        "checksums": json.dumps({n: crc32(t) for n, t in tensors.items()}),
    }
    return write_file(tensors, header, Path(path), fsync=verify_fsync)


def load_params(
    path: str | PathLike[str], module: torch.nn.Module | None = None, *, verify: bool = True
) -> dict[str, torch.Tensor]:
    """Read parameters (and buffers) by module-style name, optionally into `module`.

    Args:
        path: a file written by `export_params`, a checkpoint of a `TrainState`
            or `TrainerState` written by `save` (its `params` and `buffers`
            are taken, the tree prefix such as ``state.params.`` stripped), or
            any plain safetensors file (all its tensors).
        module: if given, `module.load_state_dict(result)` (strict) is called.
        verify: compare CRC-32 checksums where the file has them.

    Returns:
        dict name -> CPU tensor. Names tied in a checkpoint share one tensor.

    Raises:
        FileNotFoundError: no file at `path`.
        CheckpointError: the file is unreadable or corrupted, or a checkpoint
            has no `params`.
        RuntimeError: from `load_state_dict`, when names or shapes do not fit `module`.

    Example:
        >>> import tempfile, torch, lightfunc as lf
        >>> state = lf.TrainState.create(torch.nn.Linear(3, 2), lf.optim.sgd(0.1))
        >>> path = lf.save(state, tempfile.mkdtemp() + "/ckpt.safetensors")
        >>> sorted(lf.load_params(path, torch.nn.Linear(3, 2)))
        ['bias', 'weight']
    """
    with TensorFile(Path(path)) as f:
        fmt = f.metadata.get("format")
        if fmt == CHECKPOINT_FORMAT:
            header = _Header.parse(f)
            names = _state_dict_names(f.path, header)
            checksums = header.checksums
        else:
            names = {n: n for n in f.names}
            checksums = _params_checksums(f) if fmt == PARAMS_FORMAT else {}
        read: dict[str, torch.Tensor] = {}
        result = {}
        for key, stored in names.items():
            if stored not in read:
                read[stored] = f.read(stored, checksums.get(stored) if verify else None)
            result[key] = read[stored]
    if module is not None:
        module.load_state_dict(result)
    return result


def _state_dict_of(obj: Any) -> Mapping[str, Any]:
    if isinstance(obj, TrainerState):
        obj = obj.state
    if isinstance(obj, torch.nn.Module):
        return obj.state_dict()
    if isinstance(obj, Mapping):
        return obj
    params, buffers = getattr(obj, "params", None), getattr(obj, "buffers", None)
    if isinstance(params, Mapping) and isinstance(buffers, Mapping):
        both = set(params) & set(buffers)
        if both:
            raise ValueError(
                f"`state_or_params` has names that are both parameters and buffers: {sorted(both)}. "
                f"Rename them; a state dict has one entry per name."
            )
        return {**params, **buffers}
    raise TypeError(
        f"`state_or_params` must be a TrainState, a TrainerState, an nn.Module or a dict name -> "
        f"tensor, got {type(obj).__name__}."
    )


def _params_checksums(f: TensorFile) -> dict[str, int]:
    try:
        return {str(n): int(c) for n, c in _json(f, "checksums").items()}
    except (AttributeError, TypeError, ValueError) as e:
        raise CheckpointError(
            f"The parameters file '{f.path}' has a malformed `checksums` metadata entry ({e!r}); "
            f"it was edited or corrupted."
        ) from e


def _state_dict_names(path: Path, header: _Header) -> dict[str, str]:
    """State-dict name -> stored tensor name, for the `params` and `buffers` of a checkpoint.

    The train state is the shallowest node with a `params` field: for a
    `TrainState` its paths are ``params.<name>``, for a `TrainerState`
    ``state.params.<name>``. Optimizer moments (``opt_state...``) are skipped.
    """
    depths = [e.keys.index("params") for e in header.entries.values() if "params" in e.keys]
    if not depths:
        raise CheckpointError(
            f"The checkpoint '{path}' has no `params` (it is not a TrainState or TrainerState "
            f"checkpoint). Load it with lightfunc.load(path, like=...) instead."
        )
    depth = min(depths)
    prefix = next(
        e.keys[:depth] for e in header.entries.values() if e.keys[depth:][:1] == ["params"]
    )
    names: dict[str, str] = {}
    for tree_path, e in header.entries.items():
        if e.kind != "tensor" or e.keys[:depth] != prefix or len(e.keys) <= depth + 1:
            continue
        if e.keys[depth] not in _FIELDS:
            continue
        name = ".".join(str(k) for k in e.keys[depth + 1 :])
        if name in names:
            raise CheckpointError(
                f"The checkpoint '{path}' has `{name}` both as a parameter and as a buffer; "
                f"read it with lightfunc.load(path, like=...) instead."
            )
        names[name] = header.aliases.get(tree_path, tree_path)
    return names
