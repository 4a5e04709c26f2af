import functools
import time

import pytest
import torch
from helpers import make_model, make_steps

import lightfunc as lf
from lightfunc.testing import assert_trees_close


class Counting:
    """A map-style dataset of (x, y) examples that records every index read."""

    def __init__(self, n=100, seed=1):
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, 8, generator=g)
        self.y = (self.x[:, 0] > 0).long() + (self.x[:, 1] > 0).long()
        self.reads = []

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        self.reads.append(i)
        return self.x[i], self.y[i]


def _ids(batches):
    """Each batch's example ids, for a dataset whose only column is `arange(n)`."""
    return [b.tolist() for b in batches]


def _flat_ids(batches):
    """All example ids of `batches`, in order."""
    return torch.cat(list(batches)).tolist()


def test_the_same_seed_gives_the_same_batches():
    data = torch.arange(50)
    a = lf.Loader(data, 8, seed=3)
    b = lf.Loader(data, 8, seed=3)
    for epoch in range(3):
        assert _ids(a.iter_from(epoch, 0)) == _ids(b.iter_from(epoch, 0))
        assert _ids(a.iter_from(epoch, 0)) == _ids(a.iter_from(epoch, 0))


def test_epochs_and_seeds_change_the_order_of_a_permutation():
    data = torch.arange(50)
    loader = lf.Loader(data, 8, seed=3)
    orders = [_flat_ids(loader.iter_from(epoch, 0)) for epoch in range(3)]
    assert all(sorted(order) == list(range(50)) for order in orders)
    assert orders[0] != orders[1] != orders[2] != orders[0]
    other_seed = _flat_ids(lf.Loader(data, 8, seed=4).iter_from(0, 0))
    assert other_seed != orders[0]


def test_shuffle_false_keeps_the_dataset_order_every_epoch():
    loader = lf.Loader(torch.arange(10), 4, shuffle=False)
    for epoch in range(2):
        assert _ids(loader.iter_from(epoch, 0)) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]


def test_drop_last_sets_the_length_and_the_last_batch_size():
    kept = lf.Loader(torch.arange(10), 4)
    dropped = lf.Loader(torch.arange(10), 4, drop_last=True)
    assert len(kept) == 3 and [len(b) for b in kept] == [4, 4, 2]
    assert len(dropped) == 2 and [len(b) for b in dropped] == [4, 4]
    assert len(lf.Loader(torch.arange(12), 4, drop_last=True)) == 3


def test_set_epoch_selects_the_epoch_that_iteration_yields():
    loader = lf.Loader(torch.arange(20), 6, seed=1)
    assert _ids(loader) == _ids(loader.iter_from(0, 0)) == _ids(loader)  # no set_epoch: repeats
    loader.set_epoch(2)
    assert loader.epoch == 2 and _ids(loader) == _ids(loader.iter_from(2, 0))


@pytest.mark.parametrize("position", [0, 1, 3, 4])
def test_iter_from_is_the_tail_of_the_epoch(position):
    loader = lf.Loader(torch.arange(30), 8, seed=5)  # 4 batches, the last of 6
    whole = _ids(loader.iter_from(1, 0))
    assert _ids(loader.iter_from(1, position)) == whole[position:]


def test_iter_from_reads_only_the_examples_it_yields():
    dataset = Counting(n=30)
    loader = lf.Loader(dataset, 8, seed=5)
    expected = loader.indices(2)[16:].tolist()  # batches 2 and 3
    batches = list(loader.iter_from(2, 2))
    assert dataset.reads == expected
    assert torch.equal(batches[0][1], dataset.y[expected[:8]])


def test_tensor_datasets_yield_a_tensor_or_a_tuple_indexed_by_the_batch():
    x, y = torch.randn(10, 3), torch.arange(10) * 2
    single = next(iter(lf.Loader(x, 4, seed=2)))
    pair = next(iter(lf.Loader((x, y), 4, seed=2)))
    from_dataset = next(iter(lf.Loader(torch.utils.data.TensorDataset(x, y), 4, seed=2)))
    index = lf.Loader(x, 4, seed=2).indices(0)[:4]
    assert torch.equal(single, x[index])
    assert isinstance(pair, tuple) and torch.equal(pair[0], x[index])
    assert torch.equal(pair[1], y[index])
    assert isinstance(from_dataset, tuple) and torch.equal(from_dataset[1], y[index])


