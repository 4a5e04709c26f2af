"""The three training workloads every implementation runs: same init, same batches, same loss.

- `mlp`: 64-256-256-10 MLP on scikit-learn's digits, batch 64 (overhead-bound).
- `cnn`: two 3x3 convolutions + max-pool + two linear layers on the digits as
  1x8x8 images, batch 64.
- `gpt`: a decoder-only character transformer (4 layers, width 256, 4 heads,
  sequence 128, batch 16) on bytes of the Python standard library's own
  source files (compute-bound).
- `wide`: 64-1024-1024-1024-1024-10 MLP on the digits, batch 16: the training
  state (3.2M parameters and AdamW's moments, 38 MB) outweighs the
  activations, the regime of a model near its device's memory (not in the
  default set; `--workloads wide`).

FLOPs per training step are counted as 3x the forward FLOPs (forward 1x,
backward 2x) of the matmuls and convolutions only:
- linear layer: 2 * batch * in * out;
- convolution: 2 * batch * C_in * C_out * k * k * H_out * W_out;
- attention (per layer): 2 * 2 * batch * T^2 * d (scores and weighted sum;
  causal masking is not subtracted, as SDPA computes the full product on CPU).
Elementwise work, norms and the optimizer update are left out.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import sysconfig
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

Batch = tuple[torch.Tensor, torch.Tensor]


@dataclasses.dataclass(frozen=True)
class Workload:
    """A model, its batches and its loss; `make_model` returns the same init every call."""

    name: str
    make_model: Callable[[], torch.nn.Module]
    batches: list[Batch]
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    flops_per_step: float
    description: str


def make_workload(name: str, *, device: torch.device | None = None) -> Workload:
    """The workload called `name` ("mlp", "cnn", "gpt" or "wide"), its batches on `device`."""
    factories = {"mlp": _mlp, "cnn": _cnn, "gpt": _gpt, "wide": _wide}
    if name not in factories:
        raise ValueError(f"unknown workload {name!r}; expected one of {sorted(factories)}")
    return factories[name](device if device is not None else torch.device("cpu"))


def classification_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits, y)


def lm_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))


def _seeded(factory: Callable[[], torch.nn.Module]) -> Callable[[], torch.nn.Module]:
    def make() -> torch.nn.Module:
        torch.manual_seed(0)
        return factory()

    return make


def _digit_batches(batch_size: int, device: torch.device, image: bool) -> list[Batch]:
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    g = torch.Generator().manual_seed(0)
    order = torch.randperm(len(y), generator=g)
    xs = torch.tensor(x, dtype=torch.float32)[order] / 16.0
    ys = torch.tensor(y, dtype=torch.int64)[order]
    if image:
        xs = xs.reshape(-1, 1, 8, 8)
    n = len(ys) // batch_size
    return [
        (
            xs[i * batch_size : (i + 1) * batch_size].to(device),
            ys[i * batch_size : (i + 1) * batch_size].to(device),
        )
        for i in range(n)
    ]


def _mlp(device: torch.device) -> Workload:
    batch, sizes = 64, (64, 256, 256, 10)

    def make() -> torch.nn.Module:
        return torch.nn.Sequential(
            torch.nn.Linear(64, 256),
            torch.nn.ReLU(),
            torch.nn.Linear(256, 256),
            torch.nn.ReLU(),
            torch.nn.Linear(256, 10),
        )

    forward = sum(2 * batch * a * b for a, b in itertools.pairwise(sizes))
    return Workload(
        "mlp", _seeded(make), _digit_batches(batch, device, image=False), classification_loss, 3.0 * forward,
        "MLP 64-256-256-10 on digits, batch 64",
    )  # fmt: skip


def _wide(device: torch.device) -> Workload:
    batch, sizes = 16, (64, 1024, 1024, 1024, 1024, 10)

    def make() -> torch.nn.Module:
        layers: list[torch.nn.Module] = []
        for a, b in itertools.pairwise(sizes):
            layers += [torch.nn.Linear(a, b), torch.nn.ReLU()]
        return torch.nn.Sequential(*layers[:-1])

    forward = sum(2 * batch * a * b for a, b in itertools.pairwise(sizes))
    return Workload(
        "wide", _seeded(make), _digit_batches(batch, device, image=False), classification_loss,
        3.0 * forward, "MLP 64-1024x4-10 on digits, batch 16 (state-dominated)",
    )  # fmt: skip


def _cnn(device: torch.device) -> Workload:
    batch = 64

    def make() -> torch.nn.Module:
        return torch.nn.Sequential(
            torch.nn.Conv2d(1, 32, 3, padding=1), torch.nn.ReLU(),
            torch.nn.Conv2d(32, 64, 3, padding=1), torch.nn.ReLU(),
            torch.nn.MaxPool2d(2), torch.nn.Flatten(),
            torch.nn.Linear(64 * 4 * 4, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10),
        )  # fmt: skip

    convs = 2 * batch * (1 * 32 * 9 * 64 + 32 * 64 * 9 * 64)
    linears = 2 * batch * (1024 * 128 + 128 * 10)
    return Workload(
        "cnn", _seeded(make), _digit_batches(batch, device, image=True), classification_loss, 3.0 * (convs + linears),
        "CNN conv32-conv64-pool-fc128-fc10 on 1x8x8 digits, batch 64",
    )  # fmt: skip


class CharGPT(torch.nn.Module):
    """A small decoder-only transformer over bytes (pre-norm, GELU MLP, learned positions)."""

    def __init__(
        self, vocab: int = 256, width: int = 256, layers: int = 4, heads: int = 4, seq: int = 128
    ) -> None:
        super().__init__()
        self.heads = heads
        self.tok = torch.nn.Embedding(vocab, width)
        self.pos = torch.nn.Parameter(torch.randn(seq, width) * 0.02)
        self.blocks = torch.nn.ModuleList(_Block(width, heads) for _ in range(layers))
        self.norm = torch.nn.LayerNorm(width)
        self.head = torch.nn.Linear(width, vocab, bias=False)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.tok(idx) + self.pos[: idx.shape[1]]
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


class _Block(torch.nn.Module):
    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = torch.nn.LayerNorm(width), torch.nn.LayerNorm(width)
        self.qkv = torch.nn.Linear(width, 3 * width)
        self.proj = torch.nn.Linear(width, width)
        self.up, self.down = torch.nn.Linear(width, 4 * width), torch.nn.Linear(4 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).split(d, dim=-1)
        q, k, v = (z.view(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))
        attn = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(attn.transpose(1, 2).reshape(b, t, d))
        return x + self.down(F.gelu(self.up(self.norm2(x))))


def stdlib_bytes(limit: int = 2_000_000) -> torch.Tensor:
    """Up to `limit` bytes of the running Python's standard-library sources, in a fixed file order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    chunks, total = [], 0
    for path in sorted(root.glob("*.py")):
        data = path.read_bytes()
        chunks.append(data)
        total += len(data)
        if total >= limit:
            break
    return torch.frombuffer(bytearray(b"".join(chunks)[:limit]), dtype=torch.uint8).long()


