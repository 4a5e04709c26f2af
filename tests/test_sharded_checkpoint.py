"""Sharded checkpoints: bit-exact round trips across world sizes (1 -> 2 -> 3 -> 1), atomic
writes, corruption named by file. The 2- and 3-process parts run tests/scripts/sharded_worker.py
under `lightfunc run` (gloo on CPU), once each, and their checks are read back here."""

from __future__ import annotations

import json
import shutil
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

import lightfunc as lf
from lightfunc.distributed import _checkpoint as sharded
from lightfunc.distributed._checkpoint import (
    export_full,
    load_sharded,
    save_sharded,
    verify_sharded,
)

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


def _run_workers(n: int, root: Path, scenario: str) -> list[dict[str, str]]:
    command = [sys.executable, "-m", "lightfunc", "run", "--nproc-per-node", str(n)]
    command += [str(SCRIPTS / "sharded_worker.py"), "--root", str(root), "--scenario", scenario]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-4000:]
    return [json.loads((root / f"{scenario}-rank{r}.json").read_text()) for r in range(n)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Any], list[Any]]:
    """Save `one` here (1 process), then run the 2-process and 3-process scenarios once."""
    root = tmp_path_factory.mktemp("sharded")
    save_sharded(full_state(), root / "one")
    two = _run_workers(2, root, "two")
    if (root / "two").is_dir():
        shutil.copytree(root / "two", root / "corrupt")
        _flip_byte(root / "corrupt" / "shard-00001-of-00002.safetensors", "params.weight")
    three = _run_workers(3, root, "three")
    return root, two, three


def _assert_ok(results: list[dict[str, str]], *checks: str) -> None:
    for rank, result in enumerate(results):
        for check in checks:
            assert result[check] == "ok", f"rank {rank}, {check}: {result[check]}"


@pytest.mark.multiprocess
def test_one_to_two_and_two_to_two_bit_exact(runs: Any) -> None:
    _, two, _ = runs
    _assert_ok(two, "load_one", "save_two", "load_two", "overwrite_two")


@pytest.mark.multiprocess
def test_two_to_three_and_three_ranks_save(runs: Any) -> None:
    root, _, three = runs
    _assert_ok(three, "load_two", "save_three")
    files = sorted(p.name for p in (root / "three").iterdir())
    assert files == ["index.json"] + [sharded.shard_name(r, 3) for r in range(3)]


@pytest.mark.multiprocess
def test_two_to_one_and_three_to_one_bit_exact(runs: Any) -> None:
    root, _, _ = runs
    for name in ("two", "three"):
        _assert_full(load_sharded(root / name, like=_plain_template()))


@pytest.mark.multiprocess
def test_index_describes_shards(runs: Any) -> None:
    root, _, _ = runs
    index = json.loads((root / "two" / "index.json").read_text())
    assert index["format"] == "lightfunc.sharded" and index["format_version"] == 2
    assert index["world_size"] == 2
    weight = index["tensors"]["params.weight"]
    assert weight["shape"] == [5, 3] and weight["dtype"] == "float32"
    assert [(c["file"], c["offsets"], c["sizes"]) for c in weight["chunks"]] == [
        ("shard-00000-of-00002.safetensors", [0, 0], [3, 3]),
        ("shard-00001-of-00002.safetensors", [3, 0], [2, 3]),
    ]
    # replicated and plain tensors are written once, by rank 0
    assert [c["file"] for c in index["tensors"]["replicated"]["chunks"]] == [
        sharded.shard_name(0, 2)
    ]
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
    _, _, three = runs
    # rank 0 reads only the intact first shard; ranks 1 and 2 read the damaged rows
    assert three[0]["load_corrupt"].startswith("CheckpointError: Could not load")
    assert "ranks 1, 2 failed" in three[0]["load_corrupt"]
    for rank in (1, 2):
        error = three[rank]["load_corrupt"]
        assert error.startswith("CheckpointError: Checksum mismatch for tensor `params.weight`")
        assert "shard-00001-of-00002.safetensors" in error


@pytest.mark.multiprocess
def test_fully_sharded_loop_state_two_to_three_and_one(runs: Any) -> None:
    root, two, three = runs
    _assert_ok(two, "save_train_state")
    _assert_ok(three, "load_train_state")
    want = train_state(0)
    like = lf.LoopState(state=train_state(1))  # 2 -> 1, plain tensors, no strategy
    loaded = load_sharded(root / "train_state", like=like)
    for got, ref in zip(lf.tree_leaves(loaded.state), lf.tree_leaves(want), strict=True):
        assert type(got) is torch.Tensor and torch.equal(got, ref)
    assert loaded.state.rng == want.rng and loaded.step == 1


