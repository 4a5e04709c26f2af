"""Every example runs, with tiny settings."""

import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
sys.path.insert(0, str(EXAMPLES))


def test_digits_example_runs_eagerly(capsys):
    import digits

    accuracy = digits.main(["--epochs", "2", "--no-compile"])
    assert 0.5 < accuracy <= 1.0
    assert "test accuracy:" in capsys.readouterr().out


@pytest.mark.compiled
def test_digits_example_runs_compiled(capsys, fresh_dynamo):
    import digits

    accuracy = digits.main(["--epochs", "1", "--limit-train-batches", "5"])
    assert 0.0 <= accuracy <= 1.0
    assert "(compiled)" in capsys.readouterr().out


def test_digits_torch_twin_runs(capsys):
    import digits_torch

    accuracy = digits_torch.main(["--epochs", "2"])
    assert 0.5 < accuracy <= 1.0
