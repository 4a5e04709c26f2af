"""`track_health`: per-group gradient, parameter and update norms, kept in the optimizer state.

    tx = lf.optim.track_health(lf.optim.adamw(1e-3), every=50)
    state = lf.TrainState.create(model, tx)
    # ... after a multiple of 50 updates:
    health = lf.optim.find_state(state.opt_state, lf.optim.HealthState)
    health.grad_norm, health.groups      # tensor([...]), ("encoder", "head")

A wrapper like `apply_if_finite`: whatever it remembers (an update counter
and the last statistics) lives in the `HealthState` it returns, so the
statistics are computed inside the (compiled) step and travel with
checkpoints. Whether this update is a logging one is a tensor
(`count % every == 0`), so logging and other steps run the same graph (no
recompile), in one of two ways (`branch=`):

- "cond": inside a compiled step the two cases are the branches of one
  `torch.cond`, and the statistics are computed on logging updates only.
  Inductor reads the flag on the host to pick the branch (`.item()` in the
  code it generates, torch 2.13 `_inductor/codegen/wrapper.py`
  `codegen_conditional`): free on the CPU, a device sync per step on a GPU.
- "where": the statistics are computed on every update and kept with
  `torch.where`: no sync anywhere, a few reductions over the gradients,
  parameters and updates per step (fused into the step's kernels when compiled).

"auto" (the default) is "cond" for parameters on the CPU and "where" on any
other device. An eager step (where `torch.cond` would compile its branches)
takes "cond" as a Python `if` on the flag when the flag is on the CPU
(reading it is no device sync) and "where" otherwise.

`lightfunc.callbacks.HealthMonitor` adds them to the loop's metrics as
`health/<group>/grad_norm` etc., for the loggers.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, Literal

import optree
import torch

from .._tree import NAMESPACE, PyTree, register_dataclass
from .._validate import check_choice, is_int
from ._base import GradientTransformation, OptState, Params, Updates

#: How parameters are grouped: None (by the first component of their name,
#: the top-level module), an int n (the first n components) or a function
#: of the dotted name returning the group's name.
GroupBy = int | Callable[[str], str] | None


@dataclasses.dataclass(frozen=True)
class HealthState:
    """State of `track_health`.

    Attributes:
        inner: the wrapped optimizer's state.
        count: updates made through the wrapper so far (0-d int64); a deferred
            micro-batch (`None` updates) does not count.
        at: the `count` at which the statistics below were computed (0-d
            int64; 0 before the first time).
        grad_norm: L2 norm of each group's gradients (float32, shape `[len(groups)]`).
        param_norm: L2 norm of each group's parameters before the update (float32).
        update_norm: L2 norm of each group's update, the change applied to
            its parameters (float32).
        nonfinite: number of non-finite (NaN or infinite) gradient elements
            in each group (int64).
        groups: the groups' names, in the order their first parameters come in the
            params tree (a dict's sorted keys) (static).
        every: the statistics are computed when `count` is a multiple of
            this (static).
    """

    inner: OptState
    count: torch.Tensor
    at: torch.Tensor
    grad_norm: torch.Tensor
    param_norm: torch.Tensor
    update_norm: torch.Tensor
    nonfinite: torch.Tensor
    groups: tuple[str, ...] = ()
    every: int = 50

    @property
    def update_ratio(self) -> torch.Tensor:
        """`update_norm / param_norm` per group (inf for a group whose parameters are all zero)."""
        return self.update_norm / self.param_norm

    def stats(self) -> dict[str, torch.Tensor]:
        """The statistics by name, each a `[len(groups)]` tensor on the device."""
        return {
            "grad_norm": self.grad_norm,
            "param_norm": self.param_norm,
            "update_ratio": self.update_ratio,
            "nonfinite": self.nonfinite,
        }


register_dataclass(HealthState, static=("groups", "every"))

_STATS = ("grad_norm", "param_norm", "update_norm", "nonfinite")


def track_health(
    tx: GradientTransformation,
    *,
    every: int = 50,
    groups: GroupBy = None,
    branch: Literal["auto", "cond", "where"] = "auto",
) -> GradientTransformation:
    """`tx`, also measuring per-group gradient, parameter and update norms every `every` updates.

    On every `every`-th update (the `every`-th, `2 * every`-th, ...: the
    steps a logger with `log_every_n_steps=every` writes) the wrapper
    computes, for each group of parameters, the L2 norm of its gradients,
    of its parameters (before the update) and of its update, and counts its
    non-finite gradient elements; between those updates the state keeps
    the last values. See the module docstring for how that stays one graph.

    Where to put it: a wrapper outside it sees what it sees. Inside
    `apply_if_finite` (what `TrainState.create(..., precision="16-mixed")`
    or `skip_nonfinite=True` installs around the optimizer you pass) a
    skipped update rolls the health state back with the rest of the
    optimizer state, so it never shows the non-finite gradients and its
    counter falls behind the step count by the skipped updates. To see
    them, wrap the state's whole optimizer once it is created::

        state = lf.TrainState.create(model, lf.optim.adamw(1e-3), precision="16-mixed")
        tx = lf.optim.track_health(state.tx, every=50)
        state = state.replace(tx=tx, opt_state=tx.init(state.params))

    Gradient accumulation (`build(..., accumulate_grad_batches=n)`) wraps
    outside it and hands it the summed gradient once per update; an inner
    optimizer that defers (returns `None` updates) is passed through without
    counting.

    Args:
        tx: the optimizer to wrap.
        every: compute the statistics on every `every`-th update (an int >= 1).
        groups: how to group parameters by their dotted name (`"encoder.0.weight"`):
            None (the default) by its first component (`"encoder"`: the
            top-level module), an int n by its first n components
            (`2`: `"encoder.0"`, per layer), or a function of the name
            returning the group's name.
        branch: how a compiled step skips the statistics between logging
            updates: "cond", "where" or "auto" (see the module docstring:
            "cond" computes them only when due but syncs a GPU every step;
            "where" computes them every step, without a sync).

    Returns:
        A `GradientTransformation` whose state is a `HealthState`. Its update
        needs the parameters (`tx.update(grads, state, params)`, which
        `TrainState.apply_gradients` passes).

    Raises:
        TypeError: `tx` is not a `GradientTransformation`, `every` not an
            int, `groups` not None, an int or callable; at `init`, a group
            function that returns a non-string.
        ValueError: `every` < 1, `groups` < 1, or another `branch`.

    Example:
        >>> import torch, lightfunc as lf
        >>> tx = lf.optim.track_health(lf.optim.sgd(0.1), every=1)
        >>> model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 1))
        >>> state = lf.TrainState.create(model, tx)
        >>> grads = {k: torch.ones_like(v) for k, v in state.params.items()}
        >>> health = lf.optim.find_state(state.apply_gradients(grads).opt_state, lf.optim.HealthState)
        >>> health.groups, health.grad_norm.tolist()
        (('0', '1'), [2.4494898319244385, 1.7320507764816284])
    """
    if not isinstance(tx, GradientTransformation):
        raise TypeError(
            f"`tx` must be a lightfunc.optim GradientTransformation (e.g. lightfunc.optim.adamw(1e-3)), "
            f"got {type(tx).__name__}."
        )
    if not is_int(every):
        raise TypeError(f"`every` must be an int (updates), got {type(every).__name__} {every!r}.")
    if every < 1:
        raise ValueError(
            f"`every` must be >= 1, got {every}. Use the logger's `log_every_n_steps` (e.g. 50)."
        )
    group_of = _group_function(groups)
    check_choice("branch", branch, ("auto", "cond", "where"))

    def init(params: Params) -> HealthState:
        names, leaves = _named_tensors(params)
        found = tuple(dict.fromkeys(group_of(name) for name in names))
        device = leaves[0].device if leaves else torch.device("cpu")
        zeros = torch.zeros(len(found), dtype=torch.float32, device=device)
        counter = torch.zeros((), dtype=torch.int64, device=device)
        return HealthState(
            inner=tx.init(params),
            count=counter,
            at=counter.clone(),
            grad_norm=zeros,
            param_norm=zeros.clone(),
            update_norm=zeros.clone(),
            nonfinite=torch.zeros(len(found), dtype=torch.int64, device=device),
            groups=found,
            every=every,
        )

    def update(
        updates: Updates, state: OptState, params: Params | None = None
    ) -> tuple[Updates, OptState]:
        if params is None:
            raise TypeError(
                "track_health measures the parameters too: call `tx.update(grads, state, params)` "
                "(TrainState.apply_gradients does)."
            )
        grads = updates
        updates, inner = tx.update(grads, state.inner, params)
        if updates is None:  # the wrapped optimizer deferred (an accumulated micro-batch)
            return None, dataclasses.replace(state, inner=inner)
        count = state.count + 1
        due = torch.remainder(count, state.every) == 0
        index = _grouping(state.groups, group_of)
        trees = (grads, params, updates)
        kept = tuple(getattr(state, name) for name in _STATS)
        cond = branch == "cond" or (branch == "auto" and state.count.device.type == "cpu")
        grad_norm, param_norm, update_norm, nonfinite = _stats_if(
            due, trees, index, kept, cond=cond
        )
        return updates, HealthState(
            inner=inner,
            count=count,
            at=torch.where(due, count, state.at),
            grad_norm=grad_norm,
            param_norm=param_norm,
            update_norm=update_norm,
            nonfinite=nonfinite,
            groups=state.groups,
            every=state.every,
        )

    update.wraps = tx  # type: ignore[attr-defined]
    return GradientTransformation(init, update)


def _stats_if(
    due: torch.Tensor,
    trees: tuple[PyTree, PyTree, PyTree],
    index: Callable[[str], int],
    kept: tuple[torch.Tensor, ...],
    *,
    cond: bool,
) -> tuple[torch.Tensor, ...]:
    """The fresh statistics where `due` holds, else `kept`: one graph either way.

    `cond`: skip the work when not due: with `torch.cond` in a compiled
    step, with a Python `if` eagerly when `due` is a plain CPU tensor; else
    (and otherwise) compute them and choose with `torch.where`.
    """
    compiling = torch.compiler.is_compiling()
    eager_if = cond and not compiling and due.device.type == "cpu" and not _wrapped(due)
    if eager_if and not bool(due):  # a CPU tensor: reading it is no device sync
        return kept  # eagerly, states are never written in place: no copy needed
    named = [_named_tensors(tree) for tree in trees]
    grads, params, updates = (list(found[1]) for found in named)
    slots = tuple(tuple(index(name) for name in found[0]) for found in named)
    n_groups = kept[0].shape[0]

    def fresh(
        grads: list[torch.Tensor],
        params: list[torch.Tensor],
        updates: list[torch.Tensor],
        *old: torch.Tensor,
    ) -> tuple[torch.Tensor, ...]:
        out = _group_stats((grads, params, updates), slots, n_groups)
        return tuple(x.to(o.dtype) for x, o in zip(out, old, strict=True))

    def stale(
        grads: list[torch.Tensor],
        params: list[torch.Tensor],
        updates: list[torch.Tensor],
        *old: torch.Tensor,
    ) -> tuple[torch.Tensor, ...]:
        return tuple(o.clone() for o in old)  # a branch may not return its inputs

    if cond and compiling:
        return tuple(torch.cond(due, fresh, stale, (grads, params, updates, *kept)))
    if eager_if:  # and due
        return fresh(grads, params, updates, *kept)
    new = fresh(grads, params, updates, *kept)
    return tuple(torch.where(due, a, b) for a, b in zip(new, kept, strict=True))


def _wrapped(x: torch.Tensor) -> bool:
    """Whether `x` is a torch.func transform's wrapper (a batched tensor under `vmap`, ...)."""
    return bool(torch._C._functorch.is_functorch_wrapped_tensor(x))