def test_a_map_style_dataset_is_collated_like_the_tensor_path():
    dataset = Counting(n=30)
    by_example = list(lf.Loader(dataset, 8, seed=7))
    by_tensor = list(lf.Loader((dataset.x, dataset.y), 8, seed=7))
    assert len(by_example) == len(by_tensor) == 4
    for a, b in zip(by_example, by_tensor, strict=True):
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_collate_fn_and_getitems_are_used_for_map_style_datasets():
    class Batched(Counting):
        def __getitems__(self, keys):
            self.reads.append(tuple(keys))
            return [{"x": self.x[i], "y": self.y[i]} for i in keys]

    dataset = Batched(n=10)
    loader = lf.Loader(dataset, 4, shuffle=False, collate_fn=lambda ex: [e["y"] for e in ex])
    batches = list(loader)
    assert dataset.reads == [(0, 1, 2, 3), (4, 5, 6, 7), (8, 9)]
    assert [len(b) for b in batches] == [4, 4, 2] and torch.equal(batches[2][1], dataset.y[9])


def test_pin_memory_without_cuda_is_ignored():
    batch = next(iter(lf.Loader(torch.arange(10.0), 4, pin_memory=True)))
    assert batch.shape == (4,)


@pytest.mark.slow
def test_num_workers_give_the_batches_of_in_process_loading():
    dataset = Counting(n=50)
    in_process = lf.Loader(dataset, 8, seed=4)
    workers = lf.Loader(dataset, 8, seed=4, num_workers=2)
    for epoch, position in [(0, 0), (1, 3)]:
        expected = list(in_process.iter_from(epoch, position))
        got = list(workers.iter_from(epoch, position))
        assert len(got) == len(expected) == 7 - position
        for a, b in zip(got, expected, strict=True):
            assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


class WorkerSeeds:
    """Each example is the torch seed of the worker process that read it."""

    def __len__(self):
        return 8

    def __getitem__(self, i):
        return torch.initial_seed()


@pytest.mark.slow
def test_worker_seeds_are_a_function_of_seed_and_epoch():
    def seeds(seed, epoch):
        loader = lf.Loader(WorkerSeeds(), 2, seed=seed, num_workers=2)
        return _flat_ids(loader.iter_from(epoch, 0))

    assert seeds(0, 1) == seeds(0, 1)
    assert seeds(0, 1) != seeds(0, 2) and seeds(0, 1) != seeds(1, 1)


