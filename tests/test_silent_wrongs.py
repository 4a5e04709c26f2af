"""No silent wrongs (issue 16): what the user's `nn.Module` says holds, and mistakes are caught.

Each test here failed (silently: the run looked fine) before the fix it checks.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from helpers import DEVICE_READS, make_data, make_model, make_steps

import lightfunc as lf
from lightfunc.testing import assert_trees_close


class _WithSpare(torch.nn.Module):
    """An MLP with a `spare` layer that `forward` never calls (a parameter without a gradient)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = torch.nn.Sequential(
            torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1)
        )
        self.spare = torch.nn.Linear(4, 1)

    def forward(self, x: torch.Tensor, use_spare: bool = False) -> torch.Tensor:
        out = self.body(x)
        return out + self.spare(x) if use_spare else out


def _mse_step(model, **apply_kwargs):
    def train_step(state, batch):
        x, y = batch

        def loss_fn(params):
            out, _ = lf.apply(model, params, state.buffers, x, train=True, **apply_kwargs)
            return F.mse_loss(out, y)

        loss, grads = lf.value_and_grad(loss_fn)(state.params)
        return state.apply_gradients(grads), {"loss": loss}

    return train_step


def _batches(n: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(16, 4, generator=g), torch.randn(16, 1, generator=g)) for _ in range(n)]


def _torch_run(model, opt, batches, use_spare=lambda i: False):
    for i, (x, y) in enumerate(batches):
        opt.zero_grad(set_to_none=True)
        F.mse_loss(model(x, use_spare(i)), y).backward()
        opt.step()


# -- 1. frozen parameters ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make_opts",
    [
        (
            lambda: lf.optim.adamw(0.05, weight_decay=0.1),
            lambda p: torch.optim.AdamW(p, lr=0.05, weight_decay=0.1),
        ),
        (
            lambda: lf.optim.sgd(0.1, momentum=0.9, weight_decay=0.01),
            lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=0.01),
        ),
    ],
    ids=["adamw", "sgd"],
)
def test_frozen_parameters_stay_frozen_as_with_torch_optim_over_the_trainable_ones(make_opts):
    ours_tx, theirs = make_opts
    model = _WithSpare()
    model.body[0].requires_grad_(False)
    reference = copy.deepcopy(model)
    state = lf.TrainState.create(model, ours_tx())
    step = lf.build(_mse_step(model), compile=False)
    batches = _batches(5)
    for batch in batches:
        state, _ = step(state, batch)
    _torch_run(reference, theirs([p for p in reference.parameters() if p.requires_grad]), batches)
    assert_trees_close(
        state.params, {k: p.detach() for k, p in reference.named_parameters()}, rtol=0, atol=1e-7
    )
    assert torch.equal(state.params["body.0.weight"], model.body[0].weight.detach())
    assert int(state.step) == 5


def test_frozen_parameters_carry_no_optimizer_state():
    model = _WithSpare()
    model.spare.requires_grad_(False)
    state = lf.TrainState.create(model, lf.optim.adam(1e-3))
    mu = state.opt_state[0].mu
    assert isinstance(mu["spare.weight"], lf.optim.MaskedNode)
    assert isinstance(mu["body.0.weight"], torch.Tensor)


# -- 2. parameters without a gradient ------------------------------------------------------------


