"""Precision policies, dynamic loss scaling, and mixed-precision training of the digits MLP."""

from __future__ import annotations

import functools
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

import lightfunc as lf
from lightfunc._precision import LossScale, Policy, apply_if_finite, cast_tree, policy

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

F64, F32, BF16, F16 = torch.float64, torch.float32, torch.bfloat16, torch.float16
ALL = ["64-true", "32-true", "bf16-mixed", "16-mixed", "bf16-true", "16-true"]


@pytest.mark.parametrize(
    ("spec", "dtypes"),
    [
        ("64-true", (F64, F64, F64)),
        ("32-true", (F32, F32, F32)),
        ("bf16-mixed", (F32, BF16, F32)),
        ("16-mixed", (F32, F16, F32)),
        ("bf16-true", (BF16, BF16, BF16)),
        ("16-true", (F16, F16, F16)),
        (64, (F64, F64, F64)),
        (32, (F32, F32, F32)),
        (16, (F32, F16, F32)),
        ("16", (F32, F16, F32)),
        ("bf16", (F32, BF16, F32)),
    ],
)
def test_precision_strings_parse_to_policies(spec, dtypes):
    p = policy(spec)
    assert (p.param_dtype, p.compute_dtype, p.output_dtype) == dtypes
    assert p.needs_loss_scaling == (F16 in dtypes)


def test_policy_passes_a_policy_through():
    p = Policy(F32, BF16, F32)
    assert policy(p) is p


@pytest.mark.parametrize("bad", ["fp16", "bf16-true-ish", 8, True, None])
def test_unknown_precision_error_lists_the_valid_strings(bad):
    with pytest.raises(ValueError, match=r"'64-true', '32-true', 'bf16-mixed', '16-mixed'.*got"):
        policy(bad)


def test_cast_tree_casts_floating_tensors_only():
    tree = {"w": torch.ones(2), "n": torch.ones(2, dtype=torch.int64), "flag": True, "k": None}
    out = cast_tree(tree, BF16)
    assert out["w"].dtype == BF16
    assert out["n"] is tree["n"]
    assert out["flag"] is True and out["k"] is None
    p = policy("bf16-mixed")
    assert p.cast_to_compute(tree)["w"].dtype == BF16
    assert p.cast_to_param(out)["w"].dtype == F32
    assert p.cast_to_output(torch.ones(2, dtype=BF16)).dtype == F32


# ---------------------------------------------------------------- LossScale units


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"init": 0.0}, "`init` must be a finite positive"),
        ({"init": float("inf")}, "`init` must be a finite positive"),
        ({"growth_interval": 0}, "`growth_interval` must be a positive int"),
        ({"growth_interval": 2.5}, "`growth_interval` must be a positive int"),
        ({"growth_factor": 1.0}, "`growth_factor` must be above 1"),
        ({"backoff_factor": 1.0}, r"`backoff_factor` must be in \(0, 1\)"),
    ],
)
def test_loss_scale_rejects_bad_settings(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LossScale.create(**kwargs)


def test_loss_scale_backs_off_on_overflow_and_grows_after_the_interval():
    s = LossScale.create(8.0, growth_interval=2)
    yes, no = torch.tensor(True), torch.tensor(False)
    s = s.update(yes)
    assert (float(s.scale), int(s.good_steps)) == (8.0, 1)
    s = s.update(no)
    assert (float(s.scale), int(s.good_steps)) == (4.0, 0)
    s = s.update(yes).update(yes)
    assert (float(s.scale), int(s.good_steps)) == (8.0, 0)
    assert s.scale.dtype == F32 and s.good_steps.dtype == torch.int64


def test_loss_scale_never_grows_past_float32():
    s = LossScale.create(2.0**127, growth_interval=1).update(torch.tensor(True))
    assert float(s.scale) == 2.0**127


def test_scale_unscale_and_finite_check():
    s = LossScale.create(1024.0)
    loss = torch.tensor(3.0, dtype=F16)
    assert s.scale_loss(loss).dtype == F32 and float(s.scale_loss(loss)) == 3072.0
    grads = {"a": torch.full((3,), 2048.0, dtype=F16), "b": torch.tensor([512.0])}
    un = s.unscale(grads)
    assert un["a"].dtype == F16 and un["a"].tolist() == [2.0] * 3 and un["b"].tolist() == [0.5]
    assert bool(s.all_finite(un))
    assert not bool(s.all_finite({**un, "b": torch.tensor([float("nan")])}))
    assert bool(s.all_finite({}))


def test_loss_scale_round_trips_through_save_and_load(tmp_path):
    s = LossScale.create(4096.0, growth_interval=7).update(torch.tensor(True))
    path = lf.save({"scale": s}, tmp_path / "scale.safetensors")
    back = lf.load(path, like={"scale": LossScale.create(growth_interval=7)})["scale"]
    assert torch.equal(back.scale, s.scale) and back.scale.dtype == F32
    assert torch.equal(back.good_steps, s.good_steps) and back.good_steps.dtype == torch.int64
    assert back.growth_interval == 7


# ---------------------------------------------------------------- the step pattern


def make_mixed_step(model: torch.nn.Module, spec: str) -> Any:
    """The documented mixed-precision step over a {"train": TrainState, "scale": LossScale} state.

    The batch is `(x, y, factor)`: the loss is multiplied by the 0-d tensor
    `factor` (1.0 normally; huge to force an overflow).
    """
    pol = policy(spec)

    def train_step(state: dict[str, Any], batch: Any) -> tuple[dict[str, Any], Any]:
        ts, scale = state["train"], state["scale"]
        x, y, factor = batch

        def loss_fn(params: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
            logits, _ = lf.apply(
                model, pol.cast_to_compute(params), {}, pol.cast_to_compute(x), train=True
            )
            loss = F.cross_entropy(pol.cast_to_output(logits), y) * factor
            return scale.scale_loss(loss), loss

        (_, loss), grads = lf.value_and_grad(loss_fn, has_aux=True)(ts.params)
        grads = pol.cast_to_param(scale.unscale(grads))
        finite = scale.all_finite(grads)
        new_ts = apply_if_finite(finite, ts.apply_gradients(grads), ts)
        metrics = {"loss": loss, "loss_scale": scale.scale, "skipped": ~finite}
        return {"train": new_ts, "scale": scale.update(finite)}, metrics

    return lf.build(train_step, compile=False)


def init_state(model: torch.nn.Module, spec: str, tx: Any, **scale_kwargs: Any) -> dict[str, Any]:
    params = policy(spec).cast_to_param(lf.params_of(model))
    return {"train": lf.TrainState.create(params, tx), "scale": LossScale.create(**scale_kwargs)}


def tiny_mlp() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))


