"""Find a learning rate, train with an EMA of the weights, track the run: lr_find -> EMA -> MLflow.

    pip install ".[demo,mlflow]"                   # or ".[demo,wandb]" for --tracker wandb
    python examples/tuned_digits.py                # the whole run (about a minute eagerly)
    python examples/tuned_digits.py --smoke        # a short check of the whole script
    python examples/tuned_digits.py --help         # every option, with its default
    mlflow ui --backend-store-uri sqlite:///runs/tuned_digits/version_0/mlflow/mlflow.db

Three steps on the digits of `digits.py` (same data, split and model):

1. `lf.tune.lr_find` sweeps the learning rate on a trial copy of the fresh
   state (the state itself is untouched, so it trains next as it was) and
   suggests the rate of steepest loss descent, as Lightning's
   `Tuner.lr_find` does.
2. `lf.fit` trains from that state with AdamW at the suggested rate
   (cosine-decayed), wrapped in `lf.optim.ema`: an exponential moving
   average of the weights, kept in the optimizer state (so checkpointed),
   with which validation and early stopping run (`eval_weights="ema"`).
3. The run is tracked: an `MLflowLogger` (its SQLite store inside the run's
   `version_N` directory) or a `WandbLogger` in offline mode, given to `fit`
   as a function of that directory. The sweep's suggestion is logged as a
   hyper-parameter, the test metrics of both weights at the end (`test_*`),
   and the script reads the run back through the tracker's own client.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from digits import load_data, make_model

import lightfunc as lf


def make_steps(model: torch.nn.Module) -> tuple[Any, Any]:
    """The pure train and eval steps of the digits MLP."""

    def train_step(state: lf.TrainState, batch):
        x, y = batch

        def loss_fn(params):
            logits, buffers = lf.apply(model, params, state.buffers, x, train=True)
            return F.cross_entropy(logits, y), buffers

        (loss, buffers), grads = lf.value_and_grad(loss_fn, has_aux=True)(state.params)
        return state.apply_gradients(grads, buffers=buffers), {"loss": loss}

    def eval_step(state: lf.TrainState, batch):
        x, y = batch
        logits, _ = lf.apply(model, state.params, state.buffers, x, train=False)
        return {"loss": F.cross_entropy(logits, y), "acc": (logits.argmax(-1) == y).float().mean()}

    return train_step, eval_step


def tracker(kind: str) -> Any:
    """`fit`'s `logger=`: a function of the run's directory returning the tracker's logger."""
    if kind == "mlflow":
        return lambda run: lf.loggers.MLflowLogger(run, name="mlflow", experiment_name="digits")
    return lambda run: lf.loggers.WandbLogger(
        run, name="wandb", project="digits", mode="offline", settings={"console": "off"}
    )


def read_back(logger: Any) -> str:
    """What the tracker itself holds for the run, through its own client."""
    if isinstance(logger, lf.loggers.MLflowLogger):
        from mlflow import MlflowClient

        run = MlflowClient(logger.tracking_uri).get_run(logger.run_id)
        test = {k: round(v, 4) for k, v in sorted(run.data.metrics.items()) if k.startswith("test")}
        return (
            f"MLflow run {run.info.run_id[:8]} {run.info.status}: "
            f"lr_suggestion={run.data.params.get('lr_suggestion')} {test}"
        )
    return f"W&B offline run in {logger.log_dir} (upload it with `wandb sync`)"


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--epochs", type=int, default=30, help="at most this many epochs")
    parser.add_argument("--batch-size", type=int, default=64, help="examples per step")
    parser.add_argument("--ema", type=float, default=0.99, help="the EMA's decay (with warm-up)")
    parser.add_argument("--sweep-steps", type=int, default=100, help="lr_find's steps")
    parser.add_argument("--patience", type=int, default=10, help="early stopping, in epochs")
    parser.add_argument("--seed", type=int, default=0, help="data split, init, order, dropout")
    parser.add_argument(
        "--tracker", choices=("mlflow", "wandb"), default="mlflow", help="where the run is tracked"
    )
    parser.add_argument("--compile", action="store_true", help="compile the steps (default: eager)")
    parser.add_argument("--plot", type=Path, default=None, help="save lr_find's curve (PNG) here")
    parser.add_argument(
        "--run-dir", default="runs/tuned_digits", help="runs go here, one version_N each"
    )
    parser.add_argument(
        "--smoke", action="store_true", help="a short check: a 20-step sweep, 2 short epochs"
    )
    args = parser.parse_args(argv)
    limit = None
    if args.smoke:
        args.epochs, args.sweep_steps, limit = 2, 20, 5

    lf.seed_everything(args.seed)
    train_set, test_set = load_data(args.seed)
    train_loader = lf.Loader(
        train_set.tensors, args.batch_size, shuffle=True, seed=args.seed, drop_last=True
    )
    test_loader = [test_set.tensors]
    model = make_model()
    train_step, eval_step = make_steps(model)
    step = lf.build(train_step, compile=args.compile)

    # 1. The sweep runs on a trial copy: `fresh` is the state training starts from below.
    fresh = lf.TrainState.create(model, lf.optim.adamw(1e-3), seed=args.seed)
    sweep = lf.tune.lr_find(
        step, fresh, train_loader, min_lr=1e-6, max_lr=1.0, num_training=args.sweep_steps
    )
    lr = sweep.suggestion if sweep.suggestion is not None else 1e-3
    print(f"lr_find: {len(sweep.lrs)} steps ({sweep.stop_reason}); suggested lr {lr:.3g}")
    if args.plot is not None:
        sweep.plot(args.plot)

    # 2. Train from the same initial weights with the suggested rate and an EMA of the weights.
    steps_per_epoch = min(len(train_loader), limit or len(train_loader))
    schedule = lf.optim.cosine_decay_schedule(lr, decay_steps=args.epochs * steps_per_epoch)
    tx = lf.optim.ema(lf.optim.adamw(schedule, weight_decay=1e-2), args.ema, warmup=True)
    state = lf.TrainState.create(model, tx, seed=args.seed)
    evaluate = lf.build_eval(eval_step, compile=args.compile)
    loggers: list[Any] = []

    def tracked(run: Path) -> Any:  # 3. the tracker, inside this run's version_N directory
        loggers.append(tracker(args.tracker)(run))
        return loggers[-1]

    final = lf.fit(
        step,
        state,
        train_loader,
        max_epochs=args.epochs,
        limit_train_batches=limit,
        eval_step=evaluate,
        eval_data=test_loader,
        eval_weights="ema",
        default_root_dir=args.run_dir,
        logger=tracked,
        log_every_n_steps=steps_per_epoch,
        callbacks=[lf.callbacks.EarlyStopping("val_acc", mode="max", patience=args.patience)],
        hparams={**vars(args), "plot": str(args.plot), "lr_suggestion": lr},
    )
    results = {}
    for weights in ("ema", "params"):
        metrics = lf.evaluate(evaluate, final, test_loader, weights=weights)
        results.update({f"{weights}_{k}": float(v) for k, v in metrics.items()})
        loggers[0].log_metrics(metrics, step=final.step, prefix=f"test_{weights}")
    loggers[0].close()
    print(
        f"test accuracy with the EMA weights {results['ema_acc']:.4f}, "
        f"with the trained weights {results['params_acc']:.4f}"
    )
    print(read_back(loggers[0]))
    return results


if __name__ == "__main__":
    main()
