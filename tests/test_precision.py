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
import lightfunc.testing
from lightfunc._precision import LossScale, Policy, cast_tree, parse_precision, select_if_finite

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
    p = parse_precision(spec)
    assert (p.param_dtype, p.compute_dtype, p.output_dtype) == dtypes
    assert p.needs_loss_scaling == (F16 in dtypes)


def test_policy_passes_a_policy_through():
    p = Policy(F32, BF16, F32)
    assert parse_precision(p) is p


@pytest.mark.parametrize("bad", ["fp16", "bf16-true-ish", 8, True, None])
def test_unknown_precision_error_lists_the_valid_strings(bad):
    with pytest.raises(ValueError, match=r"'64-true', '32-true', 'bf16-mixed', '16-mixed'.*got"):
        parse_precision(bad)


def test_cast_tree_casts_floating_tensors_only():
    tree = {"w": torch.ones(2), "n": torch.ones(2, dtype=torch.int64), "flag": True, "k": None}
    out = cast_tree(tree, BF16)
    assert out["w"].dtype == BF16
    assert out["n"] is tree["n"]
    assert out["flag"] is True and out["k"] is None
    p = parse_precision("bf16-mixed")
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
    pol = parse_precision(spec)

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
        new_ts = select_if_finite(finite, ts.apply_gradients(grads), ts)
        metrics = {"loss": loss, "loss_scale": scale.scale, "skipped": ~finite}
        return {"train": new_ts, "scale": scale.update(finite)}, metrics

    return lf.build(train_step, compile=False)


def init_state(model: torch.nn.Module, spec: str, tx: Any, **scale_kwargs: Any) -> dict[str, Any]:
    params = parse_precision(spec).cast_to_param(lf.params_of(model))
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


# ---------------------------------------------------------------- build(..., precision=)


def plain_step(model: torch.nn.Module) -> Any:
    """A train step that knows nothing of precision; the batch is `(x, y, factor)`."""

    def train_step(state: lf.TrainState, batch: Any) -> tuple[lf.TrainState, Any]:
        x, y, factor = batch

        def loss_fn(params: dict[str, torch.Tensor]) -> tuple[torch.Tensor, Any]:
            logits, buffers = lf.apply(model, params, state.buffers, x, train=True)
            return F.cross_entropy(logits, y) * factor, (logits, buffers)

        (loss, (logits, buffers)), grads = lf.value_and_grad(
            loss_fn, has_aux=True, loss_scale=state.loss_scale
        )(state.params)
        metrics = {"loss": loss, "logit_bytes": torch.tensor(logits.element_size())}
        return state.apply_gradients(grads, buffers=buffers), metrics

    return train_step


def eval_step_for(model: torch.nn.Module) -> Any:
    def eval_step(state: lf.TrainState, batch: Any) -> Any:
        x, y = batch
        logits, _ = lf.apply(model, state.params, state.buffers, x, train=False)
        return {"acc": (logits.argmax(-1) == y).float().mean(), "logits": logits}

    return eval_step


def bn_mlp() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(8, 16), torch.nn.BatchNorm1d(16), torch.nn.ReLU(), torch.nn.Linear(16, 3)
    )


def run_steps(
    spec: str,
    factors: list[float],
    *,
    compile: bool = False,
    init_scale: float = 1024.0,
    **kwargs: Any,
) -> Any:
    model = bn_mlp()
    tx = lf.optim.adamw(1e-2, eps=1e-4)
    # 2**16 (the default) overflows this model's float16 backward at first;
    # start where the first step is finite.
    scale = LossScale.create(init_scale) if parse_precision(spec).needs_loss_scaling else None
    state = lf.TrainState.create(model, tx, precision=spec, loss_scale=scale, **kwargs)
    step = lf.build(plain_step(model), precision=spec, compile=compile, **kwargs)
    history = []
    for f in factors:
        state, m = step(state, tiny_batch(f))
        history.append((state, m))
    return history


