"""The fused LM-head functions against plain autograd: values and gradients must match."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from rlhf.policy import LinearCrossEntropy, LinearLogProbs


def _inputs(rows=13, hidden=8, vocab=50, seed=0):
    generator = torch.Generator().manual_seed(seed)
    h = torch.randn(rows, hidden, generator=generator, dtype=torch.float64, requires_grad=True)
    w = torch.randn(vocab, hidden, generator=generator, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, vocab, (rows,), generator=generator)
    return h, w, targets


def _reference(h, w, targets, temperature):
    logp_all = torch.log_softmax((h @ w.T) / temperature, dim=-1)
    logp = logp_all.gather(-1, targets[:, None]).squeeze(-1)
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    return logp, entropy


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("chunk", [4, 1024])
@pytest.mark.parametrize("keep", [True, False])
def test_linear_logprobs_match_log_softmax_with_gradients(temperature, chunk, keep, monkeypatch):
    monkeypatch.setattr(LinearLogProbs, "KEEP_LIMIT", 2**26 if keep else 0)  # kept vs recomputed softmax
    h, w, targets = _inputs()
    logp, entropy = LinearLogProbs.apply(h, w, targets, temperature, chunk, True)
    want_logp, want_entropy = _reference(h, w, targets, temperature)
    torch.testing.assert_close(logp.double(), want_logp, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(entropy.double(), want_entropy, rtol=1e-5, atol=1e-5)

    # A loss that uses both outputs, as PPO with an entropy bonus does.
    weights = torch.linspace(-1.0, 1.0, len(targets), dtype=torch.float64)
    grads = torch.autograd.grad((logp.double() * weights).sum() - 0.3 * entropy.double().sum(), (h, w))
    want = torch.autograd.grad((want_logp * weights).sum() - 0.3 * want_entropy.sum(), (h, w))
    for got, expected in zip(grads, want):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_linear_logprobs_without_entropy_gradient_matches():
    h, w, targets = _inputs(seed=1)
    logp, _ = LinearLogProbs.apply(h, w, targets, 0.7, 5, False)
    want_logp, _ = _reference(h, w, targets, 0.7)
    grads = torch.autograd.grad(logp.double().sum(), (h, w))
    want = torch.autograd.grad(want_logp.sum(), (h, w))
    for got, expected in zip(grads, want):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_linear_cross_entropy_matches_cross_entropy_with_gradients():
    h, w, targets = _inputs(seed=2)
    loss = LinearCrossEntropy.apply(h, w, targets, 4)
    want = F.cross_entropy(h @ w.T, targets, reduction="sum")
    torch.testing.assert_close(loss.double(), want, rtol=1e-5, atol=1e-5)
    grads = torch.autograd.grad(loss * 2.0, (h, w))
    expected = torch.autograd.grad(want * 2.0, (h, w))
    for got, exp in zip(grads, expected):
        torch.testing.assert_close(got, exp, rtol=1e-5, atol=1e-6)
