"""MAML: meta-learn an initialisation for 5-way 5-shot classification of unseen digit classes.

    python examples/maml.py                   # 5-way 5-shot, 1,500 meta-steps, compiled
    python examples/maml.py --shots 1         # 5-way 1-shot
    python examples/maml.py --smoke           # seconds: 10 meta-steps, eager

Model-agnostic meta-learning (Finn et al., 2017) learns initial weights from
which a few SGD steps on a handful of labelled examples (the support set)
give a good classifier for new classes (tested on a query set). The outer
step differentiates *through* the inner SGD steps, second-order terms
included: `adapt` below is a plain Python loop of `torch.func.grad` steps on
a dict of parameters, `torch.func.vmap` runs it on a meta-batch of tasks at
once, and `lf.value_and_grad` differentiates the mean query loss with
respect to the initial weights. All of it is one pure train step, compiled.

Tasks come from scikit-learn's `load_digits` (8x8 real digits, shipped with
the package). Test tasks use the digits 5-9, which the model never sees
during meta-training. Meta-training tasks use the digits 0-4 in their 8
orientations (turned by 0/90/180/270 degrees, mirrored or not), each a class
of its own: 40 classes, as Omniglot's rotations are used to multiply its
classes. (With only the 5 upright classes, the meta-learned initialisation
overfits them and ends up worse on 5-9 than no meta-learning at all.) Each
task picks 5 classes in a random order (the labels 0-4 mean different
classes in every task), `shots` support and 10 query examples per class.

Measured on a shared 2-core CPU (full settings, compiled): on 500 test tasks of
unseen digits 5-9, 5-way 5-shot query accuracy after 5 inner steps is
0.7938 from the meta-learned initialisation, against 0.5976 from the same
network before meta-training (same inner loop). About 35 s, half of it
compiling the train and test steps.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits

import lightfunc as lf

Params = dict[str, torch.Tensor]


def make_model(hidden: int = 64, ways: int = 5) -> torch.nn.Module:
    return torch.nn.Sequential(
        torch.nn.Linear(64, hidden),
        torch.nn.ReLU(),
        torch.nn.Linear(hidden, hidden),
        torch.nn.ReLU(),
        torch.nn.Linear(hidden, ways),
    )


def adapt(
    model: torch.nn.Module, params: Params, x: torch.Tensor, y: torch.Tensor, steps: int, lr: float
) -> Params:
    """`steps` steps of plain SGD on (x, y) from `params`: differentiable, nothing detached."""

    def loss_fn(params: Params) -> torch.Tensor:
        return F.cross_entropy(lf.apply(model, params, {}, x, train=True)[0], y)

    for _ in range(steps):
        grads = torch.func.grad(loss_fn)(params)
        params = {name: p - lr * grads[name] for name, p in params.items()}
    return params


def task_loss(
    model: torch.nn.Module,
    params: Params,
    task: tuple[torch.Tensor, ...],
    steps: int,
    lr: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Adapt on the support set, then (query loss, query accuracy) of the adapted weights."""
    support_x, support_y, query_x, query_y = task
    fast = adapt(model, params, support_x, support_y, steps, lr)
    logits = lf.apply(model, fast, {}, query_x, train=True)[0]
    return F.cross_entropy(logits, query_y), (logits.argmax(-1) == query_y).float().mean()


