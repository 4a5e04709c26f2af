"""Data-parallel training under `lightfunc run`, killed and restarted; driven by tests/test_launch.py.

    lightfunc run --nproc-per-node 2 --max-restarts 1 tests/scripts/elastic_train.py \\
        --dir D --out final.safetensors --die-at 5 --die-rank 1

Each rank takes its half of every global batch; gradients are averaged with
an all-reduce. Rank 0 checkpoints every step with a `CheckpointManager`; every
rank resumes from the newest checkpoint when it starts. With --die-at S the
rank --die-rank SIGKILLs itself after step S, in the first attempt only (the
launcher's TORCHELASTIC_RESTART_COUNT is 0). Each rank writes
``D/attempt{A}-rank{R}.start`` holding the step it started from; rank 0 writes
the final parameters to --out.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repo
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for helpers
from helpers import make_model

import lightfunc as lf
import lightfunc.distributed as lfd


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dir", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--max-steps", type=int, default=12)
    parser.add_argument("--die-at", type=int, default=None)
    parser.add_argument("--die-rank", type=int, default=1)
    parser.add_argument(
        "--env-pg", action="store_true", help="torch's default env:// group (hangs on restarts)"
    )
    args = parser.parse_args()

    if args.env_pg:  # torch's default: keys of an earlier attempt may still be in the store
        dist.init_process_group("gloo", timeout=timedelta(seconds=60))
    else:  # lightfunc's: the store is prefixed by TORCHELASTIC_RESTART_COUNT
        lfd.init_mesh(accelerator="cpu", timeout=timedelta(seconds=60))
    rank, world = dist.get_rank(), dist.get_world_size()
    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))

    g = torch.Generator().manual_seed(0)
    x = torch.randn(96, 8, generator=g)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
    loader = lf.Loader((x, y), batch_size=16, shuffle=True, seed=1)

    model = make_model(batchnorm=False, dropout=0.2)

    def train_step(state, batch):  # type: ignore[no-untyped-def]
        x, y = batch
        x, y = x[rank::world], y[rank::world]  # this rank's half of the global batch

        def loss_fn(params):  # type: ignore[no-untyped-def]
            logits, _ = lf.apply(model, params, state.buffers, x, train=True)
            return F.cross_entropy(logits, y)

        loss, grads = lf.value_and_grad(loss_fn)(state.params)
        names = sorted(grads)
        flat = torch.cat([grads[n].reshape(-1) for n in names])  # one bucket, one all-reduce
        dist.all_reduce(flat)
        flat = flat / world
        sizes = [grads[n].numel() for n in names]
        mean = {n: g.view_as(grads[n]) for n, g in zip(names, flat.split(sizes), strict=True)}
        return state.apply_gradients(mean), {"loss": loss}

    state = lf.TrainState.create(model, lf.optim.sgd(0.1), seed=0)
    directory = Path(args.dir)
    directory.mkdir(parents=True, exist_ok=True)  # the manager creates it at its first save
    manager = None
    if rank == 0:
        manager = lf.CheckpointManager(directory, every_n_steps=1, keep_last_n=2)
    dist.barrier()  # rank 0's manager has cleaned up before anyone reads the directory
    reader = manager or lf.CheckpointManager(directory, every_n_steps=1, keep_last_n=2)
    start = reader.restore(state) or state
    (directory / f"attempt{attempt}-rank{rank}.start").write_text(str(int(start.step)))

    ts = None
    for ts in lf.loop(
        lf.build(train_step, compile=False),
        start,
        loader,
        max_steps=args.max_steps,
        checkpoint=manager,
    ):
        if attempt == 0 and rank == args.die_rank and ts.step == args.die_at:
            os.kill(os.getpid(), signal.SIGKILL)
    assert ts is not None
    if rank == 0:
        lf.save_params(ts.state, args.out)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
