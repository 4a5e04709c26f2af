"""Sharded checkpoints: bit-exact round trips across world sizes (1 -> 2 -> 4 -> 3 -> 1, uneven
shards), atomic writes, corruption named by file. The 2-, 4- and 3-process parts run
tests/scripts/sharded_worker.py under `lightfunc run` (gloo on CPU), once each, and their checks
are read back here."""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

import lightfunc as lf
from lightfunc._atomic import remove_orphans
from lightfunc.distributed import _checkpoint as sharded
from lightfunc.distributed._checkpoint import (
    export_full,
    load_sharded,
    save_sharded,
    verify_sharded,
)
from lightfunc.distributed._shard_format import seal

SCRIPTS = Path(__file__).parent / "scripts"
sys.path.insert(0, str(SCRIPTS))
from sharded_worker import full_state, train_state  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def _plain_template() -> dict[str, Any]:
    """`full_state`'s structure with other values (and `tied` tied), plain tensors only."""
    full = full_state()
    params = {k: torch.zeros_like(v) for k, v in full["params"].items()}
    return full | {
        "params": params,
        "tied": params["weight"],
        "replicated": torch.zeros(3),
        "plain": torch.zeros(2, 2),
        "step": torch.tensor(0),
        "rng": lf.RngKey(0, 0),
        "epoch": 0,
    }


def _assert_full(loaded: dict[str, Any]) -> None:
    full = full_state()
    for k, v in full["params"].items():
        assert type(loaded["params"][k]) is torch.Tensor
        assert loaded["params"][k].dtype == v.dtype and torch.equal(loaded["params"][k], v), k
    assert loaded["tied"] is loaded["params"]["weight"]
    for k in ("replicated", "plain", "step"):
        assert torch.equal(loaded[k], full[k]), k
    assert (loaded["rng"], loaded["epoch"], loaded["lr"], loaded["name"]) == (
        lf.RngKey(3, 17),
        2,
        0.125,
        "run",
    )


def _flip_byte(file: Path, tensor: str) -> None:
    """Change one byte of `tensor`'s data inside the safetensors `file`."""
    raw = bytearray(file.read_bytes())
    (size,) = struct.unpack("<Q", raw[:8])
    start, _ = json.loads(raw[8 : 8 + size])[tensor]["data_offsets"]
    raw[8 + size + start] ^= 0xFF
    file.write_bytes(bytes(raw))


def _shard(path: Path, rank: int = 0) -> Path:
    """The shard file of `rank` in the checkpoint `path`, as its index lists it."""
    return path / json.loads((path / "index.json").read_text())["files"][rank]


def _write_index(path: Path, doc: dict[str, Any]) -> None:
    """Write an edited index back, sealed (its CRC-32 recomputed) so that the check under
    test is the one that fires, not the index's checksum."""
    (path / "index.json").write_text(json.dumps(seal(doc)))


def _run_workers(n: int, root: Path, scenario: str) -> list[dict[str, str]]:
    command = [sys.executable, "-m", "lightfunc", "run", "--nproc-per-node", str(n)]
    command += [str(SCRIPTS / "sharded_worker.py"), "--root", str(root), "--scenario", scenario]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-4000:]
    return [json.loads((root / f"{scenario}-rank{r}.json").read_text()) for r in range(n)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Any], list[Any], list[Any]]:
    """Save `one` here (1 process), then run the 2-, 4- and 3-process scenarios once each."""
    root = tmp_path_factory.mktemp("sharded")
    save_sharded(full_state(), root / "one")
    two = _run_workers(2, root, "two")
    if (root / "two").is_dir():
        shutil.copytree(root / "two", root / "corrupt")
        _flip_byte(_shard(root / "corrupt", 1), "params.weight")
    four = _run_workers(4, root, "four")
    three = _run_workers(3, root, "three")
    return root, two, three, four


def _assert_ok(results: list[dict[str, str]], *checks: str) -> None:
    for rank, result in enumerate(results):
        for check in checks:
            assert result[check] == "ok", f"rank {rank}, {check}: {result[check]}"


@pytest.mark.multiprocess
def test_one_to_two_and_two_to_two_bit_exact(runs: Any) -> None:
    _, two, *_ = runs
    _assert_ok(two, "load_one", "save_two", "load_two", "overwrite_two")


