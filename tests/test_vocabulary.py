"""A Lightning user's daily vocabulary (issue 16): each row of the README's "From Lightning" table."""

from __future__ import annotations

import contextlib
import copy
import io
import json

import pytest
import torch
import torch.nn.functional as F
from helpers import make_data, make_model, make_steps

import lightfunc as lf
from lightfunc.testing import assert_trees_close

QUIET = {"enable_progress_bar": False, "enable_model_summary": False, "logger": False}


def _setup(lr: float = 0.1):
    model = make_model()
    train_step, eval_step = make_steps(model)
    return model, train_step, eval_step, lf.TrainState.create(model, lf.optim.sgd(lr))


def _eval_steps(data, **kwargs):
    _, train_step, eval_step, state = _setup()
    out = lf.loop(
        train_step,
        state,
        data,
        eval_step=eval_step,
        eval_data=make_data(40),
        compile=False,
        **kwargs,
    )
    return [ls.step for ls in out if ls.evaluated]


# -- loop and fit arguments ------------------------------------------------------------------------


def test_val_check_interval_float_is_a_fraction_of_an_epoch(tmp_path):
    _, train_step, eval_step, state = _setup()
    seen = []

    class Record(lf.callbacks.Callback):
        def on_step(self, ls):
            if ls.evaluated:
                seen.append(ls.step)

    lf.fit(
        train_step,
        state,
        make_data(256, batch_size=32),
        max_epochs=1,
        eval_step=eval_step,
        eval_data=make_data(40),
        val_check_interval=0.25,
        compile=False,
        callbacks=[Record()],
        default_root_dir=tmp_path,
        **QUIET,
    )
    assert seen == [2, 4, 6, 8]
    with pytest.raises(ValueError, match=r"`val_check_interval` must be an int >= 1 .* got 1\.5"):
        lf.fit(
            train_step, state, make_data(), val_check_interval=1.5, barebones=True, compile=False
        )
    with pytest.raises(ValueError, match="say the same thing"):
        lf.fit(train_step, state, make_data(), val_check_interval=2, eval_every=2, barebones=True)


def test_check_val_every_n_epoch_evaluates_on_every_nth_epoch_end():
    assert _eval_steps(make_data(64), max_epochs=4, check_val_every_n_epoch=2) == [4, 8]
    with pytest.raises(ValueError, match="`check_val_every_n_epoch=2` was given without"):
        _, train_step, _, state = _setup()
        lf.loop(train_step, state, make_data(), check_val_every_n_epoch=2)


def test_num_sanity_val_steps_runs_the_eval_step_before_training(tmp_path):
    _, train_step, _, state = _setup()
    calls = []

    def broken_eval(state, batch):
        calls.append(int(state.step))
        raise RuntimeError("bug in eval_step")

    with pytest.raises(RuntimeError, match="bug in eval_step"):
        lf.fit(
            train_step,
            state,
            make_data(),
            eval_step=broken_eval,
            eval_data=make_data(40),
            num_sanity_val_steps=2,
            compile=False,
            default_root_dir=tmp_path,
            **QUIET,
        )
    assert calls == [0]  # before the first train step
    with pytest.raises(ValueError, match="`num_sanity_val_steps` must be an int >= -1"):
        lf.fit(
            train_step, state, make_data(), num_sanity_val_steps=-2, barebones=True, compile=False
        )


def test_overfit_batches_trains_and_evaluates_on_the_same_first_batches():
    _, train_step, eval_step, state = _setup()
    data = make_data(256, batch_size=32)
    batches_seen = []

    def spy(state, batch):
        batches_seen.append(batch[0][0, 0].item())
        return train_step(state, batch)

    final = lf.fit(
        spy,
        state,
        data,
        overfit_batches=2,
        max_epochs=3,
        compile=False,
        barebones=True,
        eval_step=eval_step,
    )
    firsts = [data[0][0][0, 0].item(), data[1][0][0, 0].item()]
    assert batches_seen == firsts * 3 and final.step == 6
    assert final.eval_metrics is not None
    with pytest.raises(ValueError, match="`overfit_batches` must be an int >= 1"):
        lf.fit(train_step, state, data, overfit_batches=-1, barebones=True)


