"""lightfunc.kernels: each op's reference vs the same compiled, and (on a GPU) the Triton path.

    python -m bench.kernels [--quick] [--device cpu|cuda] [--threads N] [--out bench/results]

For each case, every method runs forward and backward (or one optimizer
step) on the same inputs: warm-up, then `repeats` rounds that time each
method once in turn (so drift hits them alike); we report the median. Peak
memory is the allocator's peak above the level before the call, over one
call (with the inputs already allocated): on CPU from the torch profiler's
allocation events (`bench.harness.step_peak_bytes`), on CUDA from
`torch.cuda.max_memory_allocated`.

Methods:
- ``reference``: the op's pure-torch reference, eager (for the cross-entropy,
  the unfused ``F.cross_entropy(F.linear(x, W, b), y)``);
- ``reference, compiled``: the same under ``torch.compile(fullgraph=True)``;
- ``chunked (torch ops)``, and compiled: the fused cross-entropy's chunked
  algorithm without its Triton kernel (what a CPU runs);
- ``triton``, and compiled: the `lightfunc.kernels` op with its Triton
  kernels, on CUDA only (Triton's CPU interpreter is a correctness tool, not
  a speed one, so it is never timed);
- for AdamW, torch.optim.AdamW's foreach and fused implementations (in place).

Writes OUT/kernels.json and OUT/kernels.md.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import platform
import statistics
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch

import lightfunc
from lightfunc import kernels as K

from .harness import _cpu_name, step_peak_bytes
from .report import add_out_argument


@dataclasses.dataclass(frozen=True)
class Case:
    """One op at one size."""

    op: str  # "adamw", "rms_norm" or "linear_cross_entropy"
    # adamw: (tensors, elements each); rms_norm: (rows, features);
    # linear_cross_entropy: (rows, features, vocabulary)
    shape: tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class Config:
    cases: tuple[Case, ...] = (
        Case("adamw", (16, 262_144)),
        Case("rms_norm", (4096, 1024)),
        Case("linear_cross_entropy", (2048, 64, 32_768)),
    )
    repeats: int = 5
    warmup: int = 2
    threads: int = 1
    device: str = "cpu"
    compile: bool = True


QUICK = Config(
    cases=(
        Case("adamw", (4, 1000)),
        Case("rms_norm", (64, 128)),
        Case("linear_cross_entropy", (600, 16, 1000)),
    ),
    repeats=2,
    warmup=1,
    compile=False,
)

Method = Callable[[], Any]


@contextlib.contextmanager
def _triton(enabled: bool) -> Iterator[None]:
    """Run with the kernels' Triton paths on or off (off: the torch-op paths)."""
    if enabled:
        yield
    else:
        with K.disabled():
            yield


def _times_triton(x: torch.Tensor) -> bool:
    """Whether to time the Triton path: on CUDA only (never Triton's CPU interpreter)."""
    return x.device.type == "cuda" and K.uses_triton(x)


def _compiled(fn: Callable[..., Any], config: Config) -> Callable[..., Any] | None:
    return torch.compile(fn, fullgraph=True) if config.compile else None


def _adamw_methods(case: Case, config: Config, device: torch.device) -> dict[str, Method]:
    n, size = case.shape
    g = torch.Generator().manual_seed(0)
    params = [torch.randn(size, generator=g).to(device) for _ in range(n)]
    grads = [torch.randn(size, generator=g).to(device) for _ in range(n)]
    mus = [0.1 * torch.randn(size, generator=g).to(device) for _ in range(n)]
    nus = [1e-3 * torch.rand(size, generator=g).to(device) for _ in range(n)]
    step, lr = torch.tensor(10, device=device), torch.tensor(1e-3, device=device)
    kw = {"weight_decay": 0.1}

    def call(fn: Callable[..., Any], triton: bool) -> Method:
        def run() -> Any:
            with _triton(triton):
                return fn(params, grads, mus, nus, step, lr, **kw)

        return run

    methods = {"reference": call(K.adamw_update_reference, False)}
    compiled = _compiled(K.adamw_update_reference, config)
    if compiled is not None:
        methods["reference, compiled"] = call(compiled, False)
    if _times_triton(params[0]):
        methods["triton"] = call(K.adamw_update, True)
        compiled = _compiled(K.adamw_update, config)
        if compiled is not None:
            methods["triton, compiled"] = call(compiled, True)
    for impl in ("foreach", "fused"):
        torch_params = [p.clone() for p in params]
        for p, grad in zip(torch_params, grads, strict=True):
            p.grad = grad
        opt = torch.optim.AdamW(
            torch_params,
            lr=1e-3,
            weight_decay=0.1,
            foreach=impl == "foreach",
            fused=impl == "fused",
        )
        methods[f"torch.optim.AdamW({impl}=True), in place"] = opt.step
    return methods