@pytest.mark.multiprocess
def test_two_to_four_to_three_with_uneven_and_empty_shards(runs: Any) -> None:
    root, _, three, four = runs
    _assert_ok(four, "load_two", "save_four")
    _assert_ok(three, "load_four", "save_three")
    files = sorted(p.name for p in (root / "four").iterdir())
    assert files == ["index.json"] + [_shard(root / "four", r).name for r in range(4)]
    files = sorted(p.name for p in (root / "three").iterdir())
    assert files == ["index.json"] + [_shard(root / "three", r).name for r in range(3)]


@pytest.mark.multiprocess
def test_two_four_and_three_to_one_bit_exact(runs: Any) -> None:
    root, *_ = runs
    for name in ("two", "four", "three"):
        _assert_full(load_sharded(root / name, like=_plain_template()))


@pytest.mark.multiprocess
def test_index_describes_shards(runs: Any) -> None:
    root, *_ = runs
    index = json.loads((root / "two" / "index.json").read_text())
    assert index["format"] == "lightfunc.sharded" and index["format_version"] == 3
    assert index["world_size"] == 2 and re.fullmatch("[0-9a-f]{8}", index["generation"])
    files = [f"shard-0000{r}-of-00002-{index['generation']}.safetensors" for r in range(2)]
    assert index["files"] == files
    weight = index["tensors"]["params.weight"]
    assert weight["shape"] == [5, 3] and weight["dtype"] == "float32"
    assert [(c["file"], c["offsets"], c["sizes"]) for c in weight["chunks"]] == [
        (files[0], [0, 0], [3, 3]),
        (files[1], [3, 0], [2, 3]),
    ]
    # replicated and plain tensors are written once, by rank 0
    assert [c["file"] for c in index["tensors"]["replicated"]["chunks"]] == [files[0]]
    assert index["index_crc32"] == seal(index)["index_crc32"]
    # the header is the codec's, as `lf.save` writes it: leaves, ties, user metadata
    header = index["header"]
    assert header["format"] == "lightfunc.checkpoint" and header["checksums"] == "{}"
    assert json.loads(header["user_metadata"]) == {"note": "2 ranks"}
    assert json.loads(header["aliases"]) == {"tied": "params.weight"}
    leaves = {e["path"]: e for e in json.loads(header["leaves"])}
    assert leaves["rng"]["value"] == {"seed": 3, "counter": 17}
    assert "tied" not in index["tensors"] and leaves["tied"]["kind"] == "tensor"


@pytest.mark.multiprocess
def test_corrupt_shard_fails_on_every_rank_without_hanging(runs: Any) -> None:
    _, _, three, _ = runs
    # rank 0 reads only the intact first shard; ranks 1 and 2 read the damaged rows
    assert three[0]["load_corrupt"].startswith("CheckpointError: Could not load")
    assert "ranks 1, 2 failed" in three[0]["load_corrupt"]
    for rank in (1, 2):
        error = three[rank]["load_corrupt"]
        assert error.startswith("CheckpointError: Checksum mismatch for tensor `params.weight`")
        assert re.search(r"shard-00001-of-00002-[0-9a-f]{8}\.safetensors", error)


@pytest.mark.multiprocess
def test_fully_sharded_loop_state_two_to_four_three_and_one(runs: Any) -> None:
    root, two, three, four = runs
    _assert_ok(two, "save_train_state")
    _assert_ok(four, "load_train_state")
    _assert_ok(three, "load_train_state")
    want = train_state(0)
    like = lf.LoopState(state=train_state(1))  # 2 -> 1, plain tensors, no strategy
    loaded = load_sharded(root / "train_state", like=like)
    for got, ref in zip(lf.tree_leaves(loaded.state), lf.tree_leaves(want), strict=True):
        assert type(got) is torch.Tensor and torch.equal(got, ref)
    assert loaded.state.rng == want.rng and loaded.step == 1


@pytest.mark.multiprocess
def test_partial_dtensor_refused_before_writing(runs: Any) -> None:
    _, two, *_ = runs
    _assert_ok(two, "partial_refused")


# -- one process ------------------------------------------------------------------------


def test_round_trip_in_one_process(tmp_path: Path) -> None:
    path = save_sharded(full_state(), tmp_path / "ckpt")
    assert path == (tmp_path / "ckpt").absolute()
    assert sorted(p.name for p in path.iterdir()) == ["index.json", _shard(path).name]
    _assert_full(load_sharded(path, like=_plain_template()))


