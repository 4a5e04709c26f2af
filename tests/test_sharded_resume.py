"""Checkpoints of multi-process runs through `CheckpointManager` and `fit`, as one-process ones.

DDP (one file, written by rank 0) and FSDP (a sharded directory) states are
saved, pruned (top-k), interrupted by SIGTERM on one rank, resumed with
`manager.restore` / `fit(ckpt_path="last")`, falling back past a damaged
newest checkpoint, and each resume ends bit-identical to the run that was
never stopped. Then 4 processes resume what 2 saved (FSDP: resharded).

Start-up dominates: one `spawn` of 2 ranks runs every 2-rank check, one of 4
ranks the resharding ones (module-scoped fixtures); each test asserts on its
part of the results.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import struct
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import make_model, make_steps, ok_results

import lightfunc as lf
import lightfunc.distributed as lfd
from lightfunc.callbacks import Callback
from lightfunc.distributed._spawn import spawn

STEPS = 12  # 5 batches per epoch and rank: the run ends mid-epoch, in its third epoch
STOP_AT = 6  # SIGTERM reaches rank 1 after this step
STRATEGIES = ("ddp", "fsdp")


# ---- what the ranks run -----------------------------------------------------------------


def _setup(mesh: lfd.Mesh, name: str, batch_size: int) -> tuple[Any, Any, Any]:
    """(built step, initial state, loader): the same global batches for 2 ranks x 4 rows and
    4 ranks x 2 rows (rank r takes every world_size-th example of the epoch's order)."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(40, 8, generator=g)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
    model = make_model(0, batchnorm=False)
    train_step, _ = make_steps(model)
    strategy = lfd.DDP(mesh) if name == "ddp" else lfd.FSDP(mesh)
    step = lf.build(train_step, strategy=strategy, compile=False)
    state = lf.TrainState.create(model, lf.optim.adamw(1e-2), seed=0)
    loader = lf.Loader(
        (x, y),
        batch_size,
        shuffle=True,
        seed=1,
        rank=mesh.global_rank,
        world_size=mesh.world_size,
    )
    return step, state, loader


def _full(ls: lf.LoopState) -> list[Any]:
    """The run's position and its whole state, gathered: plain tensors and values."""
    state = lfd.gather_state(ls.state)
    return [ls.step, ls.epoch, ls.batch_idx, *lf.tree_leaves(state)]


def _same(a: list[Any], b: list[Any]) -> bool:
    return len(a) == len(b) and all(
        torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y
        for x, y in zip(a, b, strict=False)
    )


def _max_diff(a: list[Any], b: list[Any]) -> float:
    diffs = [
        float((x.double() - y.double()).abs().max()) if x.numel() else 0.0
        for x, y in zip(a, b, strict=True)
        if isinstance(x, torch.Tensor) and x.is_floating_point()
    ]
    return max(diffs)


class _Preempt(Callback):
    """Sends SIGTERM to its own process after step `at`, on rank `rank` only."""

    def __init__(self, at: int, rank: int, mesh: lfd.Mesh) -> None:
        self.at, self.rank, self.mesh = at, rank, mesh

    def on_step_end(self, ls: lf.LoopState) -> None:
        if ls.step == self.at and self.mesh.global_rank == self.rank:
            os.kill(os.getpid(), signal.SIGTERM)


class _Losses(Callback):
    """Records the (rank-reduced) train loss of every step."""

    def __init__(self) -> None:
        self.losses: dict[int, float] = {}

    def on_step_end(self, ls: lf.LoopState) -> None:
        self.losses[ls.step] = float(ls.metrics["loss"])


def _damage(directory: Path, step: int) -> None:
    """Damage the checkpoint of `step` in a manager's `directory`: one byte of tensor data in
    its file (and in `last.safetensors`, its hard link, copied as a file by `copytree`) or in
    the last shard file of its directory."""
    (path,) = directory.glob(f"step={step}*")
    last = directory / "last.safetensors"
    if last.is_file() and last.read_bytes() == path.read_bytes():
        _flip_data_byte(last)
    _flip_data_byte(path)


def _flip_data_byte(path: Path) -> None:
    """Damage one byte of tensor data: in the file, or in the last shard file of a directory."""
    if path.is_dir():
        path = path / json.loads((path / "index.json").read_text())["files"][-1]
    raw = bytearray(path.read_bytes())
    (size,) = struct.unpack("<Q", raw[:8])
    table = json.loads(raw[8 : 8 + size])
    begin, end = max(
        (v["data_offsets"] for k, v in table.items() if k != "__metadata__"),
        key=lambda o: o[1] - o[0],
    )
    raw[8 + size + (begin + end) // 2] ^= 0xFF
    path.write_bytes(bytes(raw))


def _on_rank_zero(mesh: lfd.Mesh, fn: Callable[[], None]) -> None:
    if mesh.global_rank == 0:
        fn()
    mesh.barrier()


def _two_ranks(mesh: lfd.Mesh, root: Path, name: str) -> dict[str, Any]:
    """Every 2-rank check of one strategy; returns what the test asserts on."""
    out: dict[str, Any] = {}
    step, state, loader = _setup(mesh, name, batch_size=4)
    *_, reference = lf.loop(step, state, loader, max_steps=STEPS)
    ref = _full(reference)
    *_, at4 = lf.loop(step, state, loader, max_steps=4)
    out["reference"], out["at4"] = ref, _full(at4)
    base = root / name

    # Preempted on one rank: every rank saves the same step and stops.
    manager = lf.CheckpointManager(base / "run", every_n_steps=4)
    *_, stopped = lf.loop(
        step,
        state,
        loader,
        max_steps=STEPS,
        checkpoint=manager,
        callbacks=[_Preempt(STOP_AT, 1, mesh)],
    )
    out["stopped_at"] = stopped.step
    mesh.barrier()  # DDP's rank 0 writes while the others go on
    out["saved"] = sorted(p.name for p in (base / "run").iterdir() if p.name != "index.json")

    def damaged_copies() -> None:  # for the fallback here, and for the 4-rank resume
        shutil.copytree(base / "run", base / "damaged")
        _damage(base / "damaged", stopped.step)
        shutil.copytree(base / "damaged", base / "four")

    _on_rank_zero(mesh, damaged_copies)

    # Resumed by a new manager (a new process would do the same): ends as if never stopped.
    manager = lf.CheckpointManager(base / "run", every_n_steps=4)
    start = manager.restore(step.prepare(state), strategy=step.strategy)
    assert start is not None
    out["resumed_from"] = start.step
    *_, final = lf.loop(step, start, loader, max_steps=STEPS, checkpoint=manager)
    out["resume_exact"] = _same(_full(final), ref)

    # The newest checkpoint damaged: the manager falls back to the one before, still exact.
    manager = lf.CheckpointManager(base / "damaged", every_n_steps=4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        start = manager.restore(step.prepare(state), strategy=step.strategy)
    out["fallback_warnings"] = [str(w.message)[:300] for w in caught]
    assert start is not None
    out["fell_back_to"] = start.step
    *_, final = lf.loop(step, start, loader, max_steps=STEPS, checkpoint=manager)
    out["fallback_exact"] = _same(_full(final), ref)

    # `fit` ends mid-epoch, saving there; `fit(ckpt_path="last")` continues to the end.
    quiet: dict[str, Any] = {
        "default_root_dir": base / "fit",
        "logger": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
    }
    lf.fit(step, state, loader, max_steps=STOP_AT + 1, **quiet)
    final = lf.fit(step, state, loader, max_steps=STEPS, ckpt_path="last", **quiet)
    out["fit_exact"] = _same(_full(final), ref)

    # Top-k by the train loss: the k best kept, and the newest as `last`.
    losses = _Losses()
    manager = lf.CheckpointManager(base / "topk", every_n_steps=2, monitor="loss", save_top_k=2)
    *_, _ = lf.loop(step, state, loader, max_steps=STEPS, checkpoint=manager, callbacks=[losses])
    mesh.barrier()
    out["losses"] = losses.losses
    out["kept"] = [p.name for p in manager.checkpoints()]
    out["on_disk"] = sorted(p.name for p in (base / "topk").iterdir() if p.name != "index.json")
    manager = lf.CheckpointManager(base / "topk", monitor="loss", save_top_k=2)
    start = manager.restore(step.prepare(state), strategy=step.strategy)
    out["topk_restores_newest"] = start is not None and _same(_full(start), ref)
    return out


def _four_ranks(mesh: lfd.Mesh, root: Path, name: str) -> dict[str, Any]:
    """Resume the 2-rank run's checkpoints on 4 ranks (FSDP: resharded), past its damaged
    newest one, and finish the run."""
    out: dict[str, Any] = {}
    step, state, loader = _setup(mesh, name, batch_size=2)
    base = root / name
    manager = lf.CheckpointManager(base / "four", every_n_steps=4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the damaged newest, as in 2 ranks
        start = manager.restore(step.prepare(state), strategy=step.strategy)
    assert start is not None
    out["resumed_from"] = start.step  # step=4: the newest good one (step=6 is damaged)
    out["layout"] = sorted({type(x).__name__ for x in lf.tree_leaves(start.state)})
    out["start"] = _full(start)
    *_, final = lf.loop(step, start, loader, max_steps=STEPS, checkpoint=manager)
    out["final"] = _full(final)
    return out


def _checks(mesh: lfd.Mesh, root: str, world: int) -> dict[str, Any]:
    """Each strategy's checks: ("ok", value) or ("error", traceback); warnings listed."""
    torch.use_deterministic_algorithms(True)
    results: dict[str, Any] = {}
    for name in STRATEGIES:
        try:
            run = _two_ranks if world == 2 else _four_ranks
            results[name] = ("ok", run(mesh, Path(root), name))
        except Exception:
            results[name] = ("error", traceback.format_exc())
    return results


# ---- the tests ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[Any], list[Any]]:
    """The results of one spawn of 2 ranks, then of one spawn of 4 on what the 2 saved."""
    root = tmp_path_factory.mktemp("resume")
    two = spawn(_checks, 2, args=(str(root), 2), timeout=420)
    four = spawn(_checks, 4, args=(str(root), 4), timeout=420)
    return two, four


@pytest.mark.multiprocess
@pytest.mark.parametrize("name", STRATEGIES)
def test_sigterm_on_one_rank_saves_every_rank_and_the_resume_is_bit_exact(
    ranks: Any, name: str
) -> None:
    for out in ok_results(ranks[0], name):
        assert out["stopped_at"] == STOP_AT
        suffix = ".safetensors" if name == "ddp" else ""
        assert f"step=4{suffix}" in out["saved"] and f"step={STOP_AT}{suffix}" in out["saved"]
        assert out["resumed_from"] == STOP_AT
        assert out["resume_exact"]


@pytest.mark.multiprocess
@pytest.mark.parametrize("name", STRATEGIES)
def test_a_damaged_newest_checkpoint_falls_back_and_still_resumes_exactly(
    ranks: Any, name: str
) -> None:
    for out in ok_results(ranks[0], name):
        assert out["fell_back_to"] == 4
        assert any("skipping corrupt checkpoint" in w for w in out["fallback_warnings"])
        assert out["fallback_exact"]


@pytest.mark.multiprocess
@pytest.mark.parametrize("name", STRATEGIES)
def test_fit_resumes_from_last_bit_exact(ranks: Any, name: str) -> None:
    for out in ok_results(ranks[0], name):
        assert out["fit_exact"]


@pytest.mark.multiprocess
@pytest.mark.parametrize("name", STRATEGIES)
def test_top_k_keeps_the_best_and_the_newest(ranks: Any, name: str) -> None:
    suffix = ".safetensors" if name == "ddp" else ""
    for out in ok_results(ranks[0], name):
        saved = {s: out["losses"][s] for s in range(2, STEPS + 1, 2)}
        best = sorted(saved, key=lambda s: (saved[s], s))[:2]
        assert out["kept"] == [f"step={s}{suffix}" for s in sorted(best)]
        last = "last.safetensors" if name == "ddp" else f"step={STEPS}"
        assert sorted(out["on_disk"]) == sorted({*out["kept"], last})
        assert out["topk_restores_newest"]


@pytest.mark.multiprocess
@pytest.mark.parametrize("name", STRATEGIES)
def test_four_ranks_resume_what_two_saved(ranks: Any, name: str) -> None:
    two, four = ranks
    saved = ok_results(two, name)[0]
    for out in ok_results(four, name):
        assert out["resumed_from"] == 4
        assert _same(out["start"], saved["at4"])  # loaded bit for bit, whatever the layout
        assert ("DTensor" in out["layout"]) == (name == "fsdp")
        # The same global batches as 2 ranks, summed in another order: equal to rounding.
        assert out["final"][:3] == saved["reference"][:3]
        assert _max_diff(out["final"], saved["reference"]) < 1e-5
