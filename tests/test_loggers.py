import csv
import doctest
import json
import subprocess
import sys

import pytest
import torch
from helpers import DEVICE_READS, is_cpu_count, make_data, make_model, make_steps

import lightfunc as lf
from lightfunc.loggers import (
    CSVLogger,
    JSONLLogger,
    Logger,
    TensorBoardLogger,
    _csv_logger,
    _default,
    _jsonl_logger,
    _tensorboard_logger,
    default_logger,
)

DATA = make_data(n=100, batch_size=32)  # 4 batches per epoch
LOGGERS = (TensorBoardLogger, CSVLogger, JSONLLogger)
READS = DEVICE_READS
HPARAMS = {"lr": 0.1, "layers": [16, 3], "optim": {"name": "sgd", "nesterov": False}, "tag": None}


def _setup():
    model = make_model()
    train_step, eval_step = make_steps(model)
    state = lf.TrainState.create(model, lf.optim.sgd(0.1), seed=0)
    return lf.build(train_step, compile=False), lf.build_eval(eval_step, compile=False), state


def _run(callbacks, *, max_epochs=2, eval_every=3, state=None):
    """An eager run over DATA, evaluated every `eval_every` steps and at each epoch's end."""
    step, evaluate, initial = _setup()
    return list(
        lf.loop(
            step,
            initial if state is None else state,
            DATA,
            max_epochs=max_epochs,
            eval_step=evaluate,
            eval_data=DATA,
            eval_every=eval_every,
            callbacks=callbacks,
        )
    )


def _expected(states, every):
    """The records a logger must write, read from the states ourselves: (step, epoch, metrics)."""
    records = []
    for ls in states:
        metrics = {}
        if ls.step % every == 0:
            metrics.update({name: float(v) for name, v in ls.metrics.items()})
        if ls.evaluated:
            metrics.update({f"val_{name}": float(v) for name, v in ls.eval_metrics.items()})
        if metrics:
            records.append((ls.step, ls.epoch, metrics))
    return records


def _event_accumulator(log_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return acc


# What is written ------------------------------------------------------------------------


def test_tensorboard_event_files_hold_exactly_the_logged_scalars_under_namespaced_tags(tmp_path):
    logger = TensorBoardLogger(tmp_path, name="tb", log_every_n_steps=2)
    states = _run([logger])  # 8 steps; evaluations at 3, 4, 6, 8; train logs at 2, 4, 6, 8
    expected = {}
    for step, _, metrics in _expected(states, every=2):
        for name, value in metrics.items():
            expected[(_tensorboard_logger.tensorboard_tag(name), step)] = value
    assert {step for _, step in expected} == {2, 3, 4, 6, 8}

    acc = _event_accumulator(tmp_path / "tb")
    # Two groups, train/ and val/ (TensorBoard opens the first two); no `epoch` scalar.
    assert set(acc.Tags()["scalars"]) == {"train/loss", "val/loss", "val/acc"}
    assert acc.Tags()["tensors"] == []  # no hparams given, none written
    got = {(tag, e.step): e.value for tag in acc.Tags()["scalars"] for e in acc.Scalars(tag)}
    assert got.keys() == expected.keys()  # each (tag, step) once, nothing else
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, abs=1e-6), key


def test_tensorboard_tags():
    tag = _tensorboard_logger.tensorboard_tag
    assert [tag(n) for n in ("loss", "lr", "val_loss", "val_acc", "test_loss", "grad/norm")] == [
        "train/loss",
        "train/lr",
        "val/loss",
        "val/acc",
        "test/loss",
        "grad/norm",  # the user's own namespace is kept
    ]


def _hparams_plugin(log_dir):
    from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData

    acc = _event_accumulator(log_dir)
    return {
        tag: HParamsPluginData.FromString(content)
        for tag, content in acc.PluginTagToContent("hparams").items()
    }


