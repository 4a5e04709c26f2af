"""lightfunc's `tune.lr_find` against Lightning's `Tuner.lr_find`, on the same sweep.

    python -m bench.lr_find_lightning            # writes bench/results/lr_find.{md,json}

Same sweep on both sides: the same model and initial weights (one module,
deep-copied), the same batches in the same order (sklearn's digits,
standardised, a fixed list; Lightning reads it through a `DataLoader` with
`batch_size=None`), the same optimizer (torch.optim.SGD / Adam against
lightfunc.optim.sgd / adam), the same `min_lr`, `max_lr`, `num_training`,
`mode` and early-stop threshold. Printed per configuration: both
suggestions, where each sweep stopped, and the largest relative difference
of the smoothed loss curves (what Lightning returns) and of the raw losses
(recovered exactly from Lightning's smoothed curve).

Needs the `bench` extra (lightning, scikit-learn, matplotlib).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import platform
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

import lightfunc as lf

RESULTS = Path(__file__).parent / "results"
Batch = tuple[torch.Tensor, torch.Tensor]


@dataclasses.dataclass(frozen=True)
class Config:
    name: str
    model: str  # "mlp" or "cnn"
    optimizer: str  # "sgd" or "adam"
    base_lr: float  # the rate the state's optimizer is built with (the sweep replaces it)
    min_lr: float = 1e-6
    max_lr: float = 1.0
    num_training: int = 100
    mode: str = "exponential"
    batch_size: int = 64


CONFIGS = (
    Config("mlp-sgd-exp", "mlp", "sgd", base_lr=0.1, max_lr=10.0),
    Config("mlp-adam-exp", "mlp", "adam", base_lr=1e-3),
    Config("mlp-sgd-linear", "mlp", "sgd", base_lr=0.1, min_lr=1e-3, max_lr=3.0, mode="linear"),
    Config("cnn-adam-exp", "cnn", "adam", base_lr=1e-3),
    Config("cnn-sgd-exp", "cnn", "sgd", base_lr=0.1, max_lr=10.0),
)


def digits_batches(batch_size: int) -> list[Batch]:
    """sklearn's 8x8 digits, standardised per pixel, as a fixed list of (x, y) batches."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32)
    x = (x - x.mean(0)) / (x.std(0) + 1e-6)
    y = torch.tensor(digits.target, dtype=torch.int64)
    n = len(x) - len(x) % batch_size  # full batches only: one shape
    return [(x[i : i + batch_size], y[i : i + batch_size]) for i in range(0, n, batch_size)]


