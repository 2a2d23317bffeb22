"""The maths of learning from labelled preference pairs, as pure functions of scores: the reward
model's Bradley-Terry loss and its accuracies, and the losses of direct preference optimisation
(tested against hand-computed values).

Losses are split by what they learn from: here fixed pairs a rater labelled; rlhf.rl holds the maths of
learning from episodes the policy samples (KL penalties, advantages, PPO's clipped losses)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def bradley_terry(
    chosen: torch.Tensor,
    rejected: torch.Tensor,
    margin: torch.Tensor | None = None,
    centering: float = 0.0,
    weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean of -log sigmoid(r_chosen - r_rejected - margin), plus centering * mean((r_c + r_r)^2).

    The margin asks chosen to win by at least that much (Llama 2's rating-gap margin); the centering
    term (coefficient ~0.01) keeps rewards near zero, where PPO's normalisation expects them.
    `weight` (per pair) makes both means weighted, e.g. 1 / C(K, 2) for the pairs of a K-way ranking
    so that each record counts once (InstructGPT).
    """
    difference = chosen - rejected
    if margin is not None:
        difference = difference - margin
    if weight is None:
        weight = torch.ones_like(difference)
    total = weight.sum().clamp(min=torch.finfo(weight.dtype).tiny)
    loss = (weight * -F.logsigmoid(difference)).sum() / total
    if centering:
        loss = loss + centering * (weight * (chosen + rejected) ** 2).sum() / total
    return loss


def pair_weights(records: list[int], mode: str) -> list[float]:
    """Per-pair loss weights from each pair's record index: record, 1 / (the record's number of
    pairs), so a ranking of K responses weighs as much as one pair in total; pair, 1 each."""
    if mode == "pair":
        return [1.0] * len(records)
    if mode != "record":
        raise ValueError(f"unknown pair weighting {mode!r}; use record or pair")
    counts: dict[int, int] = {}
    for record in records:
        counts[record] = counts.get(record, 0) + 1
    return [1.0 / counts[record] for record in records]


def preference_accuracy(chosen: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
    """Share of pairs ranked the right way (a tie counts as half)."""
    return ((chosen > rejected).float() + 0.5 * (chosen == rejected).float()).mean()


def gold_order_agreement(
    chosen: torch.Tensor, rejected: torch.Tensor, gold_order: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Over the pairs a gold annotator decides (gold_order +1: chosen better, -1: rejected better,
    0: a tie, left out): (accuracy of the scores against the gold ordering, share of labels that agree
    with it). The second is the label accuracy a model that recovered the gold ordering would score,
    the ceiling that label noise puts on `preference_accuracy`. None when no pair is decided."""
    decided = gold_order != 0
    if not decided.any():
        return None
    gold_first = gold_order[decided] > 0
    chosen, rejected = chosen[decided], rejected[decided]
    better, worse = torch.where(gold_first, chosen, rejected), torch.where(gold_first, rejected, chosen)
    return preference_accuracy(better, worse), gold_first.float().mean()


def dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    reference_chosen: torch.Tensor,
    reference_rejected: torch.Tensor,
    beta: float,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair losses of direct preference optimisation, and the implicit rewards of chosen and
    rejected (beta times the policy-to-reference log-ratio), all (P,), from sequence log-probabilities.

    With h = (log pi(c) - log pi(r)) - (log ref(c) - log ref(r)), as TRL writes them:
    sigmoid (DPO, Rafailov et al. 2023): -log sigmoid(beta h), or with label smoothing e (conservative
    DPO: labels flipped with probability e) -(1 - e) log sigmoid(beta h) - e log sigmoid(-beta h);
    ipo (Azar et al. 2023): (h - 1 / (2 beta))^2; hinge (SLiC): max(0, 1 - beta h).
    """
    chosen_ratio = policy_chosen - reference_chosen
    rejected_ratio = policy_rejected - reference_rejected
    h = chosen_ratio - rejected_ratio
    if loss_type == "sigmoid":
        losses = -F.logsigmoid(beta * h) * (1 - label_smoothing) - F.logsigmoid(-beta * h) * label_smoothing
    elif loss_type == "ipo":
        losses = (h - 1 / (2 * beta)) ** 2
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * h)
    else:
        raise ValueError(f"unknown DPO loss {loss_type!r}; use sigmoid, ipo or hinge")
    return losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach()