def _gpt(device: torch.device) -> Workload:
    batch, seq, width, layers = 16, 128, 256, 4
    text = stdlib_bytes()
    g = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(16):
        starts = torch.randint(0, len(text) - seq - 1, (batch,), generator=g)
        x = torch.stack([text[s : s + seq] for s in starts.tolist()])
        y = torch.stack([text[s + 1 : s + seq + 1] for s in starts.tolist()])
        batches.append((x.to(device), y.to(device)))
    tokens = batch * seq
    per_layer = 2 * tokens * (width * 3 * width + width * width + 2 * width * 4 * width)
    attention = 2 * 2 * batch * seq * seq * width
    forward = layers * (per_layer + attention) + 2 * tokens * width * 256
    return Workload(
        "gpt", _seeded(lambda: CharGPT(width=width, layers=layers, seq=seq)), batches, lm_loss, 3.0 * forward,
        f"char transformer {layers}x{width}, seq {seq}, batch {batch}, on stdlib source bytes",
    )  # fmt: skip


def describe_flops(workload: Workload) -> str:
    """FLOPs per step in GFLOP, for tables."""
    return (
        f"{workload.flops_per_step / 1e9:.3g} GFLOP/step"
        if math.isfinite(workload.flops_per_step)
        else "?"
    )
