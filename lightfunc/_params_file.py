"""Parameters alone, as a plain state-dict file any PyTorch code can load.

`save_params` writes a model's parameters and buffers under module-style
names (``0.weight``, ``1.running_mean``), the file `safetensors.torch.load_file`
returns and `nn.Module.load_state_dict` accepts. Its metadata is the header
of `lightfunc._codec` with ``format`` "params" (a CRC-32 per tensor, the
versions). `load_params` reads such a file, or pulls the parameters out of a
full checkpoint written by `save`. (`lightfunc.export_params`, the old name
of `save_params`, is a deprecated alias in the package root.)
"""

from __future__ import annotations

from collections.abc import Mapping
from os import PathLike
from pathlib import Path
from typing import Any

import torch

from ._codec import CHECKPOINT_FORMAT, PARAMS_FORMAT, Header, encode, flatten_named
from ._contract import LoopState
from ._tensorfile import CheckpointError, TensorFile, write_file

_FIELDS = ("params", "buffers")


def save_params(
    state_or_params: Any, path: str | PathLike[str], *, verify_fsync: bool = True
) -> Path:
    """Write parameters (and buffers) alone as a plain safetensors state-dict file.

    Written atomically like `save`. A tensor under several names (tied
    weights in `nn.Module.state_dict()`) is written under each of them, so
    `load_state_dict` (strict) finds every name. A `TrainState` holds a tied
    parameter once, under its first name (as `named_parameters()` lists it):
    `load_params(path, module)` fills in the other names from `module`.

    Args:
        state_or_params: a `TrainState` or `LoopState` (its `params` and
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
        >>> path = lf.save_params(state, tempfile.mkdtemp() + "/model.safetensors")
        >>> torch.nn.Linear(3, 2).load_state_dict(load_file(path))
        <All keys matched successfully>
    """
    flat = flatten_named(_state_dict_of(state_or_params), "`state_or_params`")
    tensors, header = encode(flat, fmt=PARAMS_FORMAT)
    return write_file(tensors, header, Path(path), fsync=verify_fsync)


def load_params(
    path: str | PathLike[str], module: torch.nn.Module | None = None, *, verify: bool = True
) -> dict[str, torch.Tensor]:
    """Read parameters (and buffers) by module-style name, optionally into `module`.

    Args:
        path: a file written by `save_params`, a checkpoint of a `TrainState`
            or `LoopState` written by `save` (its `params` and `buffers`
            are taken, the tree prefix such as ``state.params.`` stripped), or
            any plain safetensors file (all its tensors).
        module: if given, `module.load_state_dict(result)` (strict) is called,
            with the names `module` ties to a tensor in `result` filled in.
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
            header = Header.read(f)
            names = _state_dict_names(f.path, header)
            checksums = header.checksums
        else:
            names = {n: n for n in f.names}
            checksums = Header.read(f, fmt=PARAMS_FORMAT).checksums if fmt == PARAMS_FORMAT else {}
        read: dict[str, torch.Tensor] = {}
        result = {}
        for key, stored in names.items():
            if stored not in read:
                read[stored] = f.read(stored, checksums.get(stored) if verify else None)
            result[key] = read[stored]
    if module is not None:
        module.load_state_dict(_with_tied_names(result, module))
    return result


def _state_dict_of(obj: Any) -> Mapping[str, Any]:
    if isinstance(obj, LoopState):
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
        f"`state_or_params` must be a TrainState, a LoopState, an nn.Module or a dict name -> "
        f"tensor, got {type(obj).__name__}."
    )


def _with_tied_names(tensors: dict[str, torch.Tensor], module: torch.nn.Module) -> dict[str, Any]:
    """`tensors` plus every other name under which `module` holds one of them (tied weights).

    A `TrainState` keeps a tied parameter once, under the first name
    `named_parameters()` gives it; a strict `load_state_dict` asks for all.
    """
    named = [
        *module.named_parameters(remove_duplicate=False),
        *module.named_buffers(remove_duplicate=False),
    ]
    first: dict[int, str] = {}
    for name, t in named:
        first.setdefault(id(t), name)
    out = dict(tensors)
    for name, t in named:
        if name not in out and first[id(t)] in out:
            out[name] = out[first[id(t)]]
    return out


def _state_dict_names(path: Path, header: Header) -> dict[str, str]:
    """State-dict name -> stored tensor name, for the `params` and `buffers` of a checkpoint.

    The train state is the shallowest node with a `params` field: for a
    `TrainState` its paths are ``params.<name>``, for a `LoopState`
    ``state.params.<name>``. Optimizer moments (``opt_state...``) are skipped.
    """
    leaves = header.leaves.values()
    depths = [e.keys.index("params") for e in leaves if "params" in e.keys]
    if not depths:
        raise CheckpointError(
            f"The checkpoint '{path}' has no `params` (it is not a TrainState or LoopState "
            f"checkpoint). Load it with lightfunc.load(path, like=...) instead."
        )
    depth = min(depths)
    prefix = next(e.keys[:depth] for e in leaves if e.keys[depth:][:1] == ["params"])
    names: dict[str, str] = {}
    for e in leaves:
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
        names[name] = header.aliases.get(e.path, e.path)
    return names
