"""What keeps peak memory down: gradients released once a step has used them."""

from __future__ import annotations

import pytest
import torch

from rlhf import optim


@pytest.fixture
def stage(compose):
    from rlhf.config import validate

    return validate(compose(["model=tiny", "tracking=none"])).stage


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_gradients_are_released_by_the_step_and_kept_while_accumulating(stage, precision):
    model = torch.nn.Linear(4, 3)
    optimizer = optim.adamw(optim.param_groups(model.named_parameters(), 0.0, 1e-3), stage, precision)
    # The fused step: no temporaries of the parameters' size (bf16 mixed has no scaler to unscale).
    assert optimizer.defaults["fused"]
    model(torch.randn(2, 4)).sum().backward()
    model(torch.randn(2, 4)).sum().backward()  # accumulating: no step in between
    assert all(p.grad is not None for p in model.parameters())
    before = model.weight.detach().clone()
    optimizer.step()
    assert not torch.equal(model.weight, before)
    assert all(p.grad is None for p in model.parameters())
