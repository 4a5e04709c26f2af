"""Where an eager lightfunc step spends its time, part by part, next to raw PyTorch.

    python -m bench.eager_parts --workloads mlp,cnn --rounds 7

Each part is timed as a window of `--calls` calls in a row (process CPU
time, one torch thread), its variants alternating window by window, for
`--rounds` rounds. A variant's figure is its median microseconds per call;
its ratio is, round by round, the reference variant's time (the first of
its part: raw PyTorch, or what lightfunc did before) over its own, median
(min-max) over rounds: 1.00 is as fast as the reference, less is slower,
as in `python -m bench`.

Parts, on one batch of the workload:

- forward: `model(x)`, `lf.apply`, and `torch.func.functional_call` (what
  `lf.apply` called for every call before its eager fast path);
- forward + backward: `zero_grad` + `loss.backward()`, `lf.value_and_grad`;
- optimizer: `torch.optim.AdamW.step` (in place), the state's optimizer
  update (`state.tx.update`, `trainable_only` and `skip_unused` included);
- new parameters: `apply_updates` against the per-leaf `p + u` tree map it
  was before (torch.optim has no such step: it updates in place);
- whole step: the raw loop body, `lf.build(step, compile=False)`, and the
  same with `TrainState.create(..., skip_unused=False)` (no per-step check
  for all-zero gradients: what that check costs).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from torch.func import functional_call

import lightfunc as lf
import lightfunc.optim as lo
from lightfunc._tree import tree_map

from .impls import BETAS, EPS, LR, WEIGHT_DECAY, lightfunc_train_step
from .workloads import Workload, make_workload

Part = tuple[str, list[tuple[str, Callable[[], Any]]]]


def parts(workload: Workload) -> list[Part]:
    """The parts of one step, each with its variants (raw PyTorch first)."""
    x, y = workload.batches[0]
    loss_fn = workload.loss_fn
    model = workload.make_model().train()
    raw = workload.make_model().train()
    opt = torch.optim.AdamW(
        raw.parameters(), lr=LR, betas=BETAS, eps=EPS, weight_decay=WEIGHT_DECAY
    )
    tx = lo.adamw(LR, b1=BETAS[0], b2=BETAS[1], eps=EPS, weight_decay=WEIGHT_DECAY)
    state = lf.TrainState.create(model, tx)
    params, buffers = state.params, state.buffers

    def loss_of(p: dict[str, torch.Tensor]) -> torch.Tensor:
        out, _ = lf.apply(model, p, buffers, x, train=True)
        return loss_fn(out, y)

    grad_fn = lf.value_and_grad(loss_of)
    _, grads = grad_fn(params)
    updates, _ = state.tx.update(grads, state.opt_state, params)

    def raw_backward() -> None:
        opt.zero_grad(set_to_none=True)
        loss_fn(raw(x), y).backward()

    raw_backward()  # gradients for AdamW.step, and its state

    def raw_step() -> None:
        raw_backward()
        opt.step()

    step = lf.build(lightfunc_train_step(workload, model), compile=False)
    holder = [state, lf.TrainState.create(model, tx, skip_unused=False)]

    def lf_step() -> None:
        holder[0], _ = step(holder[0], (x, y))

    def lf_step_all_used() -> None:
        holder[1], _ = step(holder[1], (x, y))

    return [
        (
            "forward",
            [
                ("model(x)", lambda: raw(x)),
                ("lf.apply", lambda: lf.apply(model, params, buffers, x, train=True)),
                (
                    "functional_call",
                    lambda: functional_call(model, (params, buffers), (x,), strict=False),
                ),
            ],
        ),
        (
            "forward + backward",
            [
                ("zero_grad + backward", raw_backward),
                ("lf.value_and_grad", lambda: grad_fn(params)),
            ],
        ),
        (
            "optimizer",
            [
                ("AdamW.step", opt.step),
                ("state.tx.update", lambda: state.tx.update(grads, state.opt_state, params)),
            ],
        ),
        (
            "new parameters",
            [
                (
                    "p + u tree map",
                    lambda: tree_map(lambda p, u: p + u.to(p.dtype), params, updates),
                ),
                ("apply_updates", lambda: lo.apply_updates(params, updates)),
            ],
        ),
        (
            "whole step",
            [
                ("raw eager step", raw_step),
                ("lightfunc eager step", lf_step),
                ("same, skip_unused=False", lf_step_all_used),
            ],
        ),
    ]


def window(fn: Callable[[], Any], calls: int) -> float:
    """Process CPU seconds per call over `calls` calls in a row."""
    start = time.process_time()
    for _ in range(calls):
        fn()
    return (time.process_time() - start) / calls


def measure(part: Part, rounds: int, calls: int) -> list[tuple[str, float, list[float]]]:
    """(variant, median us per call, per-round reference / variant ratios) for each variant."""
    _, variants = part
    for _, fn in variants:  # warm up
        window(fn, max(calls // 10, 2))
    times: dict[str, list[float]] = {name: [] for name, _ in variants}
    for _ in range(rounds):
        for name, fn in variants:
            times[name].append(window(fn, calls))
    ref = times[variants[0][0]]
    return [
        (name, statistics.median(t) * 1e6, [r / v for r, v in zip(ref, t, strict=True)])
        for name, t in times.items()
    ]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workloads", default="mlp", help="comma-separated subset of mlp,cnn,gpt")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--calls", type=int, default=100, help="calls per timing window")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    print("| workload | part | variant | us per call (median) | vs first variant (min-max) |")
    print("|---|---|---|---|---|")
    for name in args.workloads.split(","):
        workload = make_workload(name)
        calls = args.calls if name == "mlp" else max(args.calls // 10, 3)
        for part in parts(workload):
            for variant, us, ratios in measure(part, args.rounds, calls):
                spread = f"{statistics.median(ratios):.2f} ({min(ratios):.2f}-{max(ratios):.2f})"
                print(f"| {name} | {part[0]} | {variant} | {us:.0f} | {spread} |", flush=True)


if __name__ == "__main__":
    main()
