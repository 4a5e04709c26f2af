"""`ModelSummary` and `summarize`: a table of layers, parameter counts and sizes."""

from __future__ import annotations

import sys
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, TextIO

import torch
from torch import nn

from .._callback import Callback
from .._state import TrainState
from .._validate import is_int
from ._progress import _is_rank_zero

if TYPE_CHECKING:
    from .._contract import LoopState


class ModelSummary(Callback):
    """Print a summary of the model when the run starts (Lightning's `ModelSummary`).

    Counts come from the run's state: with a `TrainState`, its `params` are
    the trainable parameters and its `buffers` are counted apart. The module,
    if given, only supplies layer names and types, and the frozen parameters
    (those of the module that the state does not train). Without a module
    the layers are read off the parameter names (`"0.weight"` -> layer `"0"`)
    and the table has no Type column (`fit(enable_model_summary=model)`
    passes the module).

    Only rank 0 of a `torch.distributed` run prints (checked in `on_start`);
    the other ranks are silent.

    Args:
        model: the module the state was built from (for types and frozen parameters).
        max_depth: how deep to list submodules: 1 lists the top-level layers,
            0 only the totals, -1 every layer.
        stream: where to print; default `sys.stdout` (looked up at `on_start`).

    Attributes:
        summary: the last printed table ("" before `on_start`).

    Raises:
        TypeError: `model` not an `nn.Module`.
        ValueError: `max_depth` below -1.

    Example:
        >>> import io, torch, lightfunc as lf
        >>> cb = lf.callbacks.ModelSummary(torch.nn.Linear(3, 2), stream=io.StringIO())
    """

    def __init__(
        self, model: nn.Module | None = None, *, max_depth: int = 1, stream: TextIO | None = None
    ) -> None:
        if model is not None and not isinstance(model, nn.Module):
            raise TypeError(
                f"`model` must be an nn.Module or None, got {type(model).__name__}. The state's "
                f"parameters are read from the run; pass the module only for layer names and types."
            )
        self.model = model
        self.max_depth = _check_depth(max_depth)
        self.stream = stream
        self.summary = ""

    def on_start(self, ls: LoopState) -> None:
        if not _is_rank_zero():
            return
        state = ls.state
        if isinstance(state, TrainState) or _is_params(state):
            self.summary = summarize(state, self.max_depth, module=self.model)
        elif self.model is not None:
            self.summary = summarize(self.model, self.max_depth)
        else:  # a custom state: which of its tensors are parameters is unknown
            self.summary = (
                f"ModelSummary: the state is a {type(state).__name__}, not a TrainState or a dict "
                f"of parameter tensors; pass the module as `ModelSummary(model=...)` for a summary."
            )
        print(self.summary, file=self.stream if self.stream is not None else sys.stdout)


def summarize(
    model_or_params: nn.Module | TrainState | Mapping[str, torch.Tensor],
    max_depth: int = 1,
    *,
    module: nn.Module | None = None,
) -> str:
    """A table of layers (name, type, parameters) and totals: trainable, frozen, buffers, MB.

    Args:
        model_or_params: a module (trainable = `requires_grad`), a `TrainState`
            (trainable = its `params`, buffers = its `buffers`), or a dict of
            parameter tensors (all counted as trainable).
        max_depth: 1 lists the top-level layers, 0 only the totals, -1 every layer.
        module: with a state or a dict, the module it came from: layer types,
            and its parameters missing from the state are counted as frozen.

    Returns:
        The table as text. Sizes are in MB (10**6 bytes), from each tensor's
        number of elements times its dtype's element size.

    Raises:
        TypeError: `model_or_params` or `module` of another type.
        ValueError: `max_depth` below -1.

    Example:
        >>> import torch, lightfunc as lf
        >>> print(lf.callbacks.summarize(torch.nn.Linear(3, 2)).splitlines()[-4])
        Total params:     8
    """
    max_depth = _check_depth(max_depth)
    if module is not None and not isinstance(module, nn.Module):
        raise TypeError(f"`module` must be an nn.Module or None, got {type(module).__name__}.")
    if isinstance(model_or_params, nn.Module):
        module = model_or_params
    trainable, frozen, buffers = _split(model_or_params, module)
    rows = _layer_rows({**trainable, **frozen}, module, max_depth)
    return _render(rows, trainable, frozen, buffers)


