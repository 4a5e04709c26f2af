"""Seeding Python, NumPy and torch, and DataLoader workers, in one call."""

from __future__ import annotations

import os
import random

import numpy as np
import torch

_WORKERS_ENV = "LIGHTFUNC_SEED_WORKERS"


def seed_everything(seed: int, *, workers: bool = True) -> int:
    """Seed `random`, NumPy and torch (all devices) with `seed`.

    Args:
        seed: the seed; must fit in 32 bits unsigned (NumPy's limit).
        workers: also make `seed_worker` (pass it as a DataLoader's
            `worker_init_fn`) derive per-worker seeds for `random` and NumPy.
            torch already seeds each worker's torch generator from the main
            process's generator, which this call seeds.

    Returns:
        The seed, for logging.

    Raises:
        ValueError: if `seed` is out of range.

    Randomness *inside* built steps does not depend on this: it comes from the
    state's `RngKey` (see `TrainState.create(seed=...)`).
    """
    if not isinstance(seed, int) or not 0 <= seed < 2**32:
        raise ValueError(f"`seed` must be an int in [0, 2**32), got {seed!r}.")
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # seeds every CUDA device too, lazily
    os.environ[_WORKERS_ENV] = "1" if workers else "0"
    return seed


def seed_worker(worker_id: int) -> None:
    """A DataLoader `worker_init_fn` that seeds `random` and NumPy in each worker.

    The seed comes from the worker's torch seed (which DataLoader derives
    from the main process's generator and the worker id), so it is distinct
    per worker and reproducible after `seed_everything`. Does nothing when
    `seed_everything(..., workers=False)` was called.
    """
    if os.environ.get(_WORKERS_ENV, "1") == "0":
        return
    worker_seed = torch.initial_seed() % 2**32
    random.seed(worker_seed)
    np.random.seed(worker_seed)
