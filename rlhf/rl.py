"""The maths of RL for language models, PPO and critic-free (GRPO, RLOO, REINFORCE++), as pure
functions of tensors: learning from episodes the policy samples (rlhf.preference holds the maths of
learning from labelled pairs).

Shapes: B rollouts, T response tokens. `mask` (B, T) is 1 on real response tokens (up to and
including the first EOS) and 0 after; every function here ignores masked positions exactly.
Token t's value estimates the return from token t on; its reward is the per-token KL penalty, plus
the sequence's score on its last token.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def masked_mean(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    mask = mask.to(values.dtype)
    if dim is None:
        return (values * mask).sum() / mask.sum().clamp(min=1)
    return (values * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def masked_var(values: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    mean = masked_mean(values, mask)
    squares = masked_mean((values - mean) ** 2, mask)
    count = mask.sum()
    if unbiased and count > 1:
        squares = squares * count / (count - 1)
    return squares


def whiten(
    values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8
) -> torch.Tensor:
    """(values - mean) / std over the masked positions; masked positions come out 0."""
    mean, var = masked_mean(values, mask), masked_var(values, mask)
    out = (values - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * mask


def kl_penalty(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str = "k1") -> torch.Tensor:
    """Per-token estimate of KL(policy || reference) from samples of the policy.

    k1: log p - log q (unbiased, can be negative per token); k3: (q/p - 1) - log(q/p) (unbiased,
    always >= 0, lower variance). Schulman, "Approximating KL divergence" (2020).
    """
    log_ratio = logprobs - ref_logprobs
    if estimator == "k1":
        return log_ratio
    if estimator == "k3":
        return torch.expm1(-log_ratio) + log_ratio
    raise ValueError(f"unknown KL estimator {estimator!r}; use k1 or k3")


def kl_divergence(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """Exact KL(p || q) of each row's distributions, from their log-probabilities (N, vocab):
    sum over v of p(v) (log p(v) - log q(v)), where p(v) = 0 adds nothing (p may be truncated).

    Summed over a response's positions, on responses sampled from p, it is an unbiased estimate of the
    sequences' KL with less variance than any per-token sample estimate (kl_penalty).
    """
    p = logprobs.exp()
    terms = p * (logprobs - ref_logprobs)
    return torch.where(p > 0, terms, torch.zeros_like(terms)).sum(-1)


def token_rewards(
    scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, kl_coef: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token rewards: -kl_coef * KL on every token, plus the sequence score on its last token.

    Returns (rewards, non_score_rewards), both (B, T) and zero after the mask.
    """
    non_score = -kl_coef * kl * mask
    rewards = non_score.clone()
    last = (mask.long().cumsum(-1) == mask.sum(-1, keepdim=True).long()) & mask.bool()
    rewards = rewards + last.to(rewards.dtype) * scores[:, None]
    return rewards, non_score


def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over each response; returns (advantages, returns).

    delta_t = r_t + gamma * V_{t+1} - V_t, A_t = delta_t + gamma * lam * A_{t+1}, with V and A zero
    past the last real token; returns = advantages + values.
    """
    values = values * mask
    advantages = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    steps = rewards.shape[1]
    for t in reversed(range(steps)):
        next_value = values[:, t + 1] if t + 1 < steps else torch.zeros_like(running)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = (delta + gamma * lam * running) * mask[:, t]
        advantages[:, t] = running
    return advantages, (advantages + values) * mask


def resolve_reward_norm(mode: str, has_model_stats: bool) -> str:
    """stage.reward_norm with auto resolved: the reward model's stored statistics when it has them,
    else running statistics."""
    if mode == "auto":
        return "model" if has_model_stats else "running"
    return mode


def penalise_missing_eos(raw: torch.Tensor, ended: torch.Tensor, penalty: float | None) -> torch.Tensor:
    """Raw scores minus `penalty` (>= 0) where a response was cut off without EOS (`ended` false);
    applied before normalisation, so the penalty is in the reward's own units."""
    if not penalty:
        return raw
    return raw - penalty * (~ended.bool()).to(raw.dtype)


