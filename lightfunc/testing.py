"""Numeric assertions on pytrees, with a readable report of what differs and where."""

from __future__ import annotations

from typing import Any

import torch

from ._tree import PyTree, describe_leaf, tree_flatten_with_paths


def assert_trees_close(
    actual: PyTree,
    expected: PyTree,
    *,
    rtol: float = 0.0,
    atol: float = 0.0,
    equal_nan: bool = False,
) -> None:
    """Assert two pytrees have the same structure and elementwise-close tensor leaves.

    With the default tolerances (0, 0) the tensors must be equal. Non-tensor
    leaves must compare equal.

    Raises:
        AssertionError: listing every differing leaf by tree path, with its
            max absolute and relative difference, or the structural mismatch.
    """
    a_paths, a_leaves, a_spec = tree_flatten_with_paths(actual)
    e_paths, e_leaves, e_spec = tree_flatten_with_paths(expected)
    if a_spec != e_spec:
        missing = sorted(set(e_paths) - set(a_paths))
        extra = sorted(set(a_paths) - set(e_paths))
        raise AssertionError(
            f"tree structures differ.\n  missing in actual: {missing}\n  extra in actual: {extra}\n"
            f"  actual:   {a_spec}\n  expected: {e_spec}"
        )
    problems = []
    for path, a, e in zip(a_paths, a_leaves, e_leaves, strict=True):
        msg = _leaf_mismatch(a, e, rtol=rtol, atol=atol, equal_nan=equal_nan)
        if msg:
            problems.append(f"  {path}: {msg}")
    if problems:
        raise AssertionError(
            f"{len(problems)} of {len(a_leaves)} leaves differ (rtol={rtol}, atol={atol}):\n"
            + "\n".join(problems)
        )


def _leaf_mismatch(a: Any, e: Any, *, rtol: float, atol: float, equal_nan: bool) -> str | None:
    if not isinstance(a, torch.Tensor) or not isinstance(e, torch.Tensor):
        return (
            None if (type(a) is type(e) and a == e) else f"{describe_leaf(a)} != {describe_leaf(e)}"
        )
    if a.shape != e.shape or a.dtype != e.dtype:
        return f"actual {describe_leaf(a)}, expected {describe_leaf(e)}"
    a64, e64 = a.detach().cpu().double(), e.detach().cpu().double()
    if torch.allclose(a64, e64, rtol=rtol, atol=atol, equal_nan=equal_nan):
        return None
    diff = (a64 - e64).abs()
    finite = torch.isfinite(diff)
    max_abs = float(diff[finite].max()) if finite.any() else float("nan")
    rel = diff / e64.abs().clamp_min(torch.finfo(torch.float64).tiny)
    max_rel = float(rel[finite].max()) if finite.any() else float("nan")
    bad = int((~torch.isclose(a64, e64, rtol=rtol, atol=atol, equal_nan=equal_nan)).sum())
    return (
        f"{bad}/{a.numel()} elements differ; max abs diff {max_abs:.3g}, max rel diff {max_rel:.3g}"
    )
