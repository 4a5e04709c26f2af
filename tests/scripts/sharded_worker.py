"""Sharded-checkpoint checks in N gloo processes, driven by tests/test_sharded_checkpoint.py.

    lightfunc run --nproc-per-node 2 tests/scripts/sharded_worker.py --root R --scenario two

Every rank runs the scenario's checks in order and writes ``R/<scenario>-rank<r>.json``:
{check name: "ok" or the error it raised}. The full state is `full_state()`,
built the same way on every rank; DTensors are its tensors distributed as
`Shard(0)` (or `Replicate()`) over a 1-D CPU mesh of all ranks.

Scenarios, run in this order (the test prepares R/one, saved by one process, before "two"):
- two:   load R/one into 2 ranks (1 -> 2); save R/two; load it back (2 -> 2);
         save R/two again over itself (a new generation beside the old files);
         a tree with a Partial DTensor is refused; save a `LoopState` of a
         `TrainState` sharded by `lightfunc.distributed.shard_state` (R/train_state).
- four:  load R/two into 4 ranks (2 -> 4: uneven shards, ranks holding no row);
         save R/four; load R/train_state into `shard_state`'s 4-rank layout.
- three: load R/four into 3 ranks (4 -> 3); save R/three; load R/corrupt, whose
         second shard the test damaged: every rank must raise, none may hang;
         load R/train_state into `shard_state`'s 3-rank layout.
The test loads R/three and R/four in one process (3 -> 1, 4 -> 1).
"""

from __future__ import annotations

import argparse
import json
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repo
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for helpers
from helpers import make_model

import lightfunc as lf
import lightfunc.distributed as lfd
from lightfunc import RngKey
from lightfunc.distributed._checkpoint import load_sharded, save_sharded, verify_sharded


def full_state() -> dict[str, Any]:
    """A state with odd sizes (uneven shards, an empty shard on 3 ranks), several dtypes,
    a tied tensor, a 0-d step, an RNG key and plain Python leaves."""
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(5, 3, generator=g)
    return {
        "params": {
            "weight": weight,
            "bias": torch.randn(5, generator=g, dtype=torch.float64),
            "tiny": torch.randn(2, 4, generator=g).to(torch.bfloat16),  # rank 2 of 3 holds no row
            "counts": torch.arange(7, dtype=torch.int64),
        },
        "tied": weight,
        "replicated": torch.randn(3, generator=g),
        "plain": torch.randn(2, 2, generator=g),
        "step": torch.tensor(17, dtype=torch.int64),
        "rng": RngKey(3, 17),
        "epoch": 2,
        "lr": 0.125,
        "name": "run",
    }


def distributed(state: dict[str, Any], mesh: Any) -> dict[str, Any]:
    """`state` with its params Shard(0), `replicated` Replicate(); `plain` and `step` stay plain."""
    params = {k: distribute_tensor(v, mesh, [Shard(0)]) for k, v in state["params"].items()}
    return state | {
        "params": params,
        "tied": params["weight"],
        "replicated": distribute_tensor(state["replicated"], mesh, [Replicate()]),
    }


def template(mesh: Any) -> dict[str, Any]:
    """A state of the right structure and layout whose values are all different from the saved."""
    full = full_state()
    blank = {k: torch.full_like(v, 9) for k, v in full["params"].items()}
    out = distributed(
        full | {"params": blank, "replicated": torch.full_like(full["replicated"], 9)}, mesh
    )
    return out | {
        "plain": torch.full_like(full["plain"], 9),
        "step": torch.tensor(0),
        "rng": RngKey(0, 0),
        "epoch": 0,
        "lr": 1.0,
        "name": "",
    }


def check_equal(loaded: dict[str, Any], mesh: Any) -> None:
    """`loaded` has `template`'s layout and `full_state`'s values, bit for bit."""
    full, layout = full_state(), template(mesh)
    for k, v in full["params"].items():
        got = loaded["params"][k]
        assert isinstance(got, DTensor) and got.placements == (Shard(0),), (k, got)
        want = layout["params"][k]
        assert got.to_local().shape == want.to_local().shape, (k, got.to_local().shape)
        assert torch.equal(got.full_tensor(), v), k
        assert got.dtype == v.dtype, k
    assert loaded["tied"] is loaded["params"]["weight"]
    assert loaded["replicated"].placements == (Replicate(),)
    assert torch.equal(loaded["replicated"].to_local(), full["replicated"])
    assert type(loaded["plain"]) is torch.Tensor and torch.equal(loaded["plain"], full["plain"])
    assert torch.equal(loaded["step"], full["step"])
    assert (loaded["rng"], loaded["epoch"], loaded["lr"], loaded["name"]) == (
        RngKey(3, 17),
        2,
        0.125,
        "run",
    )


def run_checks(checks: list[tuple[str, Callable[[], None]]]) -> dict[str, str]:
    results = {}
    for name, check in checks:
        try:
            check()
            results[name] = "ok"
        except Exception as e:
            results[name] = f"{type(e).__name__}: {e}\n{traceback.format_exc()}"
    return results


