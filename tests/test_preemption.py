"""Preemption all ranks agree on, and collectives that end instead of hanging.

In one process: SIGTERM, SIGINT and SIGUSR1 stop `loop` cleanly at the step
boundary while a callback handles interrupts (the manager saves), a second
SIGINT force-quits, the previous handlers come back. Under `lightfunc run`
with 2 processes (the README's pattern: DDP, every rank holds the manager):
SIGTERM to one rank, or to the launcher, stops both ranks at the same step,
both exit 0, and the resumed run ends bit-identical to an uninterrupted one.
A rank that stops taking part ends the run after the collective timeout.
"""

from __future__ import annotations

import datetime
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import safetensors.torch
import torch
from helpers import make_data, make_model, make_steps

import lightfunc as lf
import lightfunc.distributed as lfd
from lightfunc.distributed._mesh import collective_timeout

SCRIPTS = Path(__file__).parent / "scripts"
REPO = Path(__file__).resolve().parents[1]
_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)


class Interrupts(lf.callbacks.Callback):
    def __init__(self) -> None:
        self.events: list[tuple[str, int]] = []

    def on_interrupt(self, ls: lf.LoopState, reason: str) -> None:
        self.events.append((reason, ls.step))

    def on_end(self, ls: lf.LoopState) -> None:
        self.events.append(("end", ls.step))


def _run(callbacks: list[Any], signals: dict[int, list[int]]) -> list[int]:
    """Iterate a 5-epoch loop; after step k, send this process each signal in `signals[k]`."""
    model = make_model()
    train_step, _ = make_steps(model)
    step = lf.build(train_step, compile=False)
    state = lf.TrainState.create(model, lf.optim.adamw(1e-2), seed=0)
    seen = []
    for ls in lf.loop(step, state, make_data(), max_epochs=5, callbacks=callbacks):
        seen.append(ls.step)
        for number in signals.get(ls.step, []):
            os.kill(os.getpid(), number)
    return seen


# -- one process ---------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def _python_sigint():
    """Python's own SIGINT handler during each test, as in a run started in the foreground.

    A process started in the background by a non-interactive shell inherits SIGINT ignored, and
    Python then leaves it ignored; the tests of what a second Ctrl-C does need Python's handler.
    """
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


@pytest.mark.parametrize("number", _STOP_SIGNALS, ids=lambda n: signal.Signals(n).name)
def test_a_stop_signal_saves_the_step_and_stops_cleanly(number: int, tmp_path: Path) -> None:
    before = {n: signal.getsignal(n) for n in _STOP_SIGNALS}
    manager = lf.CheckpointManager(tmp_path, every_n_steps=100)
    recorder = Interrupts()
    assert _run([manager, recorder], {2: [number]}) == [1, 2]  # no KeyboardInterrupt for SIGINT
    assert recorder.events == [("sigterm", 2), ("end", 2)]
    index = json.loads((tmp_path / "index.json").read_text())["checkpoints"]
    assert [(e["step"], e["reason"]) for e in index] == [(2, "sigterm")]
    assert {n: signal.getsignal(n) for n in _STOP_SIGNALS} == before  # handlers put back


def test_a_second_sigint_raises_keyboard_interrupt_at_once() -> None:
    recorder = Interrupts()
    with pytest.raises(KeyboardInterrupt):
        _run([recorder], {2: [signal.SIGINT, signal.SIGINT]})
    assert recorder.events == []  # forced out: nothing saved, no on_end
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_sigint_after_sigterm_force_quits_too() -> None:
    with pytest.raises(KeyboardInterrupt):
        _run([Interrupts()], {3: [signal.SIGTERM, signal.SIGINT]})


def test_without_a_callback_that_handles_interrupts_sigint_is_python_s() -> None:
    with pytest.raises(KeyboardInterrupt):
        _run([], {2: [signal.SIGINT]})


def test_one_process_agrees_with_itself_without_a_collective() -> None:
    assert lf.SingleProcess().agree_to_stop(True) is True
    assert lf.SingleProcess().agree_to_stop(False) is False
    ddp = lfd.DDP(lfd.Mesh.single())
    assert (ddp.agree_to_stop(True), ddp.agree_to_stop(False)) == (True, False)


# -- the collective timeout ---------------------------------------------------------------------


