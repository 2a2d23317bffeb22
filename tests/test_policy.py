"""The fused LM-head functions against plain autograd: values and gradients must match."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from rlhf.policy import LinearCrossEntropy, LinearLogProbs, generate, sample_tokens


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


# ---------------------------------------------------------------- sampling


def _tiny_lm(vocab=40, **config):
    """A seeded random Llama of 2 layers in eval mode; `config` overrides its LlamaConfig fields."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    settings = dict(
        vocab_size=vocab,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=64,
        pad_token_id=0,
        eos_token_id=1,
    )
    return LlamaForCausalLM(LlamaConfig(**{**settings, **config})).eval()


PROMPTS = [[5, 9, 17, 3, 8], [12, 4], [7, 7, 30, 2], [22]]


def _hf_greedy(model, prompt, new_tokens):
    out = model.generate(
        torch.tensor([prompt]), max_new_tokens=new_tokens, do_sample=False, eos_token_id=None, pad_token_id=0
    )
    return out[0, len(prompt) :].tolist()


def test_greedy_generation_matches_transformers_and_stops_at_the_first_eos():
    model = _tiny_lm()
    plain = [_hf_greedy(model, p, 12) for p in PROMPTS]
    # An EOS that some responses reach early and others never: rows leave the batch at different steps.
    eos = plain[0][3]
    responses = generate(
        model, PROMPTS, pad_token_id=0, eos_token_ids=[eos], max_new_tokens=12, do_sample=False
    )
    for response, alone in zip(responses, plain):
        end = alone.index(eos) + 1 if eos in alone else len(alone)
        assert response == alone[:end]
    assert len(responses[0]) == 4 and responses[0][-1] == eos
    assert any(eos not in r and len(r) == 12 for r in responses)


def test_sampling_is_reproducible_and_top_k_one_is_greedy():
    model = _tiny_lm()
    torch.manual_seed(3)
    first = generate(model, PROMPTS, 0, [1], max_new_tokens=10, temperature=0.7)
    torch.manual_seed(3)
    again = generate(model, PROMPTS, 0, [1], max_new_tokens=10, temperature=0.7)
    assert first == again
    assert all(1 <= len(r) <= 10 and 1 not in r[:-1] for r in first)
    greedy = generate(model, PROMPTS, 0, [1], max_new_tokens=10, do_sample=False)
    model.train()  # sampling runs in eval mode and gives the caller's mode back
    assert generate(model, PROMPTS, 0, [1], max_new_tokens=10, top_k=1) == greedy
    assert model.training is True


def test_a_seeded_sampler_draws_the_same_for_every_caller_and_leaves_their_random_state():
    from rlhf.policy import Sampler

    model = _tiny_lm()
    sampler = Sampler(pad_token_id=0, eos_token_ids=(1,), max_new_tokens=8, temperature=0.9)
    torch.manual_seed(11)
    before = torch.random.get_rng_state()
    first = sampler(model, PROMPTS, seed=5)
    assert torch.equal(torch.random.get_rng_state(), before)  # the caller's stream is untouched
    torch.rand(3)  # whatever the caller drew meanwhile
    assert sampler(model, PROMPTS, seed=5) == first
    torch.manual_seed(5)
    assert first == generate(model, PROMPTS, 0, [1], max_new_tokens=8, temperature=0.9)
    # In batches of 2: every prompt still answered, in order, each ending at EOS or the cap.
    batched = sampler(model, PROMPTS, seed=5, batch_size=2)
    assert len(batched) == len(PROMPTS) and all(sampler.ended(r) or len(r) == 8 for r in batched)
    greedy = Sampler(0, (1,), 8, greedy=True)
    assert greedy(model, PROMPTS, batch_size=3) == generate(
        model, PROMPTS, 0, [1], max_new_tokens=8, do_sample=False
    )


def test_episode_inputs_put_each_response_after_its_prompt():
    from rlhf.policy import episode_inputs

    responses = [[11, 12, 1], [13], [14, 15, 16, 17], [18, 19]]
    ids, mask, where, targets = episode_inputs(PROMPTS, responses, pad_token_id=0)
    assert targets.tolist() == [t for r in responses for t in r]
    for row, (prompt, response) in enumerate(zip(PROMPTS, responses)):
        assert ids[row][mask[row].bool()].tolist() == prompt + response
        # position t predicts token t + 1: the predicting positions are those just before each response token
        predicted = (where[row].nonzero().squeeze(-1) + 1).tolist()
        assert ids[row, predicted].tolist() == response


def test_sample_tokens_draws_from_the_softmax():
    torch.manual_seed(0)
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05, 0.0])
    scores = probs.clamp(min=1e-30).log().expand(20000, -1)
    counts = torch.bincount(sample_tokens(scores), minlength=5).double() / 20000
    torch.testing.assert_close(counts, probs.double(), atol=0.015, rtol=0)
    assert counts[4] == 0


# ---------------------------------------------------------------------------------------------------------
# response_logprobs against a plain forward pass


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_response_logprobs_match_a_plain_forward_pass_with_left_padding(temperature):
    """Left-padded prompts and right-padded responses in one batch give each response token the
    log-probability a plain transformers forward pass of that sequence alone gives it, at logits / T."""
    from rlhf.data.loading import attention_mask, pad
    from rlhf.policy import join_prompt_response, response_logprobs

    model = _tiny_lm()
    responses = [[11, 12, 1], [13], [14, 15, 16, 17], [18, 19]]
    query, query_mask = pad(PROMPTS, 0, left=True), attention_mask(PROMPTS, left=True)
    response, response_mask = pad(responses, 0), attention_mask(responses)
    ids, mask, where = join_prompt_response(query, query_mask, response, response_mask)
    targets = response[response_mask.bool()]
    with torch.no_grad():
        logp, entropy = response_logprobs(model, ids, mask, where, targets, temperature)
        expected_logp, expected_entropy = [], []
        for prompt, answer in zip(PROMPTS, responses):
            logits = model(input_ids=torch.tensor([prompt + answer])).logits[0].float() / temperature
            plain = torch.log_softmax(
                logits[len(prompt) - 1 : -1], dim=-1
            )  # the positions predicting the answer
            expected_logp.append(plain.gather(-1, torch.tensor(answer)[:, None]).squeeze(-1))
            expected_entropy.append(-(plain.exp() * plain).sum(-1))
    torch.testing.assert_close(logp, torch.cat(expected_logp), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(entropy, torch.cat(expected_entropy), atol=1e-5, rtol=1e-5)