def _grad_call(fn: Callable[..., torch.Tensor], inputs: list[torch.Tensor], *rest: Any) -> Method:
    """Forward and backward: the gradients of fn(*inputs, *rest) (summed, if not 0-d)."""

    def run() -> Any:
        out = fn(*inputs, *rest)
        return torch.autograd.grad(out.sum() if out.dim() else out, inputs)

    return run


def _rms_norm_methods(case: Case, config: Config, device: torch.device) -> dict[str, Method]:
    rows, features = case.shape
    g = torch.Generator().manual_seed(0)
    x = torch.randn(rows, features, generator=g).to(device).requires_grad_()
    w = (1 + 0.1 * torch.randn(features, generator=g)).to(device).requires_grad_()
    methods = {"reference": _grad_call(K.rms_norm_reference, [x, w])}
    compiled = _compiled(K.rms_norm_reference, config)
    if compiled is not None:
        methods["reference, compiled"] = _grad_call(compiled, [x, w])
    if _times_triton(x):
        methods["triton"] = _grad_call(K.rms_norm, [x, w])
        compiled = _compiled(K.rms_norm, config)
        if compiled is not None:
            methods["triton, compiled"] = _grad_call(compiled, [x, w])
    return methods


def _linear_ce_methods(case: Case, config: Config, device: torch.device) -> dict[str, Method]:
    rows, features, vocab = case.shape
    g = torch.Generator().manual_seed(0)
    x = torch.randn(rows, features, generator=g).to(device).requires_grad_()
    w = (0.1 * torch.randn(vocab, features, generator=g)).to(device).requires_grad_()
    target = torch.randint(0, vocab, (rows,), generator=g).to(device)

    def torch_ops(fn: Callable[..., Any]) -> Callable[..., Any]:
        def run(*args: Any) -> Any:
            with K.disabled():
                return fn(*args)

        return run

    methods = {"reference": _grad_call(K.linear_cross_entropy_reference, [x, w], target)}
    chunked = torch_ops(K.linear_cross_entropy)
    methods["chunked (torch ops)"] = _grad_call(chunked, [x, w], target)
    for name, fn in (
        ("reference", K.linear_cross_entropy_reference),
        ("chunked (torch ops)", K.linear_cross_entropy),
    ):
        compiled = _compiled(fn, config)
        if compiled is not None:
            methods[f"{name}, compiled"] = _grad_call(torch_ops(compiled), [x, w], target)
    if _times_triton(x):
        methods["chunked + triton"] = _grad_call(K.linear_cross_entropy, [x, w], target)
        compiled = _compiled(K.linear_cross_entropy, config)
        if compiled is not None:
            methods["chunked + triton, compiled"] = _grad_call(compiled, [x, w], target)
    return methods


METHODS = {
    "adamw": _adamw_methods,
    "rms_norm": _rms_norm_methods,
    "linear_cross_entropy": _linear_ce_methods,
}


@dataclasses.dataclass
class _Runner:
    """What `bench.harness.step_peak_bytes` measures: `run(steps)` on `device`."""

    fn: Method
    device: torch.device

    def run(self, steps: int) -> float:
        start = time.perf_counter()
        for _ in range(steps):
            self.fn()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter() - start