def test_loop_state_round_trip_and_export_full(tmp_path: Path) -> None:
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    state = lf.TrainState.create(model, lf.optim.adamw(1e-3), seed=5)
    # A one-process run: no process group; the strategy is static and not saved.
    ls = lf.LoopState(state=state, step=7, epoch=1, strategy=lf.SingleProcess())
    save_sharded(ls, tmp_path / "ckpt")
    verify_sharded(tmp_path / "ckpt")
    back = load_sharded(tmp_path / "ckpt", like=lf.LoopState(state=state))
    assert (back.step, back.epoch, back.state.rng) == (7, 1, lf.RngKey(5, 0))
    assert back.strategy is None and back.state.tx is state.tx
    for a, b in zip(lf.tree_leaves(back), lf.tree_leaves(ls), strict=True):
        assert torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b

    out = export_full(tmp_path / "ckpt", tmp_path / "full.safetensors")
    full = lf.load(out, like=ls)
    for a, b in zip(lf.tree_leaves(full), lf.tree_leaves(ls), strict=True):
        assert torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b
    fresh = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    lf.load_params(out, fresh)
    assert torch.equal(fresh[0].weight, model[0].weight)


@pytest.mark.multiprocess
def test_export_full_of_a_sharded_run(runs: Any) -> None:
    root, *_ = runs
    out = export_full(root / "three", root / "full.safetensors")
    _assert_full(lf.load(out, like=_plain_template()))


def test_missing_shard_is_named(tmp_path: Path) -> None:
    save_sharded(full_state(), tmp_path / "ckpt")
    _shard(tmp_path / "ckpt").unlink()
    with pytest.raises(lf.CheckpointError, match=r"shard file .*shard-00000-of-00001.* is missing"):
        load_sharded(tmp_path / "ckpt", like=_plain_template())


def test_corrupt_shard_is_named(tmp_path: Path) -> None:
    save_sharded(full_state(), tmp_path / "ckpt")
    _flip_byte(_shard(tmp_path / "ckpt"), "params.bias")
    with pytest.raises(lf.CheckpointError, match=r"Checksum mismatch .*params.bias.*shard-00000"):
        load_sharded(tmp_path / "ckpt", like=_plain_template())
    with pytest.raises(lf.CheckpointError, match="Checksum mismatch"):
        export_full(tmp_path / "ckpt", tmp_path / "full.safetensors")
    assert not (tmp_path / "full.safetensors").exists()
    load_sharded(tmp_path / "ckpt", like=_plain_template(), verify=False)  # skips the check


def test_truncated_shard_is_named(tmp_path: Path) -> None:
    save_sharded(full_state(), tmp_path / "ckpt")
    shard = _shard(tmp_path / "ckpt")
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(lf.CheckpointError, match=r"shard-00000-of-00001-[0-9a-f]{8}\.safetensors"):
        load_sharded(tmp_path / "ckpt", like=_plain_template())