def masked_average(values: torch.Tensor, mask: torch.Tensor, level: str = "token") -> torch.Tensor:
    """Mean of (B, T) values over the masked tokens: `token`, every token weighs the same; `sequence`,
    the mean of each sequence's token mean, so every sequence weighs the same whatever its length."""
    if level == "token":
        return masked_mean(values, mask)
    if level == "sequence":
        return masked_mean(values, mask, dim=-1).mean()
    raise ValueError(f"unknown loss average {level!r}; use token or sequence")


def policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip: float,
    average: str = "token",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO's clipped surrogate: mean over tokens of max(-A r, -A clip(r, 1-e, 1+e)), r = p/p_old;
    `average`: over all tokens, or per sequence first (see masked_average)."""
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip, 1.0 + clip)
    loss = masked_average(torch.maximum(unclipped, clipped), mask, average)
    with torch.no_grad():
        stats = {
            "clipfrac": masked_mean((clipped > unclipped).float(), mask),
            # (r - 1) - log r: non-negative, low-variance estimate of KL(old || new)
            "approx_kl": masked_mean(torch.expm1(log_ratio) - log_ratio, mask),
            "ratio": masked_mean(ratio, mask),
        }
    return loss, stats


def value_loss(
    values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor, clip: float
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped value loss: 0.5 * mean over tokens of max((V - R)^2, (clip(V, V_old +- e) - R)^2)."""
    clipped_values = old_values + torch.clamp(values - old_values, -clip, clip)
    unclipped = (values - returns) ** 2
    clipped = (clipped_values - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        stats = {"clipfrac": masked_mean((clipped > unclipped).float(), mask)}
    return loss, stats


# -- critic-free advantages (GRPO, RLOO, REINFORCE++) ----------------------------------------------
# Scores (B,) come in groups: rows [g * G, (g + 1) * G) are the G responses to one prompt.


def equal_groups(
    scores: torch.Tensor, group_size: int, rtol: float = 1e-4, atol: float = 1e-6
) -> torch.Tensor:
    """Which groups' scores are all equal (n_groups,): spread (max - min) at most rtol times the
    group's largest |score| plus atol. Rounding makes equal rewards differ by a few ulps once
    normalised, and the group std then turns that noise into advantages of one sign; these groups say
    nothing about which response is better, so the baselines give them exactly 0."""
    groups = scores.view(-1, group_size)
    spread = groups.amax(-1) - groups.amin(-1)
    return spread <= rtol * groups.abs().amax(-1) + atol


def grpo_baseline(scores: torch.Tensor, group_size: int, eps: float = 1e-6) -> torch.Tensor:
    """(r - mean of its group) / (std of its group + eps), the std unbiased (Shao et al. 2024,
    DeepSeekMath); 0 for the groups equal_groups finds equal."""
    groups = scores.view(-1, group_size)
    mean, std = groups.mean(-1, keepdim=True), groups.std(-1, keepdim=True)
    advantages = (groups - mean) / (std + eps)
    equal = equal_groups(scores, group_size)[:, None]
    return torch.where(equal, torch.zeros_like(advantages), advantages).view(-1)


def rloo_baseline(scores: torch.Tensor, group_size: int) -> torch.Tensor:
    """r minus the mean of the other responses of its group (leave-one-out; Ahmadian et al. 2024):
    an unbiased baseline, since it does not depend on the response it is subtracted from; 0 for the
    groups equal_groups finds equal."""
    groups = scores.view(-1, group_size)
    others = (groups.sum(-1, keepdim=True) - groups) / (group_size - 1)
    advantages = groups - others
    equal = equal_groups(scores, group_size)[:, None]
    return torch.where(equal, torch.zeros_like(advantages), advantages).view(-1)


def reinforce_pp_baseline(scores: torch.Tensor, group_size: int) -> torch.Tensor:
    """REINFORCE++ (Hu 2025) keeps the score; its baseline is the normalisation over the whole batch
    that follows (critic_free_advantages whitens its token advantages)."""
    return scores


# name: (sequence baseline, whether the token advantages are then normalised over the batch)
ADVANTAGE_ESTIMATORS = {
    "grpo": (grpo_baseline, False),
    "rloo": (rloo_baseline, False),
    "reinforce_pp": (reinforce_pp_baseline, True),
}


def critic_free_advantages(
    scores: torch.Tensor,
    mask: torch.Tensor,
    estimator: str,
    group_size: int,
    kl: torch.Tensor | None = None,
    kl_coef: float = 0.0,
) -> torch.Tensor:
    """Token advantages (B, T) without a value model.

    The estimator's baseline turns each score into a sequence advantage. Without `kl` (the KL is a
    term of the loss) every token of a response gets its sequence's advantage; with it, the per-token
    rewards of token_rewards (the sequence advantage on the last token, -kl_coef * KL on each) are
    summed from each token to the end (the return, undiscounted). REINFORCE++ then whitens the
    advantages over the batch's tokens.
    """
    if estimator not in ADVANTAGE_ESTIMATORS:
        raise ValueError(
            f"unknown advantage estimator {estimator!r}; use one of {', '.join(ADVANTAGE_ESTIMATORS)}"
        )
    baseline, normalise = ADVANTAGE_ESTIMATORS[estimator]
    sequence = baseline(scores, group_size)
    if kl is None:
        advantages = sequence[:, None] * mask
    else:
        rewards, _ = token_rewards(sequence, kl, mask, kl_coef)
        advantages = rewards.flip(-1).cumsum(-1).flip(-1) * mask
    if normalise:
        advantages = whiten(advantages, mask)
    return advantages


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of the categorical distribution given by the last dimension of `logits`."""
    log_probs = torch.log_softmax(logits.float(), dim=-1)
    return -(log_probs.exp() * log_probs).sum(-1)


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """1 - Var(returns - values) / Var(returns): 1 is a perfect critic, 0 no better than a constant."""
    var_returns = masked_var(returns, mask)
    return 1.0 - masked_var(returns - values, mask) / var_returns.clamp(min=1e-8)


@dataclass
class KLController:
    """The KL coefficient: fixed, or adapted towards a target KL (Ziegler et al. 2019).

    Adaptive: coef *= 1 + clip(KL / target - 1, -0.2, 0.2) * n_steps / horizon.
    """

    value: float
    target: float | None = None
    horizon: int = 10000

    def update(self, observed_kl: float, n_steps: int) -> None:
        if self.target is None:
            return
        error = max(-0.2, min(0.2, observed_kl / self.target - 1.0))
        self.value *= 1.0 + error * n_steps / self.horizon

    def state_dict(self) -> dict[str, float | int | None]:
        return {"value": self.value, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, state: dict) -> None:
        self.value, self.target, self.horizon = state["value"], state["target"], state["horizon"]


@dataclass
class RunningMoments:
    """Mean and standard deviation of everything seen so far (Chan et al.'s parallel update).

    `std`, the scale rewards are divided by, shrinks the observed variance towards 1 with the weight
    of `prior_count` observations: a first batch of equal scores (variance 0) would otherwise set a
    scale near 0, and the next scores would be multiplied by millions and hit the clip. After a few
    hundred scores the prior no longer matters.
    """

    mean: float = 0.0
    var: float = 0.0
    count: float = 0.0
    prior_count: float = 1.0

    def update(self, values: torch.Tensor) -> None:
        values = values.detach().float()
        n = values.numel()
        if n == 0:
            return
        batch_mean, batch_var = values.mean().item(), values.var(unbiased=False).item()
        total = self.count + n
        delta = batch_mean - self.mean
        self.mean += delta * n / total
        self.var = (self.var * self.count + batch_var * n + delta**2 * self.count * n / total) / total
        self.count = total

    @property
    def std(self) -> float:
        return ((self.var * self.count + self.prior_count) / (self.count + self.prior_count)) ** 0.5

    def state_dict(self) -> dict[str, float]:
        return {"mean": self.mean, "var": self.var, "count": self.count}

    def load_state_dict(self, state: dict) -> None:
        self.mean, self.var, self.count = state["mean"], state["var"], state["count"]
