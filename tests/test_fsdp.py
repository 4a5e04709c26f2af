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
EAGER = [
    "fsdp_eager",
    "gathering",
    "plain_gradients",
    "mixed_precision",
    "bf16_gather",
    "meta_init",
    "schedule",
]


@pytest.fixture(scope="module")
def four() -> list[dict[str, Any]]:
    """Every eager check on 4 ranks (6, 11 and 3 rows do not divide by 4)."""
    return spawn(worker.checks, 4, args=(EAGER,), timeout=480)


@pytest.fixture(scope="module")
def two_compiled() -> list[dict[str, Any]]:
    return spawn(worker.checks, 2, args=(["fsdp_compiled", "fsdp_regions"],), timeout=480)


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
def test_the_next_units_gather_is_issued_before_the_current_unit_computes(four):
    for out in ok_results(four, "schedule"):
        # Forward: the rest's and block 0's gathers go out together, block 1's before
        # block 0's first matmul, and so on.
        assert out["order"][:4] == ["AG", "AG", "AG", "mm"], out
        # Backward: block 1's re-gather goes out with block 2's, before block 2's
        # reduce-scatter, then block 0's with block 1's; the rest's reduce-scatter last.
        assert out["collectives"] == [*["AG"] * 4, "AG", "AG", "RS", "AG", "RS", "RS", "RS"], out


@pytest.mark.multiprocess
@pytest.mark.slow
def test_units_that_run_out_of_the_expected_order_train_like_one_process(four):
    for out in ok_results(four, "schedule"):
        assert out["reversed"] <= TOL, out
        # 7 gathers are needed; a wrong guess of the next unit in the forward costs one
        # gather more (3 here), never a wrong value. The backward follows the forward's order.
        assert out["reversed_gathers"] == 10, out


@pytest.mark.multiprocess
@pytest.mark.slow
def test_fsdp_units_choose_what_is_gathered_together(four):
    for out in ok_results(four, "gathering"):
        chosen = out["chosen"]  # FSDP(mesh, units=...), over the model's set_units mark
        gathers = {k: v["all_gather_into_tensor"] for k, v in chosen.items()}
        scatters = {k: v["reduce_scatter_tensor"] for k, v in chosen.items()}
        # ["blocks.0", "head"]: 2 units; Block: 3; every Linear (2 per block + head): 7; []: 0.
        assert gathers == {"names": 5, "class": 7, "predicate": 15, "none": 1}, out
        assert scatters == {"names": 3, "class": 4, "predicate": 8, "none": 1}, out
        assert chosen["class"]["largest"] == out["largest_unit_gather"], out
        assert chosen["none"]["largest"] == out["largest_whole_gather"], out
        # Two blocks' rest plus the head in one gather: more than one block's.
        assert chosen["names"]["largest"] > chosen["class"]["largest"], out


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
def test_bf16_mixed_gathers_linear_weights_in_bf16_and_trains_like_one_process(four):
    for out in ok_results(four, "bf16_gather"):
        bf16, fp32 = out["bf16"], out["fp32"]
        assert bf16["gathers"] == fp32["gathers"] == 7, out  # still one collective per unit
        assert fp32["bytes"] == out["expected_fp32"], out
        # Linear weights and biases as 2 bytes, the rest as 4; each gather's rows are padded
        # to 8 bytes per rank (4 ranks, 7 gathers).
        assert out["expected_bf16"] <= bf16["bytes"] <= out["expected_bf16"] + 7 * 4 * 8, out
        assert bf16["bytes"] < 0.7 * fp32["bytes"], out
        # Float32 master weights; bfloat16 tolerance against one bf16-mixed process (2 rows
        # per rank vs 8 in one batch), and the same values as float32 gathers.
        assert bf16["dtypes"] == ["torch.float32"], out
        assert bf16["params"] <= 2e-3 and fp32["params"] <= 2e-3, out
        assert out["bf16_vs_fp32"] <= 1e-6, out


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


@pytest.mark.multiprocess
@pytest.mark.slow
@pytest.mark.compiled
def test_compiled_blocks_keep_per_unit_gathers_and_match_one_process(two_compiled):
    for out in ok_results(two_compiled, "fsdp_regions"):
        fp32, bf16, donated = out["fp32"], out["bf16"], out["donated"]
        assert fp32["regions"] == ["blocks.0", "blocks.1", "blocks.2"], out
        assert fp32["graphs"] == bf16["graphs"] == 1, out  # one block graph per precision
        assert donated["graphs"] == 0, out  # fp32's graph again
        assert donated["kept"] and not fp32["kept"], out  # in place only when donating
        for run in (fp32, bf16, donated):
            # Still per unit: the rest once, each block before its forward and again for its
            # backward, around the compiled forwards.
            assert run["gathers_per_step"] == 1 + 2 * 3, out
            # The compiled blocks' saved gathered weights are released and re-gathered.
            assert run["tokens_per_step"] >= 3, out
        for run in (fp32, donated):
            assert run["params"] <= TOL and run["opt_state"] <= TOL and run["loss"] <= TOL, out
        assert bf16["params"] <= 2e-3, out  # as the eager bf16-mixed check


# ---- one process ------------------------------------------------------------------------


