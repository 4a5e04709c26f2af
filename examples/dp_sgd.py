"""Differentially private training (DP-SGD) of a digit classifier, from per-example gradients.

    python examples/dp_sgd.py                          # sigma 1.5, clip 0.5, 30 epochs, compiled
    python examples/dp_sgd.py --noise-multiplier 0     # clipping only, no noise (epsilon = inf)
    python examples/dp_sgd.py --no-clip                # plain Adam, no DP: the baseline
    python examples/dp_sgd.py --smoke                  # seconds: 2 epochs, eager

DP-SGD (Abadi et al., 2016) bounds how much any one training example can
change the model: every example's gradient is clipped to an L2 norm of at
most `clip`, the clipped gradients are summed, Gaussian noise of standard
deviation `noise_multiplier * clip` is added, and the sum is divided by the
batch size. That needs one gradient per example, which is
`lf.per_example_grads(loss_fn)`: `torch.func.vmap` of `torch.func.grad`,
inside the one compiled step (no per-example Python loop, no hooks). The
noise is drawn inside the step from the state's random stream, so a run is
reproducible and resumes exactly.

The privacy guarantee is computed with the Renyi-DP accountant of the
sampled Gaussian mechanism (Mironov et al., 2019; integer orders 2-256, the
classic RDP -> (epsilon, delta) conversion). Like most DP-SGD code, it
assumes Poisson sampling with rate batch/N while the loader takes shuffled
fixed-size batches.

Data: scikit-learn's `load_digits`, 1,437 train / 360 test, as in `digits.py`.
Measured on a shared 2-core CPU (full settings, compiled, 660 steps of batch
64): test accuracy 0.9444 at (epsilon 4.79, delta 1e-5); the same run
without noise (clipping only) reaches 0.9778, and without clipping or noise
(plain Adam) 0.9694. About 20 s.
"""

from __future__ import annotations

import argparse
import math
import time

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

import lightfunc as lf


def load_data(seed: int) -> tuple[tuple[torch.Tensor, torch.Tensor], ...]:
    """Digits as (x in [0, 1], label) tensors: 1,437 train and 360 test examples."""
    x, y = load_digits(return_X_y=True)
    x_train, x_test, y_train, y_test = train_test_split(
        x / 16.0, y, test_size=0.2, random_state=seed, stratify=y
    )
    as_x = lambda a: torch.tensor(a, dtype=torch.float32)  # noqa: E731
    as_y = lambda a: torch.tensor(a, dtype=torch.int64)  # noqa: E731
    return (as_x(x_train), as_y(y_train)), (as_x(x_test), as_y(y_test))


def make_model(hidden: int = 128) -> torch.nn.Module:
    # Tanh rather than ReLU: bounded activations are the usual choice under DP-SGD.
    return torch.nn.Sequential(
        torch.nn.Linear(64, hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, 10)
    )