def _group_stats(
    leaves: tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]],
    slots: tuple[tuple[int, ...], ...],
    n_groups: int,
) -> tuple[torch.Tensor, ...]:
    """(grad_norm, param_norm, update_norm, nonfinite), each `[n_groups]`, from the leaves."""
    grads = leaves[0]
    out = [_group_norms(xs, where, n_groups) for xs, where in zip(leaves, slots, strict=True)]
    counts = [torch.isfinite(g).logical_not().sum() for g in grads]
    out.append(_group_sum(counts, slots[0], n_groups, torch.int64, grads))
    return tuple(out)


def _group_norms(xs: list[torch.Tensor], slots: tuple[int, ...], n_groups: int) -> torch.Tensor:
    """The L2 norm of each group's tensors together (float32), as the norm of their norms."""
    norms = list(torch._foreach_norm(xs, 2, dtype=torch.float32)) if xs else []
    return _group_sum([n.square() for n in norms], slots, n_groups, torch.float32, xs).sqrt()


def _group_sum(
    values: list[torch.Tensor],
    slots: tuple[int, ...],
    n_groups: int,
    dtype: torch.dtype,
    like: list[torch.Tensor],
) -> torch.Tensor:
    """`[n_groups]`: the sum of the 0-d `values` falling in each group (0 for none)."""
    device = like[0].device if like else torch.device("cpu")
    zero = torch.zeros((), dtype=dtype, device=device)
    per_group: list[list[torch.Tensor]] = [[] for _ in range(n_groups)]
    for value, slot in zip(values, slots, strict=True):
        per_group[slot].append(value)
    return torch.stack([torch.stack(vs).sum().to(dtype) if vs else zero for vs in per_group])


