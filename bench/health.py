"""Cost of `lightfunc.optim.track_health` and of `ThroughputMonitor`'s FLOP count, on the CPU.

    python -m bench.health [--out DIR]   # prints a table; writes DIR/health.json

Per-step CPU time of this process (one thread: `time.process_time`, so other jobs on a shared
machine count less than in wall time) of a built step, plain AdamW vs `track_health(AdamW)`,
eager and compiled: the median of 9 blocks of steps (20 eager, 50 compiled), the variants
interleaved block by block after 3 warm-up steps each.
"""

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F

import lightfunc as lf

from .report import add_out_argument

torch.manual_seed(0)
torch.set_num_threads(1)
model = torch.nn.Sequential(
    torch.nn.Linear(256, 512),
    torch.nn.ReLU(),
    torch.nn.Linear(512, 512),
    torch.nn.ReLU(),
    torch.nn.Linear(512, 10),
)
batch = (torch.randn(64, 256), torch.randint(0, 10, (64,)))


def train_step(state, batch):
    x, y = batch

    def loss_fn(params):
        logits, _ = lf.apply(model, params, state.buffers, x, train=True)
        return F.cross_entropy(logits, y)

    loss, grads = lf.value_and_grad(loss_fn)(state.params)
    return state.apply_gradients(grads), {"loss": loss}


def variants(compiled: bool) -> dict:
    health = lambda **kw: lf.optim.track_health(lf.optim.adamw(1e-3), **kw)  # noqa: E731
    return {
        "plain AdamW": lf.optim.adamw(1e-3),
        "track_health(every=50)": health(every=50),
        "track_health(every=50, branch='where')": health(every=50, branch="where"),
        "track_health(every=1)": health(every=1),
    }


def main() -> None:
    p = argparse.ArgumentParser(
        prog="python -m bench.health",
        description="CPU cost per step of optim.track_health, and of ThroughputMonitor's FLOP count.",
    )
    add_out_argument(p)
    out = p.parse_args().out
    results = {
        "params": sum(p.numel() for p in model.parameters()),
        "batch": 64,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "ms_per_step": {},
    }
    for compiled in (False, True):
        steps, states = {}, {}
        for name, tx in variants(compiled).items():
            steps[name] = lf.build(train_step, compile=compiled)
            s = lf.TrainState.create(model, tx)
            for _ in range(3):
                s, _ = steps[name](s, batch)
            states[name] = s
        block = 50 if compiled else 20
        times: dict[str, list[float]] = {name: [] for name in steps}
        for _ in range(9):
            for name, step in steps.items():
                s = states[name]
                t0 = time.process_time()
                for _ in range(block):
                    s, _ = step(s, batch)
                times[name].append((time.process_time() - t0) / block * 1e3)
                states[name] = s
        for name, ts in times.items():
            key = f"{'compiled' if compiled else 'eager'}: {name}"
            results["ms_per_step"][key] = statistics.median(ts)
            print(
                f"{key:55s} {statistics.median(ts):7.3f} ms/step "
                f"(min {min(ts):.3f}, max {max(ts):.3f})",
                flush=True,
            )
    state = lf.TrainState.create(model, lf.optim.adamw(1e-3))
    train_step(state, batch)
    counts, plain = [], []
    for _ in range(5):
        t0 = time.process_time()
        flops = lf.callbacks.count_step_flops(train_step, state, batch)
        counts.append(time.process_time() - t0)
        t0 = time.process_time()
        train_step(state, batch)
        plain.append(time.process_time() - t0)
    results.update(
        flops_per_step=flops,
        count_step_flops_ms=statistics.median(counts) * 1e3,
        eager_step_ms=statistics.median(plain) * 1e3,
    )
    print(
        f"count_step_flops {results['count_step_flops_ms']:.1f} ms vs an eager step "
        f"{results['eager_step_ms']:.1f} ms; {flops} FLOPs per step"
    )
    t0 = time.perf_counter()
    results["peak_flops"] = lf.callbacks.measure_peak_flops("cpu")
    print(
        f"measure_peak_flops: {results['peak_flops'] / 1e9:.1f} GFLOP/s in "
        f"{time.perf_counter() - t0:.2f} s"
    )
    out.mkdir(parents=True, exist_ok=True)
    (out / "health.json").write_text(json.dumps(results, indent=1))
    print(f"wrote {out / 'health.json'}")


if __name__ == "__main__":
    main()