@pytest.mark.multiprocess
def test_partial_dtensor_refused_before_writing(runs: Any) -> None:
    _, two, _ = runs
    _assert_ok(two, "partial_refused")


# -- one process ------------------------------------------------------------------------


def test_round_trip_in_one_process(tmp_path: Path) -> None:
    path = save_sharded(full_state(), tmp_path / "ckpt")
    assert path == (tmp_path / "ckpt").absolute()
    assert sorted(p.name for p in path.iterdir()) == ["index.json", sharded.shard_name(0, 1)]
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
    root, _, _ = runs
    out = export_full(root / "three", root / "full.safetensors")
    _assert_full(lf.load(out, like=_plain_template()))


def test_missing_shard_is_named(tmp_path: Path) -> None:
    save_sharded(full_state(), tmp_path / "ckpt")
    (tmp_path / "ckpt" / sharded.shard_name(0, 1)).unlink()
    with pytest.raises(lf.CheckpointError, match=r"shard file .*shard-00000-of-00001.* is missing"):
        load_sharded(tmp_path / "ckpt", like=_plain_template())


def test_corrupt_shard_is_named(tmp_path: Path) -> None:
    save_sharded(full_state(), tmp_path / "ckpt")
    _flip_byte(tmp_path / "ckpt" / sharded.shard_name(0, 1), "params.bias")
    with pytest.raises(lf.CheckpointError, match=r"Checksum mismatch .*params.bias.*shard-00000"):
        load_sharded(tmp_path / "ckpt", like=_plain_template())
    with pytest.raises(lf.CheckpointError, match="Checksum mismatch"):
        export_full(tmp_path / "ckpt", tmp_path / "full.safetensors")
    assert not (tmp_path / "full.safetensors").exists()
    load_sharded(tmp_path / "ckpt", like=_plain_template(), verify=False)  # skips the check


def test_truncated_shard_is_named(tmp_path: Path) -> None:
    save_sharded(full_state(), tmp_path / "ckpt")
    shard = tmp_path / "ckpt" / sharded.shard_name(0, 1)
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(lf.CheckpointError, match=r"shard-00000-of-00001\.safetensors"):
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
    index.write_text(json.dumps(doc))
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
    shard = path / sharded.shard_name(0, 1)
    intact = shard.read_bytes()
    _flip_byte(shard, "params.weight")
    with pytest.raises(
        lf.CheckpointError,
        match=r"Checksum mismatch for tensor `params.weight` in '.*shard-00000-of-00001\.safetensors'",
    ):
        verify_sharded(path)
    shard.write_bytes(intact[:200])
    with pytest.raises(
        lf.CheckpointError, match=r"shard-00000-of-00001\.safetensors': .*truncated"
    ):
        verify_sharded(path)
    shard.unlink()
    with pytest.raises(
        lf.CheckpointError, match=r"shard file '.*shard-00000-of-00001\.safetensors' .* is missing"
    ):
        verify_sharded(path)
    with pytest.raises(FileNotFoundError, match="directory does not exist"):
        verify_sharded(tmp_path / "nothing")


def test_verify_sharded_checks_chunk_shapes_and_shard_files(tmp_path: Path) -> None:
    path = save_sharded(full_state(), tmp_path / "ckpt")
    index = path / "index.json"
    doc = json.loads(index.read_text())
    doc["tensors"]["params.bias"]["shape"] = [6]
    doc["tensors"]["params.bias"]["chunks"][0]["sizes"] = [6]
    index.write_text(json.dumps(doc))
    with pytest.raises(
        lf.CheckpointError, match=r"shard file '.*shard-00000-of-00001.*' holds `params.bias` with"
    ):
        verify_sharded(path)
    path = save_sharded(full_state(), tmp_path / "other")
    foreign = lf.save({"x": torch.ones(1)}, tmp_path / "plain.safetensors")
    shutil.copy(foreign, path / sharded.shard_name(0, 1))
    with pytest.raises(lf.CheckpointError, match=r"is not a lightfunc shard file"):
        verify_sharded(path)


@pytest.mark.multiprocess
def test_verify_sharded_of_multi_rank_checkpoints(runs: Any) -> None:
    root, _, _ = runs
    verify_sharded(root / "two")
    verify_sharded(root / "three")
    with pytest.raises(
        lf.CheckpointError,
        match=r"`params.weight` in '.*corrupt.shard-00001-of-00002\.safetensors'",
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
    (path / "index.json").write_text(json.dumps(doc))
    return path


def _chunk(doc: dict[str, Any], name: str) -> dict[str, Any]:
    return doc["tensors"][name]["chunks"][0]


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda d: d.update(format_version=3), r"sharded format version 3; .*up to 2\. Upgrade"),
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
