"""Precompiled steps (`CompileOptions(precompile=True)`): Dynamo's trace saved in the compile cache.

What must hold: a precompiled step computes what the eager step and a plain
compiled step compute; a saved step is used by the same step built again
(nothing traced); anything that changed (the model, a function in the
closure, a module-level value, the source) makes it compile again, never run
the old graph. The in-process tests use the `aot_eager` backend (no C++); one
test runs inductor in two fresh processes, as a resumed run would.
"""

from __future__ import annotations

import importlib
import sys
import textwrap
import types
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import run_script

import lightfunc as lf
from lightfunc import _precompile
from lightfunc._compile import CompileWatch, compile_counts
from lightfunc._identity import code_digest, identity
from lightfunc._precompile import step_key
from lightfunc.testing import assert_trees_close

_SCALE = 1.0  # read by `_scaled_step`: a module-level value a saved step depends on
_OPAQUE = types.SimpleNamespace(scale=1.0)  # an object with no lasting identity
AOT_EAGER = lf.CompileOptions(precompile=True, backend="aot_eager")


@pytest.fixture(autouse=True)
def fresh_registry(monkeypatch):
    """Each test sees only its own saved and loaded steps, as a new process would."""
    monkeypatch.setattr(_precompile, "_LOADED", {})
    monkeypatch.setattr(_precompile, "_COMPILED", {})


def _model(act: type[torch.nn.Module] = torch.nn.ReLU) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), act(), torch.nn.Linear(8, 3))


def _batch(n: int = 6, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 4, generator=g), torch.randint(0, 3, (n,), generator=g)


def _step(model: torch.nn.Module, loss_fn=F.cross_entropy):
    def train_step(state, batch):
        x, y = batch

        def loss_of(params):
            out, _ = lf.apply(model, params, state.buffers, x, train=True)
            return loss_fn(out, y)

        loss, grads = lf.value_and_grad(loss_of)(state.params)
        return state.apply_gradients(grads), {"loss": loss}

    return train_step


def _scaled_step(model: torch.nn.Module):
    def train_step(state, batch):
        x, y = batch

        def loss_of(params):
            out, _ = lf.apply(model, params, state.buffers, x, train=True)
            return F.cross_entropy(out, y) * _SCALE

        loss, grads = lf.value_and_grad(loss_of)(state.params)
        return state.apply_gradients(grads), {"loss": loss}

    return train_step


def _opaque_step(model: torch.nn.Module):
    def train_step(state, batch):
        x, y = batch

        def loss_of(params):
            out, _ = lf.apply(model, params, state.buffers, x, train=True)
            return F.cross_entropy(out, y) * _OPAQUE.scale

        loss, grads = lf.value_and_grad(loss_of)(state.params)
        return state.apply_gradients(grads), {"loss": loss}

    return train_step


