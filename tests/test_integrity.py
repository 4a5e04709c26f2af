"""Checkpoints under attack: damaged bytes, lost indexes, hostile paths, a second process, full disks.

Every test here reproduces a way lightfunc 0.1.0.dev0 (commit 6166925) lost
data, resumed wrongly or crossed the checkpoint directory's boundary; each
fails on that code and passes now. The outcome the battery allows for any
damage is one of: a `CheckpointError` naming the problem, or a fallback (with
a warning) to an older checkpoint that verifies. A silent wrong load is
never allowed.
"""

from __future__ import annotations

import errno
import json
import os
import random
import re
import signal
import struct
import subprocess
import sys
import warnings
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import make_data, make_model, make_steps
from safetensors import SafetensorError

import lightfunc as lf
import lightfunc._atomic
import lightfunc._tensorfile
from lightfunc import CheckpointError
from lightfunc._checkpoint import load, verify
from lightfunc._tensorfile import CHUNK_BYTES, TensorFile
from lightfunc.testing import assert_trees_close


class Count(lf.callbacks.Callback):
    """A stateful callback: its state is a counter (an int leaf in the checkpoint)."""

    def __init__(self, name: str = "Count", n: int = 0) -> None:
        self.name, self.n = name, n

    @property
    def state_key(self) -> str:
        return self.name

    def state_dict(self) -> dict[str, Any]:
        return {"n": self.n}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.n = int(state["n"])


def _ls(step: int, *, epoch: int = 0, extra: dict[str, Any] | None = None) -> lf.LoopState:
    """A loop state whose every counter differs with `step`: its damage would show."""
    state = {"w": torch.arange(3.0) + step, "rng": lf.RngKey(1000 + step, 7 * step)}
    callbacks = {"Count": {"n": 10 * step}, **(extra or {})}
    return lf.LoopState(state=state, step=step, epoch=epoch, batch_idx=step % 3,
                        callbacks=callbacks)  # fmt: skip


TEMPLATE = lf.LoopState(state={"w": torch.zeros(3), "rng": lf.RngKey(0)})


def _same(a: lf.LoopState, b: lf.LoopState) -> bool:
    """Every resumable part of two loop states is equal (tensors bit for bit)."""
    return (
        torch.equal(a.state["w"], b.state["w"])
        and a.state["rng"] == b.state["rng"]
        and (a.step, a.epoch, a.batch_idx, a.epoch_end)
        == (b.step, b.epoch, b.batch_idx, b.epoch_end)
        and a.callbacks == b.callbacks
    )


def _restore(directory: Path, callbacks: list[lf.callbacks.Callback] | None = None) -> Any:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        restored = lf.CheckpointManager(directory).restore(
            TEMPLATE, callbacks=callbacks if callbacks is not None else [Count()]
        )
    return restored, [str(w.message) for w in caught]


