"""The research examples (ensemble, DP-SGD, MAML, GAN): smoke runs, and their maths against references."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

import lightfunc as lf
from lightfunc.testing import assert_trees_close

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
sys.path.insert(0, str(EXAMPLES))

import dp_sgd  # noqa: E402
import ensemble  # noqa: E402
import gan  # noqa: E402
import maml  # noqa: E402

# Ensemble ---------------------------------------------------------------------------


def test_ensemble_example_runs(capsys):
    result = ensemble.main(["--smoke"])
    assert 0.5 < result["acc"] <= 1.0
    assert result["member_min_acc"] <= result["member_acc"] <= result["member_max_acc"]
    assert "2 members, 44 steps (eager)" in capsys.readouterr().out


# DP-SGD -----------------------------------------------------------------------------


def test_dp_sgd_example_runs(capsys):
    result = dp_sgd.main(["--smoke"])
    assert 0.5 < result["acc"] <= 1.0
    assert 0 < result["epsilon"] < math.inf
    assert "44 steps (eager)" in capsys.readouterr().out


def test_private_gradient_is_the_mean_of_clipped_per_example_gradients():
    torch.manual_seed(0)
    model = dp_sgd.make_model(hidden=8)
    x, y = torch.randn(6, 64), torch.randint(0, 10, (6,))
    x[0] *= 100  # one example far outside the clipping norm

    def example_loss(params, x, y):
        return F.cross_entropy(lf.apply(model, params, {}, x[None], train=False)[0], y[None])

    _, per_example = lf.per_example_grads(example_loss)(lf.params_of(model), x, y)
    grads, clipped = dp_sgd.private_gradient(per_example, clip=0.5, noise_multiplier=0.0)

    expected = {name: torch.zeros_like(p) for name, p in model.named_parameters()}
    n_clipped = 0
    for i in range(6):  # the reference: autograd on the module, one example at a time
        model.zero_grad()
        F.cross_entropy(model(x[i : i + 1]), y[i : i + 1]).backward()
        norm = torch.sqrt(sum(p.grad.square().sum() for p in model.parameters()))
        n_clipped += int(norm > 0.5)
        for name, p in model.named_parameters():
            expected[name] += p.grad * min(1.0, 0.5 / (float(norm) + 1e-6)) / 6
    assert_trees_close(grads, expected, atol=1e-6)
    assert float(clipped) == n_clipped / 6 and n_clipped >= 1


def test_dp_sgd_noise_has_the_documented_scale():
    per_example = {"w": torch.zeros(4, 20_000)}
    torch.manual_seed(0)
    grads, _ = dp_sgd.private_gradient(per_example, clip=2.0, noise_multiplier=1.5)
    # std of the averaged gradient: noise_multiplier * clip / batch = 0.75
    assert abs(float(grads["w"].std()) - 0.75) < 0.02


def test_dp_sgd_accountant_matches_a_published_value():
    # Bu, Dong, Long and Su (2020), "Deep learning with Gaussian differential privacy",
    # figure 4: the moments accountant gives (1.34, 1e-5)-DP after 20 epochs of MNIST
    # with sampling rate 256/60000 and noise multiplier 1.3.
    eps = dp_sgd.epsilon(256 / 60000, 1.3, round(20 * 60000 / 256), 1e-5)
    assert abs(eps - 1.34) < 0.05
    assert dp_sgd.epsilon(0.1, 0.0, 10, 1e-5) == math.inf
    assert dp_sgd.epsilon(0.1, 2.0, 10, 1e-5) < dp_sgd.epsilon(0.1, 1.0, 10, 1e-5)


# MAML -------------------------------------------------------------------------------


def _maml_problem(tasks: int = 2):
    torch.manual_seed(0)
    model = maml.make_model(hidden=8, ways=3).double()
    params = lf.params_of(model)
    g = torch.Generator().manual_seed(0)
    batch = (
        torch.randn(tasks, 6, 64, generator=g, dtype=torch.float64),
        torch.randint(0, 3, (tasks, 6), generator=g),
        torch.randn(tasks, 9, 64, generator=g, dtype=torch.float64),
        torch.randint(0, 3, (tasks, 9), generator=g),
    )
    return model, params, batch


def _unrolled_meta_gradient(model, params, batch, steps, lr):
    """The reference: MAML's meta-gradient with plain autograd (`create_graph=True`), no torch.func."""
    leaves = {k: p.clone().requires_grad_(True) for k, p in params.items()}
    losses = []
    for support_x, support_y, query_x, query_y in zip(*batch, strict=True):
        fast = dict(leaves)
        for _ in range(steps):
            loss = F.cross_entropy(torch.func.functional_call(model, fast, support_x), support_y)
            grads = torch.autograd.grad(loss, list(fast.values()), create_graph=True)
            fast = {k: p - lr * g for (k, p), g in zip(fast.items(), grads, strict=True)}
        logits = torch.func.functional_call(model, fast, query_x)
        losses.append(F.cross_entropy(logits, query_y))
    meta = torch.stack(losses).mean()
    return dict(zip(leaves, torch.autograd.grad(meta, list(leaves.values())), strict=True))