def tiny_batch(factor: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(32, 8, generator=g)
    return x, (x[:, 0] > 0).long(), torch.tensor(factor)


def test_overflow_on_16_mixed_skips_the_step_and_halves_the_scale():
    model = tiny_mlp()
    step = make_mixed_step(model, "16-mixed")
    state = init_state(model, "16-mixed", lf.optim.adamw(1e-2), init=1024.0, growth_interval=3)
    state, m = step(state, tiny_batch(1.0))
    assert not bool(m["skipped"]) and int(state["train"].step) == 1
    before = state["train"]

    state, m = step(state, tiny_batch(1e30))  # dlogits overflow float16
    assert bool(m["skipped"]) and float(m["loss_scale"]) == 1024.0
    assert float(state["scale"].scale) == 512.0 and int(state["scale"].good_steps) == 0
    for old, new in zip(lf.tree_leaves(before), lf.tree_leaves(state["train"]), strict=True):
        assert not isinstance(old, torch.Tensor) or torch.equal(old, new)

    state, m = step(state, tiny_batch(1.0))
    assert not bool(m["skipped"]) and int(state["train"].step) == 2
    assert not torch.equal(state["train"].params["0.weight"], before.params["0.weight"])
    old_opt, new_opt = lf.tree_leaves(before.opt_state), lf.tree_leaves(state["train"].opt_state)
    assert not all(torch.equal(a, b) for a, b in zip(old_opt, new_opt, strict=True))

    for _ in range(2):  # three finite steps in a row since the overflow: the scale grows
        state, m = step(state, tiny_batch(1.0))
    assert float(state["scale"].scale) == 1024.0 and int(state["scale"].good_steps) == 0


@pytest.mark.parametrize(("spec", "dtype"), [("bf16-mixed", F32), ("bf16-true", BF16)])
def test_master_weights_keep_the_param_dtype(spec, dtype):
    model = tiny_mlp()
    step = make_mixed_step(model, spec)
    state = init_state(model, spec, lf.optim.adamw(1e-2))
    for _ in range(3):
        state, _ = step(state, tiny_batch(1.0))
    assert int(state["train"].step) == 3
    leaves = lf.tree_leaves((state["train"].params, state["train"].opt_state))
    assert {x.dtype for x in leaves if x.is_floating_point()} == {dtype}


# ---------------------------------------------------------------- digits, per policy


@functools.cache
def digits_accuracy(spec: str) -> float:
    """Test accuracy of the digits MLP after 8 eager epochs under `spec`; same settings for all."""
    from digits import load_data, make_model

    train_set, test_set = load_data(0)
    torch.manual_seed(0)
    model = make_model(hidden=128, dropout=0.0)
    # eps=1e-4, not 1e-8: under "16-true" Adam's moments are float16, where 1e-8
    # rounds to 0 and an underflowed second moment gives 0 / 0.
    state = init_state(model, spec, lf.optim.adamw(2e-3, weight_decay=1e-2, eps=1e-4))
    step = make_mixed_step(model, spec)
    one = torch.tensor(1.0)
    loader = lf.Loader(train_set.tensors, 64, shuffle=True, seed=0, drop_last=True)
    for _ in range(8):
        for x, y in loader:
            state, _ = step(state, (x, y, one))
    pol = policy(spec)
    x, y = test_set.tensors
    params = pol.cast_to_compute(state["train"].params)
    logits, _ = lf.apply(model, params, {}, pol.cast_to_compute(x), train=False)
    return float((logits.argmax(-1) == y).float().mean())


@pytest.mark.parametrize("spec", [s for s in ALL if s != "32-true"])
def test_each_policy_trains_digits_as_well_as_fp32(spec):
    reference = digits_accuracy("32-true")
    assert reference > 0.9
    assert abs(digits_accuracy(spec) - reference) <= 0.01 + 1e-6
