import pytest
import torch
from helpers import make_model

import lightfunc as lf


def test_params_of_and_buffers_of_copy_without_aliasing_the_module():
    model = make_model()
    params, buffers = lf.params_of(model), lf.buffers_of(model)
    assert list(params) == [n for n, _ in model.named_parameters()]
    assert list(buffers) == [n for n, _ in model.named_buffers()]
    for name, p in model.named_parameters():
        assert torch.equal(params[name], p) and params[name].data_ptr() != p.data_ptr()
        assert not params[name].requires_grad


def test_params_of_trainable_only_skips_frozen_parameters():
    model = make_model()
    model[0].weight.requires_grad_(False)
    assert "0.weight" not in lf.params_of(model, trainable_only=True)
    assert "0.weight" in lf.params_of(model)


def test_apply_matches_the_module_in_eval_mode():
    model = make_model().eval()
    x = torch.randn(5, 8)
    out, new_buffers = lf.apply(model, lf.params_of(model), lf.buffers_of(model), x, train=False)
    torch.testing.assert_close(out, model(x), rtol=0, atol=0)
    for name, b in model.named_buffers():
        assert torch.equal(new_buffers[name], b)


def test_apply_in_train_mode_returns_new_buffers_and_leaves_inputs_alone():
    model = make_model()
    reference = make_model().train()
    params, buffers = lf.params_of(model), lf.buffers_of(model)
    before = {k: v.clone() for k, v in buffers.items()}
    x = torch.randn(6, 8)
    out, new_buffers = lf.apply(model, params, buffers, x, train=True)
    expected = reference(x)  # updates reference's running stats in place
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    for name, b in reference.named_buffers():
        assert torch.equal(new_buffers[name], b), name
        assert torch.equal(buffers[name], before[name]), f"input buffer {name} was modified"
    assert int(new_buffers["1.num_batches_tracked"]) == 1


def test_apply_restores_the_modules_own_training_flags():
    model = make_model().eval()
    lf.apply(model, lf.params_of(model), lf.buffers_of(model), torch.randn(4, 8), train=True)
    assert not any(m.training for m in model.modules())
    model.train()
    lf.apply(model, lf.params_of(model), lf.buffers_of(model), torch.randn(4, 8), train=False)
    assert all(m.training for m in model.modules())


def test_value_and_grad_matches_autograd():
    model = make_model(batchnorm=False)
    x, y = torch.randn(7, 8), torch.randint(0, 3, (7,))
    params = lf.params_of(model)

    def loss_fn(p):
        out, _ = lf.apply(model, p, {}, x, train=False)
        return torch.nn.functional.cross_entropy(out, y)

    loss, grads = lf.value_and_grad(loss_fn)(params)
    expected_loss = torch.nn.functional.cross_entropy(model.eval()(x), y)
    expected_loss.backward()
    torch.testing.assert_close(loss, expected_loss.detach(), rtol=0, atol=0)
    for name, p in model.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, rtol=1e-6, atol=1e-7)


def test_value_and_grad_has_aux_returns_value_and_aux():
    (value, aux), grad = lf.value_and_grad(lambda w: ((w**2).sum(), {"w": w * 2}), has_aux=True)(
        torch.ones(3)
    )
    assert value.item() == 3.0
    assert torch.equal(aux["w"], torch.full((3,), 2.0))
    assert torch.equal(grad, torch.full((3,), 2.0))


def test_value_and_grad_argnums_selects_the_differentiated_arguments():
    value, (ga, gb) = lf.value_and_grad(lambda a, b: (a * b).sum(), argnums=(0, 1))(
        torch.ones(2), torch.full((2,), 3.0)
    )
    assert value.item() == 6.0 and ga.tolist() == [3.0, 3.0] and gb.tolist() == [1.0, 1.0]


def test_value_and_grad_rejects_a_non_scalar_loss():
    with pytest.raises(ValueError, match=r"must be a 0-d tensor, got shape \(3,\).*loss.mean\(\)"):
        lf.value_and_grad(lambda w: w * 2)(torch.ones(3))


def test_value_and_grad_rejects_a_non_tensor_loss_and_hints_has_aux():
    with pytest.raises(TypeError, match=r"got a tuple of length 2.*pass has_aux=True"):
        lf.value_and_grad(lambda w: (w.sum(), w))(torch.ones(3))


def test_value_and_grad_has_aux_requires_a_pair():
    with pytest.raises(
        TypeError, match=r"expects the function to return \(loss, aux\), got a tensor"
    ):
        lf.value_and_grad(lambda w: w.sum(), has_aux=True)(torch.ones(3))


def test_value_and_grad_rejects_an_integer_loss():
    with pytest.raises(TypeError, match=r"must be floating point, got dtype torch\.int64"):
        lf.value_and_grad(lambda w: (w * 0).sum().long())(torch.ones(3))
