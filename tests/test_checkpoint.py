import errno
import json
import math
import os
import pickle
import struct
import subprocess
import sys

import optree
import pytest
import safetensors.torch
import torch
from helpers import make_data, make_model, make_steps

import lightfunc as lf
import lightfunc._tensorfile
from lightfunc import CheckpointError
from lightfunc._checkpoint import verify
from lightfunc._codec import HEADER_CRC, header_crc32
from lightfunc.testing import assert_trees_close

# -- helpers --------------------------------------------------------------------


def _bits(t):
    """A tensor's raw bytes, for exact comparison of any dtype (NaNs, -0.0, fp8, complex)."""
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


def _assert_identical(restored, original):
    """Same leaf paths, every tensor equal bit for bit with the same dtype, other leaves equal."""
    r_paths, r_leaves = _flatten(restored)
    o_paths, o_leaves = _flatten(original)
    assert r_paths == o_paths
    for path, r, o in zip(r_paths, r_leaves, o_leaves, strict=True):
        if isinstance(o, torch.Tensor):
            assert r.dtype == o.dtype and r.shape == o.shape, path
            assert torch.equal(_bits(r), _bits(o)), path
        else:
            assert type(r) is type(o) and (r == o or r != r), path


def _flatten(tree):
    paths, leaves, _ = optree.tree_flatten_with_path(
        tree, is_leaf=lambda x: isinstance(x, lf.RngKey), namespace="lightfunc"
    )
    return paths, leaves


def _other_values(tree):
    """A template: `tree`'s structure with every tensor value changed."""
    return lf.tree_map(lambda x: torch.zeros_like(x) if isinstance(x, torch.Tensor) else x, tree)


def _train(tx, steps=2, seed=0):
    model = make_model(dropout=0.1)
    train_step, _ = make_steps(model)
    step = lf.build(train_step, compile=False)
    state = lf.TrainState.create(model, tx, seed=seed)
    for batch in make_data(n=64, batch_size=32)[:steps]:
        state, _ = step(state, batch)
    return state


def _header(data):
    n = struct.unpack("<Q", data[:8])[0]
    return n, json.loads(data[8 : 8 + n])


def _rewrite_metadata(path, *, sign=True, **changes):
    """Rewrite the safetensors header of `path` with some metadata keys changed (None: removed).

    The header's CRC-32 is recomputed (`sign`), so what is tested is the
    check behind it; `sign=False` leaves it, as a random corruption would.
    """
    data = path.read_bytes()
    n, header = _header(data)
    meta = header["__metadata__"]
    for key, value in changes.items():
        if value is None:
            meta.pop(key)
        else:
            meta[key] = value
    if sign:
        meta[HEADER_CRC] = header_crc32(meta)
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n :])


# -- round trips ----------------------------------------------------------------

OPTIMIZERS = {
    "sgd_momentum": lambda: lf.optim.sgd(0.1, momentum=0.9),
    "adamw": lambda: lf.optim.adamw(1e-2),
    "lion": lambda: lf.optim.lion(1e-3, weight_decay=0.1),
    "masked": lambda: lf.optim.masked(
        lf.optim.adamw(1e-2), lambda p: {k: v.ndim > 1 for k, v in p.items()}
    ),
    "multi_transform": lambda: lf.optim.multi_transform(
        {"decay": lf.optim.adamw(1e-2), "frozen": lf.optim.set_to_zero()},
        lambda p: {k: "decay" if k.endswith("weight") else "frozen" for k in p},
    ),
}


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_train_state_round_trips_exactly_with_each_optimizer(tmp_path, name):
    tx = OPTIMIZERS[name]()
    state = _train(tx)
    path = lf.save(state, tmp_path / "ckpt.safetensors")
    template = lf.TrainState.create(make_model(seed=5), tx, seed=9)
    restored = lf.load(path, like=template)
    assert_trees_close(restored, state)
    _assert_identical(restored, state)
    assert restored.tx is template.tx
    assert int(restored.step) == 2 and restored.rng == state.rng