@pytest.mark.parametrize("spec", ["16-mixed", "16-true"])
def test_transform_skips_an_overflowing_fp16_step_and_halves_the_scale(spec):
    h = run_steps(spec, [1.0, 1e30, 1.0, 1.0])
    (s1, m1), (s2, m2), (s3, m3), _ = h
    assert int(m1["skipped_steps"]) == 0 and int(s1.step) == 1
    assert float(m1["loss_scale"]) == 1024.0
    # The overflowing step, as torch.amp.GradScaler and optax.apply_if_finite skip:
    # parameters and optimizer moments (and its step count) stay, the scale halves,
    # the step is counted and BatchNorm keeps the forward pass's statistics.
    assert int(m2["skipped_steps"]) == 1 and float(s2.loss_scale.scale) == 512.0
    for old, new in zip(
        lf.tree_leaves((s1.params, s1.opt_state.inner)),
        lf.tree_leaves((s2.params, s2.opt_state.inner)),
        strict=True,
    ):
        assert torch.equal(old, new)
    assert not bool(s2.opt_state.last_finite) and int(s2.step) == 2
    assert not torch.equal(s1.buffers["1.running_mean"], s2.buffers["1.running_mean"])
    # Training continues.
    assert int(m3["skipped_steps"]) == 1 and int(s3.step) == 3
    assert not torch.equal(s3.params["0.weight"], s2.params["0.weight"])


def test_loss_scale_grows_back_after_the_growth_interval():
    model = bn_mlp()
    scale = LossScale.create(8.0, growth_interval=2)
    state = lf.TrainState.create(model, lf.optim.sgd(0.1), precision="16-mixed", loss_scale=scale)
    step = lf.build(plain_step(model), precision="16-mixed", compile=False)
    scales = []
    for f in [1e30, 1.0, 1.0, 1.0]:
        state, _ = step(state, tiny_batch(f))
        scales.append(float(state.loss_scale.scale))
    assert scales == [4.0, 4.0, 8.0, 8.0]


@pytest.mark.parametrize(
    ("spec", "param", "compute", "output"),
    [
        ("bf16-mixed", F32, BF16, F32),
        ("16-mixed", F32, F16, F32),
        ("bf16-true", BF16, BF16, BF16),
        ("16-true", F16, F16, F16),
        ("64-true", F64, F64, F64),
    ],
)
def test_transform_stores_computes_and_returns_in_the_policy_dtypes(spec, param, compute, output):
    (state, m), *_ = run_steps(spec, [1.0, 1.0])
    moments = getattr(state.opt_state, "inner", state.opt_state)  # the loss scale stays float32
    leaves = lf.tree_leaves((state.params, state.buffers, moments))
    assert {x.dtype for x in leaves if x.is_floating_point()} == {param}
    assert m["loss"].dtype == output
    # The forward ran in the compute dtype: autocast for -mixed, a cast batch for -true.
    assert int(m["logit_bytes"]) == compute.itemsize
    model = bn_mlp()
    x, y, _ = tiny_batch(1.0)
    ev = lf.build_eval(eval_step_for(model), precision=spec, compile=False)
    assert ev(state, (x, y))["logits"].dtype == output


def test_skip_nonfinite_under_bf16_counts_and_skips():
    h = run_steps("bf16-mixed", [1.0, float("nan"), 1.0], skip_nonfinite=True)
    (s1, m1), (s2, m2), (s3, m3) = h
    assert "loss_scale" not in m1 and float(s1.loss_scale.scale) == 1.0
    assert [int(m["skipped_steps"]) for m in (m1, m2, m3)] == [0, 1, 1]
    assert torch.equal(s1.params["0.weight"], s2.params["0.weight"]) and int(s2.step) == 2
    assert float(s2.loss_scale.scale) == 1.0  # a fixed scale never backs off
    assert not torch.equal(s2.params["0.weight"], s3.params["0.weight"])


def test_skip_nonfinite_without_a_policy_uses_fp32():
    h = run_steps("32-true", [float("inf"), 1.0], skip_nonfinite=True)
    (s1, m1), (_, m2) = h
    initial = lf.TrainState.create(bn_mlp(), lf.optim.sgd(0.1))
    assert torch.equal(s1.params["0.weight"], initial.params["0.weight"])
    assert [int(m["skipped_steps"]) for m in (m1, m2)] == [1, 1]
    assert s1.params["0.weight"].dtype == F32