def test_deterministic_true_turns_on_deterministic_algorithms_for_the_run_only():
    _, train_step, _, state = _setup()
    during = []

    class Probe(lf.callbacks.Callback):
        def on_step(self, ls):
            during.append(torch.are_deterministic_algorithms_enabled())

    before = torch.are_deterministic_algorithms_enabled()
    lf.fit(
        train_step,
        state,
        make_data(),
        deterministic=True,
        compile=False,
        callbacks=[Probe()],
        **QUIET,
        enable_checkpointing=False,
    )
    assert during and all(during)
    assert torch.are_deterministic_algorithms_enabled() == before


def test_epoch_after_fit_is_the_index_of_the_last_epoch_run(tmp_path):
    # lightfunc's `ls.epoch` counts from 0 and names the epoch the state belongs to: after
    # max_epochs=2 it is 1 (with epoch_end=True); Lightning's `current_epoch` is then 2.
    _, train_step, _, state = _setup()
    final = lf.fit(train_step, state, make_data(), max_epochs=2, compile=False, barebones=True)
    assert (final.epoch, final.epoch_end, final.epoch + 1) == (1, True, 2)


class _DataModule:
    """Shaped like a LightningDataModule (no import of lightning needed)."""

    def __init__(self):
        self.calls = []

    def prepare_data(self):
        self.calls.append("prepare_data")

    def setup(self, stage):
        self.calls.append(f"setup:{stage}")

    def train_dataloader(self):
        return make_data(64)

    def val_dataloader(self):
        return make_data(40)

    def test_dataloader(self):
        return make_data(40, seed=3)


def test_fit_accepts_a_lightning_datamodule_shaped_object():
    _, train_step, eval_step, state = _setup()
    dm = _DataModule()
    final = lf.fit(train_step, state, dm, eval_step=eval_step, compile=False, barebones=True)
    assert dm.calls == ["prepare_data", "setup:fit"]
    assert final.step == 2 and final.eval_metrics is not None
    test = lf.evaluate(lf.build_eval(eval_step, compile=False), final, dm.test_dataloader())
    assert set(test) == {"loss", "acc"}


def test_a_user_progress_bar_replaces_the_default_one(tmp_path):
    _, train_step, _, state = _setup()
    stream = io.StringIO()
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        lf.fit(
            train_step,
            state,
            make_data(),
            compile=False,
            default_root_dir=tmp_path,
            callbacks=[lf.callbacks.ProgressBar(stream=stream, log_every_n_steps=1)],
            enable_model_summary=False,
            logger=False,
            enable_checkpointing=False,
        )
    assert stream.getvalue()
    assert err.getvalue() == ""  # no second (default) bar


# -- learning-rate schedules ------------------------------------------------------------------------


