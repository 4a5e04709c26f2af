import random

import numpy as np
import pytest
import torch

import lightfunc as lf


def _draw():
    return random.random(), float(np.random.rand()), float(torch.rand(()))


def test_seed_everything_makes_python_numpy_and_torch_repeat():
    lf.seed_everything(42)
    first = _draw()
    lf.seed_everything(42)
    assert _draw() == first
    lf.seed_everything(43)
    assert _draw() != first


def test_seed_everything_rejects_out_of_range_seeds():
    with pytest.raises(ValueError, match=r"`seed` must be an int in \[0, 2\*\*32\), got -1"):
        lf.seed_everything(-1)
    with pytest.raises(ValueError, match=r"got 1.5"):
        lf.seed_everything(1.5)  # type: ignore[arg-type]


class _NumpyNoise(torch.utils.data.Dataset):
    def __len__(self):
        return 8

    def __getitem__(self, i):
        return torch.tensor(np.random.rand())


def _worker_draws(seed):
    lf.seed_everything(seed)
    loader = torch.utils.data.DataLoader(
        _NumpyNoise(), batch_size=2, num_workers=2, worker_init_fn=lf.seed_worker
    )
    return torch.cat(list(loader))


@pytest.mark.slow
def test_seed_worker_makes_numpy_in_dataloader_workers_reproducible_and_distinct():
    a, b = _worker_draws(5), _worker_draws(5)
    assert torch.equal(a, b)
    # Workers 0 and 1 alternate batches; without per-worker seeding they'd draw the same numbers.
    assert not torch.equal(a[0:2], a[2:4])
    assert not torch.equal(a, _worker_draws(6))
