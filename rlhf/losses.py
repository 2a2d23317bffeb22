"""Losses of the reward model, as pure functions of scores (tested against hand-computed values)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def bradley_terry(
    chosen: torch.Tensor,
    rejected: torch.Tensor,
    margin: torch.Tensor | None = None,
    centering: float = 0.0,
) -> torch.Tensor:
    """Mean of -log sigmoid(r_chosen - r_rejected - margin), plus centering * mean((r_c + r_r)^2).

    The margin asks chosen to win by at least that much (Llama 2's rating-gap margin); the centering
    term (coefficient ~0.01) keeps rewards near zero, where PPO's normalisation expects them.
    """
    difference = chosen - rejected
    if margin is not None:
        difference = difference - margin
    loss = -F.logsigmoid(difference).mean()
    if centering:
        loss = loss + centering * ((chosen + rejected) ** 2).mean()
    return loss


def preference_accuracy(chosen: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
    """Share of pairs ranked the right way (a tie counts as half)."""
    return ((chosen > rejected).float() + 0.5 * (chosen == rejected).float()).mean()