@pytest.mark.parametrize(
    "make_opts",
    [
        (
            lambda: lf.optim.adamw(0.05, weight_decay=0.1),
            lambda p: torch.optim.AdamW(p, lr=0.05, weight_decay=0.1),
        ),
        (
            lambda: lf.optim.adam(0.05, weight_decay=0.1),
            lambda p: torch.optim.Adam(p, lr=0.05, weight_decay=0.1),
        ),
        (
            lambda: lf.optim.sgd(0.1, momentum=0.9, weight_decay=0.01),
            lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=0.01),
        ),
    ],
    ids=["adamw", "adam", "sgd"],
)
def test_a_parameter_the_loss_never_reaches_is_left_alone_as_torch_leaves_grad_none(make_opts):
    ours_tx, theirs = make_opts
    model = _WithSpare()
    reference = copy.deepcopy(model)
    state = lf.TrainState.create(model, ours_tx())
    step = lf.build(_mse_step(model), compile=False)
    batches = _batches(5)
    for batch in batches:
        state, _ = step(state, batch)
    _torch_run(reference, theirs(reference.parameters()), batches)
    assert reference.spare.weight.grad is None  # torch: no gradient, so no decay either
    assert torch.equal(state.params["spare.weight"], model.spare.weight.detach())
    assert_trees_close(
        state.params, {k: p.detach() for k, p in reference.named_parameters()}, rtol=0, atol=1e-7
    )


def test_a_parameter_unused_for_a_step_keeps_its_moments_and_its_value():
    model = _WithSpare()
    reference = copy.deepcopy(model)
    state = lf.TrainState.create(model, lf.optim.adamw(0.05, weight_decay=0.1))
    used = lf.build(_mse_step(model, use_spare=True), compile=False)
    unused = lf.build(_mse_step(model), compile=False)
    batches = _batches(2)
    state, _ = used(state, batches[0])
    before = {k: v.clone() for k, v in state.params.items()}
    moments = state.opt_state[0].mu["spare.weight"].clone()
    state, _ = unused(state, batches[1])
    _torch_run(
        reference,
        torch.optim.AdamW(reference.parameters(), lr=0.05, weight_decay=0.1),
        batches,
        use_spare=lambda i: i == 0,
    )
    assert torch.equal(state.params["spare.weight"], before["spare.weight"])
    assert torch.equal(state.opt_state[0].mu["spare.weight"], moments)
    assert_trees_close(
        state.params, {k: p.detach() for k, p in reference.named_parameters()}, rtol=0, atol=1e-7
    )


def test_skip_unused_false_applies_the_update_to_zero_gradients():
    model = _WithSpare()
    state = lf.TrainState.create(model, lf.optim.adamw(0.05, weight_decay=0.1), skip_unused=False)
    state, _ = lf.build(_mse_step(model), compile=False)(state, _batches(1)[0])
    expected = model.spare.weight.detach() * (1 - 0.05 * 0.1)
    assert torch.equal(state.params["spare.weight"], expected)


# -- 3. non-finite losses --------------------------------------------------------------------------


def _nan_batches(n: int, bad: tuple[int, ...]):
    data = make_data(n * 8, batch_size=8)
    return [(x * float("nan"), y) if i in bad else (x, y) for i, (x, y) in enumerate(data)]


def test_fit_stops_on_a_nan_loss_at_the_logging_interval_naming_the_step(tmp_path):
    model = make_model(batchnorm=False)
    train_step, _ = make_steps(model)
    state = lf.TrainState.create(model, lf.optim.adam(1e-2))
    with pytest.raises(
        FloatingPointError, match=r"loss=nan at step 4 .*after step 2.*skip_nonfinite=True"
    ):
        lf.fit(
            train_step,
            state,
            _nan_batches(10, bad=(2, 5, 7)),
            default_root_dir=tmp_path,
            compile=False,
            log_every_n_steps=2,
            enable_progress_bar=False,
            logger=False,
        )


def test_fit_with_skip_nonfinite_skips_the_nan_batches_and_keeps_the_weights_finite(tmp_path):
    model = make_model(batchnorm=False)
    train_step, _ = make_steps(model)
    state = lf.TrainState.create(model, lf.optim.adam(1e-2))
    final = lf.fit(
        train_step,
        state,
        _nan_batches(10, bad=(2, 5, 7)),
        default_root_dir=tmp_path,
        compile=False,
        skip_nonfinite=True,
        log_every_n_steps=2,
        enable_progress_bar=False,
        logger=False,
    )
    assert all(torch.isfinite(p).all() for p in final.state.params.values())
    assert int(final.metrics["skipped_steps"]) == 3


