"""`lightfunc run` and `launch`: help, argument errors, a failing rank stops the group, and a
rank killed mid-run under `--max-restarts 1` resumes to the same parameters as an unbroken run.

Worker runs are subprocesses with timeouts, so a hang fails the test instead of stalling it."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import safetensors.torch
import torch

from lightfunc.__main__ import main
from lightfunc.distributed._launch import LaunchOptions, launch

SCRIPTS = Path(__file__).parent / "scripts"
REPO = Path(__file__).resolve().parents[1]


def _lightfunc(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "lightfunc", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


# -- the command line, in this process --------------------------------------------------


def test_help_lists_the_options(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["run", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for option in ("--nproc-per-node", "--nnodes", "--node-rank", "--master-addr"):
        assert option in out
    assert "--master-port" in out and "--max-restarts" in out and "$MASTER_ADDR" in out
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "run" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        ([], "the following arguments are required: COMMAND"),
        (["run", "x.py"], "the following arguments are required: --nproc-per-node"),
        (["run", "--nproc-per-node", "0", "x.py"], "--nproc-per-node must be >= 1, got 0"),
        (
            ["run", "--nproc-per-node", "two", "x.py"],
            "--nproc-per-node must be an integer, got 'two'",
        ),
        (["run", "--nproc-per-node", "2"], "the following arguments are required: SCRIPT"),
        (["run", "--nproc-per-node", "2", "missing.py"], "no script file at 'missing.py'"),
        (
            ["run", "--nproc-per-node", "2", "--nnodes", "2", "--node-rank", "2", __file__],
            "--node-rank 2 is out of range for --nnodes 2",
        ),
        (
            ["run", "--nproc-per-node", "2", "--master-port", "70000", __file__],
            "--master-port must be <= 65535",
        ),
        (
            ["run", "--nproc-per-node", "2", "--max-restarts", "-1", __file__],
            "--max-restarts must be >= 0",
        ),
        (["run", "--nproc-per-node", "2", "--bogus", __file__], "unrecognized arguments: --bogus"),
    ],
)
def test_bad_arguments_exit_2_with_a_message(
    argv: list[str],
    message: str,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_script_arguments_after_the_script_are_not_parsed(monkeypatch: pytest.MonkeyPatch) -> None:
    seen = {}

    def fake_run(script, script_args, options, *, module):  # type: ignore[no-untyped-def]
        seen.update(script=script, args=script_args, options=options, module=module)
        return 0

    monkeypatch.setattr("lightfunc.distributed._launch.run_script", fake_run)
    monkeypatch.setenv("MASTER_ADDR", "10.1.2.3")
    argv = ["run", "--nproc-per-node", "3", "--nnodes", "2", "--node-rank", "1", __file__]
    assert main([*argv, "--nproc-per-node", "7", "--lr", "0.1"]) == 0
    assert seen["args"] == ["--nproc-per-node", "7", "--lr", "0.1"]
    assert seen["options"] == LaunchOptions(3, nnodes=2, node_rank=1, master_addr="10.1.2.3")


def test_rendezvous_choice() -> None:
    local = LaunchOptions(2).config()
    assert (local.rdzv_backend, local.rdzv_endpoint) == ("c10d", "localhost:0")
    nodes = LaunchOptions(8, nnodes=2, node_rank=1, master_addr="10.0.0.1").config()
    assert (nodes.rdzv_backend, nodes.rdzv_endpoint) == ("static", "10.0.0.1:29500")
    assert nodes.rdzv_configs["rank"] == 1 and (nodes.min_nodes, nodes.max_nodes) == (2, 2)
    assert LaunchOptions(2, master_port=1234, max_restarts=3).config().max_restarts == 3


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"nproc_per_node": 0}, "`nproc_per_node` must be an integer >= 1, got 0"),
        (
            {"nproc_per_node": 2, "nnodes": 2, "node_rank": 2},
            r"`node_rank` must be an integer in \[0, nnodes=2\)",
        ),
        ({"nproc_per_node": 2, "max_restarts": -1}, "`max_restarts` must be an integer >= 0"),
        ({"nproc_per_node": 2, "nnodes": 2, "node_rank": 1}, "`master_addr` is required on node 1"),
        (
            {"nproc_per_node": 2, "master_port": 0},
            r"`master_port` must be an integer in \[1, 65535\]",
        ),
        ({"nproc_per_node": 2, "start_method": "thread"}, "`start_method` must be 'spawn', 'fork'"),
    ],
)
def test_launch_rejects_bad_arguments(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        launch(print, **kwargs)  # type: ignore[arg-type]


def test_launch_rejects_a_non_function() -> None:
    with pytest.raises(TypeError, match="`fn` must be a function"):
        launch("train.py", nproc_per_node=2)  # type: ignore[arg-type]


# -- real workers -------------------------------------------------------------------------


@pytest.mark.multiprocess
def test_a_rank_that_raises_stops_the_others() -> None:
    start = time.monotonic()
    done = _lightfunc("run", "--nproc-per-node", "2", str(SCRIPTS / "raise_on_rank.py"))
    assert done.returncode == 1
    assert time.monotonic() - start < 100  # rank 0 sleeps 600 s unless the launcher stops it
    assert "ValueError: boom on rank 1" in done.stderr  # the worker's own traceback
    assert "rank 1 (local rank 1, pid" in done.stderr and "exited with code 1" in done.stderr
    assert "then stopped by the launcher: rank 0" in done.stderr


@pytest.mark.multiprocess
def test_two_nodes_on_one_machine() -> None:
    with socket.socket() as s:  # a free port for node 0's rendezvous store
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    script = str(SCRIPTS / "two_nodes.py")
    common = ["--nnodes", "2", "--master-addr", "127.0.0.1", "--master-port", port]
    command = [sys.executable, "-m", "lightfunc", "run", "--nproc-per-node", "1", *common]
    nodes = [
        subprocess.Popen(
            [*command, "--node-rank", str(rank), script],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in (0, 1)
    ]
    try:
        outputs = [node.communicate(timeout=120) for node in nodes]
    finally:
        for node in nodes:
            node.kill()
            node.communicate()  # reap it: no zombie, no ResourceWarning in a later test
    for node, (_, err) in zip(nodes, outputs, strict=True):
        assert node.returncode == 0, err[-3000:]
    assert outputs[0][0].strip() == "rank 0 of 2 on node 0: 1.0"
    assert outputs[1][0].strip() == "rank 1 of 2 on node 1: 1.0"


@pytest.mark.multiprocess
def test_launch_from_python() -> None:
    done = subprocess.run(
        [sys.executable, str(SCRIPTS / "launch_fn.py")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    spawned, failed, after = (json.loads(line) for line in done.stdout.splitlines())
    assert spawned == {
        str(r): {"rank": r, "world": 2, "restart": 0, "threads": "1"} for r in range(2)
    }
    assert "rank 1 (local rank 1" in failed["error"]
    assert "ValueError: boom in a function" in failed["error"]
    assert after == {"omp_after": None}  # the launcher's environment changes were undone


def _start_training(
    tmp: Path, name: str, launcher: tuple[str, ...] = (), script: tuple[str, ...] = ()
) -> subprocess.Popen[bytes]:
    """`lightfunc run` of elastic_train.py on 2 processes, with extra launcher and script options."""
    command = [sys.executable, "-m", "lightfunc", "run", "--nproc-per-node", "2", *launcher]
    command += [str(SCRIPTS / "elastic_train.py"), "--dir", str(tmp / name)]
    command += ["--out", str(tmp / f"{name}.safetensors"), *script]
    with open(tmp / f"{name}.log", "w") as log:  # a file, not a pipe: nothing blocks on it
        return subprocess.Popen(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)


def _finish_training(
    run: subprocess.Popen[bytes], tmp: Path, name: str
) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    try:
        run.wait(timeout=240)
    finally:
        run.kill()
    assert run.returncode == 0, (tmp / f"{name}.log").read_text()[-4000:]
    starts = {p.stem: int(p.read_text()) for p in (tmp / name).glob("*.start")}
    return safetensors.torch.load_file(tmp / f"{name}.safetensors"), starts


@pytest.mark.multiprocess
@pytest.mark.slow
def test_killed_rank_restarts_and_resumes_bit_exactly(tmp_path: Path) -> None:
    unbroken = _start_training(tmp_path, "unbroken")  # both runs at once: they mostly wait
    killed = _start_training(tmp_path, "killed", ("--max-restarts", "1"), ("--die-at", "5"))
    reference, starts = _finish_training(unbroken, tmp_path, "unbroken")
    assert starts == {"attempt0-rank0": 0, "attempt0-rank1": 0}

    resumed, starts = _finish_training(killed, tmp_path, "killed")
    # rank 1 SIGKILLed itself after step 5; both ranks restarted from rank 0's newest checkpoint
    assert starts["attempt0-rank0"] == starts["attempt0-rank1"] == 0
    assert starts["attempt1-rank0"] == starts["attempt1-rank1"]
    assert 4 <= starts["attempt1-rank0"] <= 5
    assert reference.keys() == resumed.keys()
    for name in reference:
        assert torch.equal(reference[name], resumed[name]), name