def meta_loss(
    model: torch.nn.Module,
    params: Params,
    tasks: tuple[torch.Tensor, ...],
    steps: int,
    lr: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean (query loss, query accuracy) over a meta-batch of tasks (leading dimension), vmapped."""
    losses, accs = torch.func.vmap(lambda *task: task_loss(model, params, task, steps, lr))(*tasks)
    return losses.mean(), accs.mean()


def sample_tasks(
    labels: torch.Tensor,
    classes: list[int],
    count: int,
    *,
    ways: int,
    shots: int,
    queries: int,
    seed: int,
) -> tuple[torch.Tensor, ...]:
    """`count` few-shot tasks as index tensors into the dataset.

    Returns:
        (support_idx (count, ways*shots), support_y, query_idx (count, ways*queries),
        query_y): task labels are 0..ways-1, in a random class order per task.
    """
    gen = torch.Generator().manual_seed(seed)
    by_class = {c: torch.nonzero(labels == c).flatten() for c in classes}
    support, support_y, query, query_y = [], [], [], []
    for _ in range(count):
        chosen = torch.randperm(len(classes), generator=gen)[:ways].tolist()
        s, q = [], []
        for c in chosen:
            pool = by_class[classes[c]]
            picked = pool[torch.randperm(len(pool), generator=gen)[: shots + queries]]
            s.append(picked[:shots])
            q.append(picked[shots:])
        support.append(torch.cat(s))
        query.append(torch.cat(q))
        support_y.append(torch.arange(ways).repeat_interleave(shots))
        query_y.append(torch.arange(ways).repeat_interleave(queries))
    return torch.stack(support), torch.stack(support_y), torch.stack(query), torch.stack(query_y)


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--ways", type=int, default=5, help="classes per task")
    parser.add_argument("--shots", type=int, default=5, help="examples per class per task")
    parser.add_argument("--queries", type=int, default=10, help="query examples per class")
    parser.add_argument("--meta-steps", type=int, default=1500, help="meta-training steps")
    parser.add_argument("--meta-batch", type=int, default=16, help="tasks per outer step")
    parser.add_argument("--inner-steps", type=int, default=5, help="inner SGD steps per task")
    parser.add_argument("--inner-lr", type=float, default=0.5, help="inner SGD learning rate")
    parser.add_argument("--lr", type=float, default=1e-3, help="outer (Adam) learning rate")
    parser.add_argument("--test-tasks", type=int, default=500, help="unseen tasks to evaluate on")
    parser.add_argument("--eval-every", type=int, default=250, help="meta-steps between tests")
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
        args.meta_steps, args.meta_batch, args.test_tasks, args.compile = 10, 4, 20, False
        args.inner_steps, args.eval_every = 2, 10

    lf.seed_everything(args.seed)
    x, y = load_digits(return_X_y=True)
    digits = torch.tensor(x / 16.0, dtype=torch.float32).reshape(-1, 8, 8)
    # Each orientation of a digit is a class of its own: 40 meta-training classes
    # from the digits 0-4 instead of 5 (see the module docstring).
    views = [torch.rot90(digits, r, (1, 2)) for r in range(4)]
    views += [v.transpose(1, 2) for v in views]  # and their mirror images
    images = torch.cat([v.reshape(-1, 64) for v in views])
    labels = torch.cat([torch.tensor(y) * 8 + r for r in range(8)])  # class = 8 * digit + view
    train_classes = [8 * d + r for d in range(5) for r in range(8)]
    test_classes = [8 * d for d in range(5, 10)]  # the digits 5-9, upright
    shape = dict(ways=args.ways, shots=args.shots, queries=args.queries)
    # A fixed pool of meta-training tasks, read in a seeded order by a resumable Loader.
    train_tasks = sample_tasks(labels, train_classes, 4000, **shape, seed=args.seed)
    test_tasks = sample_tasks(labels, test_classes, args.test_tasks, **shape, seed=args.seed + 1)
    loader = lf.Loader(train_tasks, args.meta_batch, shuffle=True, seed=args.seed, drop_last=True)
    model = make_model(ways=args.ways)
    state = lf.TrainState.create(model, lf.optim.adam(args.lr), seed=args.seed)

    def with_images(batch: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        support_idx, support_y, query_idx, query_y = batch
        return images[support_idx], support_y, images[query_idx], query_y

    def train_step(state: lf.TrainState, batch):
        tasks = with_images(batch)

        def loss_fn(params):
            return meta_loss(model, params, tasks, args.inner_steps, args.inner_lr)

        (loss, acc), grads = lf.value_and_grad(loss_fn, has_aux=True)(state.params)
        return state.apply_gradients(grads), {"loss": loss, "query_acc": acc}

    def eval_step(state: lf.TrainState, batch):
        loss, acc = meta_loss(
            model, state.params, with_images(batch), args.inner_steps, args.inner_lr
        )
        return {"loss": loss, "acc": acc}

    evaluate = lf.build_eval(eval_step, compile=args.compile)
    test_batches = lf.Loader(test_tasks, 100, shuffle=False)
    before = float(lf.evaluate(evaluate, state, test_batches)["acc"])

    start = time.perf_counter()
    for ts in lf.loop(
        lf.build(train_step, compile=args.compile),
        state,
        loader,
        max_steps=args.meta_steps,
        eval_step=evaluate,
        eval_data=test_batches,
        eval_every=args.eval_every,
    ):
        if ts.evaluated:
            print(
                f"meta-step {ts.step:5d}  train query acc {float(ts.metrics['query_acc']):.4f}  "
                f"test query acc {float(ts.eval_metrics['acc']):.4f}"
            )
    seconds = time.perf_counter() - start
    after = float(ts.eval_metrics["acc"])
    mode = "compiled" if args.compile else "eager"
    print(
        f"{ts.step} meta-steps ({mode}) in {seconds:.1f} s. On {args.test_tasks} test tasks of "
        f"unseen digits 5-9, {args.ways}-way {args.shots}-shot query accuracy after "
        f"{args.inner_steps} inner steps: {after:.4f} from the meta-learned initialisation, "
        f"{before:.4f} from the same network before meta-training"
    )
    return {"acc": after, "random_init_acc": before}


if __name__ == "__main__":
    # Small models: one thread is as fast as two, and far faster on a busy machine.
    torch.set_num_threads(1)
    main()