def test_a_user_written_per_epoch_schedule_matches_torch_steplr_stepped_per_epoch():
    model = make_model(batchnorm=False)
    train_step, _ = make_steps(model)
    data = make_data(64)  # 2 batches per epoch
    steps_per_epoch = len(data)

    def per_epoch(count):  # Lightning's {"interval": "epoch"}: the rate changes once per epoch
        return 0.1 * 0.5 ** (count // steps_per_epoch)

    final = lf.fit(
        train_step,
        lf.TrainState.create(model, lf.optim.sgd(per_epoch)),
        data,
        max_epochs=3,
        compile=False,
        barebones=True,
    )
    reference = copy.deepcopy(model)
    opt = torch.optim.SGD(reference.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    for _ in range(3):
        for x, y in data:
            opt.zero_grad()
            F.cross_entropy(reference(x), y).backward()
            opt.step()
        sched.step()
    assert_trees_close(
        final.state.params,
        {k: p.detach() for k, p in reference.named_parameters()},
        rtol=1e-6,
        atol=1e-7,
    )


def test_cosine_alpha_is_eta_min_over_the_initial_rate():
    sched = lf.optim.cosine_decay_schedule(0.1, decay_steps=10, alpha=0.01 / 0.1)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    torch_sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=10, eta_min=0.01)
    for t in range(11):
        assert float(sched(torch.tensor(t))) == pytest.approx(opt.param_groups[0]["lr"], rel=1e-6)
        opt.step()
        torch_sched.step()


def test_lr_monitor_logging_interval_epoch_adds_the_rate_at_epoch_ends_only():
    model, train_step, _, _ = _setup()
    sched = lf.optim.linear_schedule(0.1, 0.0, transition_steps=8)
    state = lf.TrainState.create(model, lf.optim.sgd(sched))
    monitor = lf.callbacks.LearningRateMonitor(sched, logging_interval="epoch")
    got = [
        (ls.step, "lr" in ls.metrics)
        for ls in lf.loop(
            train_step, state, make_data(64), max_epochs=2, compile=False, callbacks=[monitor]
        )
    ]
    assert got == [(1, False), (2, True), (3, False), (4, True)]
    with pytest.raises(ValueError, match="`logging_interval` must be one of"):
        lf.callbacks.LearningRateMonitor(sched, logging_interval="batch")


def test_lr_monitor_reads_the_schedule_from_the_optimizer():
    model, train_step, _, _ = _setup()
    sched = lf.optim.linear_schedule(0.1, 0.0, transition_steps=8)
    tx = lf.optim.chain(lf.optim.clip_by_global_norm(1.0), lf.optim.adamw(sched))
    state = lf.TrainState.create(model, tx)
    by_step = lf.callbacks.LearningRateMonitor(logging_interval="step", name="lr_step")
    by_epoch = lf.callbacks.LearningRateMonitor(logging_interval="epoch")
    got = [
        (
            ls.step,
            float(ls.metrics["lr_step"]),
            float(ls.metrics["lr"]) if "lr" in ls.metrics else None,
        )
        for ls in lf.loop(
            train_step,
            state,
            make_data(64),
            max_epochs=2,
            compile=False,
            callbacks=[by_step, by_epoch],
        )
    ]
    # The rate each update used: the schedule at the step count before it.
    rates = [float(sched(torch.tensor(s))) for s in range(4)]
    assert got == [
        (1, rates[0], None),
        (2, rates[1], rates[1]),
        (3, rates[2], None),
        (4, rates[3], rates[3]),
    ]
    assert rates[0] != rates[1]


def test_lr_monitor_reads_a_constant_rate_or_says_what_to_pass():
    state = lf.TrainState.create({"w": torch.zeros(1)}, lf.optim.adamw(0.03))
    monitor = lf.callbacks.LearningRateMonitor()
    assert float(monitor.extra_metrics(lf.LoopState(state=state))["lr"]) == pytest.approx(0.03)
    # An optimizer written by hand, with no `lr` / `learning_rate` inside.
    plain = lf.optim.GradientTransformation(
        lambda params: lf.optim.EmptyState(),
        lambda grads, opt_state, params=None: ({k: -g for k, g in grads.items()}, opt_state),
    )
    state = lf.TrainState.create({"w": torch.zeros(1)}, plain)
    with pytest.raises(
        TypeError, match=r"found no learning rate in the state's optimizer .*pass it"
    ):
        lf.callbacks.LearningRateMonitor().extra_metrics(lf.LoopState(state=state))


# -- checkpoints -----------------------------------------------------------------------------------


def test_ckpt_path_best_and_best_k_models(tmp_path):
    _, train_step, eval_step, state = _setup(lr=0.5)
    ckpt = lf.callbacks.ModelCheckpoint(
        tmp_path / "ck", monitor="val_loss", save_top_k=2, every_n_train_steps=1
    )
    lf.fit(
        train_step,
        state,
        make_data(),
        eval_step=eval_step,
        eval_data=make_data(40),
        eval_every=1,
        max_epochs=2,
        compile=False,
        callbacks=[ckpt],
        default_root_dir=tmp_path,
        **QUIET,
    )
    scores = ckpt.best_k_models
    assert len(scores) == 2 and ckpt.best_model_path in scores
    assert ckpt.best_model_score == min(scores.values())
    assert not any((tmp_path / d / "checkpoints").exists() for d in ("version_0", "version_1"))
    best_step = int(ckpt.best_model_path.stem.split("=")[1])
    again = lf.callbacks.ModelCheckpoint(
        tmp_path / "ck", monitor="val_loss", save_top_k=2, every_n_train_steps=1
    )
    resumed = lf.fit(
        train_step,
        state,
        make_data(),
        max_steps=best_step + 1,
        compile=False,
        callbacks=[again],
        ckpt_path="best",
        default_root_dir=tmp_path,
        **QUIET,
    )
    assert resumed.step == best_step + 1
    with pytest.raises(ValueError, match='`ckpt_path="best"` needs a `ModelCheckpoint'):
        lf.fit(train_step, state, make_data(), ckpt_path="best", barebones=True)


def test_model_checkpoint_speaks_lightning(tmp_path, capsys):
    ckpt = lf.callbacks.ModelCheckpoint(tmp_path, every_n_train_steps=3, verbose=True)
    assert ckpt.every_n_steps == 3
    _, train_step, _, state = _setup()
    for _ in lf.loop(train_step, state, make_data(), max_steps=3, compile=False, callbacks=[ckpt]):
        pass
    assert "ModelCheckpoint: step 3 saved to" in capsys.readouterr().out
    with pytest.raises(TypeError, match=r"no `save_weights_only` .*lf\.save_params"):
        lf.callbacks.ModelCheckpoint(tmp_path, save_weights_only=True)
    with pytest.raises(TypeError, match=r"no `auto_insert_metric_name` .*filename"):
        lf.callbacks.ModelCheckpoint(tmp_path, auto_insert_metric_name=False)
    with pytest.raises(ValueError, match="same option"):
        lf.callbacks.ModelCheckpoint(tmp_path, every_n_train_steps=1, every_n_steps=2)


def test_early_stopping_speaks_lightning(capsys):
    _, train_step, eval_step, state = _setup()
    stop = lf.callbacks.EarlyStopping(
        "val_loss",
        patience=0,
        verbose=True,
        strict=True,
        check_on_train_epoch_end=False,
        mode="max",
    )
    out = list(
        lf.loop(
            train_step,
            state,
            make_data(),
            eval_step=eval_step,
            eval_data=make_data(40),
            eval_every=1,
            max_epochs=3,
            compile=False,
            callbacks=[stop],
        )
    )
    assert out[-1].step == 2 and "EarlyStopping: stopping at step 2" in capsys.readouterr().out
    lenient = lf.callbacks.EarlyStopping("val_missing", strict=False)
    list(
        lf.loop(
            train_step,
            state,
            make_data(),
            eval_step=eval_step,
            eval_data=make_data(40),
            compile=False,
            callbacks=[lenient],
        )
    )
    with pytest.raises(
        ValueError, match=r"`check_on_train_epoch_end=True` with `monitor='val_loss'`"
    ):
        lf.callbacks.EarlyStopping("val_loss", check_on_train_epoch_end=True)


def test_an_eval_step_returning_val_loss_works_with_early_stopping_on_val_loss():
    model, train_step, _, state = _setup()

    def eval_step(state, batch):
        x, y = batch
        logits, _ = lf.apply(model, state.params, state.buffers, x, train=False)
        return {"val_loss": F.cross_entropy(logits, y)}

    stop = lf.callbacks.EarlyStopping("val_loss", patience=5)
    *_, final = lf.loop(
        train_step,
        state,
        make_data(),
        eval_step=eval_step,
        eval_data=make_data(40),
        compile=False,
        callbacks=[stop],
    )
    assert "val_loss" in final.eval_metrics and stop.best < float("inf")


# -- Lightning checkpoints -------------------------------------------------------------------------


def _lightning_checkpoint(tmp_path, optimizer: str):
    L = pytest.importorskip("lightning")

    class Lit(L.LightningModule):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.model = torch.nn.Sequential(
                torch.nn.Linear(4, 8),
                torch.nn.BatchNorm1d(8),
                torch.nn.ReLU(),
                torch.nn.Linear(8, 1),
            )

        def training_step(self, batch, batch_idx):
            x, y = batch
            return F.mse_loss(self.model(x), y)

        def configure_optimizers(self):
            if optimizer == "adamw":
                return torch.optim.AdamW(self.parameters(), lr=0.01, weight_decay=0.1)
            if optimizer == "adam":
                return torch.optim.Adam(self.parameters(), lr=0.01)
            return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9, weight_decay=0.01)

    g = torch.Generator().manual_seed(0)
    data = torch.utils.data.TensorDataset(
        torch.randn(32, 4, generator=g), torch.randn(32, 1, generator=g)
    )
    trainer = L.Trainer(
        max_steps=3,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
    )
    lit = Lit()
    trainer.fit(lit, torch.utils.data.DataLoader(data, batch_size=8))
    path = tmp_path / "lightning.ckpt"
    trainer.save_checkpoint(path)
    return lit, path


