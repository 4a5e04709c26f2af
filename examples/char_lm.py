"""A character-level transformer language model on the Python standard library's own source.

    python examples/char_lm.py            # full run (see the result below)
    python examples/char_lm.py --smoke    # a short check of the whole script

Data: the bytes of the running Python's standard-library `.py` files (first
1 MB in file-name order; nothing is downloaded), cut into windows of
`--seq + 1` bytes, the last 10% held out for validation. Model: a small
pre-norm decoder-only transformer over the 256 byte values. Training: AdamW
with a linear warm-up then cosine decay, gradient clipping at global norm 1,
bf16-mixed precision where the hardware has bfloat16 (CUDA with bf16, or a
CPU with AVX512-BF16 / AMX; else fp32), and `lf.fit` for the progress bar,
logs and checkpoints (under `--run-dir`/version_N). At the end it reports validation
loss in bits per byte and samples text from a prompt.

`--optimizer muon` trains the blocks' matrices with Muon (`lf.optim.muon`,
torch.optim.Muon's defaults, peak `--muon-lr`) and the embeddings, output
head, biases and norms with the same AdamW at `--lr`;
`python -m bench.muon_vs_adamw` compares the two at equal steps
(bench/results/muon_vs_adamw.md).

Measured (2 vCPU AMD EPYC with AVX512-BF16, torch 2.13 CPU, bf16-mixed,
compiled, default settings, on a machine shared with other jobs): 600 steps
in 430 s, validation 2.445 bits per byte (a uniform guess is 8; the
training loss ended at 1.47 nats). The sample has Python's shape, not its
sense:

    def size in ot self._comprecode + so opys.stestd
                          self.negr_mit_spattt():
"""

from __future__ import annotations

import argparse
import math
import sysconfig
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import lightfunc as lf


def stdlib_text(limit: int) -> torch.Tensor:
    """Up to `limit` bytes of the standard library's `.py` sources, as int64 byte values."""
    root = Path(sysconfig.get_paths()["stdlib"])
    chunks, total = [], 0
    for path in sorted(root.glob("*.py")):
        chunks.append(path.read_bytes())
        total += len(chunks[-1])
        if total >= limit:
            break
    data = bytearray(b"".join(chunks)[:limit])
    return torch.frombuffer(data, dtype=torch.uint8).long()


def windows(text: torch.Tensor, seq: int) -> torch.Tensor:
    """Non-overlapping windows of `seq + 1` bytes: inputs are [:-1], targets [1:]."""
    n = (len(text) - 1) // seq
    return text[: n * seq + 1].unfold(0, seq + 1, seq)


class CharTransformer(torch.nn.Module):
    def __init__(self, width: int, layers: int, heads: int, seq: int, dropout: float) -> None:
        super().__init__()
        self.tok = torch.nn.Embedding(256, width)
        self.pos = torch.nn.Parameter(torch.randn(seq, width) * 0.02)
        self.blocks = torch.nn.ModuleList(Block(width, heads, dropout) for _ in range(layers))
        self.norm = torch.nn.LayerNorm(width)
        self.head = torch.nn.Linear(width, 256, bias=False)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.tok(idx) + self.pos[: idx.shape[1]]
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