def test_maml_meta_gradient_matches_an_unrolled_autograd_computation():
    model, params, batch = _maml_problem()
    grads = torch.func.grad(lambda p: maml.meta_loss(model, p, batch, 3, 0.5)[0])(params)
    expected = _unrolled_meta_gradient(model, params, batch, 3, 0.5)
    assert_trees_close(grads, expected, atol=1e-12)


def test_maml_meta_gradient_matches_finite_differences_in_float64():
    model, params, batch = _maml_problem()

    def meta(p):
        return maml.meta_loss(model, p, batch, 3, 0.5)[0]

    grads = torch.func.grad(meta)(params)
    g = torch.Generator().manual_seed(1)
    eps = 1e-6
    for _ in range(3):  # central differences along random directions
        v = {k: torch.randn(p.shape, generator=g, dtype=p.dtype) for k, p in params.items()}
        plus = {k: p + eps * v[k] for k, p in params.items()}
        minus = {k: p - eps * v[k] for k, p in params.items()}
        numeric = (meta(plus) - meta(minus)) / (2 * eps)
        analytic = sum((grads[k] * v[k]).sum() for k in params)
        assert abs(float(numeric - analytic)) < 1e-7 * max(1.0, abs(float(analytic)))

    # The second-order terms matter: first-order MAML (inner gradients treated as
    # constants) gives a visibly different meta-gradient.
    first_order = _first_order_meta_gradient(model, params, batch, 3, 0.5)
    differences = [float((grads[k] - first_order[k]).abs().max()) for k in params]
    assert max(differences) > 1e-3


def _first_order_meta_gradient(model, params, batch, steps, lr):
    total = {k: torch.zeros_like(p) for k, p in params.items()}
    tasks = len(batch[0])
    for support_x, support_y, query_x, query_y in zip(*batch, strict=True):
        fast = maml.adapt(model, params, support_x, support_y, steps, lr)
        fast = {k: p.detach() for k, p in fast.items()}
        for k, g in _query_grads(model, fast, query_x, query_y).items():
            total[k] += g / tasks
    return total


def _query_grads(model, params, query_x, query_y):
    def query_loss(params):
        return F.cross_entropy(lf.apply(model, params, {}, query_x, train=True)[0], query_y)

    return torch.func.grad(query_loss)(params)


def test_maml_tasks_have_the_requested_shape_and_unseen_classes():
    labels = torch.arange(10).repeat_interleave(20)
    support, support_y, query, query_y = maml.sample_tasks(
        labels, [5, 6, 7, 8, 9], 3, ways=5, shots=2, queries=4, seed=0
    )
    assert support.shape == (3, 10) and query.shape == (3, 20)
    assert support_y[0].tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
    assert set(labels[support].flatten().tolist()) <= {5, 6, 7, 8, 9}
    for t in range(3):  # support and query examples are disjoint, labels consistent
        assert not set(support[t].tolist()) & set(query[t].tolist())
        digit_of = dict(zip(support_y[t].tolist(), labels[support[t]].tolist(), strict=True))
        assert [digit_of[int(c)] for c in query_y[t]] == labels[query[t]].tolist()


def test_maml_example_runs(capsys):
    result = maml.main(["--smoke"])
    assert 0.2 <= result["acc"] <= 1.0 and 0.2 <= result["random_init_acc"] <= 1.0
    assert "10 meta-steps (eager)" in capsys.readouterr().out


# GAN --------------------------------------------------------------------------------


def test_gan_example_runs(capsys):
    result = gan.main(["--smoke"])
    assert 1.0 <= result["digit_score"] <= 10.0
    assert 0.0 <= result["d_acc"] <= 1.0 and result["frechet"] > 0
    assert "30 steps (eager)" in capsys.readouterr().out


def _gan_run(state, step, batches):
    for batch in batches:
        state, _ = step(state, batch)
    return state


def test_gan_step_updates_both_players_and_resumes_exactly(tmp_path):
    generator, discriminator = gan.make_generator(8, 16), gan.make_discriminator(16)
    adam = lf.optim.adam(1e-3, b1=0.5)
    state = gan.GanState(
        generator=lf.TrainState.create(generator, adam, seed=None),
        discriminator=lf.TrainState.create(discriminator, adam, seed=None),
        rng=lf.RngKey(0),
    )
    step = lf.build(gan.make_step(generator, discriminator, 8), compile=False)
    g = torch.Generator().manual_seed(0)
    batches = [torch.rand(16, 64, generator=g) * 2 - 1 for _ in range(6)]

    straight = _gan_run(state, step, batches)
    assert straight.generator.step.item() == straight.discriminator.step.item() == 6
    for player in ("generator", "discriminator"):
        before, after = getattr(state, player).params, getattr(straight, player).params
        assert all(not torch.equal(before[k], after[k]) for k in before)

    halfway = _gan_run(state, step, batches[:3])
    lf.save(halfway, tmp_path / "gan.safetensors")
    resumed = lf.load(tmp_path / "gan.safetensors", like=state)
    assert resumed.rng == lf.RngKey(0, 3)
    resumed = _gan_run(resumed, step, batches[3:])
    assert_trees_close(resumed, straight)  # bit-identical: same noise, same dropout masks
