"""The public names: what `import lightfunc` exports, and the renamed ones that still warn."""

import importlib

import pytest

import lightfunc as lf
from lightfunc import _contract, _strategy


def test_the_contract_types_are_exported_from_the_package():
    assert lf.LoopState is _contract.LoopState
    assert lf.Metrics is _contract.Metrics
    assert lf.TrainStep is _contract.TrainStep
    assert lf.EvalStep is _contract.EvalStep
    assert lf.Strategy is _contract.Strategy
    assert lf.SingleProcess is _strategy.SingleProcess
    assert isinstance(lf.SingleProcess(), lf.Strategy)


def test_callback_lives_in_the_callbacks_namespace():
    assert "Callback" not in vars(lf)
    assert lf.callbacks.Callback.__name__ == "Callback"


@pytest.mark.parametrize(
    ("old", "new", "expected"),
    [
        ("TrainerState", "lightfunc.LoopState", lambda: lf.LoopState),
        ("ProgressBar", "lightfunc.callbacks.ProgressBar", lambda: lf.callbacks.ProgressBar),
        ("export_params", "lightfunc.save_params", lambda: lf.save_params),
        ("policy", "lightfunc.parse_precision", lambda: lf.parse_precision),
        ("apply_if_finite", "lightfunc.select_if_finite", lambda: lf.select_if_finite),
    ],
)
def test_a_renamed_name_warns_with_its_new_name_and_is_the_same_object(old, new, expected):
    with pytest.warns(
        DeprecationWarning, match=rf"`lightfunc\.{old}` is deprecated .* use `{new}`"
    ):
        value = getattr(lf, old)
    assert value is expected()


def test_from_import_of_a_renamed_name_warns_too():
    with pytest.warns(DeprecationWarning, match=r"use `lightfunc\.LoopState`"):
        from lightfunc import TrainerState
    assert TrainerState is lf.LoopState


def test_renamed_names_are_not_exported_eagerly():
    assert "TrainerState" not in vars(lf)
    assert "ProgressBar" not in vars(lf)
    assert "export_params" not in vars(lf)
    assert "policy" not in vars(lf) and "apply_if_finite" not in vars(lf)


def test_the_optimizer_wrappers_live_in_optim():
    assert lf.optim.apply_if_finite.__module__ == "lightfunc.optim._wrappers"
    assert lf.optim.accumulate_gradients.__module__ == "lightfunc.optim._wrappers"


def test_an_unknown_name_raises_attribute_error():
    with pytest.raises(AttributeError, match=r"module 'lightfunc' has no attribute 'Trainer'"):
        _ = lf.Trainer


def test_the_version_comes_from_the_version_module():
    assert lf.__version__ == importlib.import_module("lightfunc._version").__version__