def _named_tensors(tree: PyTree) -> tuple[list[str], list[torch.Tensor]]:
    """Dotted names and tensors of `tree`'s tensor leaves (masked-out entries have none)."""
    paths, leaves, _ = optree.tree_flatten_with_path(tree, namespace=NAMESPACE)
    names, tensors = [], []
    for path, leaf in zip(paths, leaves, strict=True):
        if isinstance(leaf, torch.Tensor):
            names.append(".".join(str(entry) for entry in path))
            tensors.append(leaf)
    return names, tensors


def _group_function(groups: Any) -> Callable[[str], str]:
    if groups is None:
        return lambda name: name.split(".")[0]
    if is_int(groups):
        if groups < 1:
            raise ValueError(
                f"`groups` as an int is the number of name components a group keeps, >= 1; got "
                f"{groups}. Use 1 for top-level modules, 2 for their children."
            )
        return lambda name: ".".join(name.split(".")[:groups])
    if callable(groups):

        def named(name: str) -> str:
            group = groups(name)
            if not isinstance(group, str):
                raise TypeError(
                    f"`groups` must return a group name (a string) for each parameter; for "
                    f"{name!r} it returned {type(group).__name__} {group!r}."
                )
            return group

        return named
    raise TypeError(
        f"`groups` must be None (top-level modules), an int (name components kept) or a "
        f"function of the parameter name, got {type(groups).__name__} {groups!r}."
    )


def _grouping(groups: tuple[str, ...], group_of: Callable[[str], str]) -> Callable[[str], int]:
    """The index in `groups` of a parameter's group, by its name."""
    position = {group: i for i, group in enumerate(groups)}

    def index(name: str) -> int:
        group = group_of(name)
        if group not in position:
            raise ValueError(
                f"track_health: the parameter {name!r} belongs to the group {group!r}, which the "
                f"state was not created with (its groups are {list(groups)}). The parameters "
                f"changed since `init`: create the optimizer state again (`tx.init(params)`)."
            )
        return position[group]

    return index