Named = dict[str, torch.Tensor]


def _split(source: Any, module: nn.Module | None) -> tuple[Named, Named, Named]:
    """(trainable, frozen, buffers) tensors by name."""
    trainable: Named
    frozen: Named = {}
    buffers: Named = {}
    if isinstance(source, nn.Module):
        named: Named = dict(source.named_parameters())
        trainable = {n: p for n, p in named.items() if p.requires_grad}
        frozen = {n: p for n, p in named.items() if not p.requires_grad}
        buffers = dict(source.named_buffers())
        return trainable, frozen, buffers
    if isinstance(source, TrainState):
        trainable, buffers = _tensors(source.params), _tensors(source.buffers)
    elif isinstance(source, Mapping):
        trainable = _tensors(source)
    else:
        raise TypeError(
            f"`model_or_params` must be an nn.Module, a TrainState or a dict of tensors, "
            f"got {type(source).__name__}."
        )
    if module is not None:  # the module's parameters the state does not train are frozen
        frozen = {n: p for n, p in module.named_parameters() if n not in trainable}
    return trainable, frozen, buffers


def _is_params(state: Any) -> bool:
    return isinstance(state, Mapping) and all(isinstance(v, torch.Tensor) for v in state.values())


def _check_depth(max_depth: int) -> int:
    if not is_int(max_depth) or max_depth < -1:
        raise ValueError(
            f"`max_depth` must be an int >= -1 (-1: every layer, 0: totals only), got {max_depth!r}."
        )
    return max_depth


def _tensors(named: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    return {n: t for n, t in named.items() if isinstance(t, torch.Tensor)}


def _layer_rows(
    params: dict[str, torch.Tensor], module: nn.Module | None, max_depth: int
) -> list[tuple[str, str, int]]:
    """(name, type, parameter count) per layer down to `max_depth`, in definition order."""
    if max_depth == 0:
        return []
    if module is not None:
        layers = [(n, type(m).__name__) for n, m in module.named_modules() if n]
    else:  # no module: layers are the name prefixes of the parameters
        prefixes: dict[str, None] = {}
        for name in params:
            parts = name.split(".")[:-1]
            for depth in range(1, len(parts) + 1):
                prefixes.setdefault(".".join(parts[:depth]))
        layers = [(n, "") for n in prefixes]  # types unknown: the column is left out
    rows = []
    for name, kind in layers:
        if max_depth != -1 and name.count(".") + 1 > max_depth:
            continue
        count = sum(t.numel() for n, t in params.items() if n.startswith(name + "."))
        rows.append((name, kind, count))
    return rows


def _render(
    rows: list[tuple[str, str, int]],
    trainable: dict[str, torch.Tensor],
    frozen: dict[str, torch.Tensor],
    buffers: dict[str, torch.Tensor],
) -> str:
    lines = []
    if rows:
        typed = any(k for _, k, _ in rows)
        table = [("Name", "Type", "Params")] + [(n, k, _count(c)) for n, k, c in rows]
        name_w, type_w, count_w = (max(len(r[col]) for r in table) for col in range(3))
        text = [
            f"{n:<{name_w}} | {k:<{type_w}} | {c:>{count_w}}"
            if typed
            else f"{n:<{name_w}} | {c:>{count_w}}"
            for n, k, c in table
        ]
        rule = "-" * len(text[0])
        lines += [text[0], rule, *text[1:], rule]
    n_train, n_frozen, n_buf = (
        sum(t.numel() for t in d.values()) for d in (trainable, frozen, buffers)
    )
    param_bytes = _bytes(trainable) + _bytes(frozen)
    lines += [
        f"Trainable params: {_count(n_train)}",
        f"Frozen params:    {_count(n_frozen)}",
        f"Total params:     {_count(n_train + n_frozen)}",
        f"Buffers:          {_count(n_buf)}",
        f"Params size (MB): {param_bytes / 1e6:.3f}",
        f"Total size (MB):  {(param_bytes + _bytes(buffers)) / 1e6:.3f} (params and buffers)",
    ]
    return "\n".join(lines)


def _bytes(named: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in named.values())


def _count(n: int) -> str:
    return f"{n:,}"
