"""Every example runs, with tiny settings; `--smoke` and `--help` do what the README says."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

import lightfunc as lf

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
sys.path.insert(0, str(EXAMPLES))


def test_digits_example_runs_eagerly(capsys, tmp_path):
    import digits

    accuracy = digits.main(["--epochs", "2", "--no-compile", "--run-dir", str(tmp_path)])
    assert 0.5 < accuracy <= 1.0
    out = capsys.readouterr().out
    assert "test accuracy:" in out
    assert "Run stopped at step 44 (epoch 1): max_epochs=2 reached" in out
    run = tmp_path / "version_0"
    assert (run / "checkpoints" / "last.safetensors").exists()
    assert list((run / "logs").glob("events.out.tfevents.*"))  # TensorBoard event files


def test_digits_smoke_runs_two_short_epochs_eagerly(capsys, tmp_path):
    import digits

    digits.main(["--smoke", "--run-dir", str(tmp_path)])
    out = capsys.readouterr().out
    assert "10 steps (eager)" in out  # 2 epochs of 5 batches


def test_digits_example_resumes_from_its_last_checkpoint(capsys, tmp_path):
    import digits

    digits.main(["--epochs", "1", "--no-compile", "--run-dir", str(tmp_path)])
    capsys.readouterr()
    digits.main(["--epochs", "2", "--no-compile", "--run-dir", str(tmp_path), "--resume"])
    out = capsys.readouterr().out
    assert "44 steps (eager)" in out  # 22 batches per epoch; the second run only ran epoch 2
    assert not (tmp_path / "version_1").exists()  # resumed in the same version


@pytest.mark.compiled
def test_digits_example_runs_compiled(capsys, fresh_dynamo, tmp_path):
    import digits

    accuracy = digits.main(
        ["--epochs", "1", "--limit-train-batches", "5", "--run-dir", str(tmp_path)]
    )
    assert 0.0 <= accuracy <= 1.0
    captured = capsys.readouterr()
    assert "(compiled)" in captured.out
    assert "compiling train_step ... " in captured.err  # the bar says what it compiles
    assert "compile " in captured.out  # and the summary's time split has it


def test_digits_torch_twin_runs(capsys):
    import digits_torch

    accuracy = digits_torch.main(["--epochs", "2"])
    assert 0.5 < accuracy <= 1.0


def test_char_lm_smoke_runs_and_samples(capsys, tmp_path):
    import char_lm

    bits = char_lm.main(["--smoke", "--run-dir", str(tmp_path)])
    assert 1.0 < bits < 8.5  # bits per byte: 8 is a uniform guess over 256 values
    out = capsys.readouterr().out
    assert "20 steps (" in out and "eager) in" in out
    assert "--- sample ---\ndef " in out
    assert list((tmp_path / "version_0" / "checkpoints").glob("*.safetensors"))


@pytest.mark.parametrize("script", ["digits.py", "char_lm.py", "tuned_digits.py"])
def test_example_help_shows_every_default_and_smoke(script):
    text = subprocess.run(
        [sys.executable, str(EXAMPLES / script), "--help"],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    ).stdout
    options_text = text.split("options:", 1)[1]
    options = [line.split()[0].rstrip(",") for line in options_text.splitlines() if line.strip()]
    options = [o for o in options if o.startswith("--") and o != "--help"]
    assert "--smoke" in options
    flat = " ".join(options_text.split())
    for option in options:  # each option's help, up to the next option, states its default
        section = flat.split(f" {option} ", 1)[1].split(" --", 1)[0]
        assert "(default:" in section, f"{script} {option} shows no default: {section!r}"


def test_lightfunc_version_flag():
    out = subprocess.run(
        [sys.executable, "-m", "lightfunc", "--version"],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    ).stdout
    assert out.startswith(f"lightfunc {lf.__version__} (torch ")


def test_tuned_digits_smoke_finds_a_rate_trains_with_ema_and_tracks_the_run(capsys, tmp_path):
    import tuned_digits
    from mlflow import MlflowClient

    results = tuned_digits.main(["--smoke", "--run-dir", str(tmp_path)])
    out = capsys.readouterr().out
    assert re.search(r"lr_find: (1\d|20) steps \((completed|diverged)\); suggested lr", out), out
    assert 0.3 < results["ema_acc"] <= 1.0 and 0.3 < results["params_acc"] <= 1.0
    db = tmp_path / "version_0" / "mlflow" / "mlflow.db"
    client = MlflowClient(f"sqlite:///{db}")
    (experiment,) = [e for e in client.search_experiments() if e.name == "digits"]
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FINISHED"
    assert float(run.data.params["lr_suggestion"]) > 0
    assert run.data.metrics["test_ema_acc"] == pytest.approx(results["ema_acc"])
    assert run.data.metrics["test_params_acc"] == pytest.approx(results["params_acc"])