def test_loop_state_round_trips_and_resumes_bit_exactly(tmp_path):
    model = make_model(dropout=0.2)
    train_step, eval_step = make_steps(model)
    step = lf.build(train_step, compile=False)
    evaluate = lf.build_eval(eval_step, compile=False)
    data = make_data(n=96, batch_size=32)
    state = lf.TrainState.create(model, lf.optim.adamw(1e-2), seed=3)
    run = lf.loop(step, state, data, max_epochs=2, eval_step=evaluate, eval_data=data)
    ls = [next(run) for _ in range(4)][-1]  # mid-epoch 1, after an evaluation
    assert ls.eval_metrics is not None and ls.state.rng.counter > 0

    path = lf.save(ls, tmp_path / "ckpt.safetensors")
    like = lf.LoopState(
        state=lf.TrainState.create(make_model(seed=7), lf.optim.adamw(1e-2), seed=0),
        metrics={"loss": torch.zeros(())},
        eval_metrics={"loss": torch.zeros(()), "acc": torch.zeros(())},
    )
    restored = lf.load(path, like=like)
    _assert_identical(restored, ls)
    assert (restored.step, restored.epoch, restored.batch_idx) == (ls.step, ls.epoch, ls.batch_idx)
    assert restored.eval_at_step == ls.eval_at_step and restored.state.rng == ls.state.rng

    def finish(start):
        loop = lf.loop(step, start, data, max_epochs=2, eval_step=evaluate, eval_data=data)
        return list(loop)[-1]

    _assert_identical(finish(restored).state, finish(ls).state)


