"""WandbLogger and MLflowLogger, read back through the trackers' own readers; no mocks.

W&B runs offline, its files under `tmp_path`, no server reachable, and the
run file is read with `wandb leet inspect` (the reader of `.wandb` logs that
ships with wandb). MLflow writes to its default SQLite store in the run's
directory, and to a real `mlflow server` started on 127.0.0.1 by the test;
both are read back with `MlflowClient`. Each run logs beside a `JSONLLogger`
(the reference: what lightfunc logged), and the tracker must hold exactly
that, plus its final summary.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch
from helpers import DEVICE_READS, make_data, make_model, make_steps

import lightfunc as lf
from lightfunc.loggers import JSONLLogger, MLflowLogger, WandbLogger
from lightfunc.loggers._tensorboard_logger import flatten_hparams

DATA = make_data(n=100, batch_size=32)  # 4 batches per epoch
HPARAMS = {"lr": 0.1, "layers": [16, 3], "optim": {"name": "sgd", "nesterov": False}, "tag": None}
EVERY = (
    3  # log the train metrics every 3 steps: 8 steps -> train at 3, 6; evaluations at 3, 4, 6, 8
)
QUIET_WANDB = {"console": "off", "x_disable_stats": True}


def _setup():
    model = make_model()
    train_step, eval_step = make_steps(model)
    state = lf.TrainState.create(model, lf.optim.sgd(0.1), seed=0)
    return lf.build(train_step, compile=False), lf.build_eval(eval_step, compile=False), state


def _run(callbacks):
    """8 eager steps over DATA, evaluated every 3 steps and at each epoch's end."""
    step, evaluate, state = _setup()
    options = {"eval_step": evaluate, "eval_data": DATA, "eval_every": 3}
    return list(lf.loop(step, state, DATA, max_epochs=2, callbacks=callbacks, **options))


class Boom(lf.callbacks.Callback):
    """Raises in `on_step` at `step`, as a failing step would (the others get `on_interrupt`)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step(self, ls):
        if ls.step == self.step:
            raise RuntimeError(f"boom at step {ls.step}")


class Preempt(lf.callbacks.Callback):
    """Sends this process SIGTERM at `step`; overriding `on_interrupt` makes the loop catch it
    (and stop cleanly after that step), as a `CheckpointManager` does."""

    def __init__(self, step: int) -> None:
        self.step, self.reasons = step, []

    def on_step(self, ls):
        if ls.step == self.step:
            os.kill(os.getpid(), signal.SIGTERM)

    def on_interrupt(self, ls, reason):
        self.reasons.append(reason)


def _reference(logger: JSONLLogger) -> list[dict]:
    """The JSONL logger's records: {"step", "epoch", "metrics"} per logging event."""
    return [json.loads(line) for line in logger.metrics_file.read_text().splitlines()]


# Weights & Biases, offline ------------------------------------------------------------------