def test_two_ranks_partition_an_epoch():
    ranks = [lf.Loader(torch.arange(24), 5, seed=9, rank=r, world_size=2) for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == 3  # 12 examples each: 5, 5, 2
    for epoch in range(2):
        ids = [_flat_ids(loader.iter_from(epoch, 0)) for loader in ranks]
        assert sorted(ids[0] + ids[1]) == list(range(24))
        order = lf.Loader(torch.arange(24), 5, seed=9).indices(epoch).tolist()
        assert ids[0] == order[0::2] and ids[1] == order[1::2]


def test_uneven_ranks_are_padded_by_repeating_the_first_indices():
    # 10 examples over 3 ranks: the order is padded to 12 with its first 2 indices.
    ranks = [lf.Loader(torch.arange(10), 2, shuffle=False, rank=r, world_size=3) for r in range(3)]
    assert [_ids(loader) for loader in ranks] == [
        [[0, 3], [6, 9]],
        [[1, 4], [7, 0]],
        [[2, 5], [8, 1]],
    ]
    tiny = [lf.Loader(torch.arange(2), 4, rank=r, world_size=5, seed=1) for r in range(5)]
    assert all(len(loader) == 1 and len(next(iter(loader))) == 1 for loader in tiny)


def test_uneven_ranks_with_drop_last_drop_the_tail_of_the_order():
    # 10 examples over 3 ranks: 9 are kept, 3 per rank, then the partial batch is dropped.
    ranks = [
        lf.Loader(torch.arange(10), 2, shuffle=False, drop_last=True, rank=r, world_size=3)
        for r in range(3)
    ]
    assert [_ids(loader) for loader in ranks] == [[[0, 3]], [[1, 4]], [[2, 5]]]


# ---- the loop resumes a Loader exactly --------------------------------------------------------


_MODEL = make_model(dropout=0.3)
_INITIAL = lf.TrainState.create(_MODEL, lf.optim.adamw(1e-2))  # one optimizer: one tree structure


def _run(data, start=_INITIAL, stop_at=None, **kwargs):
    """Train 3 epochs (or resume `start`), recording each step's batch; break after `stop_at` steps."""
    train_step, _ = make_steps(_MODEL)
    seen = []

    def recording_step(state, batch):
        seen.append([t.clone() for t in batch])
        return train_step(state, batch)

    step = lf.build(recording_step, compile=False)
    state = start
    states = []
    for ts in lf.loop(step, state, data, max_epochs=3, **kwargs):
        states.append(ts)
        if ts.step == stop_at:
            break
    return states, seen


def _xy(n=100):
    dataset = Counting(n=n)
    return dataset.x, dataset.y


@functools.cache
def _uninterrupted():
    return _run(lf.Loader(_xy(), 32, seed=11))


# 4 batches per epoch: mid-epoch, the last batch of an epoch, the first of the next, the last step.
@pytest.mark.parametrize("stop_at", [1, 2, 4, 5, 11, 12])
def test_a_run_resumed_with_a_new_loader_sees_the_batches_of_an_uninterrupted_one(stop_at):
    straight, straight_seen = _uninterrupted()
    first, first_seen = _run(lf.Loader(_xy(), 32, seed=11), stop_at=stop_at)
    resumed, resumed_seen = _run(lf.Loader(_xy(), 32, seed=11), start=first[-1])
    assert len(straight_seen) == 12 and len(first_seen) + len(resumed_seen) == 12
    for got, expected in zip(first_seen + resumed_seen, straight_seen, strict=True):
        assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
    final = resumed[-1] if resumed else first[-1]
    assert (final.step, final.epoch, final.batch_idx) == (12, 2, 4)
    assert_trees_close(final.state, straight[-1].state)


def test_resuming_a_loader_does_not_read_the_skipped_batches():
    first, _ = _run(lf.Loader(Counting(), 32, seed=11), stop_at=7)  # epoch 1, batch_idx 3
    dataset = Counting()
    loader = lf.Loader(dataset, 32, seed=11)
    _run(loader, start=first[-1])
    expected = loader.indices(1)[3 * 32 :].tolist() + loader.indices(2).tolist()
    assert dataset.reads == expected


def test_limit_train_batches_counts_from_the_start_of_the_epoch_on_resume():
    kwargs = dict(limit_train_batches=3)
    straight, straight_seen = _run(lf.Loader(_xy(), 32, seed=11), **kwargs)
    first, first_seen = _run(lf.Loader(_xy(), 32, seed=11), stop_at=5, **kwargs)
    resumed, resumed_seen = _run(lf.Loader(_xy(), 32, seed=11), start=first[-1], **kwargs)
    assert [ts.batch_idx for ts in straight] == [1, 2, 3] * 3
    assert [ts.step for ts in first + resumed] == list(range(1, 10))
    for got, expected in zip(first_seen + resumed_seen, straight_seen, strict=True):
        assert torch.equal(got[0], expected[0])
    assert_trees_close(resumed[-1].state, straight[-1].state)


# ---- errors ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (dict(batch_size=0), ValueError, r"`batch_size` must be >= 1, got 0"),
        (dict(batch_size=2.5), TypeError, r"`batch_size` must be an int, got 2.5"),
        (dict(seed=-1), ValueError, r"`seed` must be >= 0, got -1"),
        (dict(num_workers=-1), ValueError, r"`num_workers` must be >= 0"),
        (dict(world_size=0), ValueError, r"`world_size` must be >= 1, got 0"),
        (dict(rank=2, world_size=2), ValueError, r"`rank=2` is out of range for `world_size=2`"),
        (
            dict(batch_size=8, drop_last=True, world_size=2),
            ValueError,
            r"`drop_last=True` leaves no batch: 10 examples over 2 rank\(s\) give 5 per rank",
        ),
        (dict(collate_fn=list), ValueError, r"`collate_fn` was given with a tensor dataset"),
    ],
)
def test_bad_arguments_are_rejected(kwargs, error, match):
    kwargs = {"batch_size": 4, **kwargs}
    with pytest.raises(error, match=match):
        lf.Loader(torch.arange(10), **kwargs)