DTYPES = [
    torch.float32,
    torch.float64,
    torch.float16,
    torch.bfloat16,
    torch.int8,
    torch.int16,
    torch.int32,
    torch.int64,
    torch.uint8,
    torch.bool,
    torch.complex64,
    *[getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2", "uint16") if hasattr(torch, n)],
]


def _example(dtype):
    g = torch.Generator().manual_seed(0)
    if dtype == torch.bool:
        return torch.rand(3, 5, generator=g) > 0.5
    if dtype.is_complex:
        return torch.randn(3, 5, dtype=dtype, generator=g)
    if dtype.is_floating_point:
        x = torch.randn(3, 5, generator=g) * 10
        x[0, :3] = torch.tensor([float("nan"), float("inf"), -0.0])
        return x.to(dtype)
    info = torch.iinfo(dtype)
    x = torch.randint(max(info.min, -1000), min(info.max, 1000), (3, 5), generator=g)
    x = x.to(dtype)
    x[0, 0], x[0, 1] = info.min, info.max
    return x


def test_every_dtype_round_trips_bit_exactly(tmp_path):
    tree = {str(d).removeprefix("torch."): _example(d) for d in DTYPES}
    path = lf.save(tree, tmp_path / "dtypes.safetensors")
    restored = lf.load(path, like=_other_values(tree))
    _assert_identical(restored, tree)


def test_scalars_large_ints_empty_tensors_and_python_leaves_round_trip(tmp_path):
    tree = {
        "big": torch.tensor(2**62),
        "min": torch.tensor(-(2**63)),
        "half": torch.tensor(1.5, dtype=torch.bfloat16),
        "empty": torch.zeros(0, 4),
        "ints": 2**70,
        "ratio": 0.1,
        "nan": float("nan"),
        "inf": float("-inf"),
        "flag": True,
        "name": "run-1",
        "key": lf.RngKey(2**80 + 1, 17),
    }
    path = lf.save(tree, tmp_path / "scalars.safetensors")
    like = {**_other_values(tree), "ints": 0, "ratio": 0.0, "nan": 0.0, "inf": 0.0}
    like.update(flag=False, name="", key=lf.RngKey(0))
    restored = lf.load(path, like=like)
    assert math.isnan(restored.pop("nan"))
    _assert_identical(restored, {k: v for k, v in tree.items() if k != "nan"})
    assert type(restored["flag"]) is bool and type(restored["ints"]) is int
    # The metadata is strict JSON: non-finite floats are written as strings.
    with safetensors.safe_open(path, "pt") as f:
        json.loads(f.metadata()["leaves"], parse_constant=lambda c: pytest.fail(c))


def test_non_contiguous_tensors_and_views_of_one_storage_are_stored_as_copies(tmp_path):
    # Views sharing a storage (the base, its transpose, a strided slice, a contiguous
    # slice at another offset) are not ties: each is stored as its own contiguous copy.
    base = torch.arange(24.0).reshape(4, 6)
    tree = {"base": base, "t": base.t(), "strided": base[:, ::2], "rows": base[1:3]}
    path = lf.save(tree, tmp_path / "views.safetensors")
    restored = lf.load(path, like=_other_values(tree))
    _assert_identical(restored, tree)
    assert all(t.is_contiguous() for t in restored.values())
    restored["base"].zero_()
    assert torch.equal(restored["rows"], base[1:3])  # independent storage after loading


def test_tied_tensors_are_stored_once_and_restored_as_one_object(tmp_path):
    shared = torch.randn(3, 3)
    tree = {"decoder": {"w": shared}, "encoder": {"w": shared}, "other": torch.ones(2)}
    path = lf.save(tree, tmp_path / "tied.safetensors")
    with safetensors.safe_open(path, "pt") as f:
        assert sorted(f.keys()) == ["decoder.w", "other"]
        assert json.loads(f.metadata()["aliases"]) == {"encoder.w": "decoder.w"}
    like = {"decoder": {"w": torch.zeros(3, 3)}, "encoder": {"w": torch.zeros(3, 3)}}
    restored = lf.load(path, like={**like, "other": torch.zeros(2)})
    assert restored["encoder"]["w"] is restored["decoder"]["w"]
    assert torch.equal(restored["encoder"]["w"], shared)


def test_load_places_tensors_on_the_template_device_or_device(tmp_path):
    tree = {"w": torch.randn(2, 3), "p": torch.nn.Parameter(torch.randn(2))}
    path = lf.save(tree, tmp_path / "dev.safetensors")
    on_meta = lf.tree_map(lambda t: torch.empty_like(t, device="meta"), tree)
    restored = lf.load(path, like=on_meta)  # a template without memory loads to the CPU
    assert restored["w"].device.type == "cpu" and torch.equal(restored["w"], tree["w"])
    restored = lf.load(path, like=tree, device="cpu")
    assert isinstance(restored["p"], torch.nn.Parameter) and restored["p"].requires_grad


def test_user_metadata_is_read_back(tmp_path):
    path = lf.save({"w": torch.ones(1)}, tmp_path / "m.safetensors", metadata={"loss": 0.5})
    assert lf.read_metadata(path) == {"loss": 0.5}
    assert lf.read_metadata(lf.save({}, tmp_path / "n.safetensors")) is None


# -- template mismatches ------------------------------------------------------------


def _saved(tmp_path, tree=None):
    tree = tree or {"params": {"0.weight": torch.ones(2, 3), "0.bias": torch.zeros(2)}, "step": 3}
    return lf.save(tree, tmp_path / "ckpt.safetensors"), tree


def test_missing_and_extra_paths_are_named(tmp_path):
    path, tree = _saved(tmp_path)
    like = {"params": {"0.weight": torch.ones(2, 3), "9.weight": torch.ones(1)}, "step": 0}
    with pytest.raises(
        CheckpointError, match=r"missing in the file: params\.9\.weight; not in the template: "
        r"params\.0\.bias\.\n  file \(3 leaves\).*\n  template \(3 leaves\)",
    ):  # fmt: skip
        lf.load(path, like=like)
    with pytest.raises(
        CheckpointError, match="missing in the file: none; not in the template: step"
    ):
        lf.load(path, like={"params": tree["params"]})


def test_shape_dtype_and_leaf_type_mismatches_are_named(tmp_path):
    path, tree = _saved(tmp_path)
    params = tree["params"]
    with pytest.raises(
        CheckpointError,
        match=r"params\.0\.bias: the file has shape \(2,\) dtype float32, the template shape "
        r"\(3,\) dtype float32",
    ):
        lf.load(path, like={"params": {**params, "0.bias": torch.zeros(3)}, "step": 0})
    with pytest.raises(CheckpointError, match=r"file has shape \(2, 3\) dtype float32, the templa"):
        lf.load(path, like={"params": {**params, "0.weight": torch.ones(2, 3).half()}, "step": 0})
    with pytest.raises(CheckpointError, match=r"step: the file has a leaf of kind 'int', the temp"):
        lf.load(path, like={"params": params, "step": torch.tensor(0)})
    with pytest.raises(TypeError, match=r"`like` has a leaf of type object at `step`"):
        lf.load(path, like={"params": params, "step": object()})


# -- invalid input to save ------------------------------------------------------------


def test_save_rejects_unsavable_trees_naming_the_path(tmp_path):
    target = tmp_path / "x.safetensors"
    with pytest.raises(ValueError, match="leaf at path `__metadata__`"):
        lf.save({"__metadata__": torch.ones(1)}, target)
    with pytest.raises(ValueError, match=r"same path string `a\.b`"):
        lf.save({"a.b": torch.ones(1), "a": {"b": torch.ones(1)}}, target)
    with pytest.raises(TypeError, match=r"leaf of type function at `fn`"):
        lf.save({"fn": lambda x: x}, target)
    with pytest.raises(TypeError, match=r"`w`: dtype complex128 is not supported"):
        lf.save({"w": torch.zeros(2, dtype=torch.complex128)}, target)
    with pytest.raises(TypeError, match=r"`w`: it is on the meta device"):
        lf.save({"w": torch.zeros(2, device="meta")}, target)
    with pytest.raises(TypeError, match=r"`w`: it is a Tensor with layout torch.sparse_coo"):
        lf.save({"w": torch.zeros(2).to_sparse()}, target)
    with pytest.raises(TypeError, match="`metadata` must be JSON-serialisable"):
        lf.save({}, target, metadata={"t": torch.ones(1)})
    with pytest.raises(IsADirectoryError, match="is an existing directory"):
        lf.save({}, tmp_path)
    assert not target.exists()


# -- corrupted files ------------------------------------------------------------------


def test_truncated_files_are_reported_at_every_cut(tmp_path):
    path, tree = _saved(tmp_path)
    data = path.read_bytes()
    n, _ = _header(data)
    for cut in [0, 4, 8, 40, 8 + n - 1, 8 + n + 3, len(data) - 1]:
        path.write_bytes(data[:cut])
        with pytest.raises(CheckpointError, match=r"ckpt\.safetensors': .*truncated, corrupted"):
            lf.load(path, like=tree)


def test_garbage_bytes_and_directories_are_reported(tmp_path):
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(os.urandom(256))
    with pytest.raises(CheckpointError, match=r"garbage\.safetensors'.*not a safetensors file"):
        lf.load(garbage, like={})
    with pytest.raises(CheckpointError, match=r"is a directory; expected a \.safetensors file"):
        lf.load(tmp_path, like={})
    with pytest.raises(FileNotFoundError, match=r"No checkpoint file at .*nope\.safetensors"):
        lf.load(tmp_path / "nope.safetensors", like={})


def test_flipped_tensor_bytes_fail_the_checksum_unless_verify_is_off(tmp_path):
    tree = {"a": torch.randn(100), "b": torch.randn(100)}
    path = lf.save(tree, tmp_path / "ckpt.safetensors")
    data = bytearray(path.read_bytes())
    n, header = _header(data)
    data[8 + n + header["b"]["data_offsets"][0] + 13] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"Checksum mismatch for tensor `b` .* corrupted"):
        lf.load(path, like=tree)
    with pytest.raises(CheckpointError, match="Checksum mismatch for tensor `b`"):
        verify(path)
    # verify=False trusts the file: the damaged values load without an error.
    restored = lf.load(path, like=tree, verify=False)
    assert torch.equal(restored["a"], tree["a"]) and not torch.equal(restored["b"], tree["b"])


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"leaves": "[{not json"}, r"metadata key 'leaves' is not valid JSON"),
        ({"leaves": '[{"path": "step"}]'}, r"`leaves`/`aliases`/`checksums` metadata is invalid"),
        ({"checksums": None}, r"metadata key 'checksums' is missing"),
        ({"checksums": "{}"}, r"tensors do not match the `leaves` and `checksums`"),
        ({"format_version": "x"}, r"`format_version` is 'x', expected an integer"),
        ({"format_version": "99"}, r"format version 99.*Upgrade lightfunc"),
        ({"format": None}, r"not a lightfunc checkpoint .*not written by lightfunc.save"),
    ],
)
def test_edited_metadata_is_reported(tmp_path, changes, match):
    path, tree = _saved(tmp_path)
    _rewrite_metadata(path, **changes)
    with pytest.raises(CheckpointError, match=match):
        lf.load(path, like=tree)


