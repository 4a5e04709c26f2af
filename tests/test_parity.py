"""A lightfunc run ends where a hand-written eager PyTorch loop does."""

import copy

import pytest
import torch
import torch.nn.functional as F
from helpers import make_data, make_model, make_steps

import lightfunc as lf


def _torch_loop(model, data, epochs, lr, weight_decay):
    """The reference: nn.Module + torch.optim.AdamW, the way most PyTorch code is written."""
    model = copy.deepcopy(model).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    for _ in range(epochs):
        for x, y in data:
            loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return model


@pytest.mark.parametrize("compile_", [False, pytest.param(True, marks=pytest.mark.compiled)])
def test_lightfunc_run_matches_a_plain_pytorch_loop(compile_, fresh_dynamo):
    model = make_model(seed=3)  # Linear + BatchNorm + ReLU + Linear: buffers must match too
    data = make_data(n=96, batch_size=32)
    reference = _torch_loop(model, data, epochs=5, lr=1e-2, weight_decay=0.05)

    train_step, _ = make_steps(model)
    state = lf.TrainState.create(model, lf.optim.adamw(1e-2, weight_decay=0.05))
    final = lf.fit(
        lf.build(train_step, compile=compile_), state, data, max_epochs=5, barebones=True
    )

    tol = 1e-5
    for name, p in reference.named_parameters():
        torch.testing.assert_close(final.state.params[name], p.detach(), rtol=0, atol=tol, msg=name)
    for name, b in reference.named_buffers():
        torch.testing.assert_close(final.state.buffers[name], b, rtol=0, atol=tol, msg=name)
    assert int(final.state.step) == 15