def test_tensorboard_hparams_go_to_the_hparams_plugin_with_the_final_metrics(tmp_path):
    params = {"lr": 0.1, "optim": {"name": "adamw", "betas": [0.9, 0.99]}, "seed": None}
    logger = TensorBoardLogger(tmp_path, log_every_n_steps=2, hparams=params)
    _run([logger])
    plugin = _hparams_plugin(logger.log_dir)
    assert set(plugin) == {
        "_hparams_/session_start_info",
        "_hparams_/experiment",
        "_hparams_/session_end_info",
    }
    start = plugin["_hparams_/session_start_info"].session_start_info.hparams
    assert start["lr"].number_value == 0.1
    assert start["optim/name"].string_value == "adamw"
    assert start["optim/betas"].string_value == "[0.9, 0.99]"
    assert start["seed"].string_value == "None"
    experiment = plugin["_hparams_/experiment"].experiment
    # The metrics are the run's scalars, evaluation metrics first, then the train loss.
    assert [m.name.tag for m in experiment.metric_infos] == ["val/loss", "val/acc", "train/loss"]
    assert [h.name for h in experiment.hparam_infos] == ["lr", "optim/name", "optim/betas", "seed"]
    assert plugin["_hparams_/session_end_info"].session_end_info.status == 1  # STATUS_SUCCESS


def test_flatten_hparams():
    flat = _tensorboard_logger.flatten_hparams(
        {"a": {"b": 1, "c": {"d": True}}, "e": [1, 2], "f": None, "g": "x"}
    )
    assert flat == {"a/b": 1, "a/c/d": True, "e": "[1, 2]", "f": "None", "g": "x"}


def test_tensorboard_hparams_are_written_once_and_read_back_as_json(tmp_path):
    logger = TensorBoardLogger(tmp_path, log_every_n_steps=2, hparams=HPARAMS)
    states = _run([logger])
    _run([logger], max_epochs=3, state=states[-1])  # a second loop call: a new event file

    acc = _event_accumulator(logger.log_dir)
    assert len(list(logger.log_dir.glob("events.out.tfevents.*"))) == 2
    events = acc.Tensors("hparams/text_summary")
    assert len(events) == 1 and events[0].step == 0
    assert json.loads(events[0].tensor_proto.string_val[0].decode()) == HPARAMS
    assert [e.step for e in acc.Scalars("train/loss")] == [2, 4, 6, 8, 10, 12]


def test_tensorboard_log_hyperparams_writes_everything_logged_so_far(tmp_path):
    logger = TensorBoardLogger(tmp_path)
    logger.log_hyperparams({"lr": 0.1})
    logger.log_hyperparams({"batch_size": 32})
    logger.close()
    texts = [
        e.tensor_proto.string_val[0]
        for e in _event_accumulator(logger.log_dir).Tensors("hparams/text_summary")
    ]
    assert [json.loads(t) for t in texts] == [{"lr": 0.1}, {"lr": 0.1, "batch_size": 32}]
    assert logger.hparams == {"lr": 0.1, "batch_size": 32}


def _csv_text(records, columns):
    lines = [",".join(["step", "epoch", *columns])]
    for step, epoch, metrics in records:
        cells = [repr(metrics[c]) if c in metrics else "" for c in columns]
        lines.append(",".join([str(step), str(epoch), *cells]))
    return "\n".join(lines) + "\n"


def test_csv_has_one_header_that_grows_when_evaluation_metrics_appear(tmp_path):
    logger = CSVLogger(tmp_path, log_every_n_steps=2)
    step, evaluate, state = _setup()
    seen = {}
    states = []
    kwargs = {"eval_step": evaluate, "eval_data": DATA, "eval_every": 3}
    for ls in lf.loop(step, state, DATA, max_epochs=2, callbacks=[logger], **kwargs):
        states.append(ls)
        seen[ls.step] = logger.metrics_file.read_text() if logger.log_dir.exists() else None
    records = _expected(states, every=2)

    assert seen[1] is None  # nothing logged yet: not even the directory exists
    assert seen[2] == _csv_text(records[:1], ["loss"])  # train only so far
    assert seen[3] == _csv_text(records[:2], ["loss", "val_loss", "val_acc"])
    assert seen[8] == _csv_text(records, ["loss", "val_loss", "val_acc"])
    assert [r[:2] for r in records] == [(2, 0), (3, 0), (4, 0), (6, 1), (8, 1)]
    assert [p.name for p in logger.log_dir.iterdir()] == ["metrics.csv"]  # no temp files left