def test_files_not_written_by_save_are_reported(tmp_path):
    plain = tmp_path / "plain.safetensors"
    safetensors.torch.save_file({"w": torch.ones(2)}, plain, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"`format` is 'pt'.*not written by lightfunc.save"):
        lf.load(plain, like={"w": torch.ones(2)})
    params = lf.save_params({"w": torch.ones(2)}, tmp_path / "params.safetensors")
    with pytest.raises(CheckpointError, match=r"written by lightfunc\.save_params: read it with"):
        lf.load(params, like={"w": torch.ones(2)})


# -- atomic writes ----------------------------------------------------------------------


def test_save_leaves_one_file_with_the_umask_mode_and_replaces_old_ones(tmp_path):
    old = os.umask(0o022)
    try:
        path = lf.save({"w": torch.ones(2)}, tmp_path / "a" / "b" / "ckpt.safetensors")
        assert os.listdir(path.parent) == ["ckpt.safetensors"]
        assert path.stat().st_mode & 0o777 == 0o644
        os.umask(0o027)
        lf.save({"w": torch.full((2,), 5.0)}, path, verify_fsync=False)
        assert path.stat().st_mode & 0o777 == 0o640
    finally:
        os.umask(old)
    assert os.listdir(path.parent) == ["ckpt.safetensors"]
    assert torch.equal(lf.load(path, like={"w": torch.ones(2)})["w"], torch.full((2,), 5.0))


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path, monkeypatch):
    path = lf.save({"w": torch.ones(2)}, tmp_path / "ckpt.safetensors")

    def half_write(tensors, filename, metadata):
        with open(filename, "wb") as f:
            f.write(b"\x10\x00\x00\x00\x00\x00\x00\x00{")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(lightfunc._tensorfile, "save_file", half_write)
    with pytest.raises(CheckpointError, match=r"Cannot write the checkpoint .*the disk is full"):
        lf.save({"w": torch.zeros(2)}, path)
    assert os.listdir(tmp_path) == ["ckpt.safetensors"]
    assert torch.equal(lf.load(path, like={"w": torch.zeros(2)})["w"], torch.ones(2))


