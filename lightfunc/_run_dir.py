"""Versioned run directories: every run of `fit` writes under its own `version_N`.

    runs/lightfunc/
        version_0/          the first run: logs/ and checkpoints/
        version_1/          the second run with the same `default_root_dir`
            logs/
            checkpoints/

As Lightning's `lightning_logs/version_N`: a new run takes the next free
number (created with `mkdir`, which fails if another run took it first, so
two runs started at once still get two directories) and never writes into
an earlier run's directory. Resuming (`fit(ckpt_path="last")`) continues in
the newest version that holds a checkpoint, and keeps writing there.

Every rank of a multi-process run must write into the same version: rank 0
picks it, and the others receive its number (`_agree`).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from pathlib import Path

import torch

PREFIX = "version_"
_VERSION = re.compile(rf"^{PREFIX}(\d{{1,9}})$")


def versions(root: Path) -> list[int]:
    """The version numbers under `root`, ascending (none if `root` does not exist)."""
    try:
        names = [p.name for p in root.iterdir() if p.is_dir()]
    except OSError:
        return []
    return sorted(int(m[1]) for name in names if (m := _VERSION.match(name)))


def new_version(root: Path) -> Path:
    """Create and return the next free `root/version_N` (the same one on every rank)."""
    number = -1
    if _rank() == 0:
        number = (versions(root) or [-1])[-1] + 1
        root.mkdir(parents=True, exist_ok=True)
        while True:
            try:
                os.mkdir(root / f"{PREFIX}{number}")
                break
            except FileExistsError:  # another run started at the same moment took it
                number += 1
    number = _agree(number)
    path = root / f"{PREFIX}{number}"
    path.mkdir(parents=True, exist_ok=True)
    return path


def resume_version(root: Path, has_checkpoint: Callable[[Path], bool]) -> Path | None:
    """The newest `root/version_N` for which `has_checkpoint(version_dir)` holds, or None.

    A run directory of lightfunc before versions (`root` itself holding
    `checkpoints/`) counts as the oldest version.
    """
    found = -1
    if _rank() == 0:
        for number in reversed(versions(root)):
            if has_checkpoint(root / f"{PREFIX}{number}"):
                found = number
                break
        else:
            found = -2 if has_checkpoint(root) else -1
    found = _agree(found)
    if found == -1:
        return None
    return root if found == -2 else root / f"{PREFIX}{found}"


def _rank() -> int:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return 0


def _agree(number: int) -> int:
    """Rank 0's `number` on every rank (itself outside a process group)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return number
    device = torch.device("cpu")
    if dist.get_backend() == "nccl":
        device = torch.device("cuda", torch.cuda.current_device())
    value = torch.tensor([number], dtype=torch.int64, device=device)
    dist.broadcast(value, src=0)
    return int(value.item())