def test_csv_continues_an_existing_file_and_adds_new_columns(tmp_path):
    first = CSVLogger(tmp_path, log_every_n_steps=1)
    first.log_metrics({"loss": 0.5}, step=1, epoch=0)
    second = CSVLogger(tmp_path)  # a resumed run: a new logger on the same directory
    second.log_metrics({"loss": 0.25, "lr": 0.1}, step=2, epoch=0)
    second.log_metrics({"loss": 0.125}, step=3)
    assert (
        second.metrics_file.read_text() == "step,epoch,loss,lr\n1,0,0.5,\n2,0,0.25,0.1\n3,,0.125,\n"
    )


def test_jsonl_has_one_exact_line_per_logging_event(tmp_path):
    logger = JSONLLogger(tmp_path, name="j", log_every_n_steps=2)
    states = _run([logger])
    lines = (tmp_path / "j" / "metrics.jsonl").read_text().splitlines()
    expected = [
        json.dumps({"step": step, "epoch": epoch, "metrics": metrics})
        for step, epoch, metrics in _expected(states, every=2)
    ]
    assert lines == expected and len(lines) == 5
    assert json.loads(lines[2])["metrics"].keys() == {"loss", "val_loss", "val_acc"}  # step 4


def test_jsonl_appends_across_loop_calls_and_writes_constructor_hparams_once(tmp_path):
    logger = JSONLLogger(tmp_path, log_every_n_steps=4, hparams=HPARAMS)
    states = _run([logger], eval_every=None)
    hparams_file = logger.log_dir / "hparams.json"
    assert json.loads(hparams_file.read_text()) == HPARAMS
    hparams_file.unlink()
    _run([logger], eval_every=None, max_epochs=3, state=states[-1])
    assert not hparams_file.exists()  # not written a second time
    steps = [json.loads(line)["step"] for line in logger.metrics_file.read_text().splitlines()]
    assert steps == [4, 8, 12]


def test_log_hyperparams_merges_into_hparams_json(tmp_path):
    for cls in (CSVLogger, JSONLLogger):
        logger = cls(tmp_path, name=cls.__name__)
        logger.log_hyperparams({"lr": 0.1, "model": {"width": 16}})
        logger.log_hyperparams({"lr": 0.2, "seed": 0})
        saved = json.loads((logger.log_dir / "hparams.json").read_text())
        assert saved == {"lr": 0.2, "model": {"width": 16}, "seed": 0}
        assert list(logger.log_dir.iterdir()) == [logger.log_dir / "hparams.json"]


def test_log_metrics_accepts_numbers_and_one_element_tensors(tmp_path):
    logger = JSONLLogger(tmp_path)
    logger.log_metrics(
        {"a": 1, "b": torch.tensor([0.5]), "c": torch.tensor(2, dtype=torch.int64)}, step=7
    )
    logger.log_metrics({}, step=8)  # nothing to write
    logger.close()
    assert logger.metrics_file.read_text() == (
        '{"step": 7, "epoch": null, "metrics": {"a": 1.0, "b": 0.5, "c": 2.0}}\n'
    )


# When and where -------------------------------------------------------------------------