# -- parameters alone -------------------------------------------------------------------


def test_save_params_loads_into_a_plain_module(tmp_path):
    state = _train(lf.optim.adamw(1e-2))
    path = lf.save_params(state, tmp_path / "model.safetensors")
    module = make_model(seed=4)
    module.load_state_dict(safetensors.torch.load_file(path))
    assert_trees_close(dict(module.state_dict()), {**state.params, **state.buffers})
    with safetensors.safe_open(path, "pt") as f:
        assert f.metadata()["format"] == "params"
        assert "lightfunc_version" in f.metadata()


@pytest.mark.parametrize("kind", ["params_file", "train_state", "loop_state"])
def test_load_params_reads_params_files_and_full_checkpoints_into_a_module(tmp_path, kind):
    state = _train(lf.optim.sgd(0.1, momentum=0.9))
    path = tmp_path / "file.safetensors"
    if kind == "params_file":
        lf.save_params(lf.LoopState(state=state), path)
    else:
        lf.save(state if kind == "train_state" else lf.LoopState(state=state, step=2), path)
    module = make_model(seed=4)
    result = lf.load_params(path, module)
    expected = {**state.params, **state.buffers}
    assert_trees_close(result, expected)
    assert_trees_close(dict(module.state_dict()), expected)


def test_save_params_stores_tied_weights_as_copies_load_state_dict_accepts(tmp_path):
    shared = torch.nn.Linear(3, 3)
    module = torch.nn.Sequential(shared, torch.nn.ReLU(), shared)
    path = lf.save_params(module, tmp_path / "tied.safetensors")
    fresh = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.ReLU(), torch.nn.Linear(3, 3))
    fresh.load_state_dict(safetensors.torch.load_file(path))
    assert torch.equal(fresh[2].weight, shared.weight)


def test_save_params_of_a_tied_train_state_loads_into_the_tied_module(tmp_path):
    # A TrainState keeps a tied parameter once, under its first name (named_parameters()),
    # so the file has that name only; load_params(path, module) fills in the tied names.
    shared = torch.nn.Linear(3, 3)
    state = lf.TrainState.create(
        torch.nn.Sequential(shared, torch.nn.ReLU(), shared), lf.optim.sgd(0.1)
    )
    path = lf.save_params(state, tmp_path / "tied.safetensors")
    assert sorted(safetensors.torch.load_file(path)) == ["0.bias", "0.weight"]
    tied = torch.nn.Linear(3, 3)
    module = torch.nn.Sequential(tied, torch.nn.ReLU(), tied)
    result = lf.load_params(path, module)
    assert sorted(result) == ["0.bias", "0.weight"]
    assert torch.equal(module[2].weight, shared.weight) and module[2] is module[0]
    untied = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.ReLU(), torch.nn.Linear(3, 3))
    with pytest.raises(RuntimeError, match=r"Missing key\(s\) in state_dict: \"2.weight\""):
        lf.load_params(path, untied)


