import json
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import make_model, make_steps

import lightfunc as lf


def _ls(step, *, epoch=0, val_loss=None, loss=1.0, epoch_end=False):
    state = {"w": torch.full((3,), float(step))}
    eval_metrics = None if val_loss is None else {"loss": torch.tensor(val_loss)}
    return lf.LoopState(
        state=state, step=step, epoch=epoch, batch_idx=step, metrics={"loss": torch.tensor(loss)},
        eval_metrics=eval_metrics, eval_at_step=step if val_loss is not None else -1, epoch_end=epoch_end,
    )  # fmt: skip


def test_saves_every_n_steps_and_keeps_the_last_n(tmp_path):
    manager = lf.CheckpointManager(tmp_path, every_n_steps=2, keep_last_n=2)
    for step in range(1, 8):
        manager.update(_ls(step))
    assert [p.name for p in manager.checkpoints()] == ["step=4.safetensors", "step=6.safetensors"]
    assert (tmp_path / "last.safetensors").exists()
    assert (
        lf.load(
            tmp_path / "last.safetensors", like=_ls(0).replace(metrics={}, eval_metrics=None)
        ).step
        == 6
    )


def test_keeps_exactly_the_top_k_by_the_monitored_metric_with_templated_names(tmp_path):
    manager = lf.CheckpointManager(
        tmp_path,
        monitor="val_loss",
        mode="min",
        save_top_k=2,
        filename="{epoch:02d}-{val_loss:.3f}",
        every_n_epochs=None,
    )
    for step, val in [(1, 0.9), (2, 0.5), (3, 0.7), (4, 0.2), (5, 0.8)]:
        manager.update(_ls(step, epoch=step, val_loss=val))
    assert sorted(p.name for p in manager.checkpoints()) == [
        "02-0.500.safetensors",
        "04-0.200.safetensors",
    ]
    assert manager.best() == tmp_path / "04-0.200.safetensors"
    files = {p.name for p in tmp_path.glob("*.safetensors")}
    assert files == {"02-0.500.safetensors", "04-0.200.safetensors", "last.safetensors"}


def test_max_mode_keeps_the_largest(tmp_path):
    manager = lf.CheckpointManager(
        tmp_path, monitor="val_loss", mode="max", save_top_k=1, save_last=False
    )
    for step, val in [(1, 0.1), (2, 0.9), (3, 0.4)]:
        manager.update(_ls(step, val_loss=val))
    assert [p.name for p in manager.checkpoints()] == ["step=2.safetensors"]
    assert not (tmp_path / "last.safetensors").exists()


def test_every_epoch_by_default(tmp_path):
    manager = lf.CheckpointManager(tmp_path)
    assert manager.update(_ls(1)) is None
    assert manager.update(_ls(2, epoch_end=True)) == tmp_path / "step=2.safetensors"


def test_the_index_lists_what_is_where_and_survives_a_restart(tmp_path):
    manager = lf.CheckpointManager(tmp_path, every_n_steps=1, keep_last_n=3)
    for step in range(1, 5):
        manager.update(_ls(step))
    index = json.loads((tmp_path / "index.json").read_text())
    assert [e["step"] for e in index["checkpoints"]] == [2, 3, 4]
    again = lf.CheckpointManager(tmp_path, every_n_steps=1, keep_last_n=3)
    assert again.checkpoints() == manager.checkpoints()


def test_latest_falls_back_past_a_corrupt_newest_checkpoint_with_a_warning(tmp_path):
    manager = lf.CheckpointManager(tmp_path, every_n_steps=1, save_last=False)
    for step in (1, 2, 3):
        manager.update(_ls(step))
    newest = tmp_path / "step=3.safetensors"
    data = bytearray(newest.read_bytes())
    data[-5] ^= 0xFF  # flip a byte in the tensor data
    newest.write_bytes(bytes(data))
    with pytest.warns(
        RuntimeWarning, match=r"skipping corrupt checkpoint .*step=3.*Checksum mismatch"
    ):
        assert manager.latest() == tmp_path / "step=2.safetensors"
    with pytest.warns(RuntimeWarning, match=r"skipping corrupt checkpoint"):
        restored = manager.restore({"w": torch.zeros(3)})
    assert (
        restored is not None
        and restored.step == 2
        and torch.equal(restored.state["w"], torch.full((3,), 2.0))
    )


def test_restore_returns_none_without_checkpoints(tmp_path):
    assert lf.CheckpointManager(tmp_path).restore({"w": torch.zeros(3)}) is None