def _mse(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(out, F.one_hot(y, 3).float())


def _train(fn, model, compile, batches):
    step = lf.build(fn, compile=compile)
    state = lf.TrainState.create(model, lf.optim.adamw(1e-2))
    losses = []
    for batch in batches:
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    return step, state.params, losses


# -- identities (no compile) --------------------------------------------------------------------


def test_identity_of_functions_is_their_code_not_their_object():
    def make(k):
        def f(x):
            return x * k

        return f

    def g(x):
        return x + 1

    assert identity(make(1)) == identity(make(2))  # one code; closure values are guarded apart
    assert identity(make(1)) != identity(g)
    assert identity(F.relu) == identity(F.relu) and identity(F.relu).startswith("function:")


def test_identity_of_constants_classes_modules_and_containers():
    assert identity(torch.float32) == "dtype:torch.float32"
    assert identity(torch.nn.Linear) == "class:torch.nn.modules.linear.Linear"
    assert identity(F) == "module:torch.nn.functional"
    assert identity({"a": (1, 2.0)}) == identity({"a": (1, 2.0)})
    assert identity({1, 2, 3}) == identity({3, 2, 1})
    assert identity((1, 2)) != identity((2, 1))
    assert identity(1) != identity(1.0) != identity(True)


@pytest.mark.parametrize(
    "value", [torch.zeros(1), types.SimpleNamespace(a=1), object(), [object()], range(3)]
)
def test_objects_without_a_lasting_identity_have_none(value):
    assert identity(value) is None


def test_code_digest_follows_the_code_not_the_file():
    first = compile("def f(x):\n    return x * 2.0\n", "a.py", "exec")
    moved = compile("\n\n\ndef f(x):\n    return x * 2.0\n", "b.py", "exec")
    changed = compile("def f(x):\n    return x * 3.0\n", "a.py", "exec")
    assert code_digest(first) == code_digest(moved)
    assert code_digest(first) != code_digest(changed)


def test_step_key_depends_on_code_and_options():
    fn = _step(_model())
    assert step_key(fn, {"backend": "inductor"}) == step_key(
        _step(_model()), {"backend": "inductor"}
    )
    assert step_key(fn, {"backend": "inductor"}) != step_key(fn, {"backend": "aot_eager"})
    assert step_key(fn, {"backend": "inductor"}) != step_key(
        _scaled_step(_model()), {"backend": "inductor"}
    )


def test_precompile_without_fullgraph_is_refused():
    with pytest.raises(ValueError, match="`precompile=True` needs `fullgraph=True`"):
        lf.CompileOptions(precompile=True, fullgraph=False)


# -- compiled in this process (aot_eager) --------------------------------------------------------


@pytest.mark.compiled
@pytest.mark.slow
def test_precompiled_step_matches_eager_and_is_one_graph():
    batches = [_batch(seed=s) for s in range(3)]
    _, eager, eager_losses = _train(_step(_model()), _model(), False, batches)
    before = compile_counts()["graphs"]
    watch = CompileWatch()
    try:
        step, params, losses = _train(_step(_model()), _model(), AOT_EAGER, batches)
    finally:
        watch.close()
    assert step._run.entries == 1 and step._run.loaded == 0
    assert compile_counts()["graphs"] == before + 1
    assert len(watch.events) == 1  # the progress bar's "compiling train_step" sees it
    assert_trees_close(params, eager, rtol=1e-5, atol=1e-6)  # float32, one graph vs eager ops
    assert losses == pytest.approx(eager_losses, rel=1e-5)


@pytest.mark.compiled
@pytest.mark.slow
def test_saved_step_is_used_by_the_same_step_built_again(tmp_path, monkeypatch):
    batches = [_batch(seed=s) for s in range(3)]
    _, first_params, first_losses = _train(_step(_model()), _model(), AOT_EAGER, batches)
    info = lf.save_compile_cache(tmp_path)
    assert info is not None and info.steps == 1

    monkeypatch.setattr(_precompile, "_COMPILED", {})  # "a new process"
    assert lf.load_compile_cache(tmp_path).steps == 1
    before = compile_counts()["graphs"]
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        step, params, losses = _train(_step(_model()), _model(), AOT_EAGER, batches)
    assert step._run.loaded == 1 and step._run.entries == 1
    assert compile_counts()["graphs"] == before  # nothing traced
    assert_trees_close(params, first_params, rtol=0, atol=0)  # the same graph
    assert losses == first_losses


def _saved(tmp_path, fn, model) -> None:
    _train(fn, model, AOT_EAGER, [_batch()])
    assert lf.save_compile_cache(tmp_path).steps == 1


def _rerun_checked(tmp_path, fn, model, monkeypatch):
    """Load the cache, run `fn` precompiled; it must compile anew and match eager."""
    monkeypatch.setattr(_precompile, "_COMPILED", {})
    lf.load_compile_cache(tmp_path)
    batches = [_batch(seed=s) for s in range(2)]
    before = compile_counts()["graphs"]
    step, params, losses = _train(fn, model, AOT_EAGER, batches)
    assert step._run.loaded == 0 and step._run.entries == 1
    assert compile_counts()["graphs"] == before + 1
    return params, losses, batches


@pytest.mark.compiled
@pytest.mark.slow
def test_a_different_model_class_compiles_again(tmp_path, monkeypatch):
    _saved(tmp_path, _step(_model()), _model())
    params, _, batches = _rerun_checked(
        tmp_path, _step(_model(torch.nn.Tanh)), _model(torch.nn.Tanh), monkeypatch
    )
    _, eager, _ = _train(_step(_model(torch.nn.Tanh)), _model(torch.nn.Tanh), False, batches)
    assert_trees_close(params, eager, rtol=1e-5, atol=1e-6)


@pytest.mark.compiled
@pytest.mark.slow
def test_a_different_function_in_the_closure_compiles_again(tmp_path, monkeypatch):
    _saved(tmp_path, _step(_model()), _model())
    params, losses, batches = _rerun_checked(tmp_path, _step(_model(), _mse), _model(), monkeypatch)
    _, eager, eager_losses = _train(_step(_model(), _mse), _model(), False, batches)
    assert_trees_close(params, eager, rtol=1e-5, atol=1e-6)
    assert losses == pytest.approx(eager_losses, rel=1e-5)


@pytest.mark.compiled
@pytest.mark.slow
def test_a_changed_module_level_value_compiles_again(tmp_path, monkeypatch):
    _saved(tmp_path, _scaled_step(_model()), _model())
    monkeypatch.setattr(sys.modules[__name__], "_SCALE", 3.0)
    with pytest.warns(RuntimeWarning, match=r"_SCALE is not what it was"):
        _, losses, batches = _rerun_checked(tmp_path, _scaled_step(_model()), _model(), monkeypatch)
    _, _, eager_losses = _train(_scaled_step(_model()), _model(), False, batches)
    assert losses == pytest.approx(eager_losses, rel=1e-5)


@pytest.mark.compiled
@pytest.mark.slow
def test_changed_source_compiles_again(tmp_path, monkeypatch):
    source = textwrap.dedent(
        """
        import torch.nn.functional as F

        def loss_fn(out, y):
            return F.cross_entropy(out, y) * 1.0
        """
    )
    (tmp_path / "user_loss.py").write_text(source)
    monkeypatch.syspath_prepend(str(tmp_path))
    user = importlib.import_module("user_loss")
    monkeypatch.delitem(sys.modules, "user_loss")
    _saved(tmp_path, _step(_model(), user.loss_fn), _model())
    (tmp_path / "user_loss.py").write_text(source.replace("* 1.0", "* 2.0"))
    user = importlib.import_module("user_loss")  # the edited file, as a new process reads it
    with pytest.warns(RuntimeWarning, match=r"user_loss.* (changed|is not what it was)"):
        _, losses, batches = _rerun_checked(
            tmp_path, _step(_model(), user.loss_fn), _model(), monkeypatch
        )
    _, _, eager_losses = _train(_step(_model(), user.loss_fn), _model(), False, batches)
    assert losses == pytest.approx(eager_losses, rel=1e-5)


@pytest.mark.compiled
@pytest.mark.slow
def test_new_batch_shape_is_a_second_signature():
    batches = [_batch(6, seed=0), _batch(4, seed=1), _batch(6, seed=2), _batch(4, seed=3)]
    step, params, losses = _train(_step(_model()), _model(), AOT_EAGER, batches)
    assert step._run.entries == 2
    _, eager, eager_losses = _train(_step(_model()), _model(), False, batches)
    assert_trees_close(params, eager, rtol=1e-5, atol=1e-6)
    assert losses == pytest.approx(eager_losses, rel=1e-5)


@pytest.mark.compiled
@pytest.mark.slow
def test_an_attribute_of_a_module_level_object_is_guarded(tmp_path, monkeypatch):
    # torch's guards on `G['_OPAQUE'].scale` are kept (the step's own module): checked per call.
    model = _model()
    step = lf.build(_opaque_step(model), compile=AOT_EAGER)
    state = lf.TrainState.create(model, lf.optim.adamw(1e-2))
    state, _ = step(state, _batch())
    assert lf.save_compile_cache(tmp_path).steps == 1
    monkeypatch.setattr(_OPAQUE, "scale", 3.0)
    _, metrics = step(state, _batch(seed=2))
    assert step._run.entries == 2
    _, expected = lf.build(_opaque_step(model), compile=False)(state, _batch(seed=2))
    assert float(metrics["loss"]) == pytest.approx(float(expected["loss"]), rel=1e-6)


@pytest.mark.compiled
@pytest.mark.slow
def test_rebinding_a_module_level_value_between_calls_compiles_again(monkeypatch):
    model = _model()
    step = lf.build(_scaled_step(model), compile=AOT_EAGER)
    state = lf.TrainState.create(model, lf.optim.adamw(1e-2))
    state, _ = step(state, _batch())
    monkeypatch.setattr(sys.modules[__name__], "_SCALE", 3.0)
    _, metrics = step(state, _batch(seed=2))
    assert step._run.entries == 2
    _, expected = lf.build(_scaled_step(model), compile=False)(state, _batch(seed=2))
    assert float(metrics["loss"]) == pytest.approx(float(expected["loss"]), rel=1e-6)


# -- inductor, in fresh processes ----------------------------------------------------------------

_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import torch
    import torch.nn.functional as F
    import lightfunc as lf
    from lightfunc._compile import compile_counts

    mode, folder = sys.argv[1], sys.argv[2]
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))

    def train_step(state, batch):
        x, y = batch

        def loss_of(params):
            out, _ = lf.apply(model, params, state.buffers, x, train=True)
            return F.cross_entropy(out, y)

        loss, grads = lf.value_and_grad(loss_of)(state.params)
        return state.apply_gradients(grads), {"loss": loss}

    info = lf.load_compile_cache(folder) if mode == "warm" else None
    step = lf.build(train_step, compile=lf.CompileOptions(precompile=True))
    state = lf.TrainState.create(model, lf.optim.adamw(1e-2))
    g = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(3):
        batch = torch.randn(6, 4, generator=g), torch.randint(0, 3, (6,), generator=g)
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    if mode == "cold":
        info = lf.save_compile_cache(folder)
    print(json.dumps({
        "losses": losses, "graphs": compile_counts()["graphs"], "loaded": step._run.loaded,
        "steps": info.steps, "params": {k: v.tolist() for k, v in state.params.items()},
    }))
    """
)


def _process(tmp_path: Path, mode: str) -> dict:
    return run_script(
        tmp_path / "step.py", _SCRIPT, [mode, str(tmp_path)], tmp_path / f"inductor-{mode}"
    )


@pytest.mark.compiled
@pytest.mark.multiprocess
@pytest.mark.slow
def test_warm_process_runs_the_saved_step_without_tracing(tmp_path):
    cold = _process(tmp_path, "cold")
    assert cold["steps"] == 1 and cold["graphs"] == 1
    warm = _process(tmp_path, "warm")  # its own empty inductor cache
    assert warm["steps"] == 1 and warm["loaded"] == 1
    assert warm["graphs"] == 0  # Dynamo traced nothing
    assert warm["losses"] == cold["losses"]  # the same kernels: bit for bit
    for name, value in cold["params"].items():
        torch.testing.assert_close(
            torch.tensor(warm["params"][name]), torch.tensor(value), rtol=0, atol=0
        )


@pytest.mark.compiled
@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:dynamo_pgo force disabled")
def test_step_torch_cannot_precompile_falls_back_to_plain_compile():
    # aot_compile needs inductor's caches; with them off it raises and the step compiles as usual.
    # `config.patch`, not monkeypatch: undoing a monkeypatched torch config attribute deletes it
    # (it lives behind the config module's __getattr__) and leaves the caches off for every
    # later test of the session.
    batches = [_batch(seed=s) for s in range(2)]
    with (
        torch._inductor.config.patch(force_disable_caches=True),
        pytest.warns(RuntimeWarning, match=r"plain torch.compile.*force_disable_caches"),
    ):
        step, params, _ = _train(_step(_model()), _model(), AOT_EAGER, batches)
    assert not torch.compiler.config.force_disable_caches
    assert step._run.entries == 0
    _, eager, _ = _train(_step(_model()), _model(), False, batches)
    assert_trees_close(params, eager, rtol=1e-5, atol=1e-6)