def test_params_files_of_lightfunc_0_1_without_a_header_version_still_load(tmp_path):
    # Before the codec, a parameters file's metadata was `format`, `lightfunc_version` and
    # `checksums` only.
    w = torch.arange(4.0)
    sums = {"w": lightfunc._tensorfile.crc32(w)}
    meta = {"format": "params", "lightfunc_version": "0.1.0.dev0", "checksums": json.dumps(sums)}
    path = tmp_path / "old.safetensors"
    safetensors.torch.save_file({"w": w}, path, metadata=meta)
    assert torch.equal(lf.load_params(path)["w"], w)
    _rewrite_metadata(path, checksums=json.dumps({"w": lightfunc._tensorfile.crc32(w) ^ 1}))
    with pytest.raises(CheckpointError, match="Checksum mismatch for tensor `w`"):
        lf.load_params(path)
    _rewrite_metadata(path, checksums="[1]")
    with pytest.raises(CheckpointError, match=r"parameters file .* malformed `checksums`"):
        lf.load_params(path)


def test_params_file_checksums_are_verified(tmp_path):
    path = lf.save_params({"w": torch.randn(50)}, tmp_path / "p.safetensors")
    data = bytearray(path.read_bytes())
    n, header = _header(data)
    data[8 + n + header["w"]["data_offsets"][0] + 7] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(
        CheckpointError, match=r"Checksum mismatch for tensor `w` in .*p\.safetensors"
    ):
        lf.load_params(path)
    lf.load_params(path, verify=False)


def test_load_params_errors(tmp_path):
    path = lf.save({"w": torch.ones(2)}, tmp_path / "ckpt.safetensors")
    with pytest.raises(CheckpointError, match=r"has no `params`.*lightfunc.load\(path, like"):
        lf.load_params(path)
    with pytest.raises(TypeError, match="`state_or_params` must be a TrainState"):
        lf.save_params(3, tmp_path / "x.safetensors")
    with pytest.raises(TypeError, match="entry `w` is a int, expected a tensor"):
        lf.save_params({"w": 1}, tmp_path / "x.safetensors")
    with pytest.raises(ValueError, match="`state_or_params` has a leaf at path `__metadata__`"):
        lf.save_params({"__metadata__": torch.ones(1)}, tmp_path / "x.safetensors")
    params = lf.save_params({"w": torch.ones(2)}, tmp_path / "p.safetensors")
    with pytest.raises(RuntimeError, match="Missing key"):
        lf.load_params(params, torch.nn.Linear(2, 1))


# -- portability and no pickle -------------------------------------------------------------

_PLAIN_READER = """
import json, sys
from safetensors import safe_open
with safe_open(sys.argv[1], framework="pt") as f:
    meta = f.metadata()
    print(json.dumps({
        "lightfunc_imported": "lightfunc" in sys.modules,
        "names": sorted(f.keys()),
        "format": meta["format"],
        "leaves": [e["path"] for e in json.loads(meta["leaves"])],
        "step": f.get_tensor("state.step").item(),
    }))
"""


def test_a_checkpoint_is_readable_by_plain_safetensors_without_lightfunc(tmp_path):
    state = _train(lf.optim.sgd(0.1, momentum=0.9))
    path = lf.save(lf.LoopState(state=state, step=2), tmp_path / "ckpt.safetensors")
    out = subprocess.run(
        [sys.executable, "-I", "-c", _PLAIN_READER, str(path)],
        capture_output=True,
        text=True,
        check=True,
        cwd=tmp_path,
    )
    seen = json.loads(out.stdout)
    assert seen["lightfunc_imported"] is False and seen["format"] == "lightfunc.checkpoint"
    assert (
        "state.params.0.weight" in seen["names"]
        and "state.opt_state[0].trace.0.weight" in (seen["names"])
    )
    assert seen["leaves"][:2] == ["state.params.0.weight", "state.params.1.bias"]
    assert "step" in seen["leaves"] and seen["step"] == 2


def test_no_pickle_is_written_or_read(tmp_path, monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("pickle used")

    for module, name in [
        (pickle, "dumps"),
        (pickle, "loads"),
        (pickle, "dump"),
        (pickle, "load"),
        (torch, "save"),
        (torch, "load"),
    ]:
        monkeypatch.setattr(module, name, forbidden)
    state = _train(lf.optim.adamw(1e-2), steps=1)
    path = lf.save(lf.LoopState(state=state), tmp_path / "ckpt.safetensors")
    _assert_identical(lf.load(path, like=lf.LoopState(state=state)), lf.LoopState(state=state))
    verify(path)
    lf.load_params(lf.save_params(state, tmp_path / "p.safetensors"), make_model())
    lf.load_params(path, make_model())