def test_a_collate_fn_that_is_not_callable_is_rejected():
    with pytest.raises(TypeError, match=r"`collate_fn` must be callable, got 3"):
        lf.Loader(Counting(n=4), 2, collate_fn=3)


@pytest.mark.parametrize(
    ("dataset", "match"),
    [
        ((torch.zeros(4, 2), torch.zeros(5)), r"`dataset\[1\]` has shape \(5,\)"),
        ((torch.zeros(4, 2), torch.tensor(1.0)), r"`dataset\[1\]` has shape \(\)"),
    ],
)
def test_tensors_of_different_lengths_are_rejected(dataset, match):
    with pytest.raises(ValueError, match=match):
        lf.Loader(dataset, 2)


@pytest.mark.parametrize(
    ("dataset", "match"), [((torch.zeros(4), [1, 2]), r"holds a list at \[1\]"), ((), "is empty")]
)
def test_a_tuple_that_is_not_all_tensors_is_rejected(dataset, match):
    with pytest.raises(
        TypeError, match=f"a tuple `dataset` is read as columns of tensors.*{match}"
    ):
        lf.Loader(dataset, 2)


@pytest.mark.parametrize("dataset", [torch.zeros(0, 3), []])
def test_an_empty_dataset_is_rejected(dataset):
    with pytest.raises(ValueError, match=r"`dataset` is empty"):
        lf.Loader(dataset, 2)


def test_a_dataset_without_len_is_rejected():
    class NoLen:
        def __getitem__(self, i):
            return i

    with pytest.raises(TypeError, match=r"`dataset` must have a length \(`__len__`\).*NoLen"):
        lf.Loader(NoLen(), 2)


def test_an_iterable_dataset_is_rejected():
    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            return iter(range(4))

    with pytest.raises(
        TypeError, match=r"must be map-style.*got a Stream, which cannot be indexed"
    ):
        lf.Loader(Stream(), 2)
    with pytest.raises(TypeError, match=r"must be map-style.*got a generator"):
        lf.Loader((i for i in range(4)), 2)


def test_iter_from_rejects_a_position_past_the_epoch_and_a_negative_epoch():
    loader = lf.Loader(torch.arange(10), 4)
    assert list(loader.iter_from(0, 3)) == []
    with pytest.raises(
        ValueError, match=r"`position=4` is past the end of the epoch \(3 batches\)"
    ):
        loader.iter_from(0, 4)
    with pytest.raises(ValueError, match=r"`epoch` must be >= 0, got -1"):
        loader.iter_from(-1, 0)


# ---- speed, printed for the notes (not asserted) -----------------------------------------------


def test_print_tensor_path_speed_against_a_dataloader():
    x, y = torch.randn(1797, 64), torch.randint(0, 10, (1797,))
    ours = lf.Loader((x, y), 64, seed=0)
    theirs = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(x, y), batch_size=64, shuffle=True
    )

    def batches_per_second(loader, epochs):
        start = time.perf_counter()
        count = sum(1 for _ in range(epochs) for _ in loader)
        return count / (time.perf_counter() - start)

    ours_rate = batches_per_second(ours, 20)
    theirs_rate = batches_per_second(theirs, 3)
    print(
        f"\nLoader tensor path: {ours_rate:,.0f} batches/s; DataLoader(TensorDataset): "
        f"{theirs_rate:,.0f} batches/s; ratio {ours_rate / theirs_rate:.1f}x"
    )
