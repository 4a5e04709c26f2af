"""The checkpoint codec: every leaf kind round-trips, one header for every file, errors name paths."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import safetensors
import torch

import lightfunc as lf
from lightfunc import CheckpointError
from lightfunc._codec import (
    CHECKPOINT_FORMAT,
    FORMAT_VERSION,
    HEADER_CRC,
    PARAMS_FORMAT,
    Header,
    encode,
    flatten,
    flatten_named,
    header_crc32,
    place,
    user_metadata,
)
from lightfunc._version import __version__
from lightfunc.distributed._checkpoint import export_full, save_sharded

SOURCE = Path("/runs/ckpt.safetensors")  # only named in messages


def _tree() -> dict[str, Any]:
    """Every leaf kind: tensors of many dtypes (bfloat16 among them), a tied tensor, Python
    scalars (non-finite floats, a 70-bit int, a bool that must stay a bool), a string, a key."""
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(4, 3, generator=g)
    return {
        "params": {
            "weight": weight,
            "bf16": torch.randn(5, generator=g).to(torch.bfloat16),
            "f16": torch.randn(2, 2, generator=g).half(),
            "f64": torch.randn(3, generator=g, dtype=torch.float64),
            "i8": torch.tensor([-128, 0, 127], dtype=torch.int8),
            "i64": torch.tensor([-(2**63), 2**63 - 1]),
            "u8": torch.arange(256, dtype=torch.uint8),
            "mask": torch.tensor([True, False, True]),
            "empty": torch.zeros(0, 4),
            "scalar": torch.tensor(2.5),
        },
        "tied": weight,
        "step": 12,
        "big": 2**70,
        "ratio": 0.1,
        "nan": float("nan"),
        "inf": float("inf"),
        "neg_inf": float("-inf"),
        "flag": True,
        "name": "run-1",
        "rng": lf.RngKey(2**80 + 1, 17),
    }


def _blank(tree: dict[str, Any]) -> dict[str, Any]:
    """`tree`'s structure with other values everywhere (ties kept)."""
    params = {k: torch.ones_like(v) for k, v in tree["params"].items()}
    return tree | {
        "params": params,
        "tied": params["weight"],
        "step": 0,
        "big": 0,
        "ratio": 0.0,
        "nan": 0.0,
        "inf": 0.0,
        "neg_inf": 0.0,
        "flag": False,
        "name": "",
        "rng": lf.RngKey(0),
    }


def _decode_and_restore(
    tensors: dict[str, torch.Tensor], header: dict[str, str], like: Any
) -> tuple[Header, Any]:
    """What a reader does: decode the header, check `like`, restore from `tensors`."""
    decoded = Header.decode(header, SOURCE, tensors=list(tensors))
    flat = flatten(like, "`like`")
    decoded.check(flat, SOURCE, lambda n: (tuple(tensors[n].shape), tensors[n].dtype))
    return decoded, decoded.restore(flat, lambda name, leaf: place(tensors[name], leaf))


def test_every_leaf_kind_round_trips_exactly():
    tree = _tree()
    tensors, header = encode(flatten(tree, "`tree`"), metadata={"note": "x"})
    assert all(isinstance(v, str) for v in header.values())
    assert "tied" not in tensors  # stored once, under the first path
    decoded, back = _decode_and_restore(tensors, header, _blank(tree))
    for name, want in tree["params"].items():
        got = back["params"][name]
        assert got.dtype == want.dtype and got.shape == want.shape, name
        assert torch.equal(got, want), name
    assert back["tied"] is back["params"]["weight"]
    assert math.isnan(back["nan"]) and back["inf"] == math.inf and back["neg_inf"] == -math.inf
    for key in ("step", "big", "ratio", "flag", "name", "rng"):
        assert type(back[key]) is type(tree[key]) and back[key] == tree[key], key
    assert decoded.user == {"note": "x"} and decoded.aliases == {"tied": "params.weight"}
    assert decoded.lightfunc_version == __version__ and decoded.torch_version == torch.__version__
    # Strict JSON throughout: non-finite floats are strings.
    leaves = json.loads(header["leaves"], parse_constant=lambda c: pytest.fail(c))
    assert {e["path"]: e.get("value") for e in leaves}["nan"] == "nan"
    assert header["format"] == CHECKPOINT_FORMAT
    assert header["format_version"] == str(FORMAT_VERSION)


