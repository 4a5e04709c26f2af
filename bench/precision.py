"""Steps/s and peak step memory of each precision policy on the char-GPT workload, in one run.

    python -m bench.precision [--eager] [--rounds 5] [--window 2.0] [--threads 1] [--out bench/results]

The same `train_step` (bench/impls.py's, which knows nothing of precision) is
built once per policy with `lf.build(train_step, precision=spec)`, and the
state created with `lf.TrainState.create(..., precision=spec)`. One more row,
"bf16-mixed, explicit casts", is the alternative to autocast that the issue
asked to weigh: a hand-written step that casts the float32 master parameters
to bfloat16 itself (`policy.cast_to_compute`), so every op runs in bfloat16.

Timing: after a warm-up (compile included), each round times a window of
every policy in turn; the median steps/s over rounds is reported with the
ratio to "32-true" measured in the same rounds. Memory: the state's bytes, and
the allocator's peak above the starting level over two steps (the torch
profiler's allocation events on CPU, `max_memory_allocated` on CUDA), as
bench/harness.py measures it. The loss of the last warm-up step is reported
as a sanity check: every policy starts from the same weights and sees the
same batches, so it should be close to 32-true's.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import torch

import lightfunc as lf

from .harness import step_peak_bytes
from .impls import BETAS, EPS, LR, WEIGHT_DECAY, lightfunc_train_step, sync, tensor_bytes
from .report import add_out_argument
from .workloads import Workload, make_workload

POLICIES = ("32-true", "bf16-mixed", "16-mixed", "bf16-true", "16-true")
EXPLICIT = "bf16-mixed, explicit casts"


class PolicyRunner:
    """One policy's built step and state, cycling over the workload's batches."""

    def __init__(self, workload: Workload, label: str, compile: bool) -> None:
        self.label = label
        self.workload = workload
        self.device = workload.batches[0][0].device
        torch.manual_seed(0)
        model = workload.make_model().to(self.device)
        # eps=1e-4 keeps Adam's float16 moments (under "16-true") from dividing by 0.
        eps = 1e-4 if label == "16-true" else EPS
        tx = lf.optim.adamw(LR, b1=BETAS[0], b2=BETAS[1], eps=eps, weight_decay=WEIGHT_DECAY)
        if label == EXPLICIT:
            spec, step_fn = "32-true", explicit_cast_step(workload, model)
            self.step_fn = lf.build(step_fn, compile=compile)
        else:
            spec = label
            self.step_fn = lf.build(
                lightfunc_train_step(workload, model), compile=compile, precision=spec
            )
        self.state = lf.TrainState.create(model, tx, precision=spec)
        self._next = 0
        self.loss = self.warm_loss = float("nan")

    def step(self) -> torch.Tensor:
        batch = self.workload.batches[self._next % len(self.workload.batches)]
        self._next += 1
        self.state, metrics = self.step_fn(self.state, batch)
        return metrics["loss"]

    def run(self, n: int) -> float:
        start = time.perf_counter()
        for _ in range(n):
            loss = self.step()
        sync(self.device)
        self.loss = float(loss)
        return time.perf_counter() - start


def explicit_cast_step(workload: Workload, model: torch.nn.Module) -> Callable[..., Any]:
    """bf16-mixed without autocast: the step casts its float32 master weights itself."""
    pol = lf.parse_precision("bf16-mixed")
    loss_fn = workload.loss_fn

    def train_step(state: lf.TrainState, batch: Any) -> tuple[lf.TrainState, dict[str, Any]]:
        x, y = batch

        def loss_of(params: dict[str, torch.Tensor]) -> torch.Tensor:
            out, _ = lf.apply(model, pol.cast_to_compute(params), state.buffers, x, train=True)
            return loss_fn(pol.cast_to_output(out), y)

        loss, grads = lf.value_and_grad(loss_of, loss_scale=state.loss_scale)(state.params)
        return state.apply_gradients(grads), {"loss": loss}

    return train_step


def measure(args: argparse.Namespace, log: Callable[[str], None]) -> dict[str, Any]:
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    workload = make_workload("gpt", device=device)
    labels = [*POLICIES, EXPLICIT]
    runners = {}
    for label in labels:
        log(f"warming up {label} ({'eager' if args.eager else 'compiled'})")
        runner = PolicyRunner(workload, label, compile=not args.eager)
        start = time.perf_counter()
        runner.run(args.warmup)
        runner.warm_loss = runner.loss
        log(f"  {args.warmup} steps in {time.perf_counter() - start:.1f} s, loss {runner.loss:.3f}")
        runners[label] = runner
    per_window = {
        label: max(1, round(args.window / _seconds_per_step(r))) for label, r in runners.items()
    }
    rates: dict[str, list[float]] = {label: [] for label in labels}
    ratios: dict[str, list[float]] = {label: [] for label in labels}
    for round_ in range(args.rounds):
        this_round = {}
        for label, runner in runners.items():
            n = per_window[label]
            this_round[label] = n / runner.run(n)
            rates[label].append(this_round[label])
        for label in labels:
            ratios[label].append(this_round[label] / this_round["32-true"])
        log(f"round {round_ + 1}/{args.rounds}: " + ", ".join(
            f"{k} {v:.2f}" for k, v in this_round.items()
        ))  # fmt: skip
    rows = []
    for label, runner in runners.items():
        rows.append(
            {
                "policy": label,
                "steps_per_s": statistics.median(rates[label]),
                "ratio_to_fp32": statistics.median(ratios[label]),
                "ratio_spread": (min(ratios[label]), max(ratios[label])),
                "state_mb": tensor_bytes(runner.state) / 2**20,
                "peak_step_mb": step_peak_bytes(runner) / 2**20,  # type: ignore[arg-type]
                "loss_after_warmup": runner.warm_loss,
            }
        )
    return {
        "workload": workload.description,
        "mode": "eager" if args.eager else "compiled",
        "device": str(device),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "rounds": args.rounds,
        "rows": rows,
    }


def _seconds_per_step(runner: PolicyRunner) -> float:
    return runner.run(3) / 3


def markdown(result: dict[str, Any]) -> str:
    lines = [
        f"# Precision policies: {result['workload']}",
        "",
        f"{result['mode']}, device {result['device']}, {result['threads']} thread(s), "
        f"torch {result['torch']}; median of {result['rounds']} rounds; ratios measured "
        f"against 32-true in the same rounds (min-max in brackets).",
        "",
        "| policy | steps/s | vs 32-true | state MB | peak step MB | loss after warm-up |",
        "|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        lo, hi = r["ratio_spread"]
        lines.append(
            f"| {r['policy']} | {r['steps_per_s']:.2f} | {r['ratio_to_fp32']:.2f}x "
            f"({lo:.2f}-{hi:.2f}) | {r['state_mb']:.1f} | {r['peak_step_mb']:.1f} | "
            f"{r['loss_after_warmup']:.3f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.precision",
        description="Steps/s and peak step memory of each precision policy (32-true, "
        "bf16-mixed, bf16-true, 16-mixed, ...) on the char-GPT workload, timed in one run "
        "against 32-true. Method: see the module docstring (bench/precision.py).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--eager", action="store_true", help="time eager steps, not compiled")
    parser.add_argument("--rounds", type=int, default=5, help="timing rounds over all policies")
    parser.add_argument("--window", type=float, default=2.0, help="seconds per policy per round")
    parser.add_argument(
        "--warmup", type=int, default=5, help="steps before timing (compile included)"
    )
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    add_out_argument(parser)
    args = parser.parse_args(argv)
    result = measure(args, log=lambda msg: print(msg, file=sys.stderr, flush=True))
    args.out.mkdir(parents=True, exist_ok=True)
    name = "precision" if not args.eager else "precision_eager"
    (args.out / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    table = markdown(result)
    (args.out / f"{name}.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