def _two_checkpoints(directory: Path, **manager_kwargs: Any) -> lf.CheckpointManager:
    manager = lf.CheckpointManager(directory, every_n_steps=2, **manager_kwargs)
    for step in (2, 4):
        manager.update(_ls(step, epoch=step // 3))
    return manager


def _corrupt_data(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x10  # the last tensor's bytes
    path.write_bytes(bytes(data))


# -- silent wrong resumes: a checksum over every counter -------------------------------------


def _counter_bits(raw: bytes) -> dict[str, list[int]]:
    """Bit positions of each counter's digits (step, epoch, batch_idx, eval_at_step, RngKey, callback n)."""
    spans: dict[str, list[int]] = {}
    for name in ("step", "epoch", "batch_idx", "eval_at_step", "callbacks.Count.n"):
        pattern = rb'\\"path\\": \\"' + re.escape(name.encode()) + rb'\\".*?\\"value\\": (-?\d+)'
        match = re.search(pattern, raw)
        assert match, name
        spans[name] = list(range(match.start(1) * 8, match.end(1) * 8))
    match = re.search(rb'\\"seed\\": (\d+), \\"counter\\": (\d+)', raw)
    assert match
    spans["rng.seed"] = list(range(match.start(1) * 8, match.end(1) * 8))
    spans["rng.counter"] = list(range(match.start(2) * 8, match.end(2) * 8))
    return spans


@pytest.mark.parametrize(
    "sample", [400, pytest.param(None, marks=pytest.mark.slow, id="every-bit")], ids=str
)
def test_single_bit_flips_in_the_header_never_load_silently(tmp_path, sample):
    """Each counter's digits bit by bit, plus `sample` random header bits (None: all of them)."""
    directory = tmp_path / "ckpt"
    _two_checkpoints(directory, save_last=False)
    path = directory / "step=4.safetensors"
    original = path.read_bytes()
    header_bytes = 8 + struct.unpack("<Q", original[:8])[0]
    counters = _counter_bits(original[:header_bytes])
    every = range(header_bytes * 8)
    sampled = every if sample is None else random.Random(0).sample(every, k=sample)
    bits = sorted({b for span in counters.values() for b in span} | set(sampled))
    expected = {2: _ls(2, epoch=0), 4: _ls(4, epoch=1)}
    outcomes: Counter[str] = Counter()
    silent: list[int] = []
    for bit in bits:
        data = bytearray(original)
        data[bit // 8] ^= 1 << (bit % 8)
        path.write_bytes(bytes(data))
        try:  # the file alone: a clear error, or the very same state
            direct = load(path, like=TEMPLATE.replace(callbacks={"Count": {"n": 0}}))
        except CheckpointError:
            outcomes["clear error"] += 1
        else:
            outcomes["identical"] += 1
            if not _same(direct, expected[4]):
                silent.append(bit)
        restored, messages = _restore(directory)  # the manager: falls back to step 2
        if restored is not None and restored.step == 2 and _same(restored, expected[2]):
            assert any("skipping corrupt checkpoint" in m for m in messages), messages
            outcomes["fallback"] += 1
        elif restored is None or not _same(restored, expected[4]):
            silent.append(bit)
    path.write_bytes(original)
    print(
        f"\nheader bit flips: {len(bits)} tried over {header_bytes} header bytes, {dict(outcomes)}"
    )
    assert silent == [], f"bits loading silently: {silent[:20]}"
    assert outcomes["clear error"] == outcomes["fallback"] == len(bits)
    for name, span in counters.items():  # each counter field was swept bit by bit
        assert set(span) <= set(bits), name


# -- the index is a cache ---------------------------------------------------------------------


def _deep(n: int) -> str:
    return "[" * n + "]" * n


INDEX_DAMAGE = {
    "deleted": None,
    "truncated": lambda text: text[: len(text) // 2],
    "garbage": lambda text: "\x00\xff garbage {[",
    "deeply nested": lambda text: _deep(100_000),
    "a 5000-digit int": lambda text: (
        '{"checkpoints": [{"path": "step=4.safetensors", "step": ' + "4" * 5000 + "}]}"
    ),
    "an entry without `path`": lambda text: '{"checkpoints": [{"step": 4}]}',
    "entries of the wrong type": lambda text: '{"checkpoints": {"step": 4}, "last": 3}',
    "a wrong step": lambda text: text.replace('"step": 2', '"step": 99'),
}


@pytest.mark.parametrize("damage", [*INDEX_DAMAGE, "a directory named index.json"])
def test_a_damaged_index_falls_back_to_the_files_own_headers(tmp_path, damage):
    directory = tmp_path / "ckpt"
    manager = _two_checkpoints(directory)
    manager.update(_ls(6, epoch=2))
    _corrupt_data(directory / "step=6.safetensors")  # and `last`, its hard link
    index = directory / "index.json"
    text = index.read_text()
    index.unlink()
    if damage == "a directory named index.json":
        index.mkdir()
    elif INDEX_DAMAGE[damage] is not None:
        index.write_text(INDEX_DAMAGE[damage](text))
    restored, messages = _restore(directory)
    assert restored is not None and _same(restored, _ls(4, epoch=1)), messages
    assert any("skipping corrupt checkpoint" in m and "step=6" in m for m in messages)
    assert (directory / "step=2.safetensors").exists()  # nothing was deleted by reading


def test_a_directory_of_copied_step_files_restores_the_newest_with_a_warning(tmp_path):
    source = tmp_path / "run"
    _two_checkpoints(source)
    copied = tmp_path / "copied"
    copied.mkdir()
    for path in source.glob("step=*.safetensors"):  # scp step=* copied/
        (copied / path.name).write_bytes(path.read_bytes())
    restored, messages = _restore(copied)
    assert restored is not None and _same(restored, _ls(4, epoch=1))
    assert any("not listed in its index were found by their headers" in m for m in messages)
    assert sorted(p.name for p in copied.iterdir()) == ["step=2.safetensors", "step=4.safetensors"]


def test_no_checkpoint_restorable_is_an_error_not_a_fresh_start(tmp_path):
    directory = tmp_path / "ckpt"
    _two_checkpoints(directory)
    with (
        pytest.warns(RuntimeWarning, match="skipping corrupt checkpoint"),
        pytest.raises(CheckpointError, match=r"None of the 3 checkpoints in .* can be restored"),
    ):
        lf.CheckpointManager(directory).restore(
            lf.LoopState(state={"w": torch.zeros(5), "rng": lf.RngKey(0)}), callbacks=[Count()]
        )


HEADER_DAMAGE = {
    "truncated to 10 bytes": lambda data: data[:10],
    "emptied": lambda data: b"",
    "a header byte flipped": lambda data: data[:9] + bytes([data[9] ^ 0x20]) + data[10:],
}


@pytest.mark.parametrize("damage", HEADER_DAMAGE)
def test_every_header_damaged_is_an_error_not_a_fresh_start(tmp_path, damage):
    # Before: checkpoints whose header could not be read were left out of `candidates()`, so
    # with all of them damaged `restore()` returned None and `restore(state) or state` began
    # again at step 0, over the damaged run's files (found by an independent check).
    directory = tmp_path / "ckpt"
    _two_checkpoints(directory)
    for path in directory.glob("*.safetensors"):
        data = path.read_bytes()
        path.unlink()  # `last` is a hard link: damage each name on its own
        path.write_bytes(HEADER_DAMAGE[damage](data))
    before = {p.name: p.read_bytes() for p in directory.iterdir()}
    with (
        pytest.warns(RuntimeWarning, match="skipping corrupt checkpoint"),
        pytest.raises(
            CheckpointError, match=r"(?s)None of the 3 checkpoints .* header cannot be read"
        ),
    ):
        lf.CheckpointManager(directory).restore(TEMPLATE, callbacks=[Count()])
    with pytest.warns(RuntimeWarning, match="skipping corrupt checkpoint"):
        assert lf.CheckpointManager(directory).candidates() == []
    with pytest.warns(RuntimeWarning, match="skipping corrupt checkpoint"):
        assert lf.CheckpointManager(directory).has_checkpoints()
    assert {p.name: p.read_bytes() for p in directory.iterdir()} == before


def _fit_setup() -> tuple[Any, Any]:
    model = make_model()
    train_step, _ = make_steps(model)
    return lf.build(train_step, compile=False), lf.TrainState.create(model, lf.optim.adamw(1e-2))


QUIET = {"logger": False, "enable_progress_bar": False, "enable_model_summary": False}


def test_fit_resumes_last_from_files_without_index_and_deletes_none_of_them(tmp_path):
    step, state = _fit_setup()
    data = make_data(n=96)  # 3 batches an epoch
    lf.fit(step, state, data, max_epochs=1, default_root_dir=tmp_path, **QUIET)
    checkpoints = tmp_path / "version_0" / "checkpoints"
    (checkpoints / "index.json").unlink()
    (checkpoints / "last.safetensors").unlink()
    kept = (checkpoints / "step=3.safetensors").read_bytes()
    with pytest.warns(RuntimeWarning, match="found by their headers: step=3.safetensors"):
        again = lf.fit(step, state, data, max_epochs=2, default_root_dir=tmp_path,
                       ckpt_path="last", **QUIET)  # fmt: skip
    straight = lf.fit(step, state, data, max_epochs=2, barebones=True)
    assert again.step == 6
    assert_trees_close(again.state, straight.state, rtol=0, atol=0)
    assert (checkpoints / "step=3.safetensors").read_bytes() == kept
    assert sorted(p.name for p in tmp_path.iterdir()) == ["version_0"]


def test_fit_resuming_last_over_damaged_checkpoints_raises_and_writes_no_new_version(tmp_path):
    step, state = _fit_setup()
    data = make_data(n=96)
    lf.fit(step, state, data, max_epochs=1, default_root_dir=tmp_path, **QUIET)
    checkpoints = tmp_path / "version_0" / "checkpoints"
    for path in checkpoints.glob("*.safetensors"):
        data_bytes = path.read_bytes()
        path.unlink()
        path.write_bytes(data_bytes[:10])
    with (
        pytest.warns(RuntimeWarning, match="skipping corrupt checkpoint"),
        pytest.raises(CheckpointError, match="header cannot be read"),
    ):
        lf.fit(step, state, data, max_epochs=2, default_root_dir=tmp_path, ckpt_path="last",
               **QUIET)  # fmt: skip
    assert sorted(p.name for p in tmp_path.iterdir()) == ["version_0"]


# -- the end of a run and Ctrl-C are save points ----------------------------------------------


def test_a_run_that_ends_mid_epoch_saves_its_last_step(tmp_path):
    step, state = _fit_setup()
    data = make_data(n=96)
    first = lf.fit(step, state, data, max_steps=5, default_root_dir=tmp_path, **QUIET)
    index = json.loads((tmp_path / "version_0" / "checkpoints" / "index.json").read_text())
    assert first.step == 5 and index["last"]["step"] == 5 and index["last"]["reason"] == "end"
    again = lf.fit(step, state, data, max_steps=8, default_root_dir=tmp_path, ckpt_path="last",
                   **QUIET)  # fmt: skip
    straight = lf.fit(step, state, data, max_steps=8, barebones=True)
    assert again.step == 8
    assert_trees_close(again.state, straight.state, rtol=0, atol=0)


def _interrupting_step(at: int, how: str) -> Any:
    """An eager step that gets Ctrl-C (a SIGINT, or a KeyboardInterrupt raised) at call `at`."""
    train_step, _ = make_steps(make_model())
    calls = {"n": 0}

    def train(state: Any, batch: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == at:
            if how == "signal":
                os.kill(os.getpid(), signal.SIGINT)
            else:
                raise KeyboardInterrupt
        return train_step(state, batch)

    return lf.build(train, compile=False)


def test_ctrl_c_saves_the_last_completed_step(tmp_path):
    _, state = _fit_setup()
    manager = lf.CheckpointManager(tmp_path, every_n_steps=100, save_on_exception=True)
    train = _interrupting_step(4, "signal")  # the signal arrives during step 4
    states = list(lf.loop(train, state, make_data(n=96), max_epochs=3, checkpoint=manager))
    assert states[-1].step == 4
    index = json.loads((tmp_path / "index.json").read_text())
    assert [(e["step"], e["reason"]) for e in index["checkpoints"]] == [(4, "sigterm")]


def test_a_keyboard_interrupt_escaping_the_step_saves_with_save_on_exception(tmp_path):
    _, state = _fit_setup()
    manager = lf.CheckpointManager(tmp_path, every_n_steps=100, save_on_exception=True)
    with pytest.raises(KeyboardInterrupt):
        for _ in lf.loop(_interrupting_step(4, "raise"), state, make_data(n=96), max_epochs=3,
                         checkpoint=manager):  # fmt: skip
            pass
    index = json.loads((tmp_path / "index.json").read_text())
    assert [(e["step"], e["reason"]) for e in index["checkpoints"]] == [(3, "exception")]


# -- versioned run directories ----------------------------------------------------------------


def _snapshot(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def test_each_run_writes_its_own_version_and_last_resumes_the_newest(tmp_path):
    step, state = _fit_setup()
    data = make_data(n=96)
    quiet = {"enable_progress_bar": False, "enable_model_summary": False}
    lf.fit(step, state, data, max_epochs=1, default_root_dir=tmp_path, **quiet)
    first = _snapshot(tmp_path)
    assert {f.split("/")[1] for f in first} == {"logs", "checkpoints"}
    lf.fit(step, state, data, max_epochs=2, default_root_dir=tmp_path, **quiet)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["version_0", "version_1"]
    second = {k: v for k, v in _snapshot(tmp_path).items() if k.startswith("version_1/")}
    assert {f.split("/")[1] for f in second} == {"logs", "checkpoints"}
    again = lf.fit(step, state, data, max_epochs=3, default_root_dir=tmp_path, ckpt_path="last",
                   **quiet)  # fmt: skip
    assert again.step == 9  # from version_1's step 6, not version_0's step 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["version_0", "version_1"]
    now = _snapshot(tmp_path)
    assert {k: v for k, v in now.items() if k.startswith("version_0/")} == first
    index = json.loads((tmp_path / "version_1" / "checkpoints" / "index.json").read_text())
    assert index["last"]["step"] == 9


# -- a second process ---------------------------------------------------------------------------


def test_a_reader_never_touches_the_writers_in_flight_files(tmp_path, monkeypatch):
    directory = tmp_path / "ckpt"
    writer = _two_checkpoints(directory)
    real_save_file = lightfunc._tensorfile.save_file
    seen: list[list[str]] = []

    def save_file_with_a_monitor(tensors: Any, filename: Any, metadata: Any) -> None:
        real_save_file(tensors, filename, metadata=metadata)
        # The worst moment: the data is written, not yet renamed. A monitor looks in.
        before = sorted(p.name for p in directory.iterdir())
        monitor = lf.CheckpointManager(directory)
        assert monitor.latest() == directory / "last.safetensors"
        monitor.restore(TEMPLATE, callbacks=[Count()])
        assert sorted(p.name for p in directory.iterdir()) == before
        seen.append(before)

    monkeypatch.setattr(lightfunc._tensorfile, "save_file", save_file_with_a_monitor)
    writer.update(_ls(6))  # the old monitor deleted the temporary file here: the save crashed
    assert seen and any(name.endswith(".tmp") for name in seen[0])
    assert load(directory / "step=6.safetensors", like=_ls(0)).step == 6


def test_only_the_debris_of_dead_writers_of_this_host_is_removed(tmp_path):
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    try:
        host = lightfunc._atomic._HOST
        keep = {
            f".step=9.safetensors.{host}.{alive.pid}.0a1b2c3d.tmp",  # a live writer's
            f".step=9.safetensors.otherhost.{dead.pid}.0a1b2c3d.tmp",  # another machine's
            ".tmpab12cd",  # not ours to judge: no owner in the name
            "notes.txt",
        }
        gone = {f".step=8.safetensors.{host}.{dead.pid}.0a1b2c3d.tmp"}
        for name in keep | gone:
            (tmp_path / name).write_bytes(b"half a file")
        lf.CheckpointManager(tmp_path).latest()  # reading removes nothing
        assert {p.name for p in tmp_path.iterdir()} == keep | gone
        lf.CheckpointManager(tmp_path).save(_ls(1))  # the first save removes dead debris
        names = {p.name for p in tmp_path.iterdir()}
        assert keep <= names and not gone & names
    finally:
        alive.kill()
        alive.wait()


READER = """
import json, sys, time, warnings
from pathlib import Path
import lightfunc as lf
directory, done = Path(sys.argv[1]), Path(sys.argv[2])
warnings.simplefilter("ignore")  # a file pruned while read is skipped with a warning
polls, found, errors = 0, set(), []
(directory.parent / "reader-ready").write_text("1")
while not done.exists():
    try:
        path = lf.CheckpointManager(directory).latest()
        polls += 1
        if path is not None:
            found.add(path.name)
    except Exception as e:  # noqa: BLE001 - reported to the test
        errors.append(repr(e))
print(json.dumps({"polls": polls, "found": sorted(found), "errors": errors}))
"""


@pytest.mark.multiprocess
def test_a_process_polling_latest_through_a_whole_run_never_breaks_it(tmp_path):
    directory = tmp_path / "ckpt"
    directory.mkdir()
    done = tmp_path / "done"
    reader = subprocess.Popen(
        [sys.executable, "-c", READER, str(directory), str(done)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        while not (tmp_path / "reader-ready").exists():
            assert reader.poll() is None, "the reader died"
        manager = lf.CheckpointManager(directory, every_n_steps=1, keep_last_n=2)
        big = torch.randn(256, 1024)  # 1 MB: saves take long enough for the reader to overlap
        for step in range(1, 41):
            manager.update(lf.LoopState(state={"w": big + step}, step=step))
    finally:
        done.write_text("1")
        out, _ = reader.communicate(timeout=120)
    report = json.loads(out)
    print(f"\nreader: {report['polls']} polls, saw {len(report['found'])} names")
    assert report["errors"] == [] and report["polls"] > 0
    names = sorted(p.name for p in directory.iterdir())
    assert names == ["index.json", "last.safetensors", "step=39.safetensors", "step=40.safetensors"]


# -- the directory is the boundary ------------------------------------------------------------


def test_index_entries_outside_the_directory_are_never_read_or_deleted(tmp_path, monkeypatch):
    victim = tmp_path / "victim.safetensors"
    lf.save(_ls(100), victim)  # a valid, newer checkpoint: reading it would resume step 100
    victim_bytes = victim.read_bytes()
    directory = tmp_path / "run" / "ckpt"
    directory.mkdir(parents=True)
    (directory / "link.safetensors").symlink_to(victim)
    hostile = ["../../victim.safetensors", str(victim), "sub/../../../victim.safetensors",
               "link.safetensors", "..", "/"]  # fmt: skip
    entries = [
        {"path": p, "step": 1000 + i, "epoch": 0, "score": None} for i, p in enumerate(hostile)
    ]
    (directory / "index.json").write_text(json.dumps({"checkpoints": entries, "last": entries[0]}))
    opened: list[Path] = []
    real_init = TensorFile.__init__

    def recording_init(self: TensorFile, path: Path) -> None:
        opened.append(Path(path))
        real_init(self, path)

    monkeypatch.setattr(TensorFile, "__init__", recording_init)
    with pytest.warns(RuntimeWarning, match="ignoring invalid entries of the checkpoint index"):
        manager = lf.CheckpointManager(directory, every_n_steps=1, keep_last_n=1)
        assert manager.restore(TEMPLATE, callbacks=[Count()]) is None
        for step in (1, 2, 3):
            manager.update(_ls(step))
        restored = lf.CheckpointManager(directory).restore(TEMPLATE, callbacks=[Count()])
    assert restored is not None and restored.step == 3
    assert victim.read_bytes() == victim_bytes
    assert (directory / "link.safetensors").is_symlink()
    assert all(p.resolve().parent == directory.resolve() for p in opened), opened


# -- unbounded reads -----------------------------------------------------------------------------


def _declaring(source: Path, target: Path, numel: int) -> None:
    """Copy `source` (one tensor `state.w`) to `target` with a header declaring `numel` floats,
    as a sparse file: the header, then a hole up to the size the header declares."""
    raw = source.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    table = json.loads(raw[8 : 8 + n])
    table["state.w"]["shape"] = [numel]
    table["state.w"]["data_offsets"] = [0, 4 * numel]
    header = json.dumps(table, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)
    with open(target, "wb") as f:
        f.write(struct.pack("<Q", len(header)) + header)
        f.truncate(8 + len(header) + 4 * numel)


def test_a_sparse_file_declaring_3_gib_is_rejected_without_reading_it(tmp_path, monkeypatch):
    directory = tmp_path / "ckpt"
    manager = _two_checkpoints(directory, save_last=False)
    lf.save(_ls(9), tmp_path / "nine.safetensors")
    big = directory / "step=9.safetensors"
    _declaring(tmp_path / "nine.safetensors", big, 3 * 2**28)  # 3 GiB of float32
    assert big.stat().st_size > 3 * 2**30 and big.stat().st_blocks * 512 <= 64 * 1024
    manager.entries.append({"path": big.name, "step": 9, "epoch": 3, "score": None})
    manager._write_index()
    read: list[tuple[str, int]] = []  # every tensor read: (file, bytes)
    real_read, real_pread = TensorFile.read, os.pread

    def recording_read(self: TensorFile, name: str, checksum: int | None) -> torch.Tensor:
        read.append((self.path.name, self.nbytes(name)))
        return real_read(self, name, checksum)

    def recording_pread(fd: int, n: int, offset: int) -> bytes:
        read.append(("pread", n))
        return real_pread(fd, n, offset)

    monkeypatch.setattr(TensorFile, "read", recording_read)
    monkeypatch.setattr(lightfunc._tensorfile.os, "pread", recording_pread)
    restored, messages = _restore(directory)
    assert restored is not None and _same(restored, _ls(4, epoch=1))
    assert any("step=9" in m and "shape (805306368,)" in m for m in messages), messages
    assert max(n for _, n in read) <= 12, read  # three floats: the 3 GiB were never read


def test_verifying_without_a_template_reads_in_bounded_chunks(tmp_path, monkeypatch):
    lf.save(_ls(9), tmp_path / "nine.safetensors")
    sparse = tmp_path / "sparse.safetensors"
    _declaring(tmp_path / "nine.safetensors", sparse, 2**24)  # 64 MiB declared, none written
    sizes: list[int] = []
    real_pread = os.pread

    def recording_pread(fd: int, n: int, offset: int) -> bytes:
        sizes.append(n)
        return real_pread(fd, n, offset)

    monkeypatch.setattr(lightfunc._tensorfile.os, "pread", recording_pread)
    with pytest.raises(CheckpointError, match=r"Checksum mismatch for tensor `state.w`"):
        verify(sparse)
    assert len(sizes) == 4 and max(sizes) == CHUNK_BYTES  # 64 MiB in 16 MiB pieces


def test_a_header_declaring_more_than_the_file_holds_is_rejected_on_open(tmp_path):
    lf.save(_ls(9), tmp_path / "nine.safetensors")
    short = tmp_path / "short.safetensors"
    _declaring(tmp_path / "nine.safetensors", short, 2**20)
    with open(short, "r+b") as f:
        f.truncate(short.stat().st_size - 1)
    with pytest.raises(CheckpointError, match=r"Cannot open the checkpoint .*short"):
        verify(short)


# -- full and read-only disks ---------------------------------------------------------------------


def test_a_full_disk_is_reported_as_such_and_keeps_the_old_checkpoints(tmp_path, monkeypatch):
    directory = tmp_path / "ckpt"
    manager = _two_checkpoints(directory)
    before = _snapshot(directory)

    def full(tensors: Any, filename: Any, metadata: Any) -> None:
        Path(filename).write_bytes(b"partial")
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")  # fmt: skip

    monkeypatch.setattr(lightfunc._tensorfile, "save_file", full)
    with pytest.raises(
        CheckpointError, match=r"the disk is full .*previous checkpoints are intact"
    ):
        manager.update(_ls(6))
    assert _snapshot(directory) == before  # no temporary file left, nothing replaced
    monkeypatch.undo()
    restored, _ = _restore(directory)
    assert _same(restored, _ls(4, epoch=1))


def test_a_read_only_directory_still_restores_and_says_why_saving_fails(tmp_path, monkeypatch):
    # The tests run as root, which chmod cannot stop: the read-only filesystem is simulated
    # at the system calls a write makes (EROFS, as Linux returns it); test_real_... mounts one.
    directory = tmp_path / "ckpt"
    _two_checkpoints(directory)
    before = _snapshot(directory)

    def read_only(*args: Any, **kwargs: Any) -> None:
        raise OSError(errno.EROFS, "Read-only file system")

    for module, name in [(os, "mkdir"), (os, "replace"), (os, "link"), (os, "unlink"),
                         (os, "rmdir"), (lightfunc._tensorfile, "save_file")]:  # fmt: skip
        monkeypatch.setattr(module, name, read_only)
    manager = lf.CheckpointManager(directory, every_n_steps=2)  # constructing writes nothing
    restored = manager.restore(TEMPLATE, callbacks=[Count()])
    assert _same(restored, _ls(4, epoch=1))
    with pytest.raises(CheckpointError, match=r"the directory is read-only"):
        manager.update(_ls(6))
    monkeypatch.undo()
    assert _snapshot(directory) == before


@pytest.fixture
def tiny_fs(tmp_path):
    """A real 256 KiB tmpfs (root with CAP_SYS_ADMIN only: skipped elsewhere)."""
    mount = tmp_path / "mnt"
    mount.mkdir()
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount)],
                          capture_output=True)  # fmt: skip
    if made.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {made.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_real_full_and_read_only_filesystems(tiny_fs):
    directory = tiny_fs / "ckpt"
    _two_checkpoints(directory)
    manager = lf.CheckpointManager(directory, every_n_steps=2)
    huge = lf.LoopState(state={"w": torch.zeros(100_000), "rng": lf.RngKey(0)}, step=6)
    with pytest.raises(CheckpointError, match=r"the disk is full"):
        manager.update(huge)
    assert not [p for p in directory.iterdir() if p.name.startswith(".")]
    subprocess.run(["mount", "-o", "remount,ro", str(tiny_fs)], check=True)
    restored, _ = _restore(directory)
    assert _same(restored, _ls(4, epoch=1))
    with pytest.raises(CheckpointError, match=r"the directory is read-only"):
        manager.update(_ls(6))


# -- a changed callback list ------------------------------------------------------------------------


def test_callback_state_the_run_lacks_is_dropped_and_a_new_callback_starts_fresh(tmp_path):
    directory = tmp_path / "ckpt"
    manager = lf.CheckpointManager(directory, every_n_steps=1)
    manager.update(_ls(3, extra={"Gone": {"wait": 2, "best": torch.tensor([0.5, 0.25])}}))
    restored, messages = _restore(directory, callbacks=[Count(), Count("New")])
    assert restored.step == 3 and restored.callbacks == {"Count": {"n": 30}}
    assert any("callback 'Gone', which is not among the callbacks given to `restore`; that state is dropped" in m
               for m in messages)  # fmt: skip
    assert any("holds no state for the callback 'New'; it starts fresh" in m for m in messages)


def test_fit_resumes_after_adding_or_removing_early_stopping(tmp_path):
    step, state = _fit_setup()
    data = make_data(n=96)
    early = lf.callbacks.EarlyStopping("loss", patience=100)
    lf.fit(step, state, data, max_epochs=1, default_root_dir=tmp_path, callbacks=[early], **QUIET)
    with pytest.warns(
        RuntimeWarning, match=r"callback 'EarlyStopping\[monitor=loss.*that state is dropped"
    ):
        again = lf.fit(step, state, data, max_epochs=2, default_root_dir=tmp_path,
                       ckpt_path="last", **QUIET)  # fmt: skip
    assert again.step == 6
    with pytest.warns(
        RuntimeWarning, match=r"no state for the callback 'EarlyStopping\[monitor=loss.*fresh"
    ):
        third = lf.fit(step, state, data, max_epochs=3, default_root_dir=tmp_path,
                       ckpt_path="last", callbacks=[lf.callbacks.EarlyStopping("loss", patience=100)],
                       **QUIET)  # fmt: skip
    assert third.step == 9


def test_restore_without_callbacks_keeps_their_state_for_the_loop_to_hand_back(tmp_path):
    # The README's pattern `manager.restore(state) or state`, then `loop(..., callbacks=cbs)`:
    # before, `restore` dropped every callback state it was not given (warning that "the run"
    # lacked the callback), so an EarlyStopping resumed with its patience reset.
    step, state = _fit_setup()
    data = make_data(n=96)  # 3 batches an epoch

    def stopper() -> lf.callbacks.EarlyStopping:
        return lf.callbacks.EarlyStopping("loss", patience=2, min_delta=10.0)

    straight = list(lf.loop(step, state, data, max_epochs=20, callbacks=[stopper()]))[-1]
    assert straight.step < 60  # it stopped early
    manager = lf.CheckpointManager(tmp_path / "ckpt", every_n_steps=1)
    first = list(lf.loop(step, state, data, max_steps=2, callbacks=[stopper()], checkpoint=manager))
    assert first[-1].step == 2 < straight.step
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning: nothing is dropped
        start = lf.CheckpointManager(tmp_path / "ckpt").restore(state)
    assert start is not None and start.callbacks == first[-1].callbacks != {}
    resumed = list(lf.loop(step, start, data, max_epochs=20, callbacks=[stopper()]))[-1]
    assert resumed.step == straight.step
    assert_trees_close(resumed.state, straight.state, rtol=0, atol=0)


@pytest.mark.parametrize(("monitor", "kind"), [("val_nope", "evaluation"), ("accuracy", "train")])
def test_a_monitor_no_metric_answers_to_is_an_error_at_the_first_save(tmp_path, monitor, kind):
    # Before: every checkpoint ranked last without a word, `best_model_path` was the newest
    # checkpoint and `ckpt_path="best"` meant "last" (Lightning raises here too).
    step, state = _fit_setup()
    _, eval_step = make_steps(make_model())
    checkpoint = lf.callbacks.ModelCheckpoint(tmp_path / "ckpt", monitor=monitor, save_top_k=2)
    with pytest.raises(KeyError, match=rf"`monitor='{monitor}'` is not among the {kind} metrics"):
        lf.fit(step, state, make_data(n=96), max_epochs=2, eval_step=eval_step,
               eval_data=make_data(n=32), callbacks=[checkpoint], default_root_dir=tmp_path,
               **QUIET)  # fmt: skip
    assert not list((tmp_path / "ckpt").glob("step=*"))  # no checkpoint scored as missing


class _TwoRanks(lf.SingleProcess):
    """A single-file strategy that says it ran on 2 ranks (what a DDP run's checkpoint records)."""

    @property
    def world_size(self) -> int:
        return 2


def test_a_mid_epoch_checkpoint_resumed_on_another_world_size_warns_about_the_data(tmp_path):
    # The state reshards exactly, but `batch_idx` counts each rank's batches: a 2-rank run's
    # batch 2 resumed on 1 process re-reads examples (found by an independent check).
    manager = lf.CheckpointManager(tmp_path / "ckpt", every_n_steps=1)
    manager.save(_ls(5).replace(strategy=_TwoRanks()))
    with pytest.warns(RuntimeWarning, match=r"saved by 2 rank\(s\) at batch 2 .* with 1 rank\(s\)"):
        restored = lf.CheckpointManager(tmp_path / "ckpt").restore(TEMPLATE, callbacks=[Count()])
    assert restored is not None and _same(restored, _ls(5))
    manager.save(_ls(6).replace(strategy=_TwoRanks(), batch_idx=0))  # before any batch: exact
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert lf.CheckpointManager(tmp_path / "ckpt").restore(TEMPLATE, callbacks=[Count()])