def test_constructing_and_reading_change_nothing_on_disk(tmp_path):
    # Temporary files may belong to a live writer: only the first save removes
    # those of dead processes (tests/test_integrity.py).
    (tmp_path / ".step=5.safetensors.123.tmp").write_bytes(b"half a file")
    (tmp_path / ".tmpab12cd").write_bytes(b"half a file left by safetensors")
    (tmp_path / "notes.txt").write_text("kept")
    manager = lf.CheckpointManager(tmp_path / "new")
    assert manager.latest() is None and manager.restore({"w": torch.zeros(3)}) is None
    assert not (tmp_path / "new").exists()  # a reader creates no directory
    lf.CheckpointManager(tmp_path).latest()
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        ".step=5.safetensors.123.tmp",
        ".tmpab12cd",
        "notes.txt",
    ]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"every_n_steps": 0}, r"`every_n_steps` must be a positive int or None, got 0"),
        ({"mode": "best"}, r"`mode` must be 'min' or 'max', got 'best'"),
        ({"save_top_k": -2}, r"`save_top_k` must be -1 \(keep all\), 0 or positive, got -2"),
        ({"monitor": "val_loss", "keep_last_n": 2}, r"`keep_last_n` is for runs without `monitor`"),
        (
            {"filename": "{val_acc:.2f}"},
            r"cannot be formatted: 'val_acc'. Available fields: step, epoch, batch_idx",
        ),
        ({"filename": "sub/{step}"}, r"must be a plain file name"),
    ],
)
def test_bad_arguments_are_rejected(tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        lf.CheckpointManager(tmp_path, **kwargs)


def test_a_tie_keeps_the_earlier_checkpoint(tmp_path):
    manager = lf.CheckpointManager(tmp_path, monitor="val_loss", save_top_k=1, save_last=False)
    for step, val in [(1, 0.5), (2, 0.3), (3, 0.3), (4, 0.4)]:
        manager.update(_ls(step, val_loss=val))
    assert [p.name for p in manager.checkpoints()] == ["step=2.safetensors"]


class FakeStrategy:
    """A strategy on another rank (or writing directories), recording its saves instead of writing."""

    name = "fake"
    world_size = 2

    def __init__(self, *, rank=1, suffix=".safetensors"):
        self.rank, self.is_writer, self.checkpoint_suffix = rank, rank == 0, suffix
        self.saved, self.verified = [], []

    def wrap_train(self, fn, *, sync=True, metric_reductions=None):
        return fn

    def wrap_eval(self, fn, *, metric_reductions=None):
        return fn

    def prepare(self, state):
        return state

    def save(self, tree, path, *, metadata=None):
        self.saved.append((tree.step, path.name, metadata["reason"]))
        if self.is_writer and self.checkpoint_suffix == "":  # a sharded checkpoint: a directory
            path.mkdir()
            (path / "shard").write_text(str(tree.step))
        return path

    def load(self, path, *, like):
        return like.replace(step=int((path / "shard").read_text()))

    def verify(self, path):
        self.verified.append(path.name)


def test_every_rank_saves_but_only_the_writer_indexes_links_and_prunes(tmp_path):
    other = FakeStrategy(rank=1)
    manager = lf.CheckpointManager(tmp_path, every_n_steps=1, keep_last_n=1)
    for step in (1, 2, 3):
        manager.update(_ls(step).replace(strategy=other))
    assert other.saved == [(1, "step=1.safetensors", "scheduled"), (2, "step=2.safetensors", "scheduled"),
                           (3, "step=3.safetensors", "scheduled")]  # fmt: skip
    assert list(tmp_path.iterdir()) == []  # no index, no `last`, nothing pruned
    assert manager.checkpoints() == [tmp_path / "step=3.safetensors"]  # the same decisions


def test_the_writer_prunes_directory_checkpoints_and_points_last_at_the_newest(tmp_path):
    sharded = FakeStrategy(rank=0, suffix="")
    manager = lf.CheckpointManager(tmp_path, monitor="val_loss", save_top_k=1, every_n_epochs=None)
    for step, val in [(1, 0.5), (2, 0.3), (3, 0.4), (4, 0.6)]:
        manager.update(_ls(step, val_loss=val).replace(strategy=sharded))
    # step=2 is the best; step=4 is kept only as `last` (a directory cannot be hard-linked).
    assert sorted(p.name for p in tmp_path.iterdir()) == ["index.json", "step=2", "step=4"]
    index = json.loads((tmp_path / "index.json").read_text())
    assert index["last"]["path"] == "step=4" and index["last"]["step"] == 4
    assert [e["path"] for e in index["checkpoints"]] == ["step=2"]
    again = lf.CheckpointManager(tmp_path, monitor="val_loss", save_top_k=1)
    assert again.latest(strategy=sharded) == tmp_path / "step=4"
    restored = again.restore(lf.LoopState(state={"w": torch.zeros(3)}, strategy=sharded))
    assert restored is not None and restored.step == 4 and restored.strategy is sharded
    manager.update(_ls(5, val_loss=0.7).replace(strategy=sharded))  # `last` moves on: step=4 goes
    assert sorted(p.name for p in tmp_path.iterdir()) == ["index.json", "step=2", "step=5"]


def test_a_sharded_checkpoint_needs_the_strategy_that_reads_it(tmp_path):
    sharded = FakeStrategy(rank=0, suffix="")
    manager = lf.CheckpointManager(tmp_path, every_n_steps=1)
    manager.update(_ls(1).replace(strategy=sharded))
    fresh = lf.CheckpointManager(tmp_path, every_n_steps=1)
    with pytest.raises(
        ValueError,
        match=r"is a sharded checkpoint \(a directory\), but the strategy is SingleProcess\(\)",
    ):
        fresh.restore({"w": torch.zeros(3)})
    assert fresh.restore({"w": torch.zeros(3)}, strategy=sharded).step == 1


def test_the_manager_is_a_callback_that_saves_on_interrupts(tmp_path):
    quiet = lf.CheckpointManager(tmp_path / "quiet", every_n_steps=100)
    assert isinstance(quiet, lf.callbacks.Callback) and quiet.handles_interrupts
    quiet.on_interrupt(_ls(3), "exception")
    assert quiet.latest() is None  # exceptions only with save_on_exception=True
    quiet.on_interrupt(_ls(4), "sigterm")
    eager = lf.CheckpointManager(tmp_path / "eager", every_n_steps=100, save_on_exception=True)
    eager.on_interrupt(_ls(5), "exception")
    reasons = {
        name: [(e["step"], e["reason"]) for e in json.loads((tmp_path / name / "index.json").read_text())["checkpoints"]]
        for name in ("quiet", "eager")
    }  # fmt: skip
    assert reasons == {"quiet": [(4, "sigterm")], "eager": [(5, "exception")]}


def test_the_monitored_metric_is_found_under_an_eval_metric_already_named_val(tmp_path):
    manager = lf.CheckpointManager(tmp_path, monitor="val_loss", filename="{val_loss:.2f}")
    ls = _ls(1).replace(eval_metrics={"val_loss": torch.tensor(0.25)}, eval_at_step=1)
    assert manager.update(ls) == tmp_path / "0.25.safetensors"


# -- two processes: one manager for DDP and FSDP ------------------------------------------


def _save_and_resume_on_ranks(mesh: Any, root: str) -> dict[str, Any]:
    """On every rank: a DDP and an FSDP run saved by a manager, restored, and run on."""
    import lightfunc.distributed as lfd

    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 8, generator=g), torch.randint(0, 3, (64,), generator=g)
    out = {}
    for name, strategy in (("ddp", lfd.DDP(mesh)), ("fsdp", lfd.FSDP(mesh))):
        model = make_model(0, batchnorm=False)
        train_step, _ = make_steps(model)
        state = lf.TrainState.create(model, lf.optim.adamw(1e-2), seed=None)
        step = lf.build(train_step, compile=False, strategy=strategy)
        loader = lf.Loader((x, y), 4, seed=0, rank=mesh.global_rank, world_size=mesh.world_size)
        directory = Path(root) / name
        manager = lf.CheckpointManager(directory, every_n_steps=2, keep_last_n=1)
        kwargs: dict[str, Any] = dict(accelerator="cpu")
        *_, stopped = lf.loop(step, state, loader, max_steps=4, checkpoint=manager, **kwargs)
        *_, straight = lf.loop(step, state, loader, max_steps=6, **kwargs)
        mesh.barrier()
        files = sorted(p.name for p in directory.iterdir())
        again = lf.CheckpointManager(directory, every_n_steps=2, keep_last_n=1)
        restored = again.restore(step.prepare(state), strategy=step.strategy)
        *_, resumed = lf.loop(step, restored, loader, max_steps=6, **kwargs)
        full = lfd.gather_state if name == "fsdp" else (lambda s: s)
        out[name] = {
            "files": files,
            "restored_step": restored.step,
            "same_as_saved": _same(full(restored.state), full(stopped.state)),
            "resumed_equals_straight": _same(full(resumed.state), full(straight.state)),
        }
    return out


def _same(a: Any, b: Any) -> bool:
    return all(torch.equal(u, v) for u, v in zip(lf.tree_leaves(a), lf.tree_leaves(b), strict=True))


@pytest.mark.slow
def test_one_manager_saves_and_restores_ddp_and_fsdp_runs_on_two_processes(tmp_path):
    from lightfunc.distributed._spawn import spawn

    results = spawn(_save_and_resume_on_ranks, 2, args=(str(tmp_path),), timeout=300)
    for rank in results:
        assert rank["ddp"]["files"] == ["index.json", "last.safetensors", "step=4.safetensors"]
        assert rank["fsdp"]["files"] == [
            "index.json",
            "step=4",
        ]  # a sharded directory, pruned whole
        for name in ("ddp", "fsdp"):
            assert rank[name]["restored_step"] == 4
            assert rank[name]["same_as_saved"] and rank[name]["resumed_equals_straight"], name
