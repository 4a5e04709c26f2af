"""The README's Python blocks run as written."""

import re
import tempfile
import warnings
from pathlib import Path

import pytest
import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def _python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.DOTALL)


@pytest.mark.compiled
def test_readme_python_blocks_run(fresh_dynamo, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # `fit` writes its logs and checkpoints under ./runs
    # The blocks' `tempfile.mkdtemp()` run folders land in tmp_path, removed with it.
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    # The trackers' block: W&B offline writes its run under ./runs, but its service keeps a debug
    # log and a cache under HOME; keep those in tmp_path too, and let no upload succeed.
    home = tmp_path / "home"
    for name, value in {
        "WANDB_SILENT": "true",
        "WANDB_CACHE_DIR": str(home / "cache"),
        "WANDB_CONFIG_DIR": str(home / "config"),
        "WANDB_DATA_DIR": str(home / "data"),
        "WANDB_BASE_URL": "http://127.0.0.1:9",
        "HOME": str(home),
        "XDG_CACHE_HOME": str(home / "xdg_cache"),
    }.items():
        monkeypatch.setenv(name, value)
    for name in ("WANDB_API_KEY", "WANDB_PROJECT", "WANDB_ENTITY", "WANDB_RUN_ID", "WANDB_MODE"):
        monkeypatch.delenv(name, raising=False)
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
    # `lf.compile_regions`' block: torch 2.13 warns once while tracing a region that the `.grad`
    # of a non-leaf tensor is read (the README says so); not an error of the README's code.
    warnings.filterwarnings("ignore", "The .grad attribute of a Tensor that is not a leaf")
    try:
        for block in blocks[1:]:
            exec(compile(block, str(README), "exec"), namespace)
    finally:
        import wandb

        wandb.teardown()  # stop the service W&B started with this environment
    assert "tx" in namespace
    assert (
        namespace["ls"].step == 4 and namespace["again"].step == 4
    )  # 2 epochs of 2 batches, saved and loaded
