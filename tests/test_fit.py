import pytest
import torch
from helpers import make_data, make_model, make_steps

import lightfunc as lf
from lightfunc.testing import assert_trees_close


def _setup():
    model = make_model()
    train_step, eval_step = make_steps(model)
    state = lf.TrainState.create(model, lf.optim.adamw(1e-2), seed=0)
    return (
        model,
        lf.build(train_step, compile=False),
        lf.build_eval(eval_step, compile=False),
        state,
    )


def _files(root):
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


def test_fit_with_defaults_writes_logs_and_a_last_checkpoint(tmp_path, capsys):
    model, step, evaluate, state = _setup()
    data = make_data(n=96)
    final = lf.fit(step, state, data, max_epochs=2, eval_step=evaluate, eval_data=data,
                   default_root_dir=tmp_path, enable_model_summary=model, log_every_n_steps=1)  # fmt: skip
    assert final.step == 6 and final.evaluated
    files = _files(tmp_path)
    assert "version_0/checkpoints/last.safetensors" in files
    assert any(f.startswith("version_0/logs/") for f in files)
    err = capsys.readouterr().err
    assert "step 6/6" in err and "\r" not in err  # plain progress lines off a terminal


def test_fast_dev_run_writes_nothing(tmp_path, capsys):
    _, step, evaluate, state = _setup()
    data = make_data(n=96)
    final = lf.fit(step, state, data, max_epochs=5, eval_step=evaluate, eval_data=data, fast_dev_run=True,
                   default_root_dir=tmp_path / "run")  # fmt: skip
    assert final.step == 1 and final.evaluated
    assert not (tmp_path / "run").exists()


def test_barebones_prints_and_writes_nothing(tmp_path, capsys):
    _, step, _, state = _setup()
    final = lf.fit(
        step,
        state,
        make_data(n=96),
        max_epochs=2,
        barebones=True,
        default_root_dir=tmp_path / "run",
    )
    assert final.step == 6
    assert not (tmp_path / "run").exists()
    out = capsys.readouterr()
    assert out.out == "" and out.err == ""


def test_ckpt_path_last_resumes_where_the_last_fit_stopped(tmp_path, capsys):
    _, step, _, state = _setup()
    data = make_data(n=96)
    first = lf.fit(step, state, data, max_epochs=1, default_root_dir=tmp_path, logger=False)
    again = lf.fit(
        step, state, data, max_epochs=3, default_root_dir=tmp_path, logger=False, ckpt_path="last"
    )
    straight = lf.fit(step, state, data, max_epochs=3, barebones=True)
    assert first.step == 3 and again.step == 9
    assert_trees_close(again.state, straight.state)


def test_barebones_refuses_features_it_turns_off(tmp_path):
    _, step, _, state = _setup()
    with pytest.raises(ValueError, match=r"`barebones=True` turns off logging.*cannot be combined"):
        lf.fit(
            step,
            state,
            make_data(),
            barebones=True,
            callbacks=[lf.callbacks.EarlyStopping("val_loss")],
        )


def test_logger_must_be_a_bool_or_a_logger(tmp_path):
    _, step, _, state = _setup()
    with pytest.raises(
        TypeError, match=r"`logger` must be a bool, a lightfunc.loggers logger, .*; got str"
    ):
        lf.fit(step, state, make_data(), logger="tensorboard", default_root_dir=tmp_path)
    with pytest.raises(TypeError, match=r"`logger`'s function returned str, not a logger"):
        lf.fit(step, state, make_data(), logger=lambda run: "csv", default_root_dir=tmp_path)


def test_logger_can_be_a_function_of_the_run_directory_or_a_list(tmp_path):
    _, step, _, state = _setup()
    given = lf.loggers.JSONLLogger(tmp_path / "mine", name="jsonl", log_every_n_steps=1)
    lf.fit(
        step,
        state,
        make_data(),
        max_epochs=1,
        default_root_dir=tmp_path / "runs",
        enable_checkpointing=False,
        enable_progress_bar=False,
        logger=[lambda run: lf.loggers.CSVLogger(run, name="csv", log_every_n_steps=1), given],
    )
    run = tmp_path / "runs" / "version_0"
    assert (run / "csv" / "metrics.csv").is_file()  # the factory's logger writes inside the run
    assert (tmp_path / "mine" / "jsonl" / "metrics.jsonl").is_file()  # the given one where told


def test_fit_with_no_steps_left_says_so(tmp_path):
    _, step, _, state = _setup()
    done = lf.fit(step, state, make_data(n=32), max_epochs=1, barebones=True)
    with pytest.raises(ValueError, match=r"`fit` ran no steps"):
        lf.fit(step, done, make_data(n=32), max_epochs=1, barebones=True)


def test_ckpt_path_resumes_from_a_given_checkpoint_file(tmp_path):
    _, step, _, state = _setup()
    data = make_data(n=96)
    first = lf.fit(step, state, data, max_epochs=1, default_root_dir=tmp_path, logger=False,
                   enable_progress_bar=False, enable_model_summary=False)  # fmt: skip
    checkpoint = tmp_path / "version_0" / "checkpoints" / "step=3.safetensors"
    assert checkpoint.exists() and first.step == 3
    again = lf.fit(step, state, data, max_epochs=2, barebones=True, ckpt_path=checkpoint)
    straight = lf.fit(step, state, data, max_epochs=2, barebones=True)
    assert again.step == 6
    assert_trees_close(again.state, straight.state)


def test_fit_builds_a_plain_step_with_build_options_before_restoring(tmp_path):
    model = make_model()
    train_step, _ = make_steps(model)
    state = lf.TrainState.create(model, lf.optim.adamw(1e-2), seed=0)
    final = lf.fit(train_step, state, make_data(n=64), barebones=True, compile=False,
                   precision="bf16-true", accelerator="cpu")  # fmt: skip
    assert final.step == 2 and final.state.params["0.weight"].dtype == torch.bfloat16