def test_transform_errors_name_the_fix():
    model = bn_mlp()
    tx = lf.optim.sgd(0.1)
    with pytest.raises(ValueError, match="skip_nonfinite=False cannot be honoured"):
        lf.build(plain_step(model), precision="16-mixed", skip_nonfinite=False)
    step = lf.build(plain_step(model), precision="bf16-true", compile=False)
    with pytest.raises(
        ValueError, match=r"stores parameters in torch.bfloat16.*`params.0.bias` is torch.float32"
    ):
        step(lf.TrainState.create(model, tx), tiny_batch(1.0))
    step = lf.build(plain_step(model), precision="16-mixed", compile=False)
    with pytest.raises(
        ValueError, match=r"must be wrapped in lightfunc.optim.apply_if_finite.*step.prepare"
    ):
        step(lf.TrainState.create(model, tx), tiny_batch(1.0))
    # step.prepare(state) is the fix it names.
    step(step.prepare(lf.TrainState.create(model, tx)), tiny_batch(1.0))
    step = lf.build(plain_step(model), precision="bf16-mixed", skip_nonfinite=True, compile=False)
    with pytest.raises(ValueError, match="skip_nonfinite=True"):
        step(lf.TrainState.create(model, tx, precision="bf16-mixed"), tiny_batch(1.0))
    with pytest.raises(TypeError, match=r"`loss_scale` must be a lightfunc\.LossScale"):
        lf.value_and_grad(lambda w: (w * w).sum(), loss_scale=2.0)

    def unscaled_step(state: lf.TrainState, batch: Any) -> Any:
        x, y, _ = batch

        def loss_fn(params: dict[str, torch.Tensor]) -> torch.Tensor:
            logits, _ = lf.apply(model, params, state.buffers, x, train=True)
            return F.cross_entropy(logits, y)

        loss, grads = lf.value_and_grad(loss_fn)(state.params)  # forgets loss_scale=
        return state.apply_gradients(grads), {"loss": loss}

    for spec in ("16-mixed", "16-true"):
        step = lf.build(unscaled_step, precision=spec, compile=False)
        with pytest.raises(ValueError, match=r"underflow.*loss_scale=state.loss_scale"):
            step(step.prepare(lf.TrainState.create(model, tx)), tiny_batch(1.0))

    def dict_step(state: dict[str, Any], batch: Any) -> Any:
        return state, {}

    step = lf.build(dict_step, precision="16-mixed", compile=False)
    with pytest.raises(TypeError, match="holds none"):
        step({"w": torch.zeros(2, dtype=F32)}, tiny_batch(1.0))


def test_with_precision_is_idempotent_and_keeps_an_existing_scale():
    state = lf.TrainState.create(bn_mlp(), lf.optim.adam(1e-3))
    half = state.with_precision("16-mixed")
    assert half.params["0.weight"].dtype == F32 and half.loss_scale is not None
    assert half.with_precision("16-mixed") is half
    true = half.with_precision("bf16-true")
    assert true.loss_scale is half.loss_scale
    assert {x.dtype for x in lf.tree_leaves(true.opt_state.inner) if x.is_floating_point()} == {
        BF16
    }
    assert true.loss_scale.scale.dtype == F32  # the scale stays float32 whatever the policy
    assert state.with_precision("32-true") is state


def test_loop_converts_the_state_and_refuses_a_conflicting_step():
    model = bn_mlp()
    state = lf.TrainState.create(model, lf.optim.adamw(1e-2, eps=1e-4))
    data = [tiny_batch(1.0)] * 3
    step = lf.build(plain_step(model), compile=False, precision="bf16-true")
    last = list(lf.loop(step, state, data, accelerator="cpu"))[-1]
    assert last.state.params["0.weight"].dtype == BF16 and int(last.state.step) == 3
    with pytest.raises(ValueError, match=r"already built.*precision"):
        next(lf.loop(step, state, data, precision="16-mixed"))


def test_fit_with_precision_checkpoints_and_resumes_the_loss_scale(tmp_path):
    model = bn_mlp()
    data = [tiny_batch(1.0), tiny_batch(1e30), tiny_batch(1.0)]
    state = lf.TrainState.create(model, lf.optim.adamw(1e-2))
    kwargs: dict[str, Any] = dict(
        default_root_dir=tmp_path,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
    )
    first = lf.fit(
        lf.build(plain_step(model), compile=False, precision="16-mixed"),
        state,
        data,
        max_epochs=1,
        **kwargs,
    )
    assert float(first.state.loss_scale.scale) == 2.0**15
    assert int(first.state.loss_scale.skipped) == 1
    again = lf.fit(
        plain_step(model),
        state,
        data,
        max_epochs=2,
        ckpt_path="last",
        precision="16-mixed",
        compile=False,
        **kwargs,
    )
    # Resumed after epoch 1 (3 steps, 1 of them skipped): epoch 2 adds the same again.
    assert int(first.state.step) == 3 and int(again.state.step) == 6
    assert int(again.state.loss_scale.skipped) == 2
    assert float(again.state.loss_scale.scale) == 2.0**14


