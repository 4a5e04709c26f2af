"""How metrics combine: each metric's reduction declared once, used everywhere.

A step returns `Metrics`, a dict of 0-d tensors. They are combined in three
places, all through this module and by the same rule:
- `lightfunc.evaluate`, over the batches of an evaluation;
- gradient accumulation, over the micro-batches of one update;
- data-parallel strategies, over the ranks of one step.

The rule for a metric is its *reduction*:

    ======  ====================================================  =====================
    name    combines values v_i with example counts n_i as        default for
    ======  ====================================================  =====================
    "mean"  sum(n_i * v_i) / sum(n_i): the mean over examples      floating metrics
    "sum"   sum(v_i)                                               integer metrics
    "max"   max(v_i)
    "min"   min(v_i)
    "any"   v_1 or v_2 or ...                                      bool metrics
    "last"  the last part's value (state-like: a loss scale, a
            learning rate); every rank holds the same one
    ======  ====================================================  =====================

A step declares other reductions by name when it is built:
`lightfunc.build(step, metric_reductions={"max_error": "max"})`. A metric
that only some batches report is combined over those that do.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal, get_args

import torch

from ._contract import Metrics
from ._tree import tree_leaves

Reduction = Literal["mean", "sum", "max", "min", "any", "last"]
REDUCTIONS: tuple[str, ...] = get_args(Reduction)

#: `all_reduce(tensors, op)` over processes, `op` one of "sum", "max", "min";
#: given by a strategy, so this module needs nothing from torch.distributed.
AllReduce = Callable[[list[torch.Tensor], str], list[torch.Tensor]]


def check_reductions(reductions: Any, argument: str = "metric_reductions") -> dict[str, Reduction]:
    """`reductions` validated: a mapping of metric name -> one of `REDUCTIONS`."""
    if reductions is None:
        return {}
    if not isinstance(reductions, Mapping):
        raise TypeError(
            f"`{argument}` must be a dict of metric name -> reduction "
            f"({', '.join(map(repr, REDUCTIONS))}), got {type(reductions).__name__}."
        )
    for name, how in reductions.items():
        if not isinstance(name, str) or how not in REDUCTIONS:
            raise ValueError(
                f"`{argument}` maps {name!r} to {how!r}; expected a metric name (str) mapped to "
                f"one of {', '.join(map(repr, REDUCTIONS))}."
            )
    return dict(reductions)


def reduction_of(name: str, value: torch.Tensor, declared: Mapping[str, Reduction]) -> Reduction:
    """The reduction of metric `name`: declared, or by dtype (bool: any, int: sum, float: mean)."""
    if name in declared:
        return declared[name]
    if value.dtype == torch.bool:
        return "any"
    if value.is_floating_point() or value.is_complex():
        return "mean"
    return "sum"


class MetricTotals:
    """Metrics combined incrementally (over an evaluation's batches, or micro-batches).

    `add(metrics, count)` for each part, `result()` at the end. Device
    tensors only: nothing is read back to the host.
    """

    def __init__(self, declared: Mapping[str, Reduction] | None = None) -> None:
        self.declared = dict(declared or {})
        self._totals: dict[str, torch.Tensor] = {}
        self._counts: dict[str, torch.Tensor | float] = {}
        self._how: dict[str, Reduction] = {}

    def add(self, metrics: Mapping[str, torch.Tensor], count: torch.Tensor | float) -> None:
        """Fold in one part's metrics, which stand for `count` examples."""
        for name, value in metrics.items():
            how = self._how.setdefault(name, reduction_of(name, value, self.declared))
            if how == "mean":
                value = value * count
            previous = self._totals.get(name)
            if previous is None or how == "last":
                self._totals[name] = value
            else:
                self._totals[name] = _combine(how, previous, value)
            if how == "mean":
                self._counts[name] = self._counts.get(name, 0.0) + count

    def result(self) -> Metrics:
        """The combined metrics (means divided by their example counts)."""
        out: Metrics = {}
        for name, total in self._totals.items():
            out[name] = total / self._counts[name] if self._how[name] == "mean" else total
        return out

    def __bool__(self) -> bool:
        return bool(self._totals)


def combine(
    parts: Sequence[Mapping[str, torch.Tensor]],
    counts: Sequence[torch.Tensor | float],
    declared: Mapping[str, Reduction] | None = None,
) -> Metrics:
    """`parts` (each standing for `counts[i]` examples) combined by each metric's reduction."""
    totals = MetricTotals(declared)
    for metrics, count in zip(parts, counts, strict=True):
        totals.add(metrics, count)
    return totals.result()


def reduce_over_processes(
    metrics: Any,
    count: torch.Tensor,
    declared: Mapping[str, Reduction],
    all_reduce: AllReduce,
) -> Any:
    """`metrics` of this process (over `count` examples) combined with every other's.

    Means are weighted by each process's example count (so ranks with
    uneven batches still give the mean over all examples). One collective
    per kind of reduction used. Anything but a dict of 0-d tensors (a
    predict step's outputs) is returned unchanged.
    """
    if not isinstance(metrics, Mapping) or not metrics:
        return metrics
    if not all(isinstance(v, torch.Tensor) and v.ndim == 0 for v in metrics.values()):
        return metrics
    groups: dict[str, list[str]] = {}
    for name, value in metrics.items():
        groups.setdefault(reduction_of(name, value, declared), []).append(name)
    out = dict(metrics)
    for how, names in groups.items():
        if how == "mean":
            weight = count.to(torch.float32)
            values = [
                metrics[n].to(torch.promote_types(metrics[n].dtype, torch.float32)) for n in names
            ]
            summed = all_reduce([*(v * weight for v in values), weight], "sum")
            for n, total in zip(names, summed[:-1], strict=True):
                out[n] = (total / summed[-1]).to(metrics[n].dtype)
        elif how == "last":
            continue  # the same on every rank: nothing to exchange
        elif how == "any":
            reduced = all_reduce([metrics[n].to(torch.int32) for n in names], "max")
            out.update({n: v.to(torch.bool) for n, v in zip(names, reduced, strict=True)})
        else:
            reduced = all_reduce([metrics[n] for n in names], how)
            out.update(zip(names, reduced, strict=True))
    return type(metrics)(out) if isinstance(metrics, dict) else out


def _combine(how: Reduction, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    if how in ("mean", "sum"):
        return a + b
    if how == "max":
        return torch.maximum(a, b)
    if how == "min":
        return torch.minimum(a, b)
    return torch.logical_or(a, b)


def batch_size(batch: Any) -> int:
    """The number of examples in `batch`: the leading dimension of its first tensor (1 if none)."""
    for leaf in tree_leaves(batch):
        if isinstance(leaf, torch.Tensor) and leaf.ndim > 0:
            return int(leaf.shape[0])
    return 1