@pytest.mark.slow
@pytest.mark.parametrize("optimizer", ["adamw", "adam", "sgd"])
@pytest.mark.filterwarnings("ignore")
def test_a_lightning_checkpoint_resumes_with_lightnings_next_update(tmp_path, optimizer):
    lit, path = _lightning_checkpoint(tmp_path, optimizer)
    txs = {
        "adamw": lf.optim.adamw(0.01, weight_decay=0.1),
        "adam": lf.optim.adam(0.01),
        "sgd": lf.optim.sgd(0.05, momentum=0.9, weight_decay=0.01),
    }
    model = copy.deepcopy(lit.model)
    state = lf.from_lightning_checkpoint(path, model, txs[optimizer])
    # Lightning's resume: load the module and the optimizer state dict, then step.
    saved = torch.load(path, weights_only=True)
    lit.load_state_dict(saved["state_dict"])
    opt = lit.configure_optimizers()
    opt.load_state_dict(saved["optimizer_states"][0])
    x, y = torch.randn(8, 4), torch.randn(8, 1)
    lit.train()
    opt.zero_grad()
    F.mse_loss(lit.model(x), y).backward()
    opt.step()

    def train_step(state, batch):
        def loss_fn(params):
            out, buffers = lf.apply(model, params, state.buffers, batch[0], train=True)
            return F.mse_loss(out, batch[1]), buffers

        (loss, buffers), grads = lf.value_and_grad(loss_fn, has_aux=True)(state.params)
        return state.apply_gradients(grads, buffers=buffers), {"loss": loss}

    new, _ = lf.build(train_step, compile=False)(state, (x, y))
    expected = {k: p.detach() for k, p in lit.model.named_parameters()}
    assert_trees_close(new.params, expected, rtol=0, atol=1e-7)
    assert_trees_close(new.buffers, dict(lit.model.named_buffers()), rtol=0, atol=0)