@pytest.mark.compiled
@pytest.mark.parametrize(
    ("spec", "tol"), [("bf16-mixed", 1e-2), ("16-mixed", 2e-3), ("bf16-true", 2e-2)]
)
def test_compiled_precision_step_matches_eager_and_compiles_once(spec, tol):
    """Compiled and eager agree within the compute dtype's tolerance (bf16 keeps
    8 bits of mantissa: ~4e-3 relative per rounding; fp16 11 bits); an
    overflow in the middle changes the scale tensor, which never recompiles."""
    factors = [1.0, 1.0, 1e30, 1.0, 1.0, 1.0]
    before = lf.compile_counts()["graphs"]
    compiled = run_steps(spec, factors, compile=True)
    assert lf.compile_counts()["graphs"] - before == 1
    eager = run_steps(spec, factors)
    for (_, cm), (_, em) in zip(compiled, eager, strict=True):
        if "skipped_steps" in em:
            assert int(cm["skipped_steps"]) == int(em["skipped_steps"])
    lf.testing.assert_trees_close(compiled[-1][0].params, eager[-1][0].params, atol=tol, rtol=tol)


# ---------------------------------------------------------------- digits, per policy


@functools.cache
def digits_accuracy(spec: str) -> float:
    """Test accuracy of the digits MLP after 8 eager epochs under `spec`; same settings for all.

    The step is written once, without precision; `build(..., precision=spec)`
    and `TrainState.create(..., precision=spec)` do the rest.
    """
    from digits import load_data, make_model

    train_set, test_set = load_data(0)
    torch.manual_seed(0)
    model = make_model(hidden=128, dropout=0.0)
    # eps=1e-4, not 1e-8: under "16-true" Adam's moments are float16, where 1e-8
    # rounds to 0 and an underflowed second moment gives 0 / 0.
    tx = lf.optim.adamw(2e-3, weight_decay=1e-2, eps=1e-4)
    state = lf.TrainState.create(model, tx, precision=spec)
    step = lf.build(plain_step(model), precision=spec, compile=False)
    one = torch.tensor(1.0)
    loader = lf.Loader(train_set.tensors, 64, shuffle=True, seed=0, drop_last=True)
    for _ in range(8):
        for x, y in loader:
            state, _ = step(state, (x, y, one))
    evaluate = lf.build_eval(eval_step_for(model), precision=spec, compile=False)
    return float(evaluate(state, test_set.tensors)["acc"])


@pytest.mark.parametrize("spec", [s for s in ALL if s != "32-true"])
def test_each_policy_trains_digits_as_well_as_fp32(spec):
    reference = digits_accuracy("32-true")
    assert reference > 0.9
    assert abs(digits_accuracy(spec) - reference) <= 0.01 + 1e-6


def test_a_loss_scale_under_another_optimizer_wrapper_stays_float32():
    # track_health (or any wrapper) outside apply_if_finite: the scale must not be cast to float16,
    # where 65536 * growth overflows to inf; the moments are cast.
    model = torch.nn.Linear(3, 2)
    tx = lf.optim.track_health(lf.optim.apply_if_finite(lf.optim.adam(1e-3), lf.LossScale.create()))
    half = lf.TrainState.create(model, tx).with_precision("16-true")
    assert half.loss_scale is not None
    assert half.loss_scale.scale.dtype == torch.float32
    assert float(half.loss_scale.scale) == 65536.0
    from lightfunc._tree import tree_leaves

    moments = [x for x in tree_leaves(half.opt_state) if x.shape == (2, 3)]
    assert len(moments) == 2 and all(m.dtype == torch.float16 for m in moments)  # Adam's mu, nu
    assert half.params["weight"].dtype == torch.float16
    assert half.with_precision("16-true") is half  # idempotent