def test_default_units_are_module_list_children_and_transformer_layers():
    net = worker.make_net()
    assert lf._sharded_func.unit_names(net) == ["blocks.0", "blocks.1", "blocks.2"]
    layer = torch.nn.TransformerEncoderLayer(8, 2, 16, batch_first=True)
    encoder = torch.nn.Sequential(torch.nn.Linear(4, 8), layer, torch.nn.Linear(8, 2))
    assert lf._sharded_func.unit_names(encoder) == ["1"]


def test_set_units_takes_sub_modules_names_or_classes():
    net = worker.make_net()
    assert lf._sharded_func.unit_names(set_units(net, [net.head, net.blocks[1]])) == [
        "head",
        "blocks.1",
    ]
    assert lf._sharded_func.unit_names(set_units(net, ["blocks.2", "head"])) == ["blocks.2", "head"]
    assert lf._sharded_func.unit_names(set_units(net, [worker.Block])) == [
        "blocks.0",
        "blocks.1",
        "blocks.2",
    ]
    assert lf._sharded_func.unit_names(set_units(net, [])) == []


def test_set_units_names_a_bad_argument():
    net = worker.make_net()
    with pytest.raises(
        TypeError, match=r"`module` must be a torch.nn.Module \(the model\), got dict"
    ):
        set_units({}, [])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"`units` holds a Linear sub-module, which is not inside"):
        set_units(net, [torch.nn.Linear(2, 2)])
    with pytest.raises(ValueError, match=r"`units` holds 'blocks.7', which is not inside the Net"):
        set_units(net, ["blocks.7"])
    with pytest.raises(
        TypeError, match=r"`set_units\(units=...\)` takes None.*got a list holding int 3"
    ):
        set_units(net, [3])


def test_fsdp_units_take_names_classes_predicates_and_sub_modules():
    net = worker.make_net()
    names = lf._sharded_func.unit_names
    assert names(net, ["head", "blocks.0"]) == ["head", "blocks.0"]
    assert names(net, worker.Block) == ["blocks.0", "blocks.1", "blocks.2"]
    assert names(net, (torch.nn.Embedding, torch.nn.LayerNorm)) == [
        "embed",
        *(f"blocks.{i}.norm" for i in range(3)),
    ]
    # A predicate: the outermost matches (Linear layers inside blocks, and the head).
    linear = names(net, lambda name, m: isinstance(m, torch.nn.Linear))
    assert linear == [*(f"blocks.{i}.{k}" for i in range(3) for k in ("up", "down")), "head"]
    assert names(net, [net.blocks[2], worker.Block]) == ["blocks.2", "blocks.0", "blocks.1"]
    assert names(net, []) == []
    # The strategy's choice wins over the model's mark.
    assert names(set_units(net, []), ["head"]) == ["head"] and names(net) == []


def test_fsdp_names_a_bad_units_or_gather_argument():
    import lightfunc.distributed as lfd

    with pytest.raises(TypeError, match=r"`FSDP\(units=...\)` takes None.*got int 3"):
        lfd.FSDP(units=3)
    with pytest.raises(TypeError, match=r"`FSDP\(units=...\)` takes None.*holding float 1.5"):
        lfd.FSDP(units=["blocks.0", 1.5])
    with pytest.raises(TypeError, match=r"`FSDP\(gather_in_compute_dtype=...\)` must be True"):
        lfd.FSDP(gather_in_compute_dtype="yes")  # type: ignore[arg-type]
    mesh = lfd.init_mesh()
    with pytest.raises(TypeError, match=r"`fully_sharded\(units=...\)` takes None"):
        lfd.fully_sharded(lambda s, b: (s, {}), mesh, units="blocks.0")
    with pytest.raises(TypeError, match=r"`fully_sharded_eval\(gather_in_compute_dtype"):
        lfd.fully_sharded_eval(lambda s, b: {}, mesh, gather_in_compute_dtype=1)  # type: ignore[arg-type]
    assert lfd.FSDP(units=worker.Block).units is worker.Block


def test_init_sharded_names_a_bad_argument():
    from lightfunc.distributed import Mesh
    from lightfunc.distributed._sharded_init import init_sharded

    with pytest.raises(TypeError, match=r"`module` must be a torch.nn.Module, got int"):
        init_sharded(3, Mesh.single())  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"built on the meta device, but `embed.weight` is on cpu"):
        init_sharded(worker.make_net(), Mesh.single())
    with pytest.raises(TypeError, match=r"`init_sharded\(units=...\)` takes None.*got int 3"):
        init_sharded(worker.make_net(), Mesh.single(), units=3)


def test_init_sharded_on_one_process_gives_the_cpu_model_values():
    from lightfunc.distributed import Mesh
    from lightfunc.distributed._sharded_init import init_sharded

    with torch.device("meta"):
        model = worker.Net()
    expected = dict(worker.make_net().named_parameters())
    for units in (None, ["blocks.0"], torch.nn.Linear):  # the groups change, not the values
        torch.manual_seed(0)
        params, buffers = init_sharded(model, Mesh.single(), units=units)
        assert list(params) == list(expected) and buffers == {}
        for name, p in params.items():
            assert torch.equal(p, expected[name]), (units, name)
        assert all(p.is_meta for p in model.parameters())
