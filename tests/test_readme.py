"""The README's Python blocks run as written."""

import re
from pathlib import Path

import pytest
import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def _python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.DOTALL)


@pytest.mark.compiled
def test_readme_python_blocks_run(fresh_dynamo, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # `fit` writes its logs and checkpoints under ./runs
    blocks = _python_blocks()
    assert len(blocks) >= 2
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(64, 64, generator=g), torch.randint(0, 10, (64,), generator=g)
    loaders = {
        "train_loader": [(x[:32], y[:32]), (x[32:], y[32:])],
        "test_loader": [(x, y)],
    }
    # The quick start (the first block) runs exactly as written, on its own real data.
    namespace: dict = {}
    exec(compile(blocks[0], str(README), "exec"), namespace)
    assert namespace["final"].step == 240  # 10 epochs of 24 batches of digits
    assert float(namespace["final"].eval_metrics["acc"]) > 0.8
    # The later sections' snippets reuse `train_loader` & co.; give them small data.
    namespace.update(loaders, x_train=x, y_train=y)
    for block in blocks[1:]:
        exec(compile(block, str(README), "exec"), namespace)
    assert "tx" in namespace
    assert (
        namespace["ls"].step == 4 and namespace["again"].step == 4
    )  # 2 epochs of 2 batches, saved and loaded