def scenario_two(root: Path, mesh: Any) -> list[tuple[str, Callable[[], None]]]:
    def load_one() -> None:  # saved by one process without a process group
        check_equal(load_sharded(root / "one", like=template(mesh)), mesh)

    def save_two() -> None:
        save_sharded(distributed(full_state(), mesh), root / "two", metadata={"note": "2 ranks"})
        assert sorted(p.name for p in (root / "two").iterdir()) == ["index.json", *files("two")]
        verify_sharded(root / "two")  # on every rank, no collective

    def load_two() -> None:
        check_equal(load_sharded(root / "two", like=template(mesh)), mesh)

    def overwrite_two() -> None:
        before = files("two")
        mesh_barrier(mesh)  # every rank has read the old index before it is replaced
        save_sharded(distributed(full_state(), mesh), root / "two", metadata={"note": "2 ranks"})
        after = files("two")
        assert len(after) == 2 and not set(after) & set(before), (before, after)
        assert sorted(p.name for p in (root / "two").iterdir()) == ["index.json", *after]
        check_equal(load_sharded(root / "two", like=template(mesh)), mesh)

    def files(name: str) -> list[str]:
        return list(json.loads((root / name / "index.json").read_text())["files"])

    def partial_refused() -> None:
        local = torch.ones(3)
        partial = DTensor.from_local(local, mesh, [Partial()], run_check=False)
        try:
            save_sharded({"p": partial}, root / "partial")
        except TypeError as e:
            assert "`p`" in str(e) and "Partial" in str(e), e
        else:
            raise AssertionError("a Partial DTensor was saved")
        assert not (root / "partial").exists()

    return [
        ("load_one", load_one),
        ("save_two", save_two),
        ("load_two", load_two),
        ("overwrite_two", overwrite_two),
        ("partial_refused", partial_refused),
    ]


def mesh_barrier(mesh: Any) -> None:
    torch.distributed.barrier(group=mesh.get_group())


def scenario_four(root: Path, mesh: Any) -> list[tuple[str, Callable[[], None]]]:
    def load_two() -> None:
        loaded = load_sharded(root / "two", like=template(mesh))
        check_equal(loaded, mesh)
        rows = {k: v.to_local().shape[0] for k, v in loaded["params"].items()}
        # torch's Shard(0) on 4 ranks: ceil(n / 4) rows each, the last ranks hold fewer or none
        want = {
            0: {"weight": 2, "bias": 2, "tiny": 1, "counts": 2},
            1: {"weight": 2, "bias": 2, "tiny": 1, "counts": 2},
            2: {"weight": 1, "bias": 1, "tiny": 0, "counts": 2},
            3: {"weight": 0, "bias": 0, "tiny": 0, "counts": 1},
        }[mesh.get_rank()]
        assert rows == want, rows

    def save_four() -> None:
        save_sharded(distributed(full_state(), mesh), root / "four")
        verify_sharded(root / "four")

    return [("load_two", load_two), ("save_four", save_four)]


def scenario_three(root: Path, mesh: Any) -> list[tuple[str, Callable[[], None]]]:
    def load_four() -> None:
        loaded = load_sharded(root / "four", like=template(mesh))
        check_equal(loaded, mesh)
        assert loaded["params"]["tiny"].to_local().shape == (
            (1, 4) if mesh.get_rank() < 2 else (0, 4)
        )

    def save_three() -> None:
        save_sharded(distributed(full_state(), mesh), root / "three")

    def load_corrupt() -> None:
        load_sharded(root / "corrupt", like=template(mesh))

    return [("load_four", load_four), ("save_three", save_three), ("load_corrupt", load_corrupt)]


def train_state(seed: int) -> lf.TrainState:
    """A `TrainState` (BatchNorm buffers, Adam moments, RNG key) one step into training."""
    model = make_model(seed)
    state = lf.TrainState.create(model, lf.optim.adamw(1e-2), seed=seed)
    grads = {k: torch.full_like(v, 0.5) for k, v in state.params.items()}
    return state.apply_gradients(grads)


def train_state_checks(root: Path, mesh: Any) -> list[tuple[str, Callable[[], None]]]:
    """A `LoopState` holding `shard_state`'s fully-sharded TrainState, with its FSDP strategy
    (static, not saved): saved by 2 ranks, loaded by 4 and 3 (and by 1 in the test)."""

    def save_train_state() -> None:
        state = lfd.shard_state(train_state(0), mesh)
        ls = lf.LoopState(state=state, step=1, epoch=0, strategy=lfd.FSDP(mesh))
        save_sharded(ls, root / "train_state")
        verify_sharded(root / "train_state")

    def load_train_state() -> None:
        state = lfd.shard_state(train_state(1), mesh)  # other values, same layout
        like = lf.LoopState(state=state, strategy=lfd.FSDP(mesh))
        loaded = load_sharded(root / "train_state", like=like)
        want = train_state(0)
        leaves = zip(
            lf.tree_leaves(loaded.state),
            lf.tree_leaves(like.state),
            lf.tree_leaves(want),
            strict=True,
        )
        for got, layout, ref in leaves:
            if isinstance(layout, DTensor):
                assert isinstance(got, DTensor) and got.placements == layout.placements
                assert got.to_local().shape == layout.to_local().shape
                got = got.full_tensor()
            assert torch.equal(got, ref)
        assert loaded.state.rng == want.rng and int(loaded.state.step) == 1
        assert loaded.step == 1 and loaded.strategy is like.strategy

    if mesh.world_size == 2:
        return [("save_train_state", save_train_state)]
    return [("load_train_state", load_train_state)]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--root", required=True)
    parser.add_argument("--scenario", choices=["two", "four", "three"], required=True)
    args = parser.parse_args()
    with lfd.init_mesh(accelerator="cpu") as lf_mesh:
        root = Path(args.root)
        scenarios = {"two": scenario_two, "four": scenario_four, "three": scenario_three}
        scenario = scenarios[args.scenario]
        results = run_checks(
            scenario(root, lf_mesh.device_mesh) + train_state_checks(root, lf_mesh)
        )
        out = root / f"{args.scenario}-rank{lf_mesh.global_rank}.json"
        out.write_text(json.dumps(results, indent=1))
        lf_mesh.barrier()


if __name__ == "__main__":
    main()
