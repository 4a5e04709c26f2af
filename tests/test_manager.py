import json

import pytest
import torch

import lightfunc as lf


def _ts(step, *, epoch=0, val_loss=None, loss=1.0, epoch_end=False):
    state = {"w": torch.full((3,), float(step))}
    eval_metrics = None if val_loss is None else {"loss": torch.tensor(val_loss)}
    return lf.TrainerState(
        state=state, step=step, epoch=epoch, batch_idx=step, metrics={"loss": torch.tensor(loss)},
        eval_metrics=eval_metrics, eval_at_step=step if val_loss is not None else -1, epoch_end=epoch_end,
    )  # fmt: skip


def test_saves_every_n_steps_and_keeps_the_last_n(tmp_path):
    manager = lf.CheckpointManager(tmp_path, every_n_steps=2, keep_last_n=2)
    for step in range(1, 8):
        manager.update(_ts(step))
    assert [p.name for p in manager.checkpoints()] == ["step=4.safetensors", "step=6.safetensors"]
    assert (tmp_path / "last.safetensors").exists()
    assert (
        lf.load(
            tmp_path / "last.safetensors", like=_ts(0).replace(metrics={}, eval_metrics=None)
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
        manager.update(_ts(step, epoch=step, val_loss=val))
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
        manager.update(_ts(step, val_loss=val))
    assert [p.name for p in manager.checkpoints()] == ["step=2.safetensors"]
    assert not (tmp_path / "last.safetensors").exists()


def test_every_epoch_by_default(tmp_path):
    manager = lf.CheckpointManager(tmp_path)
    assert manager.update(_ts(1)) is None
    assert manager.update(_ts(2, epoch_end=True)) == tmp_path / "step=2.safetensors"


def test_the_index_lists_what_is_where_and_survives_a_restart(tmp_path):
    manager = lf.CheckpointManager(tmp_path, every_n_steps=1, keep_last_n=3)
    for step in range(1, 5):
        manager.update(_ts(step))
    index = json.loads((tmp_path / "index.json").read_text())
    assert [e["step"] for e in index["checkpoints"]] == [2, 3, 4]
    again = lf.CheckpointManager(tmp_path, every_n_steps=1, keep_last_n=3)
    assert again.checkpoints() == manager.checkpoints()


def test_latest_falls_back_past_a_corrupt_newest_checkpoint_with_a_warning(tmp_path):
    manager = lf.CheckpointManager(tmp_path, every_n_steps=1, save_last=False)
    for step in (1, 2, 3):
        manager.update(_ts(step))
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


def test_orphaned_temporary_files_are_removed(tmp_path):
    (tmp_path / ".step=5.safetensors.123.tmp").write_bytes(b"half a file")
    (tmp_path / ".tmpab12cd").write_bytes(b"half a file left by safetensors")
    (tmp_path / "notes.txt").write_text("kept")
    lf.CheckpointManager(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


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
        manager.update(_ts(step, val_loss=val))
    assert [p.name for p in manager.checkpoints()] == ["step=2.safetensors"]


def test_only_global_rank_zero_writes(tmp_path, monkeypatch):
    import torch.distributed as dist

    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_rank", lambda group=None: 1)
    manager = lf.CheckpointManager(tmp_path / "ckpt", every_n_steps=1)
    state = lf.TrainerState(state={"w": torch.ones(2)}, step=1)
    path = manager.update(state)
    assert path is not None and path.name.startswith("step=1")
    assert not path.exists() and not (tmp_path / "ckpt" / "index.json").exists()
    monkeypatch.setattr(dist, "get_rank", lambda group=None: 0)
    assert manager.update(state).exists()
