"""`lightfunc ckpt verify` and `lightfunc ckpt show`: checkpoints checked and described from a shell."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import lightfunc as lf
from lightfunc.__main__ import main
from lightfunc.distributed import save_sharded


def _run_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "ckpt"
    manager = lf.CheckpointManager(directory, every_n_steps=2)
    for step in (2, 4):
        state = {"w": torch.arange(6.0).reshape(2, 3) + step, "rng": lf.RngKey(5, step)}
        manager.update(lf.LoopState(state=state, step=step, epoch=1, batch_idx=step))
    return directory


def test_verify_gives_one_verdict_per_checkpoint_and_exit_code_0(tmp_path, capsys):
    directory = _run_dir(tmp_path)
    assert main(["ckpt", "verify", str(directory)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines[:3]] == ["OK", "OK", "OK"]
    assert re.search(
        r"step=4\.safetensors: step 4, epoch 1, batch_idx 4, .*checksums match", lines[2]
    )
    assert lines[-1] == "3 of 3 checkpoints verified"


def test_verify_fails_with_exit_code_1_and_names_the_damage(tmp_path, capsys):
    directory = _run_dir(tmp_path)
    damaged = directory / "step=2.safetensors"
    data = bytearray(damaged.read_bytes())
    data[-1] ^= 1  # tensor data
    damaged.write_bytes(bytes(data))
    header = directory / "step=4.safetensors"
    data = bytearray(header.read_bytes())
    at = data.index(b'\\"value\\": 4')  # the step counter in the header
    data[at + 10] ^= 1  # "4" -> "5"
    header.write_bytes(bytes(data))
    assert main(["ckpt", "verify", str(directory)]) == 1
    out = capsys.readouterr().out
    assert re.search(r"FAIL  .*step=2\.safetensors: Checksum mismatch for tensor `state\.w`", out)
    assert re.search(r"FAIL  .*step=4\.safetensors: .*has a damaged header: its CRC-32", out)
    # `last` is a hard link to step 4's file: damaged with it.
    assert re.search(r"FAIL  .*last\.safetensors: .*has a damaged header", out)
    assert out.splitlines()[-1] == "0 of 3 checkpoints verified"


def test_verify_of_a_missing_path_or_an_empty_directory_fails(tmp_path, capsys):
    assert main(["ckpt", "verify", str(tmp_path / "nowhere")]) == 1
    assert main(["ckpt", "verify", str(tmp_path)]) == 1
    assert capsys.readouterr().out.count("no checkpoint found") == 2


def test_verify_checks_a_sharded_directory_through_verify_sharded(tmp_path, capsys):
    sharded = save_sharded({"w": torch.ones(4), "step": 3, "epoch": 0}, tmp_path / "sharded")
    assert main(["ckpt", "verify", str(sharded)]) == 0
    assert re.search(
        r"OK    .*sharded: sharded, step 3, epoch 0, 1 stored tensors", capsys.readouterr().out
    )
    shard = next(sharded.glob("shard-*.safetensors"))
    data = bytearray(shard.read_bytes())
    data[-1] ^= 1
    shard.write_bytes(bytes(data))
    assert main(["ckpt", "verify", str(sharded)]) == 1
    assert "FAIL" in capsys.readouterr().out


def test_show_prints_counters_tree_sizes_and_metadata(tmp_path, capsys):
    directory = _run_dir(tmp_path)
    assert main(["ckpt", "show", str(directory / "step=4.safetensors")]) == 0
    out = capsys.readouterr().out
    assert "lightfunc checkpoint, written by lightfunc" in out
    assert "  step 4, epoch 1, batch_idx 4, eval_at_step -1" in out
    assert "size: 1 stored tensors, 24 B" in out
    assert '"reason": "scheduled"' in out
    assert re.search(r"state\.w +float32 +\[2, 3\] +24 B", out)
    assert re.search(r"state\.rng +RngKey\(seed=5, counter=4\)", out)
    assert main(["ckpt", "show", str(directory)]) == 0  # a directory: one line per checkpoint
    lines = capsys.readouterr().out.splitlines()
    assert lines == [
        "last.safetensors: step 4, epoch 1, batch_idx 4, eval_at_step -1, 1 stored tensors, 24 B",
        "step=2.safetensors: step 2, epoch 1, batch_idx 2, eval_at_step -1, 1 stored tensors, 24 B",
        "step=4.safetensors: step 4, epoch 1, batch_idx 4, eval_at_step -1, 1 stored tensors, 24 B",
    ]


def test_show_of_a_damaged_header_exits_1(tmp_path, capsys):
    path = tmp_path / "x.safetensors"
    path.write_bytes(b"not a checkpoint")
    assert main(["ckpt", "show", str(path)]) == 1
    assert "Cannot open the checkpoint" in capsys.readouterr().out


def test_the_command_runs_as_a_program(tmp_path):
    directory = _run_dir(tmp_path)
    done = subprocess.run(
        [sys.executable, "-m", "lightfunc", "ckpt", "verify", str(directory / "last.safetensors")],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0 and done.stdout.startswith("OK    ")
    with pytest.raises(SystemExit):  # argparse: a missing action is a usage error (exit 2)
        main(["ckpt"])


def test_verify_of_a_run_root_checks_every_version(tmp_path, capsys):
    for version in (0, 1):
        (tmp_path / "root" / f"version_{version}").mkdir(parents=True)
        _run_dir(tmp_path).rename(tmp_path / "root" / f"version_{version}" / "checkpoints")
    assert main(["ckpt", "verify", str(tmp_path / "root")]) == 0
    out = capsys.readouterr().out
    assert out.count("version_0/checkpoints/") == out.count("version_1/checkpoints/") == 3
    assert out.splitlines()[-1] == "6 of 6 checkpoints verified"
