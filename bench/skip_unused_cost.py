"""What `skip_unused` (the `TrainState.create` default) costs a compiled step.

`python -m bench.skip_unused_cost --workload wide --steps 20`

Times three compiled steps on one workload, in rounds of alternating windows in
one process (CPU time, one thread): the hand-written compiled functional step
(`raw_compiled_functional`), and lightfunc's compiled step with
`skip_unused=True` and `skip_unused=False`. Prints each one's speed relative to
the hand-written step, median (min-max) over the rounds. The check reads every
gradient once more (an `any()` per gradient, fused with the update), which
shows on a memory-bound update such as the state-dominated `wide` MLP.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import torch

import lightfunc as lf

from .impls import BETAS, EPS, LR, WEIGHT_DECAY, RawCompiledFunctional, lightfunc_train_step
from .workloads import make_workload


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workload", default="wide", help="mlp, cnn, gpt or wide (default wide)")
    p.add_argument("--steps", type=int, default=20, help="steps per window (default 20)")
    p.add_argument("--rounds", type=int, default=9, help="rounds of windows (default 9)")
    args = p.parse_args()
    torch.set_num_threads(1)
    workload = make_workload(args.workload)
    model = workload.make_model()
    tx = lf.optim.adamw(LR, b1=BETAS[0], b2=BETAS[1], eps=EPS, weight_decay=WEIGHT_DECAY)
    batches = workload.batches
    runs: dict[str, Any] = {}
    for skip in (True, False):
        step = lf.build(lightfunc_train_step(workload, model), compile=True)
        runs[f"lightfunc skip_unused={skip}"] = [
            step,
            lf.TrainState.create(model, tx, skip_unused=skip),
            0,
        ]
    raw = RawCompiledFunctional(workload)

    def window(name: str, n: int) -> float:
        start = time.process_time()
        if name == "hand-written":
            for _ in range(n):
                raw.step()
        else:
            step, state, i = runs[name]
            for _ in range(n):
                state, _ = step(state, batches[i % len(batches)])
                i += 1
            runs[name][1:] = [state, i]
        return time.process_time() - start

    names = ["hand-written", *runs]
    for name in names:
        window(name, 3)  # compile and warm up
    seconds: dict[str, list[float]] = {name: [] for name in names}
    for _ in range(args.rounds):
        for name in names:
            seconds[name].append(window(name, args.steps))
    print(f"{workload.description}: speed relative to the hand-written compiled step (CPU time)")
    for name in names[1:]:
        ratios = [h / s for h, s in zip(seconds["hand-written"], seconds[name], strict=True)]
        print(f"  {name}: {statistics.median(ratios):.2f} ({min(ratios):.2f}-{max(ratios):.2f})")


if __name__ == "__main__":
    main()
