"""Every example runs, with tiny settings."""

import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
sys.path.insert(0, str(EXAMPLES))


def test_digits_example_runs_eagerly(capsys, tmp_path):
    import digits

    accuracy = digits.main(["--epochs", "2", "--no-compile", "--run-dir", str(tmp_path)])
    assert 0.5 < accuracy <= 1.0
    assert "test accuracy:" in capsys.readouterr().out
    assert (tmp_path / "checkpoints" / "last.safetensors").exists()
    assert list((tmp_path / "best").glob("step=*.safetensors"))
    assert list((tmp_path / "logs").rglob("*"))  # TensorBoard event files


def test_digits_example_resumes_from_its_last_checkpoint(capsys, tmp_path):
    import digits

    digits.main(["--epochs", "1", "--no-compile", "--run-dir", str(tmp_path)])
    capsys.readouterr()
    digits.main(["--epochs", "2", "--no-compile", "--run-dir", str(tmp_path), "--resume"])
    out = capsys.readouterr().out
    assert "44 steps (eager)" in out  # 22 batches per epoch; the second run only ran epoch 2


@pytest.mark.compiled
def test_digits_example_runs_compiled(capsys, fresh_dynamo, tmp_path):
    import digits

    accuracy = digits.main(
        ["--epochs", "1", "--limit-train-batches", "5", "--run-dir", str(tmp_path)]
    )
    assert 0.0 <= accuracy <= 1.0
    assert "(compiled)" in capsys.readouterr().out


def test_digits_torch_twin_runs(capsys):
    import digits_torch

    accuracy = digits_torch.main(["--epochs", "2"])
    assert 0.5 < accuracy <= 1.0


def test_char_lm_example_runs_and_samples(capsys, tmp_path):
    import char_lm

    bits = char_lm.main(
        ["--steps", "4", "--bytes", "20000", "--width", "32", "--layers", "1", "--seq", "32",
         "--batch-size", "8", "--no-compile", "--sample-chars", "10", "--run-dir", str(tmp_path)]
    )  # fmt: skip
    assert 1.0 < bits < 8.5  # bits per byte: 8 is a uniform guess over 256 values
    out = capsys.readouterr().out
    assert "--- sample ---\ndef " in out
    assert list((tmp_path / "best").glob("*.safetensors"))