def test_the_converter_names_what_does_not_match(tmp_path):
    path = tmp_path / "not_lightning.pt"
    import safetensors.torch

    safetensors.torch.save_file({"w": torch.zeros(1)}, tmp_path / "x.safetensors")
    torch.save(
        {"weights": torch.zeros(1)}, path
    )  # test-side file only: the package never writes pickle
    with pytest.raises(ValueError, match="is not a Lightning checkpoint"):
        lf.from_lightning_checkpoint(path, torch.nn.Linear(1, 1), lf.optim.adam(1e-3))
    torch.save({"state_dict": {"net.weight": torch.zeros(2, 2)}}, path)
    with pytest.raises(ValueError, match=r"do not match `model`.*prefix="):
        lf.from_lightning_checkpoint(path, torch.nn.Linear(1, 1), lf.optim.adam(1e-3))


def test_the_package_does_not_import_lightning():
    import ast
    from pathlib import Path

    for path in Path(lf.__file__).parent.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else [node.module or ""]
                if isinstance(node, ast.ImportFrom)
                else []
            )
            assert not any(n.split(".")[0] in ("lightning", "pytorch_lightning") for n in names), (
                path
            )


def test_more_lightning_arguments_name_the_fix(tmp_path):
    _, train_step, _, state = _setup()
    no_len = iter(make_data())
    with pytest.raises(
        TypeError, match=r"`overfit_batches=0\.5` is a fraction, but `train_data` has no len"
    ):
        lf.fit(train_step, state, no_len, overfit_batches=0.5, barebones=True)
    with pytest.raises(TypeError, match=r"`val_check_interval=0\.5` is a fraction of an epoch"):
        lf.fit(train_step, state, iter(make_data()), val_check_interval=0.5, barebones=True)
    with pytest.raises(ValueError, match=r"`check_val_every_n_epoch` must be"):
        lf.loop(train_step, state, make_data(), check_val_every_n_epoch=0)
    empty = lf.callbacks.ModelCheckpoint(tmp_path / "none", monitor="val_loss")
    with pytest.raises(ValueError, match=r'`ckpt_path="best"`: .* has no checkpoint yet'):
        lf.fit(train_step, state, make_data(), ckpt_path="best", callbacks=[empty], **QUIET)
    with pytest.raises(TypeError, match="`dirpath` is required"):
        lf.callbacks.ModelCheckpoint(None)


