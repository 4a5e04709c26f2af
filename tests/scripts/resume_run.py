"""A small training run with checkpoints, driven in subprocesses by tests/test_resume.py.

    python tests/scripts/resume_run.py --dir D --max-steps 40 --every 5 --out final.safetensors

It resumes from the newest good checkpoint in D when there is one, prints
"step N" after every step, and writes the final parameters to --out. With
--die-while-saving S it kills itself (SIGKILL) in the middle of writing the
checkpoint of step S: after the data is written, before it is renamed into place.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from helpers import make_model, make_steps

import lightfunc as lf


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dir", required=True)
    parser.add_argument("--max-steps", type=int, default=40)
    parser.add_argument("--every", type=int, default=5)
    parser.add_argument("--out", required=True)
    parser.add_argument("--die-while-saving", type=int, default=None)
    args = parser.parse_args()

    if args.die_while_saving is not None:
        target = f"step={args.die_while_saving}.safetensors"
        real_replace = os.replace

        def replace(src, dst):  # type: ignore[no-untyped-def]
            if str(dst).endswith(target):
                os.kill(os.getpid(), signal.SIGKILL)
            real_replace(src, dst)

        os.replace = replace  # type: ignore[assignment]

    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 8, generator=g)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
    loader = lf.Loader((x, y), batch_size=16, shuffle=True, seed=1)  # 13 batches, the last of 8

    model = make_model(dropout=0.3)
    train_step, _ = make_steps(model)
    state = lf.TrainState.create(model, lf.optim.adamw(1e-2), seed=0)
    manager = lf.CheckpointManager(args.dir, every_n_steps=args.every, keep_last_n=3)
    start = manager.restore(state) or state
    ls = None
    for ls in lf.loop(
        lf.build(train_step, compile=False),
        start,
        loader,
        max_steps=args.max_steps,
        checkpoint=manager,
    ):
        print(f"step {ls.step}", flush=True)
    assert ls is not None
    lf.save_params(ls.state, args.out)
    print("done", flush=True)


if __name__ == "__main__":
    main()