def test_metrics_leave_the_device_only_on_logging_steps(tmp_path, monkeypatch):
    step, evaluate, state = _setup()
    list(lf.loop(step, state, DATA, max_steps=1))  # the first call validates; measure after it
    gate = {"open": False, "step": 0}
    reads = set()

    class Open(lf.callbacks.Callback):  # first in the list: opens the gate on logging steps
        def on_step_end(self, ls):
            gate["open"], gate["step"] = ls.step % 4 == 0 or ls.evaluated, ls.step

    class Close(lf.callbacks.Callback):  # last in the list
        def on_step_end(self, ls):
            gate["open"] = False

    def guarded(name):
        original = getattr(torch.Tensor, name)

        def method(self, *args, **kwargs):
            if name == "item" and is_cpu_count(self):  # a host read, not a device one
                return original(self, *args, **kwargs)
            if not gate["open"]:
                raise AssertionError(f"Tensor.{name} called off a logging step")
            reads.add(gate["step"])
            return original(self, *args, **kwargs)

        return method

    for name in READS:
        monkeypatch.setattr(torch.Tensor, name, guarded(name))
    loggers = [
        cls(tmp_path, name=cls.__name__, log_every_n_steps=4, hparams=HPARAMS) for cls in LOGGERS
    ]
    kwargs = {"eval_step": evaluate, "eval_data": DATA, "eval_every": 3}
    states = list(
        lf.loop(step, state, DATA, max_epochs=3, callbacks=[Open(), *loggers, Close()], **kwargs)
    )
    monkeypatch.undo()
    assert len(states) == 12
    assert reads == {3, 4, 6, 8, 9, 12}  # read on every logging step, and only there
    lines = (tmp_path / "JSONLLogger" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [3, 4, 6, 8, 9, 12]


def test_other_ranks_read_nothing_and_write_nothing(tmp_path, monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("a rank-1 logger read a tensor")

    real_item = torch.Tensor.item

    def item(tensor):
        return real_item(tensor) if is_cpu_count(tensor) else forbidden()  # a host read

    step, evaluate, state = _setup()
    list(lf.loop(step, state, DATA, max_steps=1))
    for name in READS:
        monkeypatch.setattr(torch.Tensor, name, item if name == "item" else forbidden)
    loggers = [
        cls(tmp_path, name=cls.__name__, log_every_n_steps=1, rank=1, hparams=HPARAMS)
        for cls in LOGGERS
    ]
    list(lf.loop(step, state, DATA, eval_step=evaluate, eval_data=DATA, callbacks=loggers))
    monkeypatch.undo()
    for logger in loggers:
        logger.log_hyperparams({"lr": 0.1})
        logger.log_metrics({"loss": 1.0}, step=1)
        assert logger.rank == 1
    assert list(tmp_path.iterdir()) == []


def test_rank_defaults_to_the_torch_distributed_rank(tmp_path, monkeypatch):
    logger = CSVLogger(tmp_path)
    assert logger.rank == 0
    monkeypatch.setattr(torch.distributed, "is_available", lambda: True)
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_rank", lambda group=None: 3)
    assert logger.rank == 3
    logger.log_metrics({"loss": 1.0}, step=1)
    assert list(tmp_path.iterdir()) == []


def test_nothing_is_created_when_no_step_is_logged(tmp_path):
    loggers = [cls(tmp_path / cls.__name__, log_every_n_steps=100) for cls in LOGGERS]
    step, _, state = _setup()
    states = list(lf.loop(step, state, DATA, max_epochs=2, callbacks=loggers))  # no evaluation
    assert len(states) == 8
    assert list(tmp_path.iterdir()) == []


def test_log_dir_and_state_keys_tell_loggers_apart(tmp_path):
    a, b = CSVLogger(tmp_path, name="a"), CSVLogger(tmp_path, name="b")
    assert a.log_dir == tmp_path / "a" and b.log_dir == tmp_path / "b"
    assert a.state_key == f"CSVLogger[{tmp_path / 'a'}]" and a.state_key != b.state_key
    assert a.state_key != JSONLLogger(tmp_path, name="a").state_key
    assert a.state_dict() is None
    step, _, state = _setup()
    with pytest.raises(ValueError, match="share the state key"):
        lf.loop(step, state, DATA, callbacks=[a, CSVLogger(tmp_path, name="a")])


def test_default_logger_is_tensorboard_when_installed_else_csv(tmp_path, monkeypatch):
    logger = default_logger(tmp_path, name="x", log_every_n_steps=7)
    assert type(logger) is TensorBoardLogger
    assert logger.log_dir == tmp_path / "x" and logger.log_every_n_steps == 7
    monkeypatch.setattr(_tensorboard_logger, "tensorboard_available", lambda: False)
    assert type(default_logger(tmp_path)) is CSVLogger


def test_importing_the_loggers_and_building_one_does_not_import_tensorboard(tmp_path):
    code = (
        "import sys, lightfunc.loggers as L; L.TensorBoardLogger(sys.argv[1]); "
        "print([m for m in sys.modules if m.startswith('tensorboard')])"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_docstring_examples_run(tmp_path, monkeypatch):
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    for module in (_csv_logger, _jsonl_logger, _tensorboard_logger, _default):
        result = doctest.testmod(module, extraglobs={"lf": lf})
        assert result.failed == 0 and result.attempted > 0, module.__name__


# Errors ---------------------------------------------------------------------------------


@pytest.mark.parametrize("value", [0, -1, True, 2.0, "5"])
def test_log_every_n_steps_must_be_a_positive_int(tmp_path, value):
    with pytest.raises(ValueError, match=r"`log_every_n_steps` must be an int >= 1, got"):
        CSVLogger(tmp_path, log_every_n_steps=value)


def test_constructor_arguments_are_checked(tmp_path):
    with pytest.raises(TypeError, match=r"`save_dir` must be a directory path .* int 3"):
        CSVLogger(3)
    with pytest.raises(TypeError, match=r"`name` must be a string .* got 1"):
        CSVLogger(tmp_path, name=1)
    with pytest.raises(ValueError, match=r"`name` must be a non-empty string"):
        CSVLogger(tmp_path, name="")
    with pytest.raises(TypeError, match=r"`rank` must be an int or None, got str '0'"):
        CSVLogger(tmp_path, rank="0")
    with pytest.raises(ValueError, match=r"`rank` must be >= 0 .* got -1"):
        CSVLogger(tmp_path, rank=-1)


def test_non_json_hparams_are_rejected_naming_the_key(tmp_path):
    with pytest.raises(
        TypeError, match=r"`hparams\['optim'\]\['lr'\]` is a Tensor \(a tensor: pass `.item\(\)`"
    ):
        CSVLogger(tmp_path, hparams={"optim": {"lr": torch.tensor(0.1)}})
    logger = JSONLLogger(tmp_path)
    with pytest.raises(TypeError, match=r"`params\['layers'\]\[1\]` is a object"):
        logger.log_hyperparams({"layers": [1, object()]})
    with pytest.raises(TypeError, match=r"keys must be strings; `params\['optim'\]` has the key 1"):
        logger.log_hyperparams({"optim": {1: "sgd"}})
    with pytest.raises(
        TypeError, match=r"`params` must be a mapping .* got list.*dataclasses.asdict"
    ):
        logger.log_hyperparams([("lr", 0.1)])
    assert not tmp_path.joinpath("run").exists()


def test_bad_metrics_are_rejected_with_their_name(tmp_path):
    logger = JSONLLogger(tmp_path)
    with pytest.raises(TypeError, match=r"`step` must be an int, got float 1.0"):
        logger.log_metrics({"loss": 1.0}, step=1.0)
    with pytest.raises(TypeError, match=r"metric names must be strings, got 0"):
        logger.log_metrics({0: 1.0}, step=1)
    with pytest.raises(ValueError, match=r"may not be called 'epoch'.*'epoch_metric'"):
        logger.log_metrics({"epoch": 1.0}, step=1)
    with pytest.raises(
        ValueError, match=r"metric 'logits' is a tensor of shape \(3,\).*\.mean\(\)"
    ):
        logger.log_metrics({"logits": torch.zeros(3)}, step=1)
    with pytest.raises(TypeError, match=r"metric 'name' must be a number .* got str"):
        logger.log_metrics({"name": "x"}, step=1)


def test_a_train_metric_colliding_with_an_evaluation_metric_is_rejected(tmp_path):
    ls = lf.LoopState(
        state=None,
        step=1,
        metrics={"val_loss": torch.tensor(1.0)},
        eval_metrics={"loss": torch.tensor(2.0)},
        eval_at_step=1,
    )
    with pytest.raises(ValueError, match=r"'val_loss' and the evaluation metric 'loss' would both"):
        CSVLogger(tmp_path, log_every_n_steps=1).on_step_end(ls)


def test_an_evaluation_metric_already_named_val_keeps_its_name(tmp_path):
    step, _, state = _setup()

    def prefixed_eval(state, batch):
        return {"val_loss": torch.tensor(0.25), "acc": torch.tensor(0.5)}

    logger = JSONLLogger(tmp_path, log_every_n_steps=100)
    list(lf.loop(step, state, DATA, eval_step=prefixed_eval, eval_data=DATA, callbacks=[logger]))
    records = [json.loads(line) for line in logger.metrics_file.read_text().splitlines()]
    assert records == [{"step": 4, "epoch": 0, "metrics": {"val_loss": 0.25, "val_acc": 0.5}}]


def test_the_base_class_names_what_a_backend_must_implement(tmp_path):
    logger = Logger(tmp_path)
    with pytest.raises(NotImplementedError, match="Logger must implement `write_metrics`"):
        logger.log_metrics({"loss": 1.0}, step=1)
    with pytest.raises(NotImplementedError, match="Logger must implement `write_hparams`"):
        logger.log_hyperparams({"lr": 0.1})
    logger.close()  # nothing to close


def test_tensorboard_logger_without_tensorboard_says_how_to_fix_it(tmp_path, monkeypatch):
    monkeypatch.setattr(_tensorboard_logger, "tensorboard_available", lambda: False)
    with pytest.raises(ModuleNotFoundError, match=r"pip install tensorboard.*CSVLogger"):
        TensorBoardLogger(tmp_path)


# Metrics at their own rate, test metrics after `fit` --------------------------------------


@pytest.mark.parametrize(("interval", "lr_steps"), [("epoch", [3, 6]), (5, [5])])
def test_the_lr_is_logged_at_its_own_rate_and_the_loss_every_n_steps(tmp_path, interval, lr_steps):
    model = make_model()
    train_step, _ = make_steps(model)
    sched = lf.optim.linear_schedule(0.1, 0.0, transition_steps=10)
    state = lf.TrainState.create(model, lf.optim.sgd(sched), seed=0)
    logger = JSONLLogger(tmp_path, log_every_n_steps=2, metric_intervals={"lr": interval})
    monitor = lf.callbacks.LearningRateMonitor()  # the rate on every step, on the device
    data = make_data(n=96, batch_size=32)  # 3 batches: epochs end at steps 3 and 6
    states = list(
        lf.loop(train_step, state, data, max_epochs=2, compile=False, callbacks=[monitor, logger])
    )
    assert all("lr" in ls.metrics for ls in states)  # present on every step, written on some
    expected = []
    for ls in states:
        metrics = {}
        if ls.step % 2 == 0:
            metrics["loss"] = float(ls.metrics["loss"])
        if ls.step in lr_steps:
            metrics["lr"] = float(sched(torch.tensor(ls.step - 1)))  # the rate the update used
        if metrics:
            expected.append({"step": ls.step, "epoch": ls.epoch, "metrics": metrics})
    lines = [json.loads(line) for line in logger.metrics_file.read_text().splitlines()]
    assert [r["step"] for r in lines] == sorted({2, 4, 6, *lr_steps})
    assert len(lines) == len(expected)
    for got, want in zip(lines, expected, strict=True):
        assert got.keys() == want.keys() and got["step"] == want["step"]
        assert got["epoch"] == want["epoch"]
        assert got["metrics"] == pytest.approx(want["metrics"], rel=1e-6)


def test_metric_intervals_are_checked(tmp_path):
    with pytest.raises(TypeError, match=r"`metric_intervals` must be a mapping .* got list"):
        CSVLogger(tmp_path, metric_intervals=["lr"])
    with pytest.raises(ValueError, match=r"`metric_intervals\['lr'\]` must be an int >= 1 .*"):
        CSVLogger(tmp_path, metric_intervals={"lr": "batch"})
    with pytest.raises(ValueError, match=r"`metric_intervals\['lr'\]` .* got 0"):
        CSVLogger(tmp_path, metric_intervals={"lr": 0})
    with pytest.raises(TypeError, match=r"metric names must be strings, got 1"):
        CSVLogger(tmp_path, metric_intervals={1: "epoch"})


def _fit_then_test(logger, tmp_path):
    """`fit` with `logger`, then the test metrics of `lf.evaluate` logged into the same run."""
    model = make_model()
    train_step, eval_step = make_steps(model)
    state = lf.TrainState.create(model, lf.optim.sgd(0.1), seed=0)
    final = lf.fit(
        train_step,
        state,
        DATA,
        max_epochs=2,
        logger=logger,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        default_root_dir=tmp_path / "runs",
        compile=False,
    )
    metrics = lf.evaluate(lf.build_eval(eval_step, compile=False), final, make_data(n=64, seed=5))
    logger.log_metrics(metrics, step=final.step, epoch=final.epoch, prefix="test")
    return final, {f"test_{name}": float(value) for name, value in metrics.items()}


def test_test_metrics_land_in_the_runs_csv_at_the_final_step(tmp_path):
    logger = CSVLogger(tmp_path, log_every_n_steps=4)
    final, test = _fit_then_test(logger, tmp_path)
    assert final.step == 8 and test.keys() == {"test_loss", "test_acc"}
    with open(logger.metrics_file, newline="") as f:
        rows = list(csv.DictReader(f))
    assert [row["step"] for row in rows] == ["4", "8", "8"]  # the train logs, then the test one
    assert rows[-1]["loss"] == "" and rows[0]["test_loss"] == ""
    assert {name: float(rows[-1][name]) for name in test} == test  # exact: repr round-trips
    assert rows[-1]["epoch"] == str(final.epoch)


def test_test_metrics_land_in_the_runs_tensorboard_under_test(tmp_path):
    pytest.importorskip("tensorboard")
    logger = TensorBoardLogger(tmp_path, log_every_n_steps=4)
    final, test = _fit_then_test(logger, tmp_path)
    logger.close()
    acc = _event_accumulator(logger.log_dir)
    assert {"test/loss", "test/acc", "train/loss"} <= set(acc.Tags()["scalars"])
    for name, value in test.items():
        (event,) = acc.Scalars(_tensorboard_logger.tensorboard_tag(name))
        assert event.step == final.step and event.value == pytest.approx(value, abs=1e-6)


def test_log_metrics_prefix(tmp_path):
    logger = JSONLLogger(tmp_path)
    logger.log_metrics({"loss": 0.5, "test_acc": 1.0}, step=3, prefix="test")
    logger.close()
    (line,) = logger.metrics_file.read_text().splitlines()
    assert json.loads(line)["metrics"] == {"test_loss": 0.5, "test_acc": 1.0}
    with pytest.raises(TypeError, match=r"`prefix` must be a string or None, got int 1"):
        logger.log_metrics({"loss": 0.5}, step=3, prefix=1)
    with pytest.raises(ValueError, match=r"`prefix` must be non-empty"):
        logger.log_metrics({"loss": 0.5}, step=3, prefix="")
    with pytest.raises(ValueError, match=r"may not be called 'step'"):
        logger.log_metrics({"step": 0.5}, step=3, prefix="test")


def test_a_resumed_run_logs_each_step_once_in_csv_jsonl_and_tensorboard(tmp_path):
    # A run that crashed at step 6 after its checkpoint at step 4 is resumed from step 4: the
    # steps 5 and 6 it logs again used to appear twice in every file (found by an independent
    # check). TensorBoard's writer is opened before the run here, as `fit` does by writing the
    # hyper-parameters first.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    def step(state, batch):
        return state, {"loss": state["offset"] + torch.tensor(float(batch))}

    def run(offset: float, start: int, stop: int) -> None:
        loggers = [
            lf.loggers.CSVLogger(tmp_path, name="csv", log_every_n_steps=1),
            lf.loggers.JSONLLogger(tmp_path, name="jsonl", log_every_n_steps=1),
            lf.loggers.TensorBoardLogger(tmp_path, name="tb", log_every_n_steps=1),
        ]
        loggers[2].log_hyperparams({"offset": offset})
        begin = lf.LoopState(state={"offset": torch.tensor(offset)}, step=start)
        for _ in lf.loop(step, begin, list(range(1, 20)), max_steps=stop, compile=False,
                         callbacks=loggers):  # fmt: skip
            pass
        for logger in loggers:
            logger.close()

    run(0.0, 0, 6)
    run(100.0, 4, 8)  # the resumed run: its values are 100 more
    rows = list(csv.DictReader((tmp_path / "csv" / "metrics.csv").read_text().splitlines()))
    assert [int(r["step"]) for r in rows] == list(range(1, 9))
    lines = (tmp_path / "jsonl" / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert [r["step"] for r in records] == list(range(1, 9))
    assert records[4]["metrics"]["loss"] >= 100 and records[3]["metrics"]["loss"] < 100
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    scalars = events.Scalars("train/loss")
    assert [e.step for e in scalars] == list(range(1, 9))
    assert scalars[4].value >= 100 and scalars[3].value < 100