def test_a_state_dict_keeps_every_name_and_ties_nothing():
    shared = torch.randn(2, 2)
    flat = flatten_named({"0.weight": shared, "2.weight": shared}, "`sd`")
    tensors, header = encode(flat, fmt=PARAMS_FORMAT)
    assert sorted(tensors) == ["0.weight", "2.weight"]
    assert tensors["0.weight"].untyped_storage() is not tensors["2.weight"].untyped_storage()
    decoded = Header.decode(header, SOURCE, tensors=list(tensors), fmt=PARAMS_FORMAT)
    assert decoded.aliases == {} and decoded.stored == ["0.weight", "2.weight"]


def test_one_header_for_a_file_a_params_file_and_a_shard_index(tmp_path):
    tree = _tree()
    _, header = encode(flatten(tree, "`tree`"), metadata={"run": 1})
    file = lf.save(tree, tmp_path / "one.safetensors", metadata={"run": 1})
    with safetensors.safe_open(file, "pt") as f:
        assert f.metadata() == header
    directory = save_sharded(tree, tmp_path / "sharded", metadata={"run": 1})
    index = json.loads((directory / "index.json").read_text())
    unsigned = {k: v for k, v in header.items() if k != HEADER_CRC}
    assert index["header"] == unsigned | {
        "checksums": "{}",
        HEADER_CRC: header_crc32(unsigned | {"checksums": "{}"}),
    }
    with safetensors.safe_open(export_full(directory, tmp_path / "full.safetensors"), "pt") as f:
        assert f.metadata() == header

    named = {"0.weight": torch.ones(2), "0.bias": torch.zeros(2)}
    _, params_header = encode(flatten_named(named, "`named`"), fmt=PARAMS_FORMAT)
    with safetensors.safe_open(lf.save_params(named, tmp_path / "p.safetensors"), "pt") as f:
        assert f.metadata() == params_header
    assert params_header.keys() == header.keys() and params_header["format"] == "params"


# -- templates that do not match ------------------------------------------------------


def _check(like: Any) -> None:
    tree = {"params": {"w": torch.ones(2, 3), "b": torch.zeros(2)}, "step": 3}
    tensors, header = encode(flatten(tree, "`tree`"))
    _decode_and_restore(tensors, header, like)


def test_a_mismatched_template_is_named_by_path():
    w, b = torch.ones(2, 3), torch.zeros(2)
    with pytest.raises(
        CheckpointError,
        match=r"'/runs/ckpt.safetensors' does not match the structure of `like`: missing in the "
        r"file: params\.x; not in the template: params\.b",
    ):
        _check({"params": {"w": w, "x": b}, "step": 0})
    with pytest.raises(
        CheckpointError,
        match=r"at 2 leaves:\n  params\.b: the file has shape \(2,\) dtype float32, the template "
        r"shape \(3,\) dtype float32\n  params\.w: the file has shape \(2, 3\) dtype float32, the "
        r"template shape \(2, 3\) dtype bfloat16",
    ):
        _check({"params": {"w": w.bfloat16(), "b": torch.zeros(3)}, "step": 0})
    with pytest.raises(CheckpointError, match=r"step: the file has a leaf of kind 'int', the temp"):
        _check({"params": {"w": w, "b": b}, "step": 1.0})
    with pytest.raises(CheckpointError, match=r"params\.b: the file has a leaf of kind 'tensor'"):
        _check({"params": {"w": w, "b": 0}, "step": 0})


def test_unencodable_trees_are_named_by_path():
    with pytest.raises(TypeError, match=r"`tree` has a leaf of type object at `a\[0\]`"):
        flatten({"a": [object()]}, "`tree`")
    with pytest.raises(ValueError, match=r"same path string `a\.b`"):
        flatten({"a.b": 1, "a": {"b": 2}}, "`tree`")
    with pytest.raises(ValueError, match="`sd` has a leaf at path `__metadata__`"):
        flatten_named({"__metadata__": torch.ones(1)}, "`sd`")
    with pytest.raises(TypeError, match="`sd` entry `w` is a float, expected a tensor"):
        flatten_named({"w": 1.0}, "`sd`")
    with pytest.raises(TypeError, match="`metadata` must be a dict, got list"):
        user_metadata([1])  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="`metadata` must be JSON-serialisable"):
        user_metadata({"x": {1, 2}})


# -- headers that are not ours, newer, or damaged ------------------------------------------