def test_detect_anomaly_stops_at_the_first_nan_step(tmp_path):
    model = make_model(batchnorm=False)
    train_step, _ = make_steps(model)
    state = lf.TrainState.create(model, lf.optim.adam(1e-2))
    with pytest.raises(FloatingPointError, match=r"NaN at step 3: .*Backward"):
        lf.fit(
            train_step,
            state,
            _nan_batches(10, bad=(2,)),
            default_root_dir=tmp_path,
            compile=False,
            detect_anomaly=True,
            enable_progress_bar=False,
            logger=False,
            enable_checkpointing=False,
        )
    assert not torch.is_anomaly_enabled()


def test_nonfinite_check_reads_metrics_only_at_its_interval(monkeypatch):
    check = lf.callbacks.NonFiniteCheck(every_n_steps=5)
    nan = torch.tensor(float("nan"))

    def no_read(self, *args, **kwargs):
        raise AssertionError("a metric was read back between checks")

    with monkeypatch.context() as patched:
        for name in DEVICE_READS:
            patched.setattr(torch.Tensor, name, no_read)
        for step in range(1, 5):  # NaN at steps 1-4: not read, so no sync
            assert check.on_step(lf.LoopState(state=None, step=step, metrics={"loss": nan})) is None
    with pytest.raises(FloatingPointError, match="at step 5"):
        check.on_step(lf.LoopState(state=None, step=5, metrics={"loss": nan}))


def test_nonfinite_check_can_warn_instead():
    check = lf.callbacks.NonFiniteCheck(every_n_steps=1, action="warn")
    with pytest.warns(RuntimeWarning, match="inf"):
        check.on_step(
            lf.LoopState(state=None, step=1, metrics={"loss": torch.tensor(float("inf"))})
        )


def test_nonfinite_check_rejects_bad_arguments():
    with pytest.raises(ValueError, match="`every_n_steps`"):
        lf.callbacks.NonFiniteCheck(every_n_steps=0)
    with pytest.raises(ValueError, match="`action` must be one of"):
        lf.callbacks.NonFiniteCheck(action="ignore")


# -- 4. a step that never uses the state's params ------------------------------------------------


@pytest.mark.parametrize("compile", [False, pytest.param(True, marks=pytest.mark.compiled)])
def test_a_step_calling_the_module_directly_is_caught_on_the_first_call(compile):
    model = make_model(batchnorm=False)

    def train_step(state, batch):
        x, y = batch

        def loss_fn(params):
            return F.cross_entropy(model(x), y)  # the module's own tensors, not `params`

        loss, grads = lf.value_and_grad(loss_fn)(state.params)
        return state.apply_gradients(grads), {"loss": loss}

    state = lf.TrainState.create(model, lf.optim.adamw(1e-3))
    with pytest.raises(
        ValueError, match=r"(?s)does not depend on the parameters.*lf\.apply\(model, params"
    ):
        lf.build(train_step, compile=compile)(state, make_data()[0])


def test_a_zero_learning_rate_is_not_mistaken_for_an_unused_loss():
    model = make_model(batchnorm=False)
    train_step, _ = make_steps(model)
    state = lf.TrainState.create(model, lf.optim.sgd(0.0))
    new, _ = lf.build(train_step, compile=False)(state, make_data()[0])
    assert int(new.step) == 1


# -- 5. BatchNorm buffers dropped ------------------------------------------------------------------


@pytest.mark.parametrize("compile", [False, pytest.param(True, marks=pytest.mark.compiled)])
def test_dropping_the_buffers_apply_updated_is_caught_on_the_first_call(compile):
    model = make_model()

    def train_step(state, batch):
        x, y = batch

        def loss_fn(params):
            logits, _new_buffers = lf.apply(model, params, state.buffers, x, train=True)
            return F.cross_entropy(logits, y)

        loss, grads = lf.value_and_grad(loss_fn)(state.params)
        return state.apply_gradients(grads), {"loss": loss}  # no buffers=: stats never move

    state = lf.TrainState.create(model, lf.optim.adam(1e-3))
    with pytest.raises(ValueError, match=r"(?s)`1\.running_mean`.*buffers=new_buffers"):
        lf.build(train_step, compile=compile)(state, make_data()[0])