@pytest.fixture
def wandb_env(tmp_path, monkeypatch):
    """W&B offline and quiet, writing only under `tmp_path`, with no server to reach.

    The `wandb-core` service W&B starts inherits this environment (its own debug
    log goes to `WANDB_CACHE_DIR`), so it is stopped after the test.
    """
    home = tmp_path / "home"
    env = {
        "WANDB_MODE": "offline",
        "WANDB_SILENT": "true",
        "WANDB_CONSOLE": "off",
        "WANDB_DIR": str(home / "default_dir"),  # W&B's own default: must stay unused
        "WANDB_CACHE_DIR": str(home / "cache"),
        "WANDB_CONFIG_DIR": str(home / "config"),
        "WANDB_DATA_DIR": str(home / "data"),
        "WANDB_BASE_URL": "http://127.0.0.1:9",  # nothing listens there: no upload can succeed
        "HOME": str(home),
        "XDG_CACHE_HOME": str(home / "xdg_cache"),
        "XDG_CONFIG_HOME": str(home / "xdg_config"),
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    for name in ("WANDB_API_KEY", "WANDB_PROJECT", "WANDB_ENTITY", "WANDB_RUN_ID"):
        monkeypatch.delenv(name, raising=False)
    yield home
    import wandb

    wandb.teardown()  # stop the service started with this environment


def _inspect(run_file: Path, *args: str) -> str:
    """What `wandb leet inspect --json [args] run_file` prints: wandb's own reader of a .wandb
    log, in `wandb-core`. Called as that CLI calls it, without starting Python again."""
    from wandb.util import get_core_path

    cmd = [get_core_path(), "leet", "inspect", "--no-observability", "--json", *args]
    cmd += ["--run-file", str(run_file), str(run_file.parent.parent)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout


def _wandb_history(run_file: Path) -> list[dict]:
    """The run's history rows, without W&B's own `_step`, `_runtime`, `_timestamp`."""
    records = [json.loads(line) for line in _inspect(run_file).splitlines()]
    rows = [r["history"]["item"] for r in records if r["type"] == "history"]
    return [{k: v for k, v in row.items() if not k.startswith("_")} for row in rows]


def _wandb_run(run_file: Path) -> dict:
    """The run as W&B reads it back: state, exit code, config, summary (W&B's keys dropped)."""
    run = json.loads(_inspect(run_file, "--summary"))
    run["config"] = {k: v for k, v in run["config"].items() if not k.startswith("_")}
    run["summary"] = {k: v for k, v in run["summary"].items() if not k.startswith("_")}
    return run


def _run_files(log_dir: Path) -> list[Path]:
    """The `.wandb` logs under a WandbLogger's directory, oldest first."""
    return sorted((log_dir / "wandb").glob("offline-run-*/run-*.wandb"))


def test_wandb_offline_run_holds_the_logged_metrics_config_and_final_summary(tmp_path, wandb_env):
    reference = JSONLLogger(tmp_path, name="reference", log_every_n_steps=EVERY, hparams=HPARAMS)
    logger = WandbLogger(
        tmp_path,
        name="wandb",
        log_every_n_steps=EVERY,
        hparams=HPARAMS,
        project="lightfunc-tests",
        run_name="tiny",
        mode="offline",
        settings=QUIET_WANDB,
        init_kwargs={"tags": ["tiny", "cpu"], "notes": "a test run"},
    )
    states = _run([reference, logger])
    final = states[-1]
    assert final.step == 8 and logger.run is None  # finished at the end

    (run_file,) = _run_files(tmp_path / "wandb")
    assert run_file.name == f"run-{logger.run_id}.wandb"
    expected = [
        {**r["metrics"], "step": r["step"], "epoch": r["epoch"]} for r in _reference(reference)
    ]
    assert [row["step"] for row in expected] == [3, 4, 6, 8]
    assert _wandb_history(run_file) == expected  # exact floats, each record once, in order

    run = _wandb_run(run_file)
    assert (run["state"], run["exit_code"], run["name"], run["project"]) == (
        "finished",
        0,
        "tiny",
        "lightfunc-tests",
    )
    assert (run["tags"], run["notes"]) == (["tiny", "cpu"], "a test run")
    assert run["config"] == HPARAMS
    # The summary holds the final values: step 8's train loss (not a train logging step,
    # so not in the history), the last evaluation's, the last step and epoch.
    assert run["summary"] == {
        "loss": float(final.metrics["loss"]),
        "val_loss": float(final.eval_metrics["loss"]),
        "val_acc": float(final.eval_metrics["acc"]),
        "step": 8,
        "epoch": 1,
    }
    assert run["summary"]["loss"] != expected[2]["loss"]  # not merely the last logged value

    # Test metrics after the run reopen the same W&B run (offline: a second log, synced into it).
    logger.log_metrics({"loss": 0.25}, step=final.step, epoch=final.epoch, prefix="test")
    logger.close()
    first, second = _run_files(tmp_path / "wandb")
    assert first == run_file and second.name == run_file.name
    assert _wandb_history(second) == [{"test_loss": 0.25, "step": 8, "epoch": 1}]

    # Everything W&B wrote is in the logger's directory (and the service's debug log in the cache).
    assert sorted(p.name for p in tmp_path.iterdir()) == ["home", "reference", "wandb"]
    assert not (wandb_env / "default_dir").exists()


def test_wandb_run_of_a_failing_step_is_marked_failed(tmp_path, wandb_env):
    logger = WandbLogger(tmp_path, log_every_n_steps=2, mode="offline", settings=QUIET_WANDB)
    with pytest.raises(RuntimeError, match="boom at step 5"):
        _run([logger, Boom(5)])
    assert logger.run is None
    (run_file,) = _run_files(logger.log_dir)
    run = _wandb_run(run_file)
    assert (run["state"], run["exit_code"]) == ("failed", 1)
    assert [row["step"] for row in _wandb_history(run_file)] == [2, 3, 4]


# MLflow -----------------------------------------------------------------------------------


def _mlflow_expected(reference: JSONLLogger, final) -> dict[str, list[tuple[int, float]]]:
    """Each metric's (step, value) history: the reference's records (with `epoch`), plus the
    last step's train metrics when that step did not log them."""
    history: dict[str, list[tuple[int, float]]] = {}
    for record in _reference(reference):
        for name, value in {**record["metrics"], "epoch": record["epoch"]}.items():
            history.setdefault(name, []).append((record["step"], float(value)))
    for name, value in {**final.metrics, "epoch": final.epoch}.items():
        if history[name][-1][0] != final.step:
            history[name].append((final.step, float(value)))
    return history


def _mlflow_history(client, run_id: str) -> dict[str, list[tuple[int, float]]]:
    run = client.get_run(run_id)
    return {
        name: [(m.step, m.value) for m in client.get_metric_history(run_id, name)]
        for name in run.data.metrics
    }


@pytest.mark.slow
def test_mlflow_default_store_in_the_run_directory_through_fit(tmp_path, capsys):
    from mlflow.tracking import MlflowClient

    run_dir = tmp_path / "run"
    logger = MLflowLogger(
        run_dir, name="logs", log_every_n_steps=EVERY, run_name="tiny", tags={"team": "tests"}
    )
    reference = JSONLLogger(run_dir, name="reference", log_every_n_steps=EVERY)
    step, evaluate, state = _setup()
    final = lf.fit(
        step,
        state,
        DATA,
        max_epochs=2,
        eval_step=evaluate,
        eval_data=DATA,
        eval_every=3,
        logger=logger,
        callbacks=[reference],
        hparams=HPARAMS,  # `fit` adds max_epochs and logs them to every logger
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path / "root",
    )
    assert f"logs        {run_dir / 'logs'}" in capsys.readouterr().out  # fit's summary
    assert logger.tracking_uri == f"sqlite:///{run_dir / 'logs' / 'mlflow.db'}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # nothing outside the run

    client = MlflowClient(tracking_uri=logger.tracking_uri)
    run = client.get_run(logger.run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "tiny"
    assert run.data.tags["team"] == "tests"
    logged = json.loads((run_dir / "reference" / "hparams.json").read_text())
    assert logged == {**HPARAMS, "max_epochs": 2}
    assert run.data.params == {k: str(v) for k, v in flatten_hparams(logged).items()}
    assert run.data.params["optim/nesterov"] == "False" and run.data.params["layers"] == "[16, 3]"
    history = _mlflow_history(client, logger.run_id)
    assert history == _mlflow_expected(reference, final)
    assert history["loss"][-1] == (8, float(final.metrics["loss"]))  # the final loss, at step 8
    assert run.data.metrics["loss"] == float(final.metrics["loss"])  # MLflow's latest value
    experiment = client.get_experiment(run.info.experiment_id)
    assert experiment.name == "lightfunc"
    assert experiment.artifact_location == (run_dir / "logs" / "artifacts").as_uri()

    # MLflow params are immutable: a new value is refused before anything is written.
    with pytest.raises(ValueError, match=r"params cannot change .*`lr`: '0.1' -> '0.5'"):
        logger.log_hyperparams({"lr": 0.5, "batch": 32})
    assert logger.hparams == {**HPARAMS, "max_epochs": 2}
    # New keys are added, in batches of at most 100 params (MLflow's limit per call).
    extra = {f"extra_{i}": i for i in range(150)}
    logger.log_hyperparams(extra)
    params = client.get_run(logger.run_id).data.params
    assert params == {k: str(v) for k, v in flatten_hparams({**logged, **extra}).items()}
    # A closed logger reopens the run for test metrics and ends it again after the write: it
    # used to stay RUNNING in the store for good unless `close` was called once more.
    logger.log_metrics({"loss": 0.25}, step=final.step, epoch=final.epoch, prefix="test")
    assert client.get_run(logger.run_id).info.status == "FINISHED"
    logger.close()  # nothing left to do
    run = client.get_run(logger.run_id)
    assert run.info.status == "FINISHED"
    assert [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "test_loss")] == [
        (8, 0.25)
    ]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def mlflow_server(tmp_path):
    """A real `mlflow server` on 127.0.0.1 (SQLite store, artifacts under tmp_path); its URI.

    Started in its own process group, which is killed afterwards, whatever happened.
    """
    port = _free_port()
    store = tmp_path / "server"
    store.mkdir()
    cmd = [
        *(sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port)),
        *("--backend-store-uri", f"sqlite:///{store / 'mlflow.db'}"),
        *("--default-artifact-root", str(store / "artifacts"), "--workers", "1"),
    ]
    # No background job runner (it starts seven more processes the test does not need).
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    with open(store / "server.log", "wb") as log:
        server = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                with urllib.request.urlopen(f"{uri}/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(
                    f"mlflow server did not start:\n{(store / 'server.log').read_text()}"
                )
            time.sleep(0.25)
        yield uri
    finally:
        # SIGKILL to the whole group (server and uvicorn worker): a graceful stop waits for
        # the client's keep-alive connections, seconds for nothing; the store is thrown away.
        os.killpg(server.pid, signal.SIGKILL)
        server.wait(timeout=30)


@pytest.mark.slow
@pytest.mark.multiprocess
def test_mlflow_tracking_server_round_trip(tmp_path, mlflow_server):
    from mlflow.tracking import MlflowClient

    logger = MLflowLogger(
        tmp_path,
        name="logs",
        log_every_n_steps=EVERY,
        hparams=HPARAMS,
        tracking_uri=mlflow_server,
        experiment_name="served",
    )
    reference = JSONLLogger(tmp_path, name="reference", log_every_n_steps=EVERY)
    final = _run([reference, logger])[-1]
    client = MlflowClient(tracking_uri=mlflow_server)
    run = client.get_run(logger.run_id)
    assert run.info.status == "FINISHED"
    assert client.get_experiment(run.info.experiment_id).name == "served"
    assert run.data.params == {k: str(v) for k, v in flatten_hparams(HPARAMS).items()}
    assert _mlflow_history(client, logger.run_id) == _mlflow_expected(reference, final)
    # With a tracking URI given, nothing but the reference is written in the run's directory.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["reference", "server"]

    # Another logger given the run's id logs into that run.
    again = MLflowLogger(tmp_path, tracking_uri=mlflow_server, run_id=logger.run_id)
    again.log_metrics({"acc": 0.5}, step=final.step, prefix="test")
    again.close()
    assert client.get_run(logger.run_id).data.metrics["test_acc"] == 0.5
    assert client.get_run(logger.run_id).info.status == "FINISHED"

    # A step that raises: the run is marked FAILED, with the steps logged before it.
    failing = MLflowLogger(tmp_path, log_every_n_steps=2, tracking_uri=mlflow_server)
    with pytest.raises(RuntimeError, match="boom at step 5"):
        _run([failing, Boom(5)])
    run = client.get_run(failing.run_id)
    assert run.info.status == "FAILED"
    assert [m.step for m in client.get_metric_history(failing.run_id, "loss")] == [2, 4]

    # Preempted (SIGTERM, or Ctrl-C): the loop stops after the step, the run is KILLED.
    preempted, preempt = (
        MLflowLogger(tmp_path, log_every_n_steps=2, tracking_uri=mlflow_server),
        Preempt(3),
    )
    states = _run([preempted, preempt])
    assert (states[-1].step, preempt.reasons) == (3, ["sigterm"])
    run = client.get_run(preempted.run_id)
    assert run.info.status == "KILLED"
    # Step 3 was not a logging step: its loss is added at the end, as the final value.
    assert [(m.step, m.value) for m in client.get_metric_history(preempted.run_id, "loss")][1:] == [
        (3, float(states[-1].metrics["loss"]))
    ]


# Both trackers -------------------------------------------------------------------------------


class _Reads(lf.callbacks.Callback):
    """Forbids (`forbid=True`) or allows again every device read, in each hook: placed on
    both sides of a logger, it makes any read inside the logger's hooks raise."""

    def __init__(self, saved: dict, *, forbid: bool) -> None:
        self.saved, self.forbid = saved, forbid

    def describe(self) -> str:
        return str(self.forbid)

    def _switch(self, *args) -> None:
        for name in DEVICE_READS:
            if self.forbid:
                self.saved.setdefault(name, getattr(torch.Tensor, name))
                setattr(torch.Tensor, name, _forbidden)
            else:
                setattr(torch.Tensor, name, self.saved[name])

    on_start = on_step_end = on_end = _switch


def _forbidden(*args, **kwargs):
    raise AssertionError("a rank-1 logger read a tensor")


@pytest.mark.parametrize("cls", [WandbLogger, MLflowLogger])
def test_other_ranks_create_no_run_and_read_nothing(tmp_path, cls):
    step, evaluate, state = _setup()
    logger = cls(tmp_path, log_every_n_steps=1, rank=1, hparams=HPARAMS)
    saved: dict = {}
    guarded = [_Reads(saved, forbid=True), logger, _Reads(saved, forbid=False)]
    try:
        list(lf.loop(step, state, DATA, eval_step=evaluate, eval_data=DATA, callbacks=guarded))
    finally:
        for name, method in saved.items():
            setattr(torch.Tensor, name, method)
    assert saved  # the guard was on
    logger.log_hyperparams({"lr": 0.5})
    logger.log_metrics({"loss": 1.0}, step=1)
    logger.close()
    assert logger.run_id is None
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(("cls", "extra"), [(WandbLogger, "wandb"), (MLflowLogger, "mlflow")])
def test_a_missing_tracker_names_its_extra(tmp_path, monkeypatch, cls, extra):
    monkeypatch.setitem(sys.modules, extra, None)  # what `import` sees when it is not installed
    with pytest.raises(ModuleNotFoundError, match=rf"pip install 'lightfunc\[{extra}\]'"):
        cls(tmp_path)


def test_bad_arguments_are_refused_with_the_argument_named(tmp_path):
    with pytest.raises(ValueError, match=r"`mode` must be one of 'online', 'offline', 'disabled'"):
        WandbLogger(tmp_path, mode="cloud")
    with pytest.raises(TypeError, match=r"`project` must be a string or None, got int 3"):
        WandbLogger(tmp_path, project=3)
    with pytest.raises(TypeError, match=r"`settings` must be a mapping .* got list"):
        WandbLogger(tmp_path, settings=["console"])
    with pytest.raises(ValueError, match=r"`init_kwargs` may not set 'dir', 'config'"):
        WandbLogger(tmp_path, init_kwargs={"dir": "elsewhere", "config": {}, "group": "g"})
    with pytest.raises(
        TypeError, match=r"`tracking_uri` must be a URI string or None, got the path"
    ):
        MLflowLogger(tmp_path, tracking_uri=tmp_path / "mlflow.db")
    with pytest.raises(TypeError, match=r"`tracking_uri` must be a string or None, got int 5000"):
        MLflowLogger(tmp_path, tracking_uri=5000)
    with pytest.raises(ValueError, match=r"`tracking_uri` is empty"):
        MLflowLogger(tmp_path, tracking_uri="")
    with pytest.raises(TypeError, match=r"`experiment_name` must be a string, got int 1"):
        MLflowLogger(tmp_path, experiment_name=1)
    with pytest.raises(ValueError, match=r"`experiment_name` must be non-empty"):
        MLflowLogger(tmp_path, experiment_name="")
    with pytest.raises(TypeError, match=r"`tags` values must be strings, got \{'epochs': 3\}"):
        MLflowLogger(tmp_path, tags={"team": "a", "epochs": 3})
    # Hyper-parameters get the base class's checks, on every rank, before anything is written.
    for cls in (WandbLogger, MLflowLogger):
        with pytest.raises(TypeError, match=r"`hparams\['w'\]` is a Tensor"):
            cls(tmp_path, hparams={"w": torch.ones(2)})
        with pytest.raises(TypeError, match=r"`params` must be a mapping of hyper-parameters"):
            cls(tmp_path, rank=1).log_hyperparams([("lr", 0.1)])
    assert list(tmp_path.iterdir()) == []


def test_docstring_examples_run():
    import doctest

    from lightfunc.loggers import _mlflow_logger, _wandb_logger

    for module in (_wandb_logger, _mlflow_logger):
        result = doctest.testmod(module, extraglobs={"lf": lf})
        assert result.attempted > 0 and result.failed == 0, module.__name__
