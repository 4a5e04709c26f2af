"""Start-up: cold and warm compile, time to the first step, time to 0.95 accuracy on digits.

    python -m bench.startup                       # everything, 3 repeats (long on 2 cores)
    python -m bench.startup --only compile --workloads mlp --repeats 1
    python -m bench.startup --only digits --repeats 3 --out bench/results   # the committed ones

Every measurement runs in a fresh Python process with its own empty inductor
cache directory (`TORCHINDUCTOR_CACHE_DIR`), so no in-process or on-disk
cache of an earlier measurement counts:

- `compile`: the first step of the bench workloads' lightfunc compiled step
  (`bench.impls.lightfunc_train_step`, AdamW), cold (nothing cached: a new
  machine), then warm: a second fresh process that loads the first one's
  `compile_cache.bin` (`lightfunc.save_compile_cache` / `load_compile_cache`)
  before its first step. The transformer is measured at 4 and at 8 blocks.
  Reported: the first step's wall time and CPU time (this process plus its
  children: inductor compiles C++ kernels in subprocesses), and the time from
  process start (before `import torch`) to the end of the first step. The
  `... precompiled` rows build the step with `CompileOptions(precompile=True)`,
  so the cache also holds Dynamo's trace (`lightfunc._precompile`); each child
  reports the graphs Dynamo traced (0 for a precompiled warm start).
- `digits`: examples/digits.py's model and data (MLP with dropout, batch 64,
  AdamW lr 2e-3, weight decay 1e-2, constant rate), evaluated on the 360
  test digits after every epoch; the wall time from the start of the run
  (model built, data loaded, libraries imported) until an evaluation first
  reads >= 0.95 accuracy. lightfunc `lf.loop` compiled with a warm cache
  (from a cold run's file), compiled cold, and eager; Lightning's `Trainer`
  like for like (no progress bar, logger, checkpointing or model summary, no
  sanity check). Each run's import time is reported beside it; the
  `_precompiled` runners build both steps with `precompile=True`.
  `--runners` picks some; a partial run replaces only the rows it measured.

The machine is shared: CPU seconds are the steadier figure; wall times are
given with their spread over the repeats (min / median / max).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

from bench.report import add_out_argument

TARGET_ACCURACY = 0.95
_T0 = time.perf_counter()  # process start, before torch is imported (for time-to-first-step)


@dataclasses.dataclass(frozen=True)
class CompileConfig:
    """One compile measurement: a bench workload, the transformer at `layers` blocks.

    `precompile`: the step is built with `CompileOptions(precompile=True)`, so
    the cache also carries Dynamo's trace (`lightfunc._precompile`).
    """

    workload: str
    layers: int = 4
    precompile: bool = False

    @property
    def label(self) -> str:
        name = self.workload
        if self.workload.startswith("gpt"):
            name = f"{self.workload} {self.layers} blocks"
        return f"{name} precompiled" if self.precompile else name


COMPILE_CONFIGS = [
    CompileConfig("trivial"),  # `x + 1`: what any first compile on a new machine costs
    CompileConfig("mlp"),
    CompileConfig("mlp", precompile=True),
    CompileConfig("cnn"),
    CompileConfig("cnn", precompile=True),
    CompileConfig("gpt", 4),
    CompileConfig("gpt", 4, precompile=True),
    CompileConfig("gpt", 8),
    CompileConfig("gpt-regional", 4),  # eager step, each block compiled (`compile_regions`)
    CompileConfig("gpt-regional", 8),
]
DIGITS_RUNNERS = [
    "lightfunc_warm",
    "lightfunc_cold",
    "lightfunc_warm_precompiled",
    "lightfunc_cold_precompiled",
    "lightfunc_eager",
    "lightning",
]


# -- children: one measurement each, printed as one JSON line ------------------------------


def _cpu() -> float:
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def _child_compile(config: CompileConfig, mode: str, cache: str) -> dict[str, Any]:
    import torch

    import lightfunc as lf
    from bench.impls import lightfunc_train_step
    from bench.workloads import CharGPT, make_workload
    from lightfunc._compile import compile_counts, compile_regions
    from lightfunc._compile_cache import load_compile_cache, save_compile_cache

    imported = time.perf_counter() - _T0
    if mode == "warm" and load_compile_cache(cache) is None:
        raise RuntimeError(f"no usable compile cache in {cache}")
    if config.workload == "trivial":
        wall, cpu = time.perf_counter(), _cpu()
        float(torch.compile(lambda x: x + 1)(torch.zeros(())))
    else:
        regional = config.workload == "gpt-regional"
        workload = make_workload("gpt" if regional else config.workload)
        model = workload.make_model()
        if workload.name == "gpt" and config.layers != 4:
            torch.manual_seed(0)
            model = CharGPT(layers=config.layers)
        if regional:
            compile_regions(model)
        compile: bool | lf.CompileOptions = not regional
        if config.precompile:
            compile = lf.CompileOptions(precompile=True)
        step = lf.build(lightfunc_train_step(workload, model), compile=compile)
        state = lf.TrainState.create(model, lf.optim.adamw(1e-3, weight_decay=0.01))
        wall, cpu = time.perf_counter(), _cpu()
        state, metrics = step(state, workload.batches[0])
        float(metrics["loss"])
    first = {"wall_s": time.perf_counter() - wall, "cpu_s": _cpu() - cpu}
    # Where the compile's wall time went, by torch's own phase timers (seconds).
    from torch._dynamo.utils import compilation_time_metrics

    first["phases_s"] = {k: round(sum(v), 3) for k, v in compilation_time_metrics.items()}
    first["inductor_modules"] = sum(m.startswith("torch._inductor") for m in sys.modules)
    first["graphs"] = compile_counts()["graphs"]  # traced by Dynamo (0: a precompiled warm start)
    if mode == "cold":
        info = save_compile_cache(cache)
        first["saved_steps"] = 0 if info is None else info.steps
    return {
        **first,
        "import_s": imported,
        "to_first_step_s": time.perf_counter() - _T0,
        "cache_bytes": (Path(cache) / "compile_cache.bin").stat().st_size,
    }


def _digits_data() -> tuple[Any, Any]:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
    from digits import load_data, make_model

    return load_data(0), make_model


def _child_digits(runner: str, cache: str, max_epochs: int) -> dict[str, Any]:
    import torch

    (train_set, test_set), make_model = _digits_data()
    if runner == "lightning":
        import lightning  # noqa: F401  (its import is part of its start-up)
    else:
        import lightfunc  # noqa: F401
    imported = time.perf_counter() - _T0
    torch.manual_seed(0)
    start, cpu = time.perf_counter(), _cpu()
    if runner == "lightning":
        reached = _digits_lightning(make_model(), train_set, test_set, max_epochs)
    else:
        reached = _digits_lightfunc(runner, cache, make_model(), train_set, test_set, max_epochs)
    return {
        "import_s": imported,
        **reached,
        "to_target_cpu_s": None if reached["to_target_s"] is None else reached.pop("cpu") - cpu,
        "run_s": time.perf_counter() - start,
        # the C++ compiler and other subprocesses, whole run (0-ish: nothing compiled)
        "children_cpu_s": os.times().children_user + os.times().children_system,
        "load_average": os.getloadavg(),
    }


def _digits_lightfunc(
    runner: str, cache: str, model: Any, train_set: Any, test_set: Any, max_epochs: int
) -> dict[str, Any]:
    import torch.nn.functional as F

    import lightfunc as lf
    from lightfunc._compile import compile_counts
    from lightfunc._compile_cache import load_compile_cache, save_compile_cache

    start = time.perf_counter()
    if runner.startswith("lightfunc_warm") and load_compile_cache(cache) is None:
        raise RuntimeError(f"no usable compile cache in {cache}")
    loader = lf.Loader(train_set.tensors, 64, shuffle=True, seed=0, drop_last=True)
    state = lf.TrainState.create(model, lf.optim.adamw(2e-3, weight_decay=1e-2), seed=0)

    def train_step(state: lf.TrainState, batch: Any) -> Any:
        x, y = batch

        def loss_fn(params: Any) -> Any:
            logits, _ = lf.apply(model, params, state.buffers, x, train=True)
            return F.cross_entropy(logits, y)

        loss, grads = lf.value_and_grad(loss_fn)(state.params)
        return state.apply_gradients(grads), {"loss": loss}

    def eval_step(state: lf.TrainState, batch: Any) -> Any:
        x, y = batch
        logits, _ = lf.apply(model, state.params, state.buffers, x, train=False)
        return {"acc": (logits.argmax(-1) == y).float().mean()}

    compiled = runner != "lightfunc_eager"
    compile: bool | lf.CompileOptions = compiled
    if runner.endswith("_precompiled"):
        compile = lf.CompileOptions(precompile=True)
    step = lf.build(train_step, compile=compile)
    run = lf.loop(
        step, state, loader, max_epochs=max_epochs, eval_step=eval_step,
        eval_data=[test_set.tensors],
    )  # fmt: skip
    seen = _record_warnings()
    for ls in run:
        if ls.evaluated and float(ls.eval_metrics["acc"]) >= TARGET_ACCURACY:
            seconds, cpu = time.perf_counter() - start, _cpu()
            if runner.startswith("lightfunc_cold"):
                save_compile_cache(cache)
            return {
                "to_target_s": seconds, "cpu": cpu, "steps": ls.step, "epochs": ls.epoch + 1,
                # graphs Dynamo traced (0 on a warm precompiled start), and why a saved
                # step was not used, if it was not (the child runs with warnings ignored)
                "graphs": compile_counts()["graphs"] if compiled else 0,
                "stale": [str(w.message) for w in seen if "saved compiled step" in str(w.message)],
            }  # fmt: skip
    return {"to_target_s": None, "steps": None, "epochs": max_epochs}


def _record_warnings() -> list[warnings.WarningMessage]:
    """Record every warning from here on (this child process ends with the run)."""
    catcher = warnings.catch_warnings(record=True)
    seen = catcher.__enter__()
    warnings.simplefilter("always")
    return seen


def _digits_lightning(model: Any, train_set: Any, test_set: Any, max_epochs: int) -> dict[str, Any]:
    import lightning as L
    import torch
    import torch.nn.functional as F

    start = time.perf_counter()
    reached: dict[str, Any] = {"to_target_s": None, "steps": None, "epochs": max_epochs}

    class Digits(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def training_step(self, batch: Any, _: int) -> Any:
            x, y = batch
            return F.cross_entropy(self.model(x), y)

        def validation_step(self, batch: Any, _: int) -> None:
            x, y = batch
            acc = (self.model(x).argmax(-1) == y).float().mean()
            if float(acc) >= TARGET_ACCURACY and reached["steps"] is None:
                reached.update(
                    to_target_s=time.perf_counter() - start,
                    cpu=_cpu(),
                    steps=self.trainer.global_step,
                    epochs=self.current_epoch + 1,
                )
                self.trainer.should_stop = True

        def configure_optimizers(self) -> Any:
            return torch.optim.AdamW(self.parameters(), lr=2e-3, weight_decay=1e-2)

    loader = torch.utils.data.DataLoader(train_set, batch_size=64, shuffle=True, drop_last=True)
    val = torch.utils.data.DataLoader(test_set, batch_size=len(test_set))
    trainer = L.Trainer(
        max_epochs=max_epochs, accelerator="cpu", devices=1, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0,
    )  # fmt: skip
    trainer.fit(Digits(), loader, val)
    return reached


# -- the parent: fresh processes, fresh caches ----------------------------------------------


def _spawn(args: list[str], inductor: str) -> dict[str, Any]:
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": inductor, "PYTHONWARNINGS": "ignore"}
    root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
    out = subprocess.run(
        [sys.executable, "-m", "bench.startup", "--child", *args],
        env=env,
        capture_output=True,
        text=True,
        cwd=root,
        check=False,
    )
    if out.returncode != 0:
        raise RuntimeError(f"child {args} failed:\n{out.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def _fresh_pair(cold: list[str], warm: list[str] | None) -> tuple[dict[str, Any], dict[str, Any]]:
    """A cold run and a warm run from its cache, each in a new process with an empty inductor cache."""
    with tempfile.TemporaryDirectory(prefix="lf-startup-") as tmp:
        cache = os.path.join(tmp, "checkpoints")
        os.mkdir(cache)
        first = _spawn([*cold, cache], os.path.join(tmp, "inductor-cold"))
        second = _spawn([*warm, cache], os.path.join(tmp, "inductor-warm")) if warm else {}
    return first, second


def measure_compile(
    configs: list[CompileConfig], repeats: int, save: Any = None
) -> list[dict[str, Any]]:
    """Cold / warm pairs per config; `save(rows)` is called after each (a long run keeps its part)."""
    rows: list[dict[str, Any]] = []
    for config in configs:
        for repeat in range(repeats):
            args = [config.workload, str(config.layers), str(int(config.precompile))]
            cold, warm = _fresh_pair(["compile", *args, "cold"], ["compile", *args, "warm"])
            rows.append({"config": config.label, "repeat": repeat, "cold": cold, "warm": warm,
                         "load_average": os.getloadavg()})  # fmt: skip
            if save is not None:
                save(rows)
            print(f"{config.label:14s} cold {cold['cpu_s']:6.1f} CPU-s  warm {warm['cpu_s']:5.1f} "
                  f"CPU-s  ({warm['cpu_s'] / cold['cpu_s']:.0%})", flush=True)  # fmt: skip
    return rows


def measure_digits(
    repeats: int, max_epochs: int, runners: list[str] = DIGITS_RUNNERS
) -> list[dict[str, Any]]:
    """Each runner once per repeat; a warm runner right after its cold one, from its cache."""
    rows = []
    for repeat in range(repeats):
        mine: list[dict[str, Any]] = []
        for suffix in ("", "_precompiled"):
            cold_name, warm_name = f"lightfunc_cold{suffix}", f"lightfunc_warm{suffix}"
            if cold_name not in runners:
                continue
            warm_args = ["digits", warm_name, str(max_epochs)] if warm_name in runners else None
            cold, warm = _fresh_pair(["digits", cold_name, str(max_epochs)], warm_args)
            mine.append({"runner": cold_name, "repeat": repeat, **cold})
            if warm_args:
                mine.append({"runner": warm_name, "repeat": repeat, **warm})
        for runner in ("lightfunc_eager", "lightning"):
            if runner in runners:
                result, _ = _fresh_pair(["digits", runner, str(max_epochs)], None)
                mine.append({"runner": runner, "repeat": repeat, **result})
        rows += mine
        print(" ".join(f"{r['runner']} {r['to_target_s']:.1f}s" for r in mine), flush=True)
    return rows


# -- the report ----------------------------------------------------------------------------------


def _spread(values: list[float]) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.1f}"
    return f"{statistics.median(values):.1f} ({min(values):.1f}-{max(values):.1f})"


def compile_table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| step | cold: first step CPU-s | warm: first step CPU-s | warm / cold (CPU) "
        "| cold: first step wall s | warm: first step wall s | process start to first step, "
        "cold / warm (wall s) | cache file |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for label in dict.fromkeys(r["config"] for r in rows):
        mine = [r for r in rows if r["config"] == label]
        cold = [r["cold"] for r in mine]
        warm = [r["warm"] for r in mine]
        ratio = [w["cpu_s"] / c["cpu_s"] for c, w in zip(cold, warm, strict=True)]
        spread = f" ({min(ratio):.0%}-{max(ratio):.0%})" if len(ratio) > 1 else ""
        lines.append(
            f"| {label} | {_spread([c['cpu_s'] for c in cold])} "
            f"| {_spread([w['cpu_s'] for w in warm])} "
            f"| {statistics.median(ratio):.0%}{spread} "
            f"| {_spread([c['wall_s'] for c in cold])} | {_spread([w['wall_s'] for w in warm])} "
            f"| {_spread([c['to_first_step_s'] for c in cold])} / "
            f"{_spread([w['to_first_step_s'] for w in warm])} "
            f"| {cold[0]['cache_bytes'] / 1e6:.1f} MB |"
        )
    return "\n".join(lines)


def digits_table(rows: list[dict[str, Any]]) -> str:
    lines = [
        f"| run | wall s to {TARGET_ACCURACY} test accuracy (median, min-max) | CPU-s to it "
        "| steps | import s (wall) |",
        "|---|---|---|---|---|",
    ]
    for runner in DIGITS_RUNNERS:
        mine = [r for r in rows if r["runner"] == runner]
        if not mine:
            continue
        times = [r["to_target_s"] for r in mine if r["to_target_s"] is not None]
        steps = sorted({r["steps"] for r in mine if r["steps"] is not None})
        missed = len(mine) - len(times)
        lines.append(
            f"| {runner} | {_spread(times) if times else 'never'}"
            f"{f' ({missed} of {len(mine)} never reached it)' if missed else ''} "
            f"| {_spread([r['to_target_cpu_s'] for r in mine if r['to_target_s'] is not None])} "
            f"| {', '.join(map(str, steps))} | {_spread([r['import_s'] for r in mine])} |"
        )
    return "\n".join(lines)


def _environment() -> dict[str, Any]:
    import torch

    import lightfunc

    return {
        "torch": torch.__version__,
        "lightfunc": lightfunc.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "load_average": os.getloadavg(),
    }


def markdown(results: dict[str, Any]) -> str:
    """The results as Markdown: the machine, then a table per measurement present."""
    env = results["environment"]
    parts = [
        "Written by `python -m bench.startup` (method in its docstring): every figure is a fresh "
        "process with an empty inductor cache; CPU-s count the process and its children (the C++ "
        "compiler); warm = loaded the cold process's `compile_cache.bin` first; `trivial` is "
        "`torch.compile(lambda x: x + 1)`, the floor any first compile in a process pays. "
        "Findings: startup_findings.md.",
        f"torch {env['torch']}, lightfunc {env['lightfunc']}, Python {env['python']}, "
        f"{env['machine']}, {env['cpus']} CPUs shared with other jobs; load average at the "
        f"start {', '.join(f'{x:.1f}' for x in env['load_average'])}.",
    ]
    if "compile" in results:
        parts += ["### Compile: cold and warm", compile_table(results["compile"])]
    if "digits" in results:
        parts += [
            f"### Time to {TARGET_ACCURACY} accuracy on digits",
            digits_table(results["digits"]),
        ]
    return "\n\n".join(parts) + "\n"


def _merged(old: list[dict[str, Any]], new: list[dict[str, Any]], key: str) -> list[dict[str, Any]]:
    """`old` without the rows whose `key` `new` measured again, then `new`."""
    measured = {row[key] for row in new}
    return [row for row in old if row[key] not in measured] + new


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=["compile", "digits"], default=None)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workloads", default=",".join(c.label for c in COMPILE_CONFIGS),
                        help="comma-separated labels: " + ", ".join(c.label for c in COMPILE_CONFIGS))  # fmt: skip
    parser.add_argument("--max-epochs", type=int, default=30)
    parser.add_argument("--runners", default=",".join(DIGITS_RUNNERS),
                        help="comma-separated digits runners: " + ", ".join(DIGITS_RUNNERS))  # fmt: skip
    add_out_argument(parser)
    parser.add_argument("--child", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        kind, *rest = args.child
        if kind == "compile":
            config = CompileConfig(rest[0], int(rest[1]), bool(int(rest[2])))
            result = _child_compile(config, rest[3], rest[4])
        else:
            result = _child_digits(rest[0], rest[2], int(rest[1]))
        print(json.dumps(result))
        return
    by_label = {c.label: c for c in COMPILE_CONFIGS}
    wanted = [by_label[label] for label in args.workloads.split(",")]
    path = Path(args.out) / "startup.json"
    # A partial run (`--only`, `--workloads`, `--runners`) replaces the rows it measured in
    # the earlier results of the same folder and keeps the others.
    results: dict[str, Any] = json.loads(path.read_text()) if path.is_file() else {}
    results["environment"] = _environment()
    path.parent.mkdir(parents=True, exist_ok=True)
    earlier = results.get("compile", [])

    def save(rows: list[dict[str, Any]]) -> None:
        merged = _merged(earlier, rows, "config")
        path.write_text(json.dumps({**results, "compile": merged}, indent=1))

    if args.only in (None, "compile"):
        results["compile"] = _merged(earlier, measure_compile(wanted, args.repeats, save), "config")
    if args.only in (None, "digits"):
        rows = measure_digits(args.repeats, args.max_epochs, args.runners.split(","))
        results["digits"] = _merged(results.get("digits", []), rows, "runner")
    results["environment"]["load_average_end"] = os.getloadavg()
    path.write_text(json.dumps(results, indent=1))
    path.with_suffix(".md").write_text(markdown(results))
    print(markdown(results))
    print(f"wrote {path} and {path.with_suffix('.md')}")


if __name__ == "__main__":
    main()