def measure_case(case: Case, config: Config, log: Any = print) -> list[dict[str, Any]]:
    device = torch.device(config.device)
    torch._dynamo.reset()
    runners = {
        name: _Runner(fn, device) for name, fn in METHODS[case.op](case, config, device).items()
    }
    first_call_s = {name: r.run(1) for name, r in runners.items()}  # includes compiling
    for r in runners.values():
        r.run(config.warmup)
    times: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(config.repeats):
        for name, r in runners.items():
            times[name].append(r.run(1))
    base = statistics.median(times["reference"])
    records = []
    for name, r in runners.items():
        median = statistics.median(times[name])
        record = {
            "op": case.op, "shape": list(case.shape), "method": name,
            "median_ms": median * 1e3, "spread": (max(times[name]) - min(times[name])) / median,
            "speedup_vs_reference": base / median, "first_call_s": first_call_s[name],
            "peak_mb": step_peak_bytes(r, steps=1) / 2**20,  # type: ignore[arg-type]
        }  # fmt: skip
        records.append(record)
        log(
            f"  {name}: {record['median_ms']:.2f} ms, x{record['speedup_vs_reference']:.2f}, "
            f"peak {record['peak_mb']:.1f} MB (first call {first_call_s[name]:.1f} s)"
        )
    return records


def run(config: Config, log: Any = print) -> dict[str, Any]:
    torch.set_num_threads(config.threads)
    records = []
    started = time.perf_counter()
    for case in config.cases:
        log(f"{case.op} {case.shape}:")
        records += measure_case(case, config, log)
    return {
        "machine": machine_info(config),
        "config": dataclasses.asdict(config),
        "seconds": time.perf_counter() - started,
        "records": records,
    }


def machine_info(config: Config) -> dict[str, Any]:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {
        "torch": torch.__version__, "lightfunc": lightfunc.__version__, "triton": triton_version,
        "python": platform.python_version(), "cpu": _cpu_name(), "threads": config.threads,
        "device": config.device,
        "cuda": torch.cuda.get_device_name() if config.device == "cuda" else None,
        "triton_path_measured": _times_triton(torch.empty(0, device=config.device)),
    }  # fmt: skip


SHAPE_NAMES = {
    "adamw": "tensors x elements",
    "rms_norm": "rows x features, forward + backward",
    "linear_cross_entropy": "rows x features x vocabulary, forward + backward",
}


def markdown(results: dict[str, Any]) -> str:
    m = results["machine"]
    where = m["cuda"] or f"{m['cpu']}, {m['threads']} thread(s)"
    lines = [
        f"# lightfunc.kernels on {m['device']} ({where})",
        "",
        f"torch {m['torch']}, triton {m['triton']}, lightfunc {m['lightfunc']}; median of "
        f"{results['config']['repeats']} calls after warm-up, fp32. Peak: allocator memory "
        "above the inputs during one call. First call: includes compiling, with Inductor's "
        "cache as found.",
        "",
    ]
    if not m["triton_path_measured"]:
        lines += [
            "The Triton paths were not measured here (they run on CUDA; on CPU only in "
            "Triton's interpreter, which checks correctness, not speed).",
            "",
        ]
    by_case: dict[tuple[str, tuple[int, ...]], list[dict[str, Any]]] = {}
    for r in results["records"]:
        by_case.setdefault((r["op"], tuple(r["shape"])), []).append(r)
    for (op, shape), records in by_case.items():
        lines += [
            f"## {op}: {' x '.join(map(str, shape))} ({SHAPE_NAMES[op]})",
            "",
            "| method | median ms | speed-up vs reference | peak MB | first call s |",
            "|---|---|---|---|---|",
        ]
        lines += [
            f"| {r['method']} | {r['median_ms']:.2f} | {r['speedup_vs_reference']:.2f} | "
            f"{r['peak_mb']:.1f} | {r['first_call_s']:.1f} |"
            for r in records
        ]
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.kernels", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="tiny shapes, no compile (seconds)")
    parser.add_argument("--device", help="cpu (default) or cuda")
    parser.add_argument("--threads", type=int, help="torch threads (default 1)")
    parser.add_argument(
        "--repeats", type=int, help="timed rounds per kernel and shape (median; default 5, quick 2)"
    )
    add_out_argument(parser)
    args = parser.parse_args(argv)
    config = QUICK if args.quick else Config()
    changes = {k: getattr(args, k) for k in ("device", "threads", "repeats") if getattr(args, k)}
    config = dataclasses.replace(config, **changes)
    results = run(config)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "kernels.json").write_text(json.dumps(results, indent=2) + "\n")
    table = markdown(results)
    (args.out / "kernels.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