class _Unflatten(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.view(-1, 1, 8, 8)


def make_model(kind: str, seed: int = 0) -> torch.nn.Module:
    """A small MLP or CNN over the 64 digit pixels, 10 classes."""
    torch.manual_seed(seed)
    if kind == "mlp":
        return torch.nn.Sequential(
            torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10)
        )
    return torch.nn.Sequential(
        _Unflatten(),
        torch.nn.Conv2d(1, 16, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.MaxPool2d(2),
        torch.nn.Conv2d(16, 32, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.MaxPool2d(2),
        torch.nn.Flatten(),
        torch.nn.Linear(32 * 2 * 2, 10),
    )


def torch_optimizer(name: str, params: Any, lr: float) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=lr) if name == "sgd" else torch.optim.Adam(params, lr=lr)


def lightfunc_optimizer(name: str, lr: float) -> lf.optim.GradientTransformation:
    return lf.optim.sgd(lr) if name == "sgd" else lf.optim.adam(lr)


def loss_fn(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(out, y) if y.dtype == torch.int64 else F.mse_loss(out, y)


def run_lightning(
    model: torch.nn.Module,
    batches: Sequence[Batch],
    optimizer: str,
    *,
    min_lr: float,
    max_lr: float,
    num_training: int,
    mode: str,
    early_stop_threshold: float | None = 4.0,
    root: str | Path,
) -> tuple[list[float], list[float], int | None]:
    """Lightning's `Tuner(trainer).lr_find`: (rates, smoothed losses, suggestion index)."""
    import lightning as L
    from lightning.pytorch.tuner import Tuner

    logging.getLogger("lightning").setLevel(logging.ERROR)

    class Module(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
            x, y = batch
            return loss_fn(self.model(x), y)

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch_optimizer(optimizer, self.parameters(), min_lr)

    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(root),
    )
    loader = torch.utils.data.DataLoader(list(batches), batch_size=None)
    finder = Tuner(trainer).lr_find(
        Module(),
        train_dataloaders=loader,
        min_lr=min_lr,
        max_lr=max_lr,
        num_training=num_training,
        mode=mode,
        early_stop_threshold=early_stop_threshold,
        update_attr=False,
    )
    assert finder is not None
    finder.suggestion()
    return list(finder.results["lr"]), list(finder.results["loss"]), finder._optimal_idx


def run_lightfunc(
    model: torch.nn.Module,
    batches: Sequence[Batch],
    optimizer: str,
    *,
    base_lr: float,
    min_lr: float,
    max_lr: float,
    num_training: int,
    mode: str,
    early_stop_threshold: float | None = 4.0,
    compile: bool = False,
) -> lf.tune.LRFindResult:
    """`lf.tune.lr_find` with the same sweep, from a state built at `base_lr`."""

    def train_step(state: lf.TrainState, batch: Batch) -> tuple[lf.TrainState, dict[str, Any]]:
        x, y = batch

        def objective(params: dict[str, torch.Tensor]) -> torch.Tensor:
            return loss_fn(lf.apply(model, params, state.buffers, x, train=True)[0], y)

        loss, grads = lf.value_and_grad(objective)(state.params)
        return state.apply_gradients(grads), {"loss": loss}

    state = lf.TrainState.create(model, lightfunc_optimizer(optimizer, base_lr))
    return lf.tune.lr_find(
        lf.build(train_step, compile=compile),
        state,
        batches,
        min_lr=min_lr,
        max_lr=max_lr,
        num_training=num_training,
        mode=mode,  # type: ignore[arg-type]
        early_stop_threshold=early_stop_threshold,
    )


def raw_from_smoothed(smoothed: Sequence[float], beta: float = 0.98) -> list[float]:
    """The raw losses behind Lightning's smoothed ones (its average, bias-corrected by k + 2)."""
    raw, previous = [], 0.0
    for k, s in enumerate(smoothed):
        avg = s * (1 - beta ** (k + 2))
        raw.append((avg - beta * previous) / (1 - beta))
        previous = avg
    return raw


def max_relative_difference(a: Sequence[float], b: Sequence[float]) -> float:
    n = min(len(a), len(b))
    x, y = torch.tensor(a[:n], dtype=torch.float64), torch.tensor(b[:n], dtype=torch.float64)
    return float(((x - y).abs() / y.abs().clamp_min(1e-12)).max())


def compare(config: Config, batches: Sequence[Batch], root: str | Path) -> dict[str, Any]:
    """Both sweeps on one configuration, and how far apart they are."""
    model = make_model(config.model)
    sweep = {
        "min_lr": config.min_lr,
        "max_lr": config.max_lr,
        "num_training": config.num_training,
        "mode": config.mode,
    }
    start = time.perf_counter()
    pl_lrs, pl_smoothed, pl_index = run_lightning(
        copy.deepcopy(model), batches, config.optimizer, root=root, **sweep
    )
    pl_seconds = time.perf_counter() - start
    start = time.perf_counter()
    ours = run_lightfunc(
        copy.deepcopy(model), batches, config.optimizer, base_lr=config.base_lr, **sweep
    )
    lf_seconds = time.perf_counter() - start
    graphs = lf.compile_counts()["graphs"]
    start = time.perf_counter()
    compiled = run_lightfunc(
        copy.deepcopy(model),
        batches,
        config.optimizer,
        base_lr=config.base_lr,
        compile=True,
        **sweep,
    )
    compiled_seconds = time.perf_counter() - start
    n = min(len(pl_lrs), len(ours.lrs))
    return {
        "config": dataclasses.asdict(config),
        "lightning": {
            "steps": len(pl_lrs),
            "suggestion_index": pl_index,
            "suggestion": None if pl_index is None else pl_lrs[pl_index],
            "seconds": pl_seconds,
        },
        "lightfunc": {
            "steps": len(ours.lrs),
            "suggestion_index": ours.suggestion_index,
            "suggestion": ours.suggestion,
            "stop_reason": ours.stop_reason,
            "seconds": lf_seconds,
        },
        "lightfunc_compiled": {
            "steps": len(compiled.lrs),
            "suggestion_index": compiled.suggestion_index,
            "suggestion": compiled.suggestion,
            "graphs_compiled": lf.compile_counts()["graphs"] - graphs,
            "seconds_with_compile": compiled_seconds,
            "max_rel_diff_raw_to_eager": max_relative_difference(compiled.losses, ours.losses),
        },
        "same_lrs": list(ours.lrs[:n]) == pl_lrs[:n],
        "max_rel_diff_smoothed": max_relative_difference(ours.smoothed, pl_smoothed),
        "max_rel_diff_raw": max_relative_difference(ours.losses, raw_from_smoothed(pl_smoothed)),
        "max_rel_diff_raw_to_suggestion": max_relative_difference(
            ours.losses[: max(ours.suggestion_index or 0, pl_index or 0) + 1],
            raw_from_smoothed(pl_smoothed),
        ),
    }


def markdown(rows: list[dict[str, Any]], meta: dict[str, str]) -> str:
    lines = [
        "# lr_find: lightfunc vs Lightning",
        "",
        "`python -m bench.lr_find_lightning`: the same model, initial weights, batches (sklearn",
        "digits, batch 64, fixed order), optimizer and sweep on both sides. Suggestion: the rate",
        "at the steepest descent of the smoothed loss (Lightning's rule, skip_begin=10,",
        "skip_end=1). Max rel. diff: the largest relative difference between the two loss",
        "curves over the steps both ran (raw: recovered from Lightning's smoothed curve).",
        "",
        f"torch {meta['torch']}, lightning {meta['lightning']}, lightfunc {meta['lightfunc']}, "
        f"{meta['machine']}.",
        "",
        "| config | optimizer | mode | steps (lf / L) | lf suggestion | Lightning suggestion "
        "| max rel. diff smoothed | raw | raw up to the suggestion | lf compiled: suggestion, "
        "graphs |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        c, a, b = r["config"], r["lightfunc"], r["lightning"]

        def fmt(s: dict[str, Any]) -> str:
            return (
                "none"
                if s["suggestion"] is None
                else f"{s['suggestion']:.4g} (#{s['suggestion_index']})"
            )

        lines.append(
            f"| {c['name']} | {c['optimizer']} | {c['mode']} | {a['steps']} / {b['steps']} "
            f"| {fmt(a)} | {fmt(b)} | {r['max_rel_diff_smoothed']:.1e} | {r['max_rel_diff_raw']:.1e} "
            f"| {r['max_rel_diff_raw_to_suggestion']:.1e} "
            f"| {fmt(r['lightfunc_compiled'])}, {r['lightfunc_compiled']['graphs_compiled']} |"
        )
    lines += [
        "",
        "Both sides run the same rates (bit-identical Python floats) and stop at the same step.",
        "The curves agree to about 1e-7 relative up to the suggested step: lightfunc's sweep",
        "scales each update by `lr_k / base_lr`, one float32 rounding more than torch's",
        "`p.add_(g, alpha=-lr)`. Past the suggestion, at rates where the loss rises or",
        "oscillates, training amplifies those last-bit differences, and the curves drift apart",
        "(most for Adam on the CNN, which runs all 100 steps up to lr = 1 without diverging);",
        "the suggestions are the same in every configuration.",
        "",
        "The last column runs lightfunc's sweep through `torch.compile` (inductor): the whole",
        "sweep is one compiled graph (the rate is read from a tensor table by a tensor",
        "counter), with the same suggestion as the eager sweep.",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    import lightning

    torch.set_num_threads(1)  # deterministic, and the same kernels on both sides
    meta = {
        "torch": torch.__version__,
        "lightning": lightning.__version__,
        "lightfunc": lf.__version__,
        "machine": f"{platform.machine()} {platform.system()}, 1 thread",
    }
    rows = []
    with tempfile.TemporaryDirectory() as root:
        for config in CONFIGS:
            row = compare(config, digits_batches(config.batch_size), root)
            rows.append(row)
            a, b = row["lightfunc"], row["lightning"]
            print(
                f"{config.name:16s} lightfunc {a['suggestion']!s:>22} (#{a['suggestion_index']}, "
                f"{a['steps']} steps)  Lightning {b['suggestion']!s:>22} (#{b['suggestion_index']}, "
                f"{b['steps']} steps)  max rel diff smoothed {row['max_rel_diff_smoothed']:.1e} "
                f"raw {row['max_rel_diff_raw']:.1e}"
            )
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "lr_find.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    (RESULTS / "lr_find.md").write_text(markdown(rows, meta))
    print(f"wrote {RESULTS / 'lr_find.md'}")


if __name__ == "__main__":
    main()