def _header(sign: bool = True, **changes: str | None) -> tuple[dict[str, str], list[str]]:
    """A valid header with `changes` made, re-signed (its CRC-32 recomputed) unless `sign=False`.

    Re-signed edits check what the header's own checks catch behind the
    CRC-32 (what a version-1 file, which has none, relies on).
    """
    tensors, header = encode(flatten({"w": torch.ones(2), "rng": lf.RngKey(1)}, "`tree`"))
    for key, value in changes.items():
        if value is None:
            header.pop(key)
        else:
            header[key] = value
    if sign:
        header[HEADER_CRC] = header_crc32(header)
    return header, list(tensors)


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"format": "params"}, r"is a parameters file written by lightfunc\.save_params"),
        ({"format": "pt"}, r"`format` is 'pt'.*not written by lightfunc\.save"),
        ({"format_version": "0"}, r"`format_version` is '0', expected an integer >= 1"),
        ({"format_version": "3"}, r"format version 3, written by lightfunc .*Upgrade lightfunc"),
        ({"aliases": None}, r"the metadata key 'aliases' is missing"),
        ({"user_metadata": "{"}, r"the metadata key 'user_metadata' is not valid JSON"),
        (
            {"leaves": '[{"path": "rng", "keys": ["rng"], "kind": "rng", "value": 3}]'},
            r"`leaves`/`aliases`/`checksums` metadata is invalid",
        ),
        (
            {"leaves": '[{"path": "f", "keys": ["f"], "kind": "float", "value": "x"}]'},
            r"metadata is invalid \(ValueError\(\"bad float leaf value 'x'",
        ),
        ({"checksums": '{"w": "x"}'}, r"`leaves`/`aliases`/`checksums` metadata is invalid"),
        ({"aliases": '{"v": "nowhere"}'}, r"tensors do not match the `leaves` and `checksums`"),
    ],
)
def test_foreign_newer_or_damaged_headers_are_reported(changes, match):
    header, names = _header(**changes)
    with pytest.raises(CheckpointError, match=match):
        Header.decode(header, SOURCE, tensors=names)


def test_decode_checks_the_format_asked_for_and_the_tensors_present():
    header, names = _header()
    with pytest.raises(CheckpointError, match=r"is not a lightfunc 'params' file \(metadata `for"):
        Header.decode(header, SOURCE, tensors=names, fmt=PARAMS_FORMAT)
    with pytest.raises(CheckpointError, match="tensors do not match the `leaves`"):
        Header.decode(header, SOURCE, tensors=[*names, "extra"])
    # a sharded index keeps no per-tensor checksums: its chunks carry them
    header, names = _header(checksums="{}")
    with pytest.raises(CheckpointError, match="tensors do not match the `leaves` and `checksums`"):
        Header.decode(header, SOURCE, tensors=names)
    assert Header.decode(header, SOURCE, tensors=names, checksummed=False).checksums == {}


# -- the header's own checksum ---------------------------------------------------------


@pytest.mark.parametrize(
    "changes",
    [
        {"leaves": '[{"path": "w", "keys": ["w"], "kind": "tensor"}, '
         '{"path": "rng", "keys": ["rng"], "kind": "rng", "value": {"seed": 1, "counter": 1}}]'},
        {"treespec": "edited"},
        {"user_metadata": '{"step": 3}'},
        {"lightfunc_version": "0.0.1"},
        {"extra": "added"},
    ],
)  # fmt: skip
def test_any_edit_of_a_signed_header_fails_its_crc(changes):
    header, names = _header(sign=False, **changes)
    with pytest.raises(CheckpointError, match=r"has a damaged header: its CRC-32 is [0-9a-f]{8}"):
        Header.decode(header, SOURCE, tensors=names)


def test_a_header_without_its_crc_is_malformed_from_version_2_and_read_at_version_1():
    header, names = _header(sign=False, header_crc32=None)
    with pytest.raises(CheckpointError, match=r"the metadata key 'header_crc32' is missing"):
        Header.decode(header, SOURCE, tensors=names)
    header["format_version"] = "1"  # written before the header carried a CRC-32
    assert Header.decode(header, SOURCE, tensors=names).leaves["rng"].value == lf.RngKey(1)


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"user_metadata": "[" * 100_000 + "]" * 100_000}, r"'user_metadata' is not valid JSON"),
        ({"user_metadata": "1" * 5000}, r"'user_metadata' is not valid JSON"),
        ({"checksums": '{"w": ' + "7" * 5000 + "}"}, r"'checksums' is not valid JSON"),
        ({"format_version": "1" * 5000}, r"`format_version` is '1111.*expected an integer"),
        ({"format_version": "\u00b2"}, r"`format_version` is .*expected an integer"),
    ],
)
def test_deep_or_huge_json_is_a_checkpoint_error_not_a_crash(changes, match):
    # No RecursionError, no ValueError from int() escapes: each is a CheckpointError.
    header, names = _header(**changes)
    with pytest.raises(CheckpointError, match=match):
        Header.decode(header, SOURCE, tensors=names)