def test_buffers_kept_on_purpose_in_eval_mode_are_not_an_error():
    model = make_model()

    def train_step(state, batch):
        x, y = batch

        def loss_fn(params):
            logits, _ = lf.apply(model, params, state.buffers, x, train=False)
            return F.cross_entropy(logits, y)

        loss, grads = lf.value_and_grad(loss_fn)(state.params)
        return state.apply_gradients(grads), {"loss": loss}

    state = lf.TrainState.create(model, lf.optim.adam(1e-3))
    new, _ = lf.build(train_step, compile=False)(state, make_data()[0])
    assert torch.equal(new.buffers["1.running_mean"], state.buffers["1.running_mean"])


# -- 6. in-place writes after the first call ------------------------------------------------------


def _writes_in_place_from_call(n: int):
    model = make_model(batchnorm=False)
    train_step, _ = make_steps(model)
    calls = []

    def sneaky(state, batch):
        calls.append(1)
        if len(calls) >= n:
            state.params["0.weight"].mul_(0.5)
        return train_step(state, batch)

    return model, sneaky


def test_validate_always_checks_every_call_for_in_place_writes():
    model, sneaky = _writes_in_place_from_call(2)
    step = lf.build(sneaky, compile=False, validate="always")
    state, _ = step(lf.TrainState.create(model, lf.optim.sgd(0.1)), make_data()[0])
    with pytest.raises(
        RuntimeError,
        match=r"modified its input in place at `state\.params\['0\.weight'\]`|modified its input in place",
    ):
        step(state, make_data()[1])


def test_the_default_checks_the_first_call_only():
    # The documented limit of the default: a write after the first call goes unseen.
    model, sneaky = _writes_in_place_from_call(2)
    step = lf.build(sneaky, compile=False)
    state, _ = step(lf.TrainState.create(model, lf.optim.sgd(0.1)), make_data()[0])
    kept = state.params["0.weight"].clone()
    step(state, make_data()[1])
    assert not torch.equal(state.params["0.weight"], kept)


def test_validate_rejects_other_values():
    with pytest.raises(ValueError, match=r"`validate` must be True .* got 'every'"):
        lf.build(lambda s, b: (s, {}), validate="every")


# -- 7. eval_every without eval_step; fit twice in one directory -------------------------------------


def test_eval_every_without_an_eval_step_is_an_error():
    model = make_model()
    train_step, _ = make_steps(model)
    state = lf.TrainState.create(model, lf.optim.sgd(0.1))
    with pytest.raises(ValueError, match=r"`eval_every=2` was given without `eval_step`"):
        lf.loop(train_step, state, make_data(), eval_every=2, compile=False)
    with pytest.raises(ValueError, match=r"`limit_eval_batches=1`"):
        lf.fit(train_step, state, make_data(), limit_eval_batches=1, compile=False, barebones=True)


def test_fit_twice_in_one_directory_keeps_the_two_runs_metrics_apart(tmp_path):
    model = make_model()
    train_step, _ = make_steps(model)
    snapshots = []
    for _ in range(2):
        state = lf.TrainState.create(model, lf.optim.sgd(0.1))
        lf.fit(
            train_step,
            state,
            make_data(),
            default_root_dir=tmp_path,
            compile=False,
            log_every_n_steps=1,
            enable_progress_bar=False,
            enable_model_summary=False,
        )
        logs = sorted(p for p in tmp_path.rglob("*") if p.is_file() and "logs" in p.parts)
        snapshots.append({p: p.read_bytes() for p in logs})
    first, second = snapshots
    assert first and set(first) < set(second)  # the second run wrote new files ...
    assert all(second[p] == data for p, data in first.items())  # ... and left the first's alone
    dirs = {p.relative_to(tmp_path).parts[0] for p in second}
    assert len(dirs) == 2, dirs


