"""The digits example as a plain PyTorch loop: the twin of `digits.py`, to diff against.

    python examples/digits_torch.py [--epochs 30] [--compile]

Same data split, model, AdamW and cosine schedule as `digits.py`, written the
way most PyTorch code is: a module that holds its parameters, an optimizer
that mutates them, `.train()` / `.eval()` switches and `.item()` for printing.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from digits import load_data, make_model
from torch.utils.data import DataLoader


def main(argv: list[str] | None = None) -> float:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--epochs", type=int, default=30, help="training epochs")
    parser.add_argument("--batch-size", type=int, default=64, help="examples per batch")
    parser.add_argument("--lr", type=float, default=2e-3, help="learning rate")
    parser.add_argument("--weight-decay", type=float, default=1e-2, help="AdamW weight decay")
    parser.add_argument(
        "--seed", type=int, default=0, help="random seed (data order, init, dropout)"
    )
    parser.add_argument("--compile", action="store_true", help="torch.compile the model")
    args = parser.parse_args(argv)

    torch.manual_seed(args.seed)
    train_set, test_set = load_data(args.seed)
    train_loader = DataLoader(train_set, batch_size=args.batch_size, shuffle=True, drop_last=True)
    test_loader = DataLoader(test_set, batch_size=len(test_set))
    model = make_model()
    forward = torch.compile(model) if args.compile else model
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(
        optimizer, T_max=args.epochs * len(train_loader)
    )

    start = time.perf_counter()
    for epoch in range(args.epochs):
        model.train()
        for x, y in train_loader:
            loss = F.cross_entropy(forward(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            scheduler.step()
        model.eval()
        correct = total = 0
        with torch.no_grad():
            for x, y in test_loader:
                correct += (forward(x).argmax(-1) == y).sum().item()
                total += len(y)
        print(f"epoch {epoch} loss={loss.item():.4f} val_acc={correct / total:.4f}")
    seconds = time.perf_counter() - start
    print(
        f"{args.epochs * len(train_loader)} steps in {seconds:.1f} s; test accuracy: {correct / total:.4f}"
    )
    return correct / total


if __name__ == "__main__":
    main()
