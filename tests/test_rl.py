"""The PPO maths (rlhf.rl) against values worked out by hand, and the masking of tokens after EOS.

Expected values are written out as literals; the comment next to each shows its arithmetic.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from rlhf import rl
from rlhf.models import disable_dropout
from rlhf.rollout import Rollout
from rlhf.rollout import scatter as _scatter

TOL = 1e-6


def t(values, dtype=torch.float64) -> torch.Tensor:
    return torch.tensor(values, dtype=dtype)


def assert_values(actual: torch.Tensor, expected) -> None:
    expected = torch.as_tensor(expected, dtype=actual.dtype)
    torch.testing.assert_close(actual, expected, atol=TOL, rtol=0)


# -- masked statistics ------------------------------------------------------------------------------

MASK_2x4 = t([[1, 1, 1, 0], [1, 1, 0, 0]])


def test_masked_mean_ignores_masked_positions():
    values = t([[1.0, 2.0, 3.0, 100.0], [4.0, 5.0, -50.0, 7e5]])
    assert_values(rl.masked_mean(values, MASK_2x4), 3.0)  # (1 + 2 + 3 + 4 + 5) / 5
    assert_values(rl.masked_mean(values, MASK_2x4, dim=1), [2.0, 4.5])  # 6 / 3, 9 / 2
    other = values.clone()
    other[MASK_2x4 == 0] = t([-1e4, 3.0, 12.0])
    assert rl.masked_mean(other, MASK_2x4).item() == rl.masked_mean(values, MASK_2x4).item()


def test_masked_var_is_unbiased_over_the_mask():
    values = t([[1.0, 2.0, 3.0, 100.0], [4.0, 5.0, -50.0, 7e5]])
    # mean 3; squared deviations 4 + 1 + 0 + 1 + 4 = 10 over 5 tokens
    assert_values(rl.masked_var(values, MASK_2x4), 2.5)  # 10 / (5 - 1)
    assert_values(rl.masked_var(values, MASK_2x4, unbiased=False), 2.0)  # 10 / 5
    other = values.clone()
    other[MASK_2x4 == 0] = t([-1e4, 3.0, 12.0])
    assert rl.masked_var(other, MASK_2x4).item() == rl.masked_var(values, MASK_2x4).item()


def test_whiten_over_the_mask():
    values = t([[1.0, 2.0, 3.0, 100.0], [4.0, 5.0, -50.0, 7e5]])
    out = rl.whiten(values, MASK_2x4)
    # (x - 3) / sqrt(2.5): -2/1.5811 = -1.26491, -1/1.5811 = -0.63246, 0, ...
    assert_values(
        out,
        [
            [-1.2649110640673518, -0.6324555320336759, 0.0, 0.0],
            [0.6324555320336759, 1.2649110640673518, 0.0, 0.0],
        ],
    )
    assert_values(rl.masked_mean(out, MASK_2x4), 0.0)
    assert_values(rl.masked_var(out, MASK_2x4).sqrt(), 1.0)
    assert (out[MASK_2x4 == 0] == 0).all()
    other = values.clone()
    other[MASK_2x4 == 0] = t([-1e4, 3.0, 12.0])
    assert torch.equal(rl.whiten(other, MASK_2x4), out)


def test_whiten_without_shifting_the_mean_keeps_it():
    values = t([[1.0, 2.0, 3.0, 100.0], [4.0, 5.0, -50.0, 7e5]])
    out = rl.whiten(values, MASK_2x4, shift_mean=False)
    # (x - 3) / sqrt(2.5) + 3
    assert_values(
        out,
        [
            [3 - 1.2649110640673518, 3 - 0.6324555320336759, 3.0, 0.0],
            [3 + 0.6324555320336759, 3 + 1.2649110640673518, 0.0, 0.0],
        ],
    )


# -- KL estimators ----------------------------------------------------------------------------------


def test_kl_penalty_k1_and_k3_by_hand():
    logp = t([math.log(0.5), math.log(0.25)])
    logq = t([math.log(0.25), math.log(0.5)])
    # k1 = log p - log q: log 2, -log 2
    assert_values(rl.kl_penalty(logp, logq, "k1"), [0.6931471805599453, -0.6931471805599453])
    # k3 = (q/p - 1) - log(q/p): q/p = 0.5 -> -0.5 + log 2 = 0.193147; q/p = 2 -> 1 - log 2 = 0.306853
    assert_values(rl.kl_penalty(logp, logq, "k3"), [0.1931471805599453, 0.3068528194400547])
    assert_values(rl.kl_penalty(logp, logq), [0.6931471805599453, -0.6931471805599453])  # k1 by default


def test_k3_is_non_negative_and_both_vanish_when_the_distributions_agree():
    generator = torch.Generator().manual_seed(0)
    logp = -torch.rand(64, generator=generator, dtype=torch.float64) * 8
    logq = -torch.rand(64, generator=generator, dtype=torch.float64) * 8
    assert (rl.kl_penalty(logp, logq, "k3") >= 0).all()
    assert (rl.kl_penalty(logp, logp, "k1") == 0).all()
    assert (rl.kl_penalty(logp, logp, "k3") == 0).all()


def test_exact_kl_by_hand_with_a_truncated_distribution():
    # p = (0.5, 0.5, 0) (cut to two tokens), q = (0.25, 0.25, 0.5): KL = 2 * 0.5 * log(0.5 / 0.25) = log 2
    p = torch.tensor([[0.5, 0.5, 0.0], [0.2, 0.3, 0.5]]).log()
    q = torch.tensor([[0.25, 0.25, 0.5], [0.2, 0.3, 0.5]]).log()
    torch.testing.assert_close(rl.kl_divergence(p, q), torch.tensor([math.log(2), 0.0]))
    # a token p samples that q rules out: infinitely far, not silently dropped
    assert rl.kl_divergence(q.flip(0)[:1], p[:1]).isinf().all()


def test_kl_penalty_rejects_an_unknown_estimator():
    with pytest.raises(ValueError, match="k2"):
        rl.kl_penalty(t([0.0]), t([0.0]), "k2")


# -- rewards and advantages -------------------------------------------------------------------------


def test_token_rewards_put_the_score_on_the_last_real_token():
    scores = t([2.0, -1.0])
    kl = t([[0.5, -0.2, 1.0, 7.0], [0.3, 0.4, 9.0, 9.0]])
    rewards, non_score = rl.token_rewards(scores, kl, MASK_2x4, kl_coef=0.1)
    # -0.1 * kl on real tokens: -0.05, 0.02, -0.1 | -0.03, -0.04; 0 after the mask
    assert_values(non_score, [[-0.05, 0.02, -0.1, 0.0], [-0.03, -0.04, 0.0, 0.0]])
    # + score on the last real token: -0.1 + 2 = 1.9 (row 0, t=2); -0.04 - 1 = -1.04 (row 1, t=1)
    assert_values(rewards, [[-0.05, 0.02, 1.9, 0.0], [-0.03, -1.04, 0.0, 0.0]])


def test_token_rewards_of_a_response_without_padding():
    rewards, _ = rl.token_rewards(t([3.0]), t([[1.0, 1.0, 1.0]]), t([[1, 1, 1]]), kl_coef=0.5)
    assert_values(rewards, [[-0.5, -0.5, 2.5]])  # -0.5 * 1 each, + 3 on the last token


# rows: 3 real tokens + 1 masked; 1 real token + 3 masked
GAE_MASK = t([[1, 1, 1, 0], [1, 0, 0, 0]])
GAE_REWARDS = t([[1.0, 0.5, 2.0, 0.0], [3.0, 0.0, 0.0, 0.0]])
GAE_VALUES = t([[0.4, 0.6, 0.8, 0.0], [1.0, 0.0, 0.0, 0.0]])


@pytest.mark.parametrize(
    ("gamma", "lam", "advantages", "returns"),
    [
        # gamma 1, lam 0.95, row 0 (V after the last real token = 0):
        #   delta_2 = 2.0 + 0 - 0.8 = 1.2;  delta_1 = 0.5 + 0.8 - 0.6 = 0.7;  delta_0 = 1.0 + 0.6 - 0.4 = 1.2
        #   A_2 = 1.2;  A_1 = 0.7 + 0.95 * 1.2 = 1.84;  A_0 = 1.2 + 0.95 * 1.84 = 2.948
        #   R = A + V = 3.348, 2.44, 2.0
        # row 1: delta_0 = 3.0 + 0 - 1.0 = 2.0 = A_0; R_0 = 3.0
        (
            1.0,
            0.95,
            [[2.948, 1.84, 1.2, 0.0], [2.0, 0.0, 0.0, 0.0]],
            [[3.348, 2.44, 2.0, 0.0], [3.0, 0.0, 0.0, 0.0]],
        ),
        # gamma 0.9, lam 0.5 (gamma * lam = 0.45), row 0:
        #   delta_2 = 2.0 - 0.8 = 1.2;  delta_1 = 0.5 + 0.9 * 0.8 - 0.6 = 0.62;  delta_0 = 1.0 + 0.9 * 0.6 - 0.4 = 1.14
        #   A_2 = 1.2;  A_1 = 0.62 + 0.45 * 1.2 = 1.16;  A_0 = 1.14 + 0.45 * 1.16 = 1.662
        #   R = 2.062, 1.76, 2.0
        (
            0.9,
            0.5,
            [[1.662, 1.16, 1.2, 0.0], [2.0, 0.0, 0.0, 0.0]],
            [[2.062, 1.76, 2.0, 0.0], [3.0, 0.0, 0.0, 0.0]],
        ),
    ],
)
def test_gae_by_hand(gamma, lam, advantages, returns):
    adv, ret = rl.gae(GAE_REWARDS, GAE_VALUES, GAE_MASK, gamma, lam)
    assert_values(adv, advantages)
    assert_values(ret, returns)
    # Large rewards and values under the mask change nothing.
    rewards, values = GAE_REWARDS.clone(), GAE_VALUES.clone()
    rewards[GAE_MASK == 0] = 1e6
    values[GAE_MASK == 0] = -3e5
    adv2, ret2 = rl.gae(rewards, values, GAE_MASK, gamma, lam)
    assert torch.equal(adv2, adv)
    assert torch.equal(ret2, ret)


def test_gae_of_an_empty_response_is_zero():
    adv, ret = rl.gae(t([[5.0, 5.0]]), t([[2.0, 2.0]]), t([[0, 0]]), 1.0, 0.95)
    assert (adv == 0).all() and (ret == 0).all()


# -- losses -----------------------------------------------------------------------------------------


def test_policy_loss_inside_the_clip_range_is_the_plain_surrogate():
    old = t([-1.0, -2.0, -3.0])
    new = old + t([math.log(1.1), math.log(0.9), 40.0])  # ratios 1.1, 0.9 and a masked junk one
    advantages = t([2.0, -1.0, 5.0])
    mask = t([1, 1, 0])
    loss, stats = rl.policy_loss(new, old, advantages, mask, clip=0.2)
    assert_values(loss, -0.65)  # -mean(A r) = -(2 * 1.1 + (-1) * 0.9) / 2 = -1.3 / 2
    assert_values(stats["clipfrac"], 0.0)
    assert_values(stats["ratio"], 1.0)  # (1.1 + 0.9) / 2
    # ((1.1 - 1) - log 1.1 + (0.9 - 1) - log 0.9) / 2 = (0.0046898 + 0.0053605) / 2
    assert_values(stats["approx_kl"], (0.1 - math.log(1.1) - 0.1 - math.log(0.9)) / 2)


def test_policy_loss_clips_and_its_gradient_stops_at_clipped_tokens():
    old = t([-1.0, -1.0, -1.0, -1.0, -1.0])
    ratios = [1.5, 0.5, 0.5, 1.5]
    new = (old + t([*(math.log(r) for r in ratios), 30.0])).requires_grad_(True)
    advantages = t([1.0, -1.0, 1.0, -1.0, 100.0])
    mask = t([1, 1, 1, 1, 0])
    loss, stats = rl.policy_loss(new, old, advantages, mask, clip=0.2)
    # per token max(-A r, -A clip(r, 0.8, 1.2)):
    #   r 1.5, A +1: max(-1.5, -1.2) = -1.2 (clipped)
    #   r 0.5, A -1: max(0.5, 0.8) = 0.8 (clipped)
    #   r 0.5, A +1: max(-0.5, -0.8) = -0.5 (not clipped: the pessimistic term is the unclipped one)
    #   r 1.5, A -1: max(1.5, 1.2) = 1.5 (not clipped)
    # mean = (-1.2 + 0.8 - 0.5 + 1.5) / 4 = 0.15
    assert_values(loss, 0.15)
    assert_values(stats["clipfrac"], 0.5)  # 2 of 4
    # (r - 1) - log r: r 1.5 -> 0.5 - 0.405465 = 0.0945349; r 0.5 -> -0.5 + 0.693147 = 0.1931472; mean 0.1438410
    assert_values(stats["approx_kl"], 0.14384103622589045)
    assert_values(stats["ratio"], 1.0)  # (1.5 + 0.5 + 0.5 + 1.5) / 4
    loss.backward()
    # d/dlogp of -A r / N = -A r / 4: 0 where clipped, -(1)(0.5)/4 = -0.125, -(-1)(1.5)/4 = 0.375, 0 masked
    assert_values(new.grad, [0.0, 0.0, -0.125, 0.375, 0.0])


def test_policy_loss_gradient_inside_the_clip_range_is_the_full_surrogate_gradient():
    old = t([-1.0, -1.0])
    new = (old + t([math.log(1.1), math.log(0.9)])).requires_grad_(True)
    loss, _ = rl.policy_loss(new, old, t([2.0, -1.0]), t([1, 1]), clip=0.2)
    loss.backward()
    assert_values(new.grad, [-1.1, 0.45])  # -A r / 2: -(2)(1.1)/2, -(-1)(0.9)/2


def test_value_loss_clipped_and_unclipped():
    values = t([1.0, 1.0, 0.6, 50.0], dtype=torch.float64).requires_grad_(True)
    old_values = t([0.5, 0.5, 0.5, -50.0])
    returns = t([0.0, 2.0, 1.0, 9.0])
    mask = t([1, 1, 1, 0])
    loss, stats = rl.value_loss(values, old_values, returns, mask, clip=0.2)
    # token 0: V_clip = 0.5 + 0.2 = 0.7; max((1 - 0)^2, (0.7 - 0)^2) = max(1, 0.49) = 1 (clip does not bind)
    # token 1: V_clip = 0.7; max((1 - 2)^2, (0.7 - 2)^2) = max(1, 1.69) = 1.69 (clip binds)
    # token 2: |0.6 - 0.5| < 0.2; (0.6 - 1)^2 = 0.16 both ways
    # loss = 0.5 * (1 + 1.69 + 0.16) / 3 = 0.5 * 0.95 = 0.475
    assert_values(loss, 0.475)
    assert_values(stats["clipfrac"], 1 / 3)
    loss.backward()
    # d/dV of 0.5 (V - R)^2 / 3 = (V - R) / 3: token 0: 1/3; token 1 clipped: 0; token 2: -0.4 / 3; masked: 0
    assert_values(values.grad, [1 / 3, 0.0, -0.4 / 3, 0.0])


def test_value_loss_without_clipping_binding_is_half_the_mse():
    values, returns = t([1.0, 3.0]), t([2.0, 1.0])
    loss, stats = rl.value_loss(values, values.clone(), returns, t([1, 1]), clip=0.2)
    assert_values(loss, 1.25)  # 0.5 * (1 + 4) / 2
    assert_values(stats["clipfrac"], 0.0)


# -- diagnostics ------------------------------------------------------------------------------------


def test_entropy_from_logits():
    assert_values(rl.entropy_from_logits(torch.zeros(2, 5)), [1.6094379124341003] * 2)  # log 5
    assert rl.entropy_from_logits(t([[100.0, 0.0, 0.0, 0.0]])).item() < 1e-6
    # p = (0.25, 0.75): -(0.25 log 0.25 + 0.75 log 0.75) = 0.5623351
    assert_values(rl.entropy_from_logits(t([[0.0, math.log(3.0)]])), [0.5623351446188083])


def test_explained_variance():
    returns = t([[1.0, 2.0, 3.0, 99.0]])
    mask = t([[1, 1, 1, 0]])
    assert_values(rl.explained_variance(returns.clone(), returns, mask), 1.0)
    # values equal to the mean of the returns (2): Var(R - 2) = Var(R) -> 0
    assert_values(rl.explained_variance(t([[2.0, 2.0, 2.0, -7.0]]), returns, mask), 0.0)
    # residual (0, 0, 1): mean 1/3, unbiased var (1/9 + 1/9 + 4/9) / 2 = 1/3; Var(R) = 1 -> 1 - 1/3
    assert_values(rl.explained_variance(t([[1.0, 2.0, 2.0, 55.0]]), returns, mask), 2 / 3)


# -- controllers and running statistics -------------------------------------------------------------


def test_fixed_kl_controller_never_changes():
    ctl = rl.KLController(0.05)
    for kl in (0.0, 1.0, 100.0, -3.0):
        ctl.update(kl, 512)
    assert ctl.value == 0.05


@pytest.mark.parametrize(
    ("observed", "expected"),
    [
        (12.0, 0.100512),  # error = clip(12/6 - 1, -0.2, 0.2) = 0.2: 0.1 * (1 + 0.2 * 256 / 10000)
        (6.0, 0.1),  # error 0: unchanged
        (3.0, 0.099488),  # error = clip(0.5 - 1) = -0.2: 0.1 * (1 - 0.2 * 256 / 10000)
        (6.6, 0.100256),  # error = 6.6/6 - 1 = 0.1: 0.1 * (1 + 0.1 * 256 / 10000)
        (0.0, 0.099488),  # error = clip(-1) = -0.2
    ],
)
def test_adaptive_kl_controller(observed, expected):
    ctl = rl.KLController(0.1, target=6.0, horizon=10000)
    ctl.update(observed, 256)
    assert ctl.value == pytest.approx(expected, abs=1e-12)


def test_kl_controller_state_dict_round_trip():
    ctl = rl.KLController(0.1, target=6.0, horizon=500)
    ctl.update(9.0, 64)
    restored = rl.KLController(1.0)
    restored.load_state_dict(ctl.state_dict())
    assert (restored.value, restored.target, restored.horizon) == (ctl.value, 6.0, 500)
    ctl.update(2.0, 64)
    restored.update(2.0, 64)
    assert restored.value == ctl.value


def test_running_moments_match_numpy_over_the_concatenation():
    batches = [[1.0, 2.0, 3.0], [10.0, 20.0], [-5.0, 0.5, 7.0, 8.0], [4.25]]
    moments = rl.RunningMoments()
    for batch in batches:
        moments.update(torch.tensor(batch))
    everything = np.concatenate([np.array(b) for b in batches])
    assert moments.mean == pytest.approx(everything.mean(), rel=TOL)
    assert moments.var == pytest.approx(everything.var(), rel=TOL)  # population variance (ddof 0)
    # the scale shrinks the variance towards 1 with the weight of one observation: (10 var + 1) / 11
    assert moments.std == pytest.approx(((10 * everything.var() + 1) / 11) ** 0.5, rel=TOL)
    moments.update(torch.tensor([]))  # an empty batch changes nothing
    assert moments.mean == pytest.approx(everything.mean(), rel=TOL)
    restored = rl.RunningMoments()
    restored.load_state_dict(moments.state_dict())
    assert (restored.mean, restored.std) == (moments.mean, moments.std)
    restored.update(torch.tensor([100.0, -1.0]))
    everything = np.concatenate([everything, [100.0, -1.0]])
    assert restored.mean == pytest.approx(everything.mean(), rel=TOL)
    assert restored.var == pytest.approx(everything.var(), rel=TOL)


def test_a_first_batch_of_equal_scores_does_not_blow_up_the_next():
    moments = rl.RunningMoments()
    moments.update(torch.full((8,), 0.5))
    assert (moments.mean, moments.var) == (0.5, 0.0)
    assert moments.std == pytest.approx((1 / 9) ** 0.5)  # (8 * 0 + 1) / (8 + 1)
    # the next scores, 0.5 +- 0.1, come out +- 0.3, not +- 1e5 (the old floor of 1e-6 on the std)
    nxt = (torch.tensor([0.4, 0.6]) - moments.mean) / moments.std
    torch.testing.assert_close(nxt, torch.tensor([-0.3, 0.3]))


def test_missing_eos_penalty_is_subtracted_from_cut_off_responses_only():
    raw = t([1.0, 1.0, -2.0])
    ended = torch.tensor([True, False, False])
    assert_values(rl.penalise_missing_eos(raw, ended, 0.5), [1.0, 0.5, -2.5])
    assert torch.equal(rl.penalise_missing_eos(raw, ended, None), raw)
    assert torch.equal(rl.penalise_missing_eos(raw, ended, 0.0), raw)


@pytest.mark.parametrize(
    ("mode", "has_stats", "resolved"),
    [
        ("auto", True, "model"),
        ("auto", False, "running"),
        ("model", True, "model"),
        ("running", True, "running"),
        ("none", True, "none"),
    ],
)
def test_reward_norm_auto_prefers_the_reward_models_statistics(mode, has_stats, resolved):
    assert rl.resolve_reward_norm(mode, has_stats) == resolved


# -- masking after EOS ------------------------------------------------------------------------------

EOS, PAD = 2, 0
# Left-padded prompts of lengths 2 and 3 (P = 3); responses of 3 and 1 tokens, each ending at its
# first EOS, right-padded to R = 4.
QUERY = torch.tensor([[PAD, 5, 6], [7, 8, 9]])
QUERY_MASK = torch.tensor([[0, 1, 1], [1, 1, 1]])
RESPONSE = torch.tensor([[11, 12, EOS, PAD], [EOS, PAD, PAD, PAD]])
RESPONSE_MASK = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]])
AFTER_EOS = RESPONSE_MASK == 0


def _rollout(response=RESPONSE, **tensors) -> Rollout:
    blank = {
        name: None for name in ("logprobs", "ref_logprobs", "values", "scores", "kl", "advantages", "returns")
    }
    return Rollout(QUERY, QUERY_MASK, response, RESPONSE_MASK, **{**blank, **tensors})


def test_sequences_mark_the_positions_that_predict_response_tokens():
    ids, mask, where = _rollout().sequences()
    assert torch.equal(ids, torch.tensor([[PAD, 5, 6, 11, 12, EOS, PAD], [7, 8, 9, EOS, PAD, PAD, PAD]]))
    assert torch.equal(mask, torch.tensor([[0, 1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 0, 0, 0]]))
    # P - 1 = 2 .. P - 1 + len - 1: row 0 (3 tokens) positions 2, 3, 4; row 1 (1 token) position 2
    expected = torch.tensor([[0, 0, 1, 1, 1, 0, 0], [0, 0, 1, 0, 0, 0, 0]], dtype=torch.bool)
    assert torch.equal(where, expected)
    # position t predicts token t + 1: the tokens after `where` are exactly the real response tokens
    assert torch.equal(ids[:, 1:][where[:, :-1]], RESPONSE[RESPONSE_MASK.bool()])


def test_scatter_puts_values_at_the_mask_positions():
    flat = torch.tensor([0.1, 0.2, 0.3, 0.4])
    out = _scatter(flat, RESPONSE_MASK)
    assert torch.equal(out, torch.tensor([[0.1, 0.2, 0.3, 0.0], [0.4, 0.0, 0.0, 0.0]]))


def test_junk_token_ids_after_eos_change_neither_where_nor_the_targets():
    junk_response = RESPONSE.clone()
    junk_response[AFTER_EOS] = torch.tensor([31, 77, 4, 19])
    for rollout in (_rollout(), _rollout(junk_response)):
        _, _, where = rollout.sequences()
        assert torch.equal(where, _rollout().sequences()[2])
        assert torch.equal(rollout.response[rollout.response_mask.bool()], torch.tensor([11, 12, EOS, EOS]))


def _tiny_llama(**overrides):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        **overrides,
    )
    return LlamaForCausalLM(config).float()


def test_logprobs_of_response_tokens_ignore_junk_tokens_after_eos():
    from rlhf.policy import selected_logits

    model = _tiny_llama().eval()
    junk_response = RESPONSE.clone()
    junk_response[AFTER_EOS] = torch.tensor([31, 77, 4, 19])
    logprobs = []
    with torch.no_grad():
        for response in (RESPONSE, junk_response):
            ids, mask, where = _rollout(response).sequences()
            targets = response[RESPONSE_MASK.bool()]
            logits = selected_logits(model, ids, mask, where)
            chosen = torch.log_softmax(logits, -1).gather(-1, targets[:, None]).squeeze(-1)
            logprobs.append(_scatter(chosen, RESPONSE_MASK))
    torch.testing.assert_close(logprobs[0], logprobs[1], atol=TOL, rtol=0)
    assert (logprobs[0][AFTER_EOS] == 0).all()


# -- dropout ----------------------------------------------------------------------------------------


class _WithDropout(torch.nn.Module):
    def __init__(self, lm: torch.nn.Module):
        super().__init__()
        self.lm = lm
        self.drop = torch.nn.Dropout(0.5)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.drop(self.lm(input_ids=input_ids).logits)


def test_disable_dropout_makes_training_mode_passes_deterministic():
    lm = _tiny_llama(attention_dropout=0.5, attn_implementation="eager")
    ids = torch.tensor([[3, 14, 15, 92, 65, 35, 89, 79]])
    lm.train()
    # attention dropout alone makes two passes differ
    assert not torch.equal(lm(input_ids=ids).logits, lm(input_ids=ids).logits)
    model = _WithDropout(lm).train()
    assert not torch.equal(model(ids), model(ids))
    disable_dropout(model)
    assert model.training
    assert torch.equal(model(ids), model(ids))
    assert torch.equal(lm(input_ids=ids).logits, lm(input_ids=ids).logits)


def test_disable_dropout_clears_the_config_of_a_transformers_model():
    lm = _tiny_llama(attention_dropout=0.5)
    disable_dropout(lm)
    assert lm.config.attention_dropout == 0.0
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    lm.train()
    assert torch.equal(lm(input_ids=ids).logits, lm(input_ids=ids).logits)