def test_missing_or_malformed_index(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="directory does not exist"):
        load_sharded(tmp_path / "nothing", like={})
    save_sharded(full_state(), tmp_path / "ckpt")
    index = tmp_path / "ckpt" / "index.json"
    text = index.read_text()
    index.write_text(text[: len(text) // 2])
    with pytest.raises(
        lf.CheckpointError, match=r"index '.*index.json' is malformed: it is not readable JSON"
    ):
        load_sharded(tmp_path / "ckpt", like=_plain_template())
    doc = json.loads(text)
    doc["tensors"]["params.weight"]["shape"] = [6, 3]
    _write_index(tmp_path / "ckpt", doc)
    with pytest.raises(lf.CheckpointError, match=r"chunks of `params.weight` hold 15 elements"):
        load_sharded(tmp_path / "ckpt", like=_plain_template())
    index.unlink()
    with pytest.raises(
        FileNotFoundError, match=r"'index.json' is missing.*interrupted before its commit"
    ):
        load_sharded(tmp_path / "ckpt", like=_plain_template())


def test_template_mismatch_names_paths(tmp_path: Path) -> None:
    save_sharded(full_state(), tmp_path / "ckpt")
    wrong = _plain_template()
    wrong["params"]["bias"] = torch.zeros(6, dtype=torch.float64)
    with pytest.raises(
        lf.CheckpointError,
        match=r"params.bias: the file has shape \(5,\) dtype float64, the template shape \(6,\)",
    ):
        load_sharded(tmp_path / "ckpt", like=wrong)
    missing = _plain_template()
    del missing["plain"]
    with pytest.raises(lf.CheckpointError, match="not in the template: plain"):
        load_sharded(tmp_path / "ckpt", like=missing)


def test_failed_save_leaves_the_old_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    save_sharded(full_state(), tmp_path / "ckpt")

    def fail(*args: Any, **kwargs: Any) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(sharded, "write_file", fail)
    with pytest.raises(OSError, match="disk full"):
        save_sharded({"x": torch.ones(2)}, tmp_path / "ckpt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no temporary debris
    _assert_full(load_sharded(tmp_path / "ckpt", like=_plain_template()))


def test_refuses_to_replace_other_files(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match=r"directory holding other files \(notes.txt\)"):
        save_sharded({"x": torch.ones(2)}, tmp_path)
    with pytest.raises(FileExistsError, match="it is an existing file"):
        save_sharded({"x": torch.ones(2)}, tmp_path / "notes.txt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_unsavable_leaf_is_named(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match=r"`state.opt`"):
        save_sharded({"state": {"opt": object()}}, tmp_path / "ckpt")
    assert not (tmp_path / "ckpt").exists()


def test_unsavable_metadata_is_refused_before_writing(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="`metadata` must be JSON-serialisable"):
        save_sharded({"x": torch.ones(2)}, tmp_path / "ckpt", metadata={"t": torch.ones(1)})
    assert not (tmp_path / "ckpt").exists() and list(tmp_path.iterdir()) == []


# -- verify_sharded -----------------------------------------------------------------------


def test_verify_sharded_names_the_missing_damaged_or_truncated_file(tmp_path: Path) -> None:
    path = save_sharded(full_state(), tmp_path / "ckpt")
    verify_sharded(path)
    shard = _shard(path)
    intact = shard.read_bytes()
    _flip_byte(shard, "params.weight")
    with pytest.raises(
        lf.CheckpointError,
        match=r"Checksum mismatch for tensor `params.weight` in '.*shard-00000-of-00001-\w+\.safe",
    ):
        verify_sharded(path)
    shard.write_bytes(intact[:200])
    with pytest.raises(
        lf.CheckpointError, match=r"shard-00000-of-00001-\w+\.safetensors': .*truncated"
    ):
        verify_sharded(path)
    shard.unlink()
    with pytest.raises(
        lf.CheckpointError,
        match=r"shard file '.*shard-00000-of-00001-\w+\.safetensors' .* is missing",
    ):
        verify_sharded(path)
    with pytest.raises(FileNotFoundError, match="directory does not exist"):
        verify_sharded(tmp_path / "nothing")


def test_verify_sharded_checks_chunk_shapes_and_shard_files(tmp_path: Path) -> None:
    path = save_sharded(full_state(), tmp_path / "ckpt")
    doc = json.loads((path / "index.json").read_text())
    doc["tensors"]["params.bias"]["shape"] = [6]
    doc["tensors"]["params.bias"]["chunks"][0]["sizes"] = [6]
    _write_index(path, doc)
    with pytest.raises(
        lf.CheckpointError, match=r"shard file '.*shard-00000-of-00001.*' holds `params.bias` with"
    ):
        verify_sharded(path)
    doc["tensors"]["params.bias"]["shape"] = [5]
    doc["tensors"]["params.bias"]["chunks"][0]["sizes"] = [5]
    doc["tensors"]["params.bias"]["dtype"] = "int64"  # same bytes, read as another dtype
    _write_index(path, doc)
    with pytest.raises(
        lf.CheckpointError,
        match=r"holds `params.bias` with shape \(5,\) dtype torch.float64, the "
        r"index says \(5,\) torch.int64",
    ):
        verify_sharded(path)
    path = save_sharded(full_state(), tmp_path / "other")
    foreign = lf.save({"x": torch.ones(1)}, tmp_path / "plain.safetensors")
    shutil.copy(foreign, _shard(path))
    with pytest.raises(lf.CheckpointError, match=r"is not a lightfunc shard file"):
        verify_sharded(path)


@pytest.mark.multiprocess
def test_verify_sharded_of_multi_rank_checkpoints(runs: Any) -> None:
    root, *_ = runs
    verify_sharded(root / "two")
    verify_sharded(root / "four")
    verify_sharded(root / "three")
    with pytest.raises(
        lf.CheckpointError,
        match=r"`params.weight` in '.*corrupt.shard-00001-of-00002-\w+\.safetensors'",
    ):
        verify_sharded(root / "corrupt")


# -- the index ------------------------------------------------------------------------------


def _as_version_1(doc: dict[str, Any]) -> dict[str, Any]:
    """A version-2 index in the layout lightfunc 0.1.0.dev0 wrote (format version 1): the
    header's fields at the top level, each tensor's shape, dtype and chunks in its leaf."""
    header = doc["header"]
    leaves = json.loads(header["leaves"])
    for leaf in leaves:
        leaf.update(doc["tensors"].get(leaf["path"], {}))
    return {
        "format": "lightfunc.sharded",
        "format_version": 1,
        "lightfunc_version": header["lightfunc_version"],
        "torch_version": header["torch_version"],
        "world_size": doc["world_size"],
        "files": doc["files"],
        "leaves": leaves,
        "aliases": json.loads(header["aliases"]),
        "user_metadata": json.loads(header["user_metadata"]),
        "treespec": header["treespec"],
    }


def test_version_1_checkpoints_still_load_verify_and_export(tmp_path: Path) -> None:
    path = save_sharded(full_state(), tmp_path / "ckpt", metadata={"note": "v1"})
    index = path / "index.json"
    index.write_text(json.dumps(_as_version_1(json.loads(index.read_text())), indent=1))
    _assert_full(load_sharded(path, like=_plain_template()))
    verify_sharded(path)
    out = export_full(path, tmp_path / "full.safetensors")
    _assert_full(lf.load(out, like=_plain_template()))
    assert lf.read_metadata(out) == {"note": "v1"}


def _edited_index(tmp_path: Path, edit: Any) -> Path:
    path = save_sharded(full_state(), tmp_path / "ckpt")
    doc = json.loads((path / "index.json").read_text())
    edit(doc)
    _write_index(path, doc)
    return path


def _chunk(doc: dict[str, Any], name: str) -> dict[str, Any]:
    return doc["tensors"][name]["chunks"][0]


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda d: d.update(format_version=4), r"sharded format version 4; .*up to 3\. Upgrade"),
        (lambda d: d.update(format="x"), r"malformed: its `format` is not 'lightfunc.sharded'"),
        (lambda d: d.pop("tensors"), r"index '.*index.json' is malformed: an entry is invalid"),
        (
            lambda d: d["tensors"]["params.bias"].update(dtype="float99"),
            r"unknown dtype 'float99' at `params.bias`",
        ),
        (lambda d: _chunk(d, "plain").update(file="x.safetensors"), r"names an unknown file"),
        (lambda d: _chunk(d, "params.bias").update(offsets=[1]), r"`params.bias` lies outside"),
        (
            lambda d: d["tensors"]["plain"]["chunks"].append(_chunk(d, "plain")),
            r"Two chunks of `plain` overlap",
        ),
        (
            lambda d: d["tensors"].pop("plain"),
            r"'.*index.json' has malformed lightfunc metadata: its tensors do not match",
        ),
        (
            lambda d: d["header"].update(format_version="9"),
            r"checkpoint format version 9.*Upgrade lightfunc",
        ),
    ],
)
def test_malformed_indexes_are_reported(tmp_path: Path, edit: Any, match: str) -> None:
    path = _edited_index(tmp_path, edit)
    with pytest.raises(lf.CheckpointError, match=match):
        verify_sharded(path)
    with pytest.raises(lf.CheckpointError, match=match):
        load_sharded(path, like=_plain_template())


# -- the commit: a crash at any point leaves a loadable checkpoint ----------------------------

CRASHED = 75  # the exit status of a child killed inside `os.replace`


def _crash_at(call: int, after: bool, save: Any) -> int:
    """Run `save()` in a forked child that dies (`os._exit`, no clean-up) at its `call`-th
    `os.replace`, before or after the rename happens. Returns the child's exit code: 0 when
    `save` made fewer calls and finished, `CRASHED` when it died there."""
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 1
        try:
            calls, real = 0, os.replace

            def replace(src: Any, dst: Any) -> None:
                nonlocal calls
                calls += 1
                if calls == call and not after:
                    os._exit(CRASHED)
                real(src, dst)
                if calls == call and after:
                    os._exit(CRASHED)

            os.replace = replace  # type: ignore[assignment]
            save()
            code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def _variant(delta: int) -> dict[str, Any]:
    """`full_state` with other tensor values and counters (a later save of the same run)."""
    full = full_state()
    params = {k: v + delta for k, v in full["params"].items()}
    return full | {"params": params, "tied": params["weight"], "rng": lf.RngKey(3, 17 + delta)}


def _equal(a: Any, b: Any) -> bool:
    la, lb = lf.tree_leaves(a), lf.tree_leaves(b)
    return len(la) == len(lb) and all(
        torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y
        for x, y in zip(la, lb, strict=False)
    )


@pytest.mark.parametrize("existing", [False, True], ids=["new-path", "over-a-checkpoint"])
def test_a_crash_at_any_point_of_the_commit_leaves_a_loadable_checkpoint(
    tmp_path: Path, existing: bool
) -> None:
    old, new, third = _variant(0), _variant(1), _variant(2)
    crashes = 0
    for call in range(1, 20):
        finished = False
        for after in (False, True):
            parent = tmp_path / f"{call}-{after}"
            path = parent / "ckpt"
            if existing:
                save_sharded(old, path)
            code = _crash_at(call, after, lambda path=path: save_sharded(new, path))
            if code == 0:
                finished = True
                break
            assert code == CRASHED
            crashes += 1
            # The path holds the previous checkpoint or the new one, whole, or (a new path)
            # nothing yet; never a half.
            if path.exists():
                verify_sharded(path)
                loaded = load_sharded(path, like=_plain_template())
                assert _equal(loaded, new) or (existing and _equal(loaded, old)), (call, after)
            else:
                assert not existing, (call, after)
            # The next save works, and leaves no debris beside it.
            save_sharded(third, path)
            assert _equal(load_sharded(path, like=_plain_template()), third)
            assert sorted(p.name for p in path.iterdir()) == ["index.json", _shard(path).name]
            remove_orphans(parent)  # what a checkpoint manager does: dead writers' temp files
            assert [p.name for p in parent.iterdir()] == ["ckpt"], (call, after)
        if finished:
            break
    # new path: the shard's, the index's and the directory's renames; over a checkpoint: the
    # shard's and the index's (the commit); each crashed before and after the rename.
    assert crashes == (4 if existing else 6)


def test_a_failed_save_over_a_checkpoint_deletes_only_its_own_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = save_sharded(_variant(0), tmp_path / "ckpt")
    before = sorted(p.name for p in path.iterdir())

    def fail(*args: Any, **kwargs: Any) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(sharded, "build_index", fail)  # after the shard is written
    with pytest.raises(OSError, match="disk full"):
        save_sharded(_variant(1), path)
    assert sorted(p.name for p in path.iterdir()) == before
    assert _equal(load_sharded(path, like=_plain_template()), _variant(0))


def test_the_surviving_copy_of_an_interrupted_old_commit_is_found_and_kept(
    tmp_path: Path,
) -> None:
    # lightfunc 0.1.0.dev0 renamed the old checkpoint aside, then the new one into place;
    # a crash between left only `.ckpt.sharded.old` and `.ckpt.sharded.tmp`.
    path = tmp_path / "ckpt"
    save_sharded(_variant(0), tmp_path / ".ckpt.sharded.old")
    save_sharded(_variant(1), tmp_path / ".ckpt.sharded.tmp")
    with pytest.warns(RuntimeWarning, match=r"surviving copy '.*\.ckpt\.sharded\.tmp'"):
        assert _equal(load_sharded(path, like=_plain_template()), _variant(1))
    (tmp_path / ".ckpt.sharded.tmp" / "index.json").unlink()  # the new copy had not committed
    with pytest.warns(RuntimeWarning, match=r"surviving copy '.*\.ckpt\.sharded\.old'"):
        verify_sharded(path)
        assert _equal(load_sharded(path, like=_plain_template()), _variant(0))
    save_sharded(_variant(2), path)  # a new save never deletes them
    assert (tmp_path / ".ckpt.sharded.old" / "index.json").is_file()
    assert _equal(load_sharded(path, like=_plain_template()), _variant(2))


# -- every byte that changes a resume is checked ------------------------------------------------


def _counter_spans(text: str) -> dict[str, tuple[int, int]]:
    """The character span of each non-tensor leaf's entry (path, kind, value) in the index."""
    spans = {}
    for name in ("step", "epoch", "batch_idx", "eval_at_step", "epoch_end", "state.rng"):
        found = re.search(r'\{\\"path\\": \\"' + re.escape(name) + r'\\".*?\}\}?', text)
        assert found, name
        spans[name] = found.span()
    return spans


def test_single_bit_flips_in_the_index_never_load_silently(tmp_path: Path) -> None:
    state = full_state()
    ls = lf.LoopState(state=state, step=12, epoch=3, batch_idx=5, eval_at_step=10)
    path = save_sharded(ls, tmp_path / "ckpt")
    like = lf.LoopState(state=_plain_template())
    index = path / "index.json"
    raw = index.read_bytes()
    assert raw.isascii()  # one character per byte
    g = torch.Generator().manual_seed(0)
    bits = []
    for start, end in _counter_spans(raw.decode()).values():
        value = raw.index(b"value", start)
        # every bit of each counter's (and the RNG key's) value, one bit of every other byte
        # of its entry (path, keys, kind), and 200 bits sampled over the whole index
        bits += range(8 * value, 8 * end)
        bits += [8 * i + int(torch.randint(8, (), generator=g)) for i in range(start, value)]
    bits += torch.randperm(8 * len(raw), generator=g)[:200].tolist()
    outcomes = {"error": 0, "same": 0}
    for bit in bits:
        flipped = bytearray(raw)
        flipped[bit // 8] ^= 1 << (bit % 8)
        index.write_bytes(bytes(flipped))
        try:
            loaded = load_sharded(path, like=like)
        except lf.CheckpointError:
            outcomes["error"] += 1
            continue
        # a flip that leaves the parsed index unchanged (whitespace) may load: the same state
        assert _equal(loaded, ls), f"bit {bit} ({raw[bit // 8 - 20 : bit // 8 + 20]!r}) loaded"
        outcomes["same"] += 1
    assert outcomes["error"] >= 0.9 * len(bits), outcomes  # the rest: whitespace, same state
    index.write_bytes(raw)
    assert _equal(load_sharded(path, like=like), ls)


def test_a_damaged_index_is_named_with_its_checksum(tmp_path: Path) -> None:
    path = save_sharded(lf.LoopState(state=full_state(), step=12), tmp_path / "ckpt")
    doc = json.loads((path / "index.json").read_text())
    doc["header"]["leaves"] = doc["header"]["leaves"].replace('"value": 12', '"value": 11')
    (path / "index.json").write_text(json.dumps(doc))
    with pytest.raises(lf.CheckpointError, match=r"index '.*index.json' is damaged: its CRC-32"):
        load_sharded(path, like=lf.LoopState(state=_plain_template()))
    with pytest.raises(lf.CheckpointError, match=r"is damaged: its CRC-32"):
        verify_sharded(path)
    del doc["index_crc32"]
    (path / "index.json").write_text(json.dumps(doc))
    with pytest.raises(lf.CheckpointError, match=r"the one stored is None"):
        verify_sharded(path)


def test_a_path_too_long_to_share_between_ranks_is_refused() -> None:
    two_ranks = sharded._Group(object(), 0, 2, torch.device("cpu"), ())
    with pytest.raises(ValueError, match=r"`directory` is too long .* 5000 bytes"):
        two_ranks.share("x" * 5000)  # refused before any collective


def test_a_shard_file_of_another_checkpoint_is_named(tmp_path: Path) -> None:
    path = save_sharded(full_state(), tmp_path / "ckpt")
    other = save_sharded({"x": torch.ones(2)}, tmp_path / "other")
    shutil.copy(_shard(other), _shard(path))
    with pytest.raises(lf.CheckpointError, match=r"holds no tensor `params.bias`, which the index"):
        verify_sharded(path)
    with pytest.raises(lf.CheckpointError, match=r"holds no tensor `params.\w+`"):
        load_sharded(path, like=_plain_template())