class Block(torch.nn.Module):
    def __init__(self, width: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = torch.nn.LayerNorm(width), torch.nn.LayerNorm(width)
        self.qkv = torch.nn.Linear(width, 3 * width)
        self.proj = torch.nn.Linear(width, width)
        self.mlp = torch.nn.Sequential(
            torch.nn.Linear(width, 4 * width),
            torch.nn.GELU(),
            torch.nn.Linear(4 * width, width),
            torch.nn.Dropout(dropout),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).split(d, dim=-1)
        q, k, v = (z.view(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))
        attn = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(attn.transpose(1, 2).reshape(b, t, d))
        return x + self.mlp(self.norm2(x))


OPTIMIZERS = ("adamw", "muon")


def hidden_matrices(params: dict[str, torch.Tensor]) -> dict[str, str]:
    """Muon's labels: "muon" for the blocks' 2-D weights, "adamw" for the rest.

    The token and position embeddings and the output head are matrices too,
    but (as torch.optim.Muon's docs and the Muon papers advise) they stay
    with AdamW, with the biases and the LayerNorm scales.
    """
    return {
        k: "muon" if k.startswith("blocks.") and v.ndim == 2 else "adamw" for k, v in params.items()
    }


def optimizer(name: str, adamw_lr, muon_lr) -> lf.optim.GradientTransformation:
    """The example's optimizer: AdamW (decay 0.1) everywhere, or Muon on the hidden matrices.

    With "muon", the blocks' matrices get `lf.optim.muon` (torch.optim.Muon's
    defaults: momentum 0.95, Nesterov, five bfloat16 Newton-Schulz iterations,
    decoupled decay 0.1, the "original" shape ratio) at `muon_lr`; every other
    parameter gets the same AdamW as with "adamw", at `adamw_lr`.
    """
    if name == "adamw":
        return lf.optim.adamw(adamw_lr, weight_decay=0.1)
    if name == "muon":
        return lf.optim.muon(
            muon_lr,
            weight_decay=0.1,
            adamw_lr=adamw_lr,
            adamw_weight_decay=0.1,
            labels=hidden_matrices,
        )
    raise ValueError(f"`optimizer` must be one of {OPTIMIZERS}, got {name!r}.")


def bf16_available() -> bool:
    """Whether bfloat16 matmuls run natively here (else bf16-mixed would be slower than fp32)."""
    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def sample(model: torch.nn.Module, state: lf.TrainState, prompt: str, n: int, seq: int) -> str:
    """`n` bytes after `prompt`, drawn at temperature 0.8 (eager, one byte at a time)."""
    params = lf.cast_tree(state.params, torch.float32)
    device = next(iter(params.values())).device
    idx = torch.tensor(list(prompt.encode()), dtype=torch.long, device=device)[None]
    generator = torch.Generator(device=device).manual_seed(0)
    for _ in range(n):
        logits, _ = lf.apply(model, params, state.buffers, idx[:, -seq:], train=False)
        probs = torch.softmax(logits[0, -1].float() / 0.8, dim=-1)
        idx = torch.cat([idx, torch.multinomial(probs, 1, generator=generator)[None]], dim=1)
    return bytes(idx[0].tolist()).decode("utf-8", errors="replace")


def main(argv: list[str] | None = None) -> float:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--steps", type=int, default=600, help="train steps")
    parser.add_argument("--batch-size", type=int, default=32, help="windows per step")
    parser.add_argument("--seq", type=int, default=64, help="bytes of context")
    parser.add_argument("--width", type=int, default=128, help="model width")
    parser.add_argument("--layers", type=int, default=3, help="transformer blocks")
    parser.add_argument("--heads", type=int, default=4, help="attention heads")
    parser.add_argument("--dropout", type=float, default=0.0, help="dropout after each MLP")
    parser.add_argument("--lr", type=float, default=3e-3, help="peak learning rate")
    parser.add_argument(
        "--optimizer",
        choices=OPTIMIZERS,
        default="adamw",
        help="adamw for every parameter, or muon for the blocks' matrices and AdamW for the rest",
    )
    parser.add_argument(
        "--muon-lr", type=float, default=0.02, help="Muon's peak learning rate (with muon)"
    )
    parser.add_argument("--warmup", type=int, default=50, help="linear warm-up steps")
    parser.add_argument("--bytes", type=int, default=1_000_000, help="training text size")
    parser.add_argument("--precision", default="auto", help="auto: bf16-mixed if native, else fp32")
    parser.add_argument(
        "--no-compile", dest="compile", action="store_false", help="run eagerly (compile: True)"
    )
    parser.add_argument(
        "--run-dir", default="runs/char_lm", help="runs go here, one version_N each"
    )
    parser.add_argument("--sample-chars", type=int, default=300, help="bytes to sample at the end")
    parser.add_argument("--seed", type=int, default=0, help="data order, init, sampling")
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="a short check: 20 steps of a tiny eager model on 20 kB, 40 bytes sampled",
    )
    args = parser.parse_args(argv)
    if args.smoke:
        args.steps, args.bytes, args.width, args.layers, args.seq = 20, 20_000, 32, 1, 32
        args.batch_size, args.compile, args.sample_chars = 8, False, 40

    lf.seed_everything(args.seed)
    data = windows(stdlib_text(args.bytes), args.seq)
    split = int(0.9 * len(data))
    train_loader = lf.Loader(
        (data[:split],), args.batch_size, shuffle=True, seed=args.seed, drop_last=True
    )
    val_batches = [(chunk,) for chunk in data[split:].split(256)]
    precision = args.precision
    if precision == "auto":
        precision = "bf16-mixed" if bf16_available() else "32-true"

    model = CharTransformer(args.width, args.layers, args.heads, args.seq, args.dropout)
    warmup = min(args.warmup, args.steps // 2)

    def schedule(peak: float):  # linear warm-up, then cosine decay to a tenth of the peak
        return lf.optim.warmup_cosine_decay_schedule(
            0.0,
            peak,
            warmup_steps=warmup,
            decay_steps=max(args.steps, warmup + 1),
            end_value=peak / 10,
        )

    tx = lf.optim.chain(
        lf.optim.clip_by_global_norm(1.0),
        optimizer(args.optimizer, schedule(args.lr), schedule(args.muon_lr)),
    )
    state = lf.TrainState.create(model, tx, seed=args.seed)

    def train_step(state: lf.TrainState, batch):
        (w,) = batch
        x, y = w[:, :-1], w[:, 1:]

        def loss_fn(params):
            logits, _ = lf.apply(model, params, state.buffers, x, train=True)
            return F.cross_entropy(logits.reshape(-1, 256).float(), y.reshape(-1))

        loss, grads = lf.value_and_grad(loss_fn, loss_scale=state.loss_scale)(state.params)
        return state.apply_gradients(grads), {
            "loss": loss,
            "grad_norm": lf.optim.global_norm(grads),
        }

    def eval_step(state: lf.TrainState, batch):
        (w,) = batch
        logits, _ = lf.apply(model, state.params, state.buffers, w[:, :-1], train=False)
        loss = F.cross_entropy(logits.reshape(-1, 256).float(), w[:, 1:].reshape(-1))
        return {"loss": loss, "bits_per_byte": loss / math.log(2)}

    start = time.perf_counter()
    final = lf.fit(
        lf.build(train_step, compile=args.compile, precision=precision),
        state,
        train_loader,
        max_steps=args.steps,
        max_epochs=10_000,
        eval_step=eval_step,
        eval_data=val_batches,
        eval_every=max(args.steps // 3, 1),
        default_root_dir=args.run_dir,
        log_every_n_steps=max(args.steps // 20, 1),
        hparams=vars(args),
    )
    seconds = time.perf_counter() - start
    bpb = float(final.eval_metrics["bits_per_byte"]) if final.eval_metrics else float("nan")
    print(
        f"{final.step} steps ({precision}, {'compiled' if args.compile else 'eager'}) "
        f"in {seconds:.1f} s; validation: {bpb:.3f} bits per byte"
    )
    if args.sample_chars:
        text = sample(model, final.state, "def ", args.sample_chars, args.seq)
        print("--- sample ---\n" + text)
    return bpb


if __name__ == "__main__":
    main()