# -- errors that pointed nowhere ---------------------------------------------------------------------


def _plain():
    model = make_model()
    train_step, eval_step = make_steps(model)
    return model, train_step, eval_step, lf.TrainState.create(model, lf.optim.sgd(0.1))


def test_train_data_none_names_the_argument():
    _, train_step, _, state = _plain()
    with pytest.raises(
        TypeError, match=r"`train_data` must be an iterable of batches .* got NoneType"
    ):
        lf.fit(train_step, state, None, barebones=True)
    with pytest.raises(TypeError, match=r"`train_data` must be an iterable"):
        lf.loop(train_step, state, None)


def test_an_empty_loader_is_named_as_empty():
    _, train_step, eval_step, state = _plain()
    empty = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(torch.zeros(3, 8)), batch_size=4, drop_last=True
    )
    with pytest.raises(ValueError, match=r"`train_data` is empty \(len 0\).*drop_last"):
        lf.fit(train_step, state, empty, compile=False)
    with pytest.raises(ValueError, match=r"`eval_data` is empty"):
        lf.loop(train_step, state, make_data(), eval_step=eval_step, eval_data=[])


def test_fast_dev_run_of_the_wrong_type_names_the_argument():
    _, train_step, _, state = _plain()
    with pytest.raises(
        ValueError, match=r"`fast_dev_run` must be a bool or a positive int .* got 'yes'"
    ):
        lf.fit(train_step, state, make_data(), fast_dev_run="yes")


def test_fit_takes_every_build_option_for_a_plain_step_and_names_unknown_ones():
    _, train_step, _, state = _plain()
    final = lf.fit(
        train_step,
        state,
        make_data(),
        accumulate_grad_batches=2,
        validate=False,
        metric_reductions={"loss": "mean"},
        compile=False,
        barebones=True,
    )
    assert final.step == 4
    built = lf.build(train_step, compile=False)
    with pytest.raises(
        ValueError, match=r"already built .*accumulate_grad_batches=4.*lightfunc\.build"
    ):
        lf.fit(built, state, make_data(), accumulate_grad_batches=4, barebones=True)
    with pytest.raises(TypeError, match=r"no argument `gradient_clip_val` .*clip_by_global_norm"):
        lf.fit(train_step, state, make_data(), gradient_clip_val=1.0)
    with pytest.raises(TypeError, match=r"unexpected argument `max_epoch=2`.*max_epochs"):
        lf.fit(train_step, state, make_data(), max_epoch=2)


def test_eval_step_without_eval_data_names_the_missing_one():
    _, train_step, eval_step, state = _plain()
    with pytest.raises(ValueError, match=r"`eval_step` was given without `eval_data`"):
        lf.loop(train_step, state, make_data(), eval_step=eval_step)


@pytest.mark.parametrize("compile", [False, pytest.param(True, marks=pytest.mark.compiled)])
def test_apply_gradients_on_a_dict_state_says_what_to_do(compile):
    model, _, _, _ = _plain()

    def train_step(state, batch):
        x, y = batch

        def loss_fn(params):
            logits, _ = lf.apply(model, params, state["buffers"], x, train=True)
            return F.cross_entropy(logits, y)

        loss, grads = lf.value_and_grad(loss_fn)(state["params"])
        return state.apply_gradients(grads), {"loss": loss}

    state = {"params": lf.params_of(model), "buffers": lf.buffers_of(model)}
    with pytest.raises(
        AttributeError, match=r"called `\.apply_gradients` on a dict .*TrainState\.create"
    ):
        lf.build(train_step, compile=compile)(state, make_data()[0])