def private_gradient(
    per_example: dict[str, torch.Tensor], clip: float, noise_multiplier: float
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Clip each example's gradient to norm `clip`, sum, add noise, average; and the clipped fraction.

    Args:
        per_example: name -> (N, *param.shape) gradients, one per example.
        clip: the largest L2 norm one example's whole gradient may have.
        noise_multiplier: noise standard deviation in units of `clip` (0: none).
    """
    n = next(iter(per_example.values())).shape[0]
    squares = [g.reshape(n, -1).square().sum(1) for g in per_example.values()]
    norms = torch.stack(squares).sum(0).sqrt()  # (N,): each example's gradient norm
    factors = (clip / (norms + 1e-6)).clamp(max=1.0)
    grads = {}
    for name, g in per_example.items():
        clipped_sum = torch.einsum("n,n...->...", factors, g)
        if noise_multiplier > 0:
            clipped_sum = clipped_sum + noise_multiplier * clip * torch.randn_like(clipped_sum)
        grads[name] = clipped_sum / n
    return grads, (norms > clip).float().mean()


def epsilon(q: float, noise_multiplier: float, steps: int, delta: float) -> float:
    """(epsilon, delta)-DP of `steps` sampled Gaussian mechanisms, by Renyi DP.

    Args:
        q: the sampling rate (batch size / dataset size).
        noise_multiplier: noise standard deviation / clipping norm.
        steps: number of noisy updates.
        delta: the target delta.
    """
    if noise_multiplier == 0:
        return math.inf
    best = math.inf
    for order in range(2, 257):
        # log A_order = log sum_k C(order, k) (1-q)^(order-k) q^k exp((k^2 - k) / (2 sigma^2))
        terms = [
            math.lgamma(order + 1)
            - math.lgamma(k + 1)
            - math.lgamma(order - k + 1)
            + (order - k) * math.log1p(-q)
            + k * math.log(q)
            + (k * k - k) / (2 * noise_multiplier**2)
            for k in range(order + 1)
        ]
        top = max(terms)
        log_a = top + math.log(sum(math.exp(t - top) for t in terms))
        rdp = steps * log_a / (order - 1)
        best = min(best, rdp + math.log(1 / delta) / (order - 1))
    return best


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--epochs", type=int, default=30, help="training epochs")
    parser.add_argument("--batch-size", type=int, default=64, help="examples per batch")
    parser.add_argument("--lr", type=float, default=1e-2, help="learning rate")
    parser.add_argument("--clip", type=float, default=0.5, help="per-example gradient norm bound")
    parser.add_argument(
        "--noise-multiplier", type=float, default=1.5, help="sigma, in units of clip"
    )
    parser.add_argument("--no-clip", action="store_true", help="plain training, no DP (baseline)")
    parser.add_argument(
        "--delta",
        type=float,
        default=1e-5,
        help="the delta of the (epsilon, delta) privacy guarantee",
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="random seed (data order, init, dropout)"
    )
    parser.add_argument(
        "--no-compile",
        dest="compile",
        action="store_false",
        help="run eagerly instead of torch.compile",
    )
    parser.add_argument("--smoke", action="store_true", help="tiny settings, eager (for tests)")
    args = parser.parse_args(argv)
    if args.smoke:
        args.epochs, args.lr, args.compile = 2, 1e-2, False
    if args.no_clip:
        args.clip, args.noise_multiplier = math.inf, 0.0

    lf.seed_everything(args.seed)
    (x_train, y_train), (x_test, y_test) = load_data(args.seed)
    loader = lf.Loader(
        (x_train, y_train), args.batch_size, shuffle=True, seed=args.seed, drop_last=True
    )
    model = make_model()
    state = lf.TrainState.create(model, lf.optim.adam(args.lr), seed=args.seed)

    def train_step(state: lf.TrainState, batch):
        x, y = batch

        def example_loss(params, x, y):  # ONE example: x (64,), y ()
            logits, _ = lf.apply(model, params, state.buffers, x[None], train=True)
            return F.cross_entropy(logits, y[None])

        losses, per_example = lf.per_example_grads(example_loss)(state.params, x, y)
        grads, clipped = private_gradient(per_example, args.clip, args.noise_multiplier)
        return state.apply_gradients(grads), {"loss": losses.mean(), "clipped": clipped}

    def eval_step(state: lf.TrainState, batch):
        x, y = batch
        logits, _ = lf.apply(model, state.params, state.buffers, x, train=False)
        return {"acc": (logits.argmax(-1) == y).float().mean()}

    start = time.perf_counter()
    for ts in lf.loop(
        lf.build(train_step, compile=args.compile),
        state,
        loader,
        max_epochs=args.epochs,
        eval_step=lf.build_eval(eval_step, compile=args.compile),
        eval_data=[(x_test, y_test)],
    ):
        if ts.evaluated and (ts.epoch % 5 == 4 or ts.epoch == args.epochs - 1):
            print(
                f"epoch {ts.epoch + 1:3d}  loss {float(ts.metrics['loss']):.4f}  "
                f"clipped {float(ts.metrics['clipped']):.2f}  "
                f"test acc {float(ts.eval_metrics['acc']):.4f}"
            )
    seconds = time.perf_counter() - start
    eps = epsilon(args.batch_size / len(x_train), args.noise_multiplier, ts.step, args.delta)
    accuracy = float(ts.eval_metrics["acc"])
    mode = "compiled" if args.compile else "eager"
    print(
        f"{ts.step} steps ({mode}) in {seconds:.1f} s; test accuracy {accuracy:.4f} at "
        f"epsilon {eps:.2f}, delta {args.delta:g} (clip {args.clip}, sigma {args.noise_multiplier})"
    )
    return {"acc": accuracy, "epsilon": eps}


if __name__ == "__main__":
    # Small models: one thread is as fast as two, and far faster on a busy machine.
    torch.set_num_threads(1)
    main()
