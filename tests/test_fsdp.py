"""Fully-sharded steps gathered one unit at a time: 4 gloo ranks (uneven shards) vs one process.

Each group of checks runs in one `spawn` (a module-scoped fixture; the ranks
run tests/scripts/fsdp_worker.py) and each test asserts on its part.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import ok_results

import lightfunc as lf
from lightfunc.distributed._fsdp import set_units
from lightfunc.distributed._spawn import spawn

sys.path.insert(0, str(Path(__file__).parent / "scripts"))
import fsdp_worker as worker

TOL = 1e-6
EAGER = ["fsdp_eager", "gathering", "plain_gradients", "mixed_precision", "meta_init"]


@pytest.fixture(scope="module")
def four() -> list[dict[str, Any]]:
    """Every eager check on 4 ranks (6, 11 and 3 rows do not divide by 4)."""
    return spawn(worker.checks, 4, args=(EAGER,), timeout=480)


@pytest.fixture(scope="module")
def two_compiled() -> list[dict[str, Any]]:
    return spawn(worker.checks, 2, args=(["fsdp_compiled"],), timeout=480)


@pytest.mark.multiprocess
@pytest.mark.slow
def test_four_ranks_with_uneven_shards_match_one_process(four):
    for out in ok_results(four, "fsdp_eager"):
        assert out["params"] <= TOL and out["opt_state"] <= TOL and out["loss"] <= TOL, out
    rows = [out["rows"] for out in ok_results(four, "fsdp_eager")]
    assert [r["blocks.0.up.weight"] for r in rows] == [2, 2, 2, 0]  # 6 rows over 4 ranks
    assert [r["head.weight"] for r in rows] == [1, 1, 1, 0]


@pytest.mark.multiprocess
@pytest.mark.slow
def test_shards_own_their_storage_and_hold_a_quarter_of_the_bytes(four):
    results = ok_results(four, "fsdp_eager")
    for out in results:
        assert out["owned"], out
    full = results[0]["full_bytes"]
    total = sum(out["bytes"] for out in results)
    # The ranks together hold the state once (plus the 0-d step counts each keeps).
    assert full <= total <= full + 4 * 64, (total, full)
    assert max(out["bytes"] for out in results) <= full / 4 * 1.25


@pytest.mark.multiprocess
@pytest.mark.slow
def test_parameters_are_gathered_one_unit_at_a_time(four):
    for out in ok_results(four, "gathering"):
        units = out["units"]
        # The parameters outside the units once, each unit before its forward and
        # again for its backward; gradients reduce-scattered once per unit and the rest.
        assert out["per_unit"]["all_gather_into_tensor"] == 1 + 2 * units, out
        assert out["per_unit"]["reduce_scatter_tensor"] == 1 + units, out
        assert out["whole"]["all_gather_into_tensor"] == 1, out  # set_units(model, [])
        assert out["by_class"] == out["per_unit"], out  # set_units(model, [Block])
        # The largest gather is one block or the non-unit rest, not the whole model.
        assert out["largest_unit_gather"] < out["largest_whole_gather"] / 2, out


@pytest.mark.multiprocess
@pytest.mark.slow
def test_plain_full_gradients_are_averaged_into_shards(four):
    for out in ok_results(four, "plain_gradients"):
        assert out["params"] <= TOL, out


@pytest.mark.multiprocess
@pytest.mark.slow
def test_bf16_mixed_under_fsdp_trains_like_one_process(four):
    for out in ok_results(four, "mixed_precision"):
        assert out["dtype"] == "torch.float32"  # float32 master weights
        assert out["params"] <= 2e-3, out  # bfloat16 matmuls on 2-row vs 8-row batches


@pytest.mark.multiprocess
@pytest.mark.slow
def test_meta_model_initialises_shards_equal_to_a_cpu_model(four):
    results = ok_results(four, "meta_init")
    for out in results:
        assert out["init"] == 0.0, out  # rank 0 initialised in construction order
        assert out["trained"] <= TOL, out
        assert out["model_on_meta"], out
    full = sum(p.numel() * 4 for p in worker.make_net().parameters())
    assert max(out["bytes"] for out in results) <= full / 4 * 1.25


@pytest.mark.multiprocess
@pytest.mark.slow
def test_the_ranks_raise_no_warnings(four):
    assert all(out["warnings"] == [] for out in four)


@pytest.mark.multiprocess
@pytest.mark.compiled
@pytest.mark.slow
def test_compiled_fsdp_step_is_one_graph_and_matches_one_process(two_compiled):
    for out in ok_results(two_compiled, "fsdp_compiled"):
        assert out["params"] <= TOL and out["opt_state"] <= TOL and out["loss"] <= TOL, out
        assert out["graphs"] == 1, out
        assert out["owned"], out


# ---- one process ------------------------------------------------------------------------


def test_default_units_are_module_list_children_and_transformer_layers():
    net = worker.make_net()
    assert lf._func.unit_names(net) == ["blocks.0", "blocks.1", "blocks.2"]
    layer = torch.nn.TransformerEncoderLayer(8, 2, 16, batch_first=True)
    encoder = torch.nn.Sequential(torch.nn.Linear(4, 8), layer, torch.nn.Linear(8, 2))
    assert lf._func.unit_names(encoder) == ["1"]


def test_set_units_takes_sub_modules_or_classes():
    net = worker.make_net()
    assert lf._func.unit_names(set_units(net, [net.head, net.blocks[1]])) == ["head", "blocks.1"]
    assert lf._func.unit_names(set_units(net, [worker.Block])) == [
        "blocks.0",
        "blocks.1",
        "blocks.2",
    ]
    assert lf._func.unit_names(set_units(net, [])) == []


def test_set_units_names_a_bad_argument():
    net = worker.make_net()
    with pytest.raises(
        TypeError, match=r"`module` must be a torch.nn.Module \(the model\), got dict"
    ):
        set_units({}, [])  # type: ignore[arg-type]
    with pytest.raises(
        ValueError, match=r"`units` must hold sub-modules of `module`.*\(not inside"
    ):
        set_units(net, [torch.nn.Linear(2, 2)])
    with pytest.raises(ValueError, match=r"`units` must hold .* got str"):
        set_units(net, ["blocks.0"])  # type: ignore[list-item]


def test_init_sharded_names_a_bad_argument():
    from lightfunc.distributed import Mesh
    from lightfunc.distributed._sharded_init import init_sharded

    with pytest.raises(TypeError, match=r"`module` must be a torch.nn.Module, got int"):
        init_sharded(3, Mesh.single())  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"built on the meta device, but `embed.weight` is on cpu"):
        init_sharded(worker.make_net(), Mesh.single())


def test_init_sharded_on_one_process_gives_the_cpu_model_values():
    from lightfunc.distributed import Mesh
    from lightfunc.distributed._sharded_init import init_sharded

    with torch.device("meta"):
        model = worker.Net()
    torch.manual_seed(0)
    params, buffers = init_sharded(model, Mesh.single())
    expected = dict(worker.make_net().named_parameters())
    assert list(params) == list(expected) and buffers == {}
    for name, p in params.items():
        assert torch.equal(p, expected[name]), name
    assert all(p.is_meta for p in model.parameters())
