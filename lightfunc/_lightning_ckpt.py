"""Resuming from a Lightning `.ckpt`: its weights and optimizer state as a `TrainState`.

    state = lf.from_lightning_checkpoint("epoch=3.ckpt", model, lf.optim.adamw(1e-3, weight_decay=0.1))
    lf.fit(train_step, state, loader, ...)      # the next update is the one Lightning would make

A Lightning checkpoint is a pickle (`torch.save` of a dict). lightfunc reads
pickle nowhere else; this converter reads it with `torch.load(...,
weights_only=True)`, torch's restricted unpickler that builds tensors and
plain containers only and refuses anything that would run code, and writes
nothing. Save the result with `lf.save` to have the run as safetensors.

What is carried over: the module's parameters and buffers (the
`LightningModule`'s `state_dict`, the attribute prefix such as `"model."`
removed), and the state of the first optimizer: Adam / AdamW moments and step
count (`exp_avg`, `exp_avg_sq`, `step`), SGD's momentum buffers. The
optimizer's hyper-parameters are not read from the file: pass the same
`tx` as `configure_optimizers` built (same lr, betas, weight decay), and the
next update equals the one `torch.optim` would make after Lightning's resume.
Learning-rate scheduler state and the loop counters (`global_step`,
`epoch`) are not converted; `TrainState.step` is the optimizer's step count.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import torch

from ._state import TrainState
from .optim._base import GradientTransformation
from .optim._masking import MaskedNode
from .optim._transforms import ScaleByAdamState, ScaleByScheduleState, TraceState


def from_lightning_checkpoint(
    path: str | os.PathLike[str],
    model: torch.nn.Module,
    tx: GradientTransformation,
    *,
    prefix: str | None = None,
    param_names: list[str] | None = None,
    seed: int | None = 0,
) -> TrainState:
    """A `TrainState` holding a Lightning checkpoint's weights and optimizer state.

    Args:
        path: the `.ckpt` file Lightning wrote.
        model: the `nn.Module` the weights belong to (the one your
            `LightningModule` held, e.g. `self.model`); it is not modified.
        tx: the lightfunc optimizer equal to the checkpoint's (`adam`,
            `adamw` or `sgd` with the same hyper-parameters).
        prefix: the attribute the module had in the `LightningModule` plus a
            dot (`"model."`); by default it is found from the names.
        param_names: the names of the parameters in the order they were given
            to the torch optimizer; by default the module's parameters with
            `requires_grad=True`, in `named_parameters()` order (what
            `self.parameters()` gives, or a `requires_grad` filter of it).
        seed: the new state's random-stream seed (`TrainState.create`).

    Returns:
        A `TrainState` whose next `apply_gradients` makes Lightning's next update.

    Raises:
        ValueError: the file is not a Lightning checkpoint, its weights do not
            match `model`, or its optimizer state does not match `tx`.
    """
    ckpt = torch.load(os.fspath(path), map_location="cpu", weights_only=True)
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise ValueError(
            f"`path` {os.fspath(path)!r} is not a Lightning checkpoint (no `state_dict` entry; "
            f"found {sorted(ckpt)[:8] if isinstance(ckpt, dict) else type(ckpt).__name__})."
        )
    weights = _strip(ckpt["state_dict"], model, prefix)
    module = _loaded(model, weights)
    state = TrainState.create(module, tx, seed=seed)
    optimizers = ckpt.get("optimizer_states") or []
    if not optimizers:
        return state
    names = param_names or [n for n, p in model.named_parameters() if p.requires_grad]
    per_name, step = _by_name(optimizers[0], names)
    # SGD keeps no step count; Lightning's `global_step` counts optimizer steps.
    step = step if step is not None else int(ckpt.get("global_step", 0))
    opt_state = _fill(state.opt_state, per_name, step)
    return state.replace(opt_state=opt_state, step=torch.tensor(int(step), dtype=torch.int64))


def _strip(
    state_dict: dict[str, Any], model: torch.nn.Module, prefix: str | None
) -> dict[str, Any]:
    """The checkpoint's weights under the module's own names."""
    expected = set(model.state_dict())
    if prefix is None:
        candidates = {k[: -len(n)] for k in state_dict for n in expected if k.endswith(n)}
        prefix = next(
            (p for p in sorted(candidates, key=len) if all(p + n in state_dict for n in expected)),
            None,
        )
        if prefix is None:
            missing = sorted(expected - set(state_dict))[:6]
            raise ValueError(
                f"The checkpoint's weights do not match `model`: names like {missing} were not "
                f"found under any prefix (the checkpoint has e.g. {sorted(state_dict)[:6]}). "
                f'Pass the module the LightningModule held, or `prefix=` (e.g. `prefix="model."`).'
            )
    return {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}


def _loaded(model: torch.nn.Module, weights: dict[str, Any]) -> torch.nn.Module:
    """A copy of `model` holding `weights` (strict), with `model`'s `requires_grad` flags."""
    import copy

    module = copy.deepcopy(model)
    try:
        module.load_state_dict(weights, strict=True)
    except RuntimeError as error:
        raise ValueError(f"The checkpoint's weights do not fit `model`: {error}") from error
    return module


