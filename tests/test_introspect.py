"""`learning_rate_of`: the learning rate read back out of an optimizer, for the loggers and the bar."""

from __future__ import annotations

import torch

from lightfunc import optim
from lightfunc.optim._introspect import learning_rate_of


def test_a_constant_and_a_schedule_are_found():
    assert learning_rate_of(optim.adamw(3e-3)) == 3e-3
    schedule = optim.cosine_decay_schedule(1e-2, 100)
    assert (
        learning_rate_of(optim.chain(optim.clip_by_global_norm(1.0), optim.adamw(schedule)))
        is schedule
    )


def test_the_groups_of_a_multi_transform_are_searched_in_order():
    # Muon for matrices, AdamW for the rest: the walk must look inside the dict of groups.
    warm = optim.linear_schedule(0.0, 0.05, 10)
    tx = optim.multi_transform(
        {"matrices": optim.sgd(warm), "rest": optim.adamw(0.03)}, {"w": "matrices", "b": "rest"}
    )
    assert learning_rate_of(tx) is warm
    constants = optim.multi_transform(
        {"a": optim.sgd(0.5), "b": optim.adamw(0.03)}, {"w": "a", "b": "b"}
    )
    assert learning_rate_of(constants) == 0.5
    params = {"w": torch.zeros(2, 2), "b": torch.zeros(2)}
    constants.init(params)  # still a working optimizer


def test_no_learning_rate_is_none():
    assert learning_rate_of(optim.clip_by_global_norm(1.0)) is None
