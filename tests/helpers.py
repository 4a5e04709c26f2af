"""Shared test helpers: a small model with BatchNorm and Dropout, data, and step functions."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

import lightfunc as lf

# The Tensor methods that read a value back from the device: tests patch them to catch syncs.
DEVICE_READS = (
    "item",
    "tolist",
    "cpu",
    "numpy",
    "__bool__",
    "__float__",
    "__int__",
    "__repr__",
    "__format__",
)


def is_cpu_count(tensor: torch.Tensor) -> bool:
    """A 0-d int64 CPU tensor: reading it (`.item()`) is a host read, not a device sync.

    The no-sync tests allow `.item()` on these only: an eager optimizer reads
    its step count as a Python number, as torch.optim does on CPU, and
    skip_unused reads how many gradients are all zero (`_gradient_flags`); on
    an accelerator both stay tensors (`host_scalar`, the exact on-device flags).
    """
    return tensor.device.type == "cpu" and tensor.ndim == 0 and tensor.dtype == torch.int64


def make_model(seed: int = 0, *, dropout: float = 0.0, batchnorm: bool = True) -> torch.nn.Module:
    torch.manual_seed(seed)
    # No bias before BatchNorm: its true gradient is exactly zero, and Adam would
    # turn the float noise in it into full-size steps, different in every implementation.
    layers: list[torch.nn.Module] = [torch.nn.Linear(8, 16, bias=not batchnorm)]
    if batchnorm:
        layers.append(torch.nn.BatchNorm1d(16))
    layers += [torch.nn.ReLU(), torch.nn.Dropout(dropout), torch.nn.Linear(16, 3)]
    return torch.nn.Sequential(*layers)


def make_data(
    n: int = 100, batch_size: int = 32, seed: int = 1
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """A deterministic list of (x, y) batches; the last one is smaller when `n % batch_size`."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=g)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
    return [(x[i : i + batch_size], y[i : i + batch_size]) for i in range(0, n, batch_size)]


def make_steps(model: torch.nn.Module) -> tuple[Any, Any]:
    """A classification train step and eval step over `model`."""

    def train_step(
        state: lf.TrainState, batch: Any
    ) -> tuple[lf.TrainState, dict[str, torch.Tensor]]:
        x, y = batch

        def loss_fn(params: dict[str, torch.Tensor]) -> tuple[torch.Tensor, Any]:
            logits, buffers = lf.apply(model, params, state.buffers, x, train=True)
            return F.cross_entropy(logits, y), buffers

        (loss, buffers), grads = lf.value_and_grad(loss_fn, has_aux=True)(state.params)
        return state.apply_gradients(grads, buffers=buffers), {"loss": loss}

    def eval_step(state: lf.TrainState, batch: Any) -> dict[str, torch.Tensor]:
        x, y = batch
        logits, _ = lf.apply(model, state.params, state.buffers, x, train=False)
        return {"loss": F.cross_entropy(logits, y), "acc": (logits.argmax(-1) == y).float().mean()}

    return train_step, eval_step


def clone_tree(tree: Any) -> Any:
    return lf.tree_map(lambda x: x.clone() if isinstance(x, torch.Tensor) else x, tree)


def ok_results(results: list[dict[str, Any]], name: str) -> list[Any]:
    """Each rank's value of the check `name` from a spawned run, asserting every rank passed it.

    The rank workers record each check as ("ok", value) or ("error", traceback).
    """
    values = []
    for rank, result in enumerate(results):
        status, value = result[name]
        assert status == "ok", f"rank {rank}, check {name}:\n{value}"
        values.append(value)
    return values


def run_script(script: Path, text: str, args: list[str], inductor: Path) -> dict[str, Any]:
    """Write `text` to `script`, run it in a fresh Python with `inductor` as its inductor cache,
    and return the JSON object its last line of output prints."""
    script.write_text(text)
    out = subprocess.run(
        [sys.executable, str(script), *args],
        env={**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(inductor)},
        capture_output=True,
        text=True,
        timeout=900,
        check=True,
    )
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result