def _by_name(opt: dict[str, Any], names: list[str]) -> tuple[dict[str, dict[str, Any]], int | None]:
    """Per-parameter torch optimizer state keyed by parameter name, and the step count."""
    indices = [i for group in opt["param_groups"] for i in group["params"]]
    if len(indices) != len(names):
        raise ValueError(
            f"The checkpoint's optimizer has {len(indices)} parameters, the module "
            f"{len(names)} trainable ones. Pass `param_names=` in the order they were given to "
            f"the torch optimizer."
        )
    per_name = {name: opt["state"].get(i, {}) for name, i in zip(names, indices, strict=True)}
    steps = {int(s["step"]) for s in per_name.values() if "step" in s}
    if len(steps) > 1:
        raise ValueError(
            f"The checkpoint's parameters have different step counts {sorted(steps)} (some were "
            f"skipped as grad=None); lightfunc keeps one count for all. Not convertible exactly."
        )
    return per_name, steps.pop() if steps else None


def _fill(node: Any, per_name: dict[str, dict[str, Any]], step: int) -> Any:
    """`node` (an optimizer state) with the torch state filled in, leaf by leaf."""
    if isinstance(node, ScaleByAdamState):
        return dataclasses.replace(
            node,
            count=_count(node.count, step),
            mu=_moments(node.mu, per_name, "exp_avg"),
            nu=_moments(node.nu, per_name, "exp_avg_sq"),
        )
    if isinstance(node, TraceState):
        return dataclasses.replace(
            node,
            count=_count(node.count, step),
            trace=_moments(node.trace, per_name, "momentum_buffer"),
        )
    if isinstance(node, ScaleByScheduleState):
        return dataclasses.replace(node, count=_count(node.count, step))
    if isinstance(node, tuple | list):
        return type(node)(_fill(x, per_name, step) for x in node)
    if dataclasses.is_dataclass(node) and not isinstance(node, type):
        changes = {
            f.name: _fill(getattr(node, f.name), per_name, step)
            for f in dataclasses.fields(node)
            if not isinstance(getattr(node, f.name), torch.Tensor)
        }
        return dataclasses.replace(node, **changes)
    return node


def _count(like: torch.Tensor, step: int) -> torch.Tensor:
    return torch.full_like(like, step)


def _moments(tree: dict[str, Any], per_name: dict[str, dict[str, Any]], key: str) -> dict[str, Any]:
    out = {}
    for name, leaf in tree.items():
        if isinstance(leaf, MaskedNode):
            out[name] = leaf
            continue
        value = per_name.get(name, {}).get(key)
        if value is None:  # torch creates it at the parameter's first step: zero until then
            out[name] = leaf
            continue
        if value.shape != leaf.shape:
            raise ValueError(
                f"The checkpoint's `{key}` of `{name}` has shape {tuple(value.shape)}, the "
                f"parameter {tuple(leaf.shape)}: `param_names` is not in the optimizer's order."
            )
        out[name] = value.to(dtype=leaf.dtype, device=leaf.device)
    return out
