"""The README's multi-process pattern, preempted; driven by tests/test_preemption.py.

    lightfunc run --nproc-per-node 2 tests/scripts/preempt_train.py --dir D --out final.safetensors

DDP over `init_mesh()`; every rank holds the `CheckpointManager` (only the
strategy's writer writes) and restores the newest checkpoint when it starts.
The manager's schedule never saves (`every_n_steps=1000`): the only
checkpoint is the one written when a signal stops the run, so a resumed run
that ends bit-identical to an uninterrupted one lost no step.

Each rank writes ``D/rank{R}.pid`` (for the test to signal it),
``D/rank{R}.progress`` (the last step it finished, rewritten each step),
``D/run{N}-rank{R}.start`` (the step it started from) and
``D/run{N}-rank{R}.end`` (the step its loop ended at), N counting the runs
in D. Rank 0 writes the final parameters to --out when the run reached
--max-steps. Each step sleeps --step-sleep seconds, so a test can signal the
run in the middle. With --hang-at S, rank --hang-rank stops taking part after
step S (it sleeps) while the others go on into the next collective: the
loop's stop agreement, or with --no-checkpoint (no callback handles
interrupts, so no agreement) the next step's gradient all-reduce. With
--manager-on-rank0 only rank 0's loop has the manager (the other ranks
still restore with it).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repo
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for helpers
from helpers import make_model, make_steps

import lightfunc as lf
import lightfunc.distributed as lfd


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dir", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--max-steps", type=int, default=12)
    parser.add_argument("--step-sleep", type=float, default=0.0)
    parser.add_argument("--hang-at", type=int, default=None)
    parser.add_argument("--hang-rank", type=int, default=1)
    parser.add_argument("--no-checkpoint", action="store_true", help="no manager: no agreement")
    parser.add_argument(
        "--manager-on-rank0", action="store_true", help="the manager in rank 0's loop only"
    )
    args = parser.parse_args()
    directory = Path(args.dir)
    directory.mkdir(parents=True, exist_ok=True)

    with lfd.init_mesh(accelerator="cpu") as mesh:
        rank = mesh.global_rank
        run = len(list(directory.glob(f"run*-rank{rank}.start")))
        (directory / f"rank{rank}.pid").write_text(str(os.getpid()))

        g = torch.Generator().manual_seed(0)
        x = torch.randn(192, 8, generator=g)
        y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
        loader = lf.Loader((x, y), batch_size=16, shuffle=True, seed=1, rank=rank,
                           world_size=mesh.world_size)  # fmt: skip
        model = make_model(batchnorm=False, dropout=0.2)
        train_step, _ = make_steps(model)
        state = lf.TrainState.create(model, lf.optim.adamw(1e-2), seed=0)
        step = lf.build(train_step, strategy=lfd.DDP(mesh), compile=False)
        manager = lf.CheckpointManager(directory / "ckpt", every_n_steps=1000)
        start = manager.restore(step.prepare(state), strategy=step.strategy) or state
        first = start.step if isinstance(start, lf.LoopState) else 0
        (directory / f"run{run}-rank{rank}.start").write_text(str(first))

        ls = None
        for ls in lf.loop(step, start, loader, max_epochs=100, max_steps=args.max_steps,
                          checkpoint=_checkpoint(args, rank, manager)):  # fmt: skip
            progress = directory / f"rank{rank}.progress"
            progress.with_suffix(".tmp").write_text(str(ls.step))
            progress.with_suffix(".tmp").replace(progress)
            if args.hang_at == ls.step and rank == args.hang_rank:
                # Stops taking part (the others wait in the next collective) and, unlike a
                # loop at a step boundary, dies at once when the launcher stops it.
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
                time.sleep(600)
            time.sleep(args.step_sleep)
        assert ls is not None
        (directory / f"run{run}-rank{rank}.end").write_text(str(ls.step))
        if ls.step == args.max_steps and mesh.is_global_zero:
            lf.save_params(ls.state, args.out)


def _checkpoint(args: argparse.Namespace, rank: int, manager: lf.CheckpointManager) -> object:
    if args.no_checkpoint or (args.manager_on_rank0 and rank != 0):
        return None
    return manager


if __name__ == "__main__":
    main()