def test_collective_timeout_from_the_argument_the_environment_or_the_default(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("LIGHTFUNC_COLLECTIVE_TIMEOUT", raising=False)
    assert collective_timeout() == datetime.timedelta(minutes=10)
    assert collective_timeout(2.5) == datetime.timedelta(seconds=2.5)
    assert collective_timeout(datetime.timedelta(seconds=7)) == datetime.timedelta(seconds=7)
    monkeypatch.setenv("LIGHTFUNC_COLLECTIVE_TIMEOUT", "30")
    assert collective_timeout() == datetime.timedelta(seconds=30)
    assert collective_timeout(5) == datetime.timedelta(seconds=5)  # the argument wins


@pytest.mark.parametrize("timeout", ["10", True])
def test_a_timeout_of_another_type_is_refused(timeout: Any) -> None:
    with pytest.raises(TypeError, match=r"`timeout` must be a datetime.timedelta or seconds, got"):
        lfd.init_mesh(accelerator="cpu", timeout=timeout)


@pytest.mark.parametrize(
    ("timeout", "env", "message"),
    [
        (0, None, r"`timeout` must be a positive, finite duration, got 0"),
        (-1.0, None, r"`timeout` must be a positive, finite duration, got -1.0"),
        (float("inf"), None, r"`timeout` must be a positive, finite duration, got inf"),
        (datetime.timedelta(0), None, r"`timeout` must be a positive, finite duration"),
        (None, "soon", r"\$LIGHTFUNC_COLLECTIVE_TIMEOUT must be a number of seconds, got 'soon'"),
        (None, "0", r"\$LIGHTFUNC_COLLECTIVE_TIMEOUT must be a positive, finite duration"),
    ],
)
def test_bad_timeouts_are_refused(
    timeout: Any, env: str | None, message: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    if env is None:
        monkeypatch.delenv("LIGHTFUNC_COLLECTIVE_TIMEOUT", raising=False)
    else:
        monkeypatch.setenv("LIGHTFUNC_COLLECTIVE_TIMEOUT", env)
    with pytest.raises(ValueError, match=message):
        lfd.init_mesh(accelerator="cpu", timeout=timeout)


# -- two processes under `lightfunc run` ------------------------------------------------------


def _start(
    tmp: Path,
    name: str,
    *script_args: str,
    launcher: tuple[str, ...] = (),
    env: dict[str, str] | None = None,
) -> Any:
    """`lightfunc run` of preempt_train.py on 2 processes, output in tmp/name.log."""
    command = [sys.executable, "-m", "lightfunc", "run", "--nproc-per-node", "2", *launcher]
    command += [str(SCRIPTS / "preempt_train.py"), "--dir", str(tmp / name)]
    command += ["--out", str(tmp / f"{name}.safetensors"), *script_args]
    with open(tmp / f"{name}.log", "a") as log:  # a file, not a pipe: nothing blocks on it
        return subprocess.Popen(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                                env={**os.environ, **(env or {})})  # fmt: skip


def _wait(run: Any, tmp: Path, name: str, code: int = 0, timeout: float = 240) -> str:
    try:
        run.wait(timeout=timeout)
    finally:
        run.kill()
        run.wait()
    log = (tmp / f"{name}.log").read_text()
    assert run.returncode == code, log[-4000:]
    return log


def _read(path: Path) -> int | None:
    try:
        return int(path.read_text())
    except (FileNotFoundError, ValueError):
        return None


def _signal_after(tmp: Path, name: str, step: int, pid: Any, number: int = signal.SIGTERM) -> None:
    """Send `number` to `pid` (a pid, or "rank R") once rank 1 finished `step`."""
    deadline = time.monotonic() + 180
    while (_read(tmp / name / "rank1.progress") or 0) < step:
        assert time.monotonic() < deadline, (tmp / f"{name}.log").read_text()[-4000:]
        time.sleep(0.05)
    if isinstance(pid, str):
        pid = _read(tmp / name / f"{pid.replace(' ', '')}.pid")
    os.kill(pid, number)


def _params(tmp: Path, name: str) -> dict[str, torch.Tensor]:
    return safetensors.torch.load_file(tmp / f"{name}.safetensors")


@pytest.mark.multiprocess
@pytest.mark.slow
def test_sigterm_to_one_rank_or_the_launcher_stops_all_and_resumes_bit_exactly(
    tmp_path: Path,
) -> None:
    sleep = ("--step-sleep", "0.25")  # time for the signal to land mid-run
    unbroken = _start(tmp_path, "unbroken")  # all four at once: they mostly wait
    one_rank = _start(tmp_path, "one_rank", *sleep)
    launcher = _start(tmp_path, "launcher", *sleep)
    # The old pattern: only rank 0's loop has a manager. The ranks agree at the start that
    # one of them listens, so rank 1 takes part in the agreement too.
    rank0_manager = _start(tmp_path, "rank0_manager", *sleep, "--manager-on-rank0")
    _signal_after(tmp_path, "one_rank", 3, "rank 1")  # the signal reaches rank 1 only
    _signal_after(tmp_path, "launcher", 3, launcher.pid)  # torch's agent forwards it to both
    _signal_after(tmp_path, "rank0_manager", 3, "rank 1")  # to the rank without the manager
    _wait(unbroken, tmp_path, "unbroken")
    _wait(one_rank, tmp_path, "one_rank")  # every worker saved and exited 0
    _wait(rank0_manager, tmp_path, "rank0_manager")
    log = _wait(launcher, tmp_path, "launcher", code=128 + signal.SIGTERM)
    assert "lightfunc run: stopped by SIGTERM, which was forwarded to the workers." in log
    stops = {}
    for name in ("one_rank", "launcher", "rank0_manager"):
        run_dir = tmp_path / name
        ends = {_read(run_dir / f"run0-rank{r}.end") for r in (0, 1)}
        assert len(ends) == 1, ends  # both ranks stopped after the same step
        (stopped,) = ends
        assert stopped is not None and 3 <= stopped < 12
        assert not (tmp_path / f"{name}.safetensors").exists()
        # The manager's schedule never saves: the only checkpoint is the stop's.
        index = json.loads((run_dir / "ckpt" / "index.json").read_text())["checkpoints"]
        assert [(e["step"], e["reason"]) for e in index] == [(stopped, "sigterm")]
        stops[name] = stopped
    del stops["rank0_manager"]  # its resume is the others'
    resumes = {name: _start(tmp_path, name) for name in stops}  # to the end, both at once
    reference = _params(tmp_path, "unbroken")
    for name, stopped in stops.items():
        _wait(resumes[name], tmp_path, name)
        starts = {_read(tmp_path / name / f"run1-rank{r}.start") for r in (0, 1)}
        assert starts == {stopped}  # resumed from the step it stopped at: no step lost
        resumed = _params(tmp_path, name)
        assert resumed.keys() == reference.keys()
        for key in reference:
            assert torch.equal(resumed[key], reference[key]), (name, key)


@pytest.mark.multiprocess
@pytest.mark.parametrize("where", ["agreement", pytest.param("step", marks=pytest.mark.slow)])
def test_a_rank_that_stops_taking_part_ends_the_run_after_the_collective_timeout(
    where: str, tmp_path: Path
) -> None:
    # Rank 1 sleeps after step 2; rank 0 waits for it in the next collective, which gives up
    # after LIGHTFUNC_COLLECTIVE_TIMEOUT seconds; then the launcher stops rank 1. That
    # collective is the loop's stop agreement (a manager handles interrupts), or without a
    # manager the DDP step's gradient all-reduce.
    start = time.monotonic()
    extra = ("--no-checkpoint",) if where == "step" else ()
    run = _start(tmp_path, "hang", "--hang-at", "2", *extra,
                 env={"LIGHTFUNC_COLLECTIVE_TIMEOUT": "3"})  # fmt: skip
    log = _wait(run, tmp_path, "hang", code=1, timeout=120)
    assert time.monotonic() - start < 100  # not rank 1's 600 s
    if where == "agreement":  # the mesh's collectives say which timeout and how to change it
        assert "TimeoutError: rank 0: the collective `any` waited longer than the collective " \
               "timeout (3 s)" in log  # fmt: skip
        assert "LIGHTFUNC_COLLECTIVE_TIMEOUT=SECONDS" in log
    else:  # inside the step: gloo's own words
        assert "Timed out waiting 3000ms" in log
    assert "rank 0 (local rank 0, pid" in log  # the launcher names the failed rank
