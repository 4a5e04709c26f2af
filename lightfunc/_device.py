"""Where a run lives: Lightning's `accelerator` / `devices` spellings, and moving trees there."""

from __future__ import annotations

import os
from typing import Any

import torch

from ._tree import PyTree, tree_map

_ACCELERATORS = ("auto", "cpu", "gpu", "cuda", "mps")


def resolve_device(
    accelerator: str = "auto", devices: int | str | list[int] = "auto"
) -> torch.device:
    """The `torch.device` a single-process run uses.

    Args:
        accelerator: "auto" (CUDA if available, then MPS, then CPU), "cpu",
            "gpu"/"cuda", or "mps".
        devices: "auto" or 1 (the first device of that kind), or a one-element
            list `[i]` naming the device index. More than one device needs a
            distributed launch (one process per device).

    Raises:
        ValueError: for an unknown accelerator, an unavailable one, or several devices.
    """
    if accelerator not in _ACCELERATORS:
        raise ValueError(
            f"`accelerator` must be one of {', '.join(map(repr, _ACCELERATORS))}, got {accelerator!r}."
        )
    index = _device_index(devices)
    if accelerator == "auto":
        if torch.cuda.is_available():
            accelerator = "cuda"
        elif torch.backends.mps.is_available():
            accelerator = "mps"
        else:
            accelerator = "cpu"
    if accelerator in ("gpu", "cuda"):
        if not torch.cuda.is_available():
            raise ValueError(
                f"`accelerator={accelerator!r}` was asked for but CUDA is not available on this "
                f"machine. Use accelerator='auto' or 'cpu'."
            )
        return torch.device("cuda", index)
    if accelerator == "mps":
        if not torch.backends.mps.is_available():
            raise ValueError(
                "`accelerator='mps'` was asked for but MPS is not available. Use 'auto' or 'cpu'."
            )
        return torch.device("mps")
    return torch.device("cpu")


def _device_index(devices: int | str | list[int]) -> int:
    if devices in ("auto", 1):
        # One device per process: a launched process uses the one matching its local rank.
        return int(os.environ.get("LOCAL_RANK", "0"))
    if isinstance(devices, list) and len(devices) == 1 and isinstance(devices[0], int):
        return devices[0]
    raise ValueError(
        f"`devices={devices!r}`: a single process uses one device; give 'auto', 1 or [index]. "
        f"To train on several devices, launch one process per device with a data-parallel or "
        f"sharded strategy."
    )


def to_device(tree: PyTree, device: torch.device, *, non_blocking: bool = False) -> PyTree:
    """Move every tensor in `tree` to `device` (a no-op, without copies, for tensors already there)."""

    def move(x: Any) -> Any:
        return x.to(device, non_blocking=non_blocking) if isinstance(x, torch.Tensor) else x

    return tree_map(move, tree)