def test_the_converter_checks_the_optimizer_state_against_the_module(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 1))
    weights = {f"model.{k}": v for k, v in model.state_dict().items()}
    params = list(model.parameters())
    opt = torch.optim.Adam(params, lr=0.1)
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()
    path = tmp_path / "a.ckpt"
    saved = opt.state_dict()
    torch.save({"state_dict": weights, "optimizer_states": [saved]}, path)  # test-side only
    state = lf.from_lightning_checkpoint(path, model, lf.optim.adam(0.1))
    assert int(state.step) == 1
    with pytest.raises(ValueError, match=r"optimizer has 4 parameters, the module 2 trainable"):
        lf.from_lightning_checkpoint(
            path, model, lf.optim.adam(0.1), param_names=["0.weight", "0.bias"]
        )
    with pytest.raises(ValueError, match=r"`exp_avg` of `0\.weight` has shape \(2,\)"):
        lf.from_lightning_checkpoint(
            path,
            model,
            lf.optim.adam(0.1),
            param_names=["0.bias", "0.weight", "1.weight", "1.bias"],
        )
    saved["state"][1]["step"] = torch.tensor(5.0)
    torch.save({"state_dict": weights, "optimizer_states": [saved]}, path)
    with pytest.raises(ValueError, match=r"different step counts \[1, 5\]"):
        lf.from_lightning_checkpoint(path, model, lf.optim.adam(0.1))
    torch.save({"state_dict": {**weights, "model.0.weight": torch.zeros(3, 3)}}, path)
    with pytest.raises(ValueError, match="weights do not fit `model`"):
        lf.from_lightning_checkpoint(path, model, lf.optim.adam(0.1))


def test_hyperparameters_are_in_every_checkpoint_readable_with_plain_safetensors(tmp_path):
    from safetensors import safe_open

    _, train_step, _, state = _setup()
    lf.fit(
        train_step,
        state,
        make_data(),
        max_epochs=2,
        compile=False,
        default_root_dir=tmp_path,
        hparams={"lr": 0.1, "layers": [8, 16]},
        enable_progress_bar=False,
        enable_model_summary=False,
        logger=False,
        callbacks=[
            lf.callbacks.ModelCheckpoint(tmp_path / "mine", every_n_train_steps=2, keep_last_n=None)
        ],
    )
    files = sorted((tmp_path / "mine").glob("*.safetensors"))
    assert len(files) >= 4
    for path in files:
        with safe_open(str(path), "pt") as f:
            leaves = json.loads(f.metadata()["leaves"])
        (entry,) = [leaf for leaf in leaves if leaf["path"] == "callbacks.hparams.hparams"]
        assert json.loads(entry["value"]) == {"layers": [8, 16], "lr": 0.1}
    with pytest.raises(TypeError, match="`hparams` must hold JSON values"):
        lf.callbacks.SaveHyperparameters({"path": tmp_path})
    with pytest.raises(TypeError, match="`hparams` must be a dict of JSON values, got list"):
        lf.callbacks.SaveHyperparameters([1, 2])