@pytest.mark.compiled
def test_a_dtype_mistake_in_a_compiled_step_surfaces_the_eager_error():
    _, train_step, _, state = _plain()
    x, y = make_data()[0]
    with pytest.raises(RuntimeError, match="dtype") as info:
        lf.build(train_step)(state, (x.double(), y))
    assert "torch._dynamo" not in type(info.value).__module__
    assert any(entry.name == "loss_fn" for entry in info.traceback)  # the user's own line


def _linear_with_gradients_changed_by(mistake):
    """A Linear(4, 2) and an MSE train step that hands `mistake(grads)` to `apply_gradients`."""
    model = torch.nn.Linear(4, 2)
    x, y = torch.randn(8, 4), torch.randn(8, 2)

    def train_step(state, batch):
        def loss_fn(params):
            return F.mse_loss(lf.apply(model, params, state.buffers, x, train=True)[0], y)

        loss, grads = lf.value_and_grad(loss_fn)(state.params)
        return state.apply_gradients(mistake(grads)), {"loss": loss}

    return model, train_step


@pytest.mark.parametrize(
    "mistake, message",
    [
        (lambda g: dict(g, bias=g["bias"].sum()), r"`bias` has shape \(\) .* shape \(2,\)"),
        (lambda g: dict(g, bias=g["bias"] * 2), None),  # a new tensor of the same kind: fine
        (lambda g: dict(g, weight=g["weight"][:1]), r"`weight` has shape \(1, 4\)"),
        (lambda g: dict(g, weight=g["weight"].double()), r"`weight` .* dtype torch\.float64"),
        (lambda g: list(g.values()), r"structure of `state\.params` .* got a list"),
        (lambda g: {"weight": g["weight"]}, r"missing \['bias'\]"),
    ],
    ids=["0-d", "control", "rows", "float64", "list", "missing"],
)
@pytest.mark.parametrize("tx", [lf.optim.sgd(0.1), lf.optim.adamw(0.1)], ids=["sgd", "adamw"])
def test_a_gradient_unlike_its_parameter_is_refused_naming_it(mistake, message, tx):
    # Before: a 0-d gradient for a (k,) parameter was broadcast into its update (same shapes
    # out, so no check caught it); a float64 one failed in `lerp` naming no parameter.
    model, train_step = _linear_with_gradients_changed_by(mistake)
    step = lf.build(train_step, compile=False)
    state = lf.TrainState.create(model, tx)
    if message is None:
        step(state, None)
        return
    with pytest.raises((ValueError, TypeError), match=message):
        step(state, None)


@pytest.mark.compiled
def test_a_gradient_unlike_its_parameter_is_refused_in_a_compiled_step_too(fresh_dynamo):
    model, train_step = _linear_with_gradients_changed_by(lambda g: dict(g, bias=g["bias"].sum()))
    with pytest.raises(ValueError, match=r"`bias` has shape \(\) .* shape \(2,\)"):
        lf.build(train_step)(lf.TrainState.create(model, lf.optim.adamw(0.1)), None)


def test_a_layer_behind_a_zero_initialised_one_needs_skip_unused_false_to_match_torch():
    # The README's documented difference: layer 0's gradient is exactly zero on the first step
    # (the next layer's weight is zero), torch.optim still applies weight decay and momentum.
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
    torch.nn.init.zeros_(model[2].weight)
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(8, 4, generator=g), torch.randn(8, 2, generator=g)) for _ in range(6)]
    reference = copy.deepcopy(model)
    opt = torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9, weight_decay=0.1)
    for x, y in batches:
        opt.zero_grad()
        F.mse_loss(reference(x), y).backward()
        opt.step()
    theirs = {k: p.detach() for k, p in reference.named_parameters()}
    step = lf.build(_mse_step(model), compile=False)
    finals = {}
    for skip in (True, False):
        state = lf.TrainState.create(
            model, lf.optim.sgd(0.1, momentum=0.9, weight_decay=0.1), skip_unused=skip
        )
        for batch in batches:
            state, _ = step(state, batch)
        finals[skip] = state.params
    assert_trees_close(finals[False], theirs, rtol=0, atol=0)  # torch's arithmetic, bit for bit
    assert (finals[True]["0.weight"] - theirs["0.weight"]).abs().max() > 1e-3  # as documented


