"""Runs killed at random steps resume to the bit-identical result; SIGTERM saves and exits cleanly."""

import json
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors.torch
import torch

SCRIPT = Path(__file__).parent / "scripts" / "resume_run.py"
MAX_STEPS = 40

pytestmark = pytest.mark.slow


def _command(directory: Path, out: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        str(SCRIPT),
        "--dir",
        str(directory),
        "--out",
        str(out),
        "--max-steps",
        str(MAX_STEPS),
        *extra,
    ]


def _run_to_end(directory: Path, out: Path, *extra: str) -> dict[str, torch.Tensor]:
    done = subprocess.run(
        _command(directory, out, *extra), capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().endswith("done")
    return safetensors.torch.load_file(out)


def _run_until(directory: Path, out: Path, step: int, sig: int) -> tuple[int, list[int]]:
    """Start a run, send `sig` once it has printed `step`, return its exit code and the steps it printed."""
    printed = []
    with subprocess.Popen(
        _command(directory, out), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    ) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.startswith("step "):
                printed.append(int(line.split()[1]))
                if printed[-1] == step:
                    proc.send_signal(sig)
                    break
        rest, _ = proc.communicate(timeout=300)
    printed += [int(line.split()[1]) for line in rest.splitlines() if line.startswith("step ")]
    return proc.returncode, printed


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict[str, torch.Tensor]:
    root = tmp_path_factory.mktemp("reference")
    return _run_to_end(root / "ckpt", root / "final.safetensors")


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_run_killed_at_a_random_step_resumes_to_the_same_parameters(tmp_path, reference, seed):
    kill_at = random.Random(seed).randint(3, MAX_STEPS - 3)
    code, printed = _run_until(
        tmp_path / "ckpt", tmp_path / "x.safetensors", kill_at, signal.SIGKILL
    )
    assert code == -signal.SIGKILL and printed[-1] < MAX_STEPS
    final = _run_to_end(tmp_path / "ckpt", tmp_path / "final.safetensors")
    assert final.keys() == reference.keys()
    for name in reference:
        assert torch.equal(final[name], reference[name]), name


def test_a_run_killed_while_writing_a_checkpoint_resumes_from_the_previous_one(tmp_path, reference):
    directory = tmp_path / "ckpt"
    died = subprocess.run(
        _command(directory, tmp_path / "x.safetensors", "--die-while-saving", "20"),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert died.returncode == -signal.SIGKILL
    assert not (directory / "step=20.safetensors").exists()
    assert list(directory.glob(".*.tmp")), (
        "the half-written checkpoint should be left as a temporary file"
    )
    assert (directory / "step=15.safetensors").exists()
    final = _run_to_end(directory, tmp_path / "final.safetensors")
    assert not list(directory.glob(".*.tmp")), "orphaned temporary files are cleaned up on restart"
    for name in reference:
        assert torch.equal(final[name], reference[name]), name


def test_sigterm_saves_the_last_completed_step_and_exits_cleanly(tmp_path, reference):
    directory = tmp_path / "ckpt"
    code, printed = _run_until(directory, tmp_path / "x.safetensors", 12, signal.SIGTERM)
    assert code == 0
    index = json.loads((directory / "index.json").read_text())["checkpoints"]
    assert index[-1]["reason"] == "sigterm" and index[-1]["step"] == printed[-1]
    final = _run_to_end(directory, tmp_path / "final.safetensors")
    for name in reference:
        assert torch.equal(final[name], reference[name]), name