# -- mistakes named, found by an independent hostile check of the README ----------------------


def test_a_model_or_none_given_as_the_loop_state_is_named():
    model, train_step, _, _ = _plain()
    for given, named in ((model, r"a Sequential \(an nn.Module\)"), (None, "None")):
        with pytest.raises(TypeError, match=rf"`state` is {named}; .*TrainState\.create"):
            lf.loop(train_step, given, make_data(), max_steps=1)


def test_one_callback_not_in_a_list_is_taken_as_lightning_takes_it():
    _, train_step, _, state = _plain()
    stopper = lf.callbacks.EarlyStopping("loss", patience=1, min_delta=100.0)
    runs = [
        list(lf.loop(train_step, state, make_data(), max_epochs=5, callbacks=cbs))[-1]
        for cbs in (stopper, [lf.callbacks.EarlyStopping("loss", patience=1, min_delta=100.0)])
    ]
    assert runs[0].step == runs[1].step < 5 * len(make_data())
    with pytest.raises(TypeError, match=r"`callbacks` must be a list of .* got str"):
        lf.loop(train_step, state, make_data(), max_steps=1, callbacks="EarlyStopping")


def test_evaluate_names_a_bad_limit_batches():
    _, _, eval_step, state = _plain()
    with pytest.raises(ValueError, match=r"`limit_batches` as a count must be >= 1, got -1"):
        lf.evaluate(eval_step, state, make_data(), limit_batches=-1)


def test_columns_given_to_loader_as_a_list_are_refused_at_once():
    x, y = torch.randn(40, 8), torch.randint(0, 3, (40,))
    with pytest.raises(TypeError, match=r"list of 2 tensors .* pass the columns as a tuple"):
        lf.Loader([x, y], 16)
    assert len(lf.Loader([torch.randn(3) for _ in range(5)], 2)) == 3  # a list of examples


def test_a_checkpoint_manager_on_a_file_is_refused_at_once(tmp_path):
    path = tmp_path / "taken"
    path.write_text("not a directory")
    with pytest.raises(ValueError, match="is a file, not a directory"):
        lf.CheckpointManager(path)
    assert path.read_text() == "not a directory"


def test_a_strategy_class_instead_of_an_instance_is_named():
    import lightfunc.distributed as lfd

    _, train_step, _, _ = _plain()
    with pytest.raises(TypeError, match=r"is the class DDP, not a strategy object.*DDP\(mesh\)"):
        lf.build(train_step, strategy=lfd.DDP)


@pytest.mark.parametrize("seed", ["a", 1.5, True])
def test_a_seed_that_is_no_int_is_refused(seed):
    with pytest.raises(TypeError, match="`seed` must be an int"):
        lf.TrainState.create(torch.nn.Linear(2, 2), lf.optim.sgd(0.1), seed=seed)


def test_fit_flags_logger_names_regions_and_cache_paths_are_checked(tmp_path):
    _, train_step, _, state = _plain()
    with pytest.raises(TypeError, match="`enable_progress_bar` must be True or False, got str"):
        lf.fit(train_step, state, make_data(), max_steps=1, enable_progress_bar="no",
               default_root_dir=tmp_path)  # fmt: skip
    with pytest.raises(ValueError, match="leads outside it"):
        lf.loggers.CSVLogger(tmp_path / "logs", name="../escape")
    with pytest.raises(TypeError, match=r"`model` must be the torch\.nn\.Module"):
        lf.compile_regions("model")  # type: ignore[arg-type]
    cache = tmp_path / "compile_cache.bin"
    cache.write_bytes(b"")
    with pytest.raises(ValueError, match="is a file: pass the checkpoint directory"):
        lf.load_compile_cache(cache)
    assert not (tmp_path / "escape").exists() and not list(tmp_path.glob("version_*"))
