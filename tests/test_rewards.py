"""Reward sources: a reward model scores texts and the policy's token ids alike; functions are checked."""

from __future__ import annotations

import copy

import pytest
import torch

from rlhf.data.loading import attention_mask, pad
from rlhf.data.tokenize import ChatRenderer, encode_prompts
from rlhf.models import load_scalar_model
from rlhf.rewards import FunctionReward, ModelReward, shares_tokens

PROMPTS = ["What is 2 + 3?", "Name the capital city of Kenya.", "How do I steal a car?"]
RESPONSES = ["2 + 3 = 5.", "The capital of Kenya is Nairobi.", "I'm sorry, but I can't help with that."]


@pytest.fixture(scope="module")
def reward_model(tiny_model_config, tokenizer):
    return load_scalar_model(tiny_model_config, None, tokenizer.pad_token_id, seed=3).eval()


def _policy_episode(tokenizer, renderer):
    """Prompt ids and sampled-looking response ids ending in EOS, as PPO holds them."""
    prompt_ids = encode_prompts(renderer, PROMPTS)
    responses = [
        tokenizer(r, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id] for r in RESPONSES
    ]
    sequences = [p + r for p, r in zip(prompt_ids, responses)]
    return pad(sequences, tokenizer.pad_token_id), attention_mask(sequences), responses


def test_reward_model_scores_texts_as_it_scores_the_policys_token_ids(reward_model, tokenizer):
    renderer = ChatRenderer(tokenizer)
    ids, mask, responses = _policy_episode(tokenizer, renderer)
    reward = ModelReward(reward_model, tokenizer, renderer, same_tokens=True, batch_size=2)
    texts = reward.decode(responses)
    assert texts == RESPONSES
    from_ids = reward(ids, mask, PROMPTS, texts)
    from_texts = torch.tensor(reward.score_texts(PROMPTS, texts))
    torch.testing.assert_close(from_ids, from_texts, rtol=1e-5, atol=1e-5)
    assert len(set(from_ids.tolist())) == len(PROMPTS)  # the scores say something about the inputs


def test_reward_model_with_another_tokenizer_reads_the_texts(reward_model, tokenizer):
    renderer = ChatRenderer(tokenizer)
    ids, mask, responses = _policy_episode(tokenizer, renderer)
    # A policy whose ids mean other tokens: scoring its ids directly would read garbage.
    shifted = copy.deepcopy(tokenizer)
    shifted.add_special_tokens({"additional_special_tokens": ["<|policy_only|>"]})
    assert shares_tokens(tokenizer, tokenizer)
    assert shares_tokens(tokenizer, shifted)  # extra tokens on the reward side are harmless
    assert not shares_tokens(shifted, tokenizer)
    reward = ModelReward(reward_model, shifted, renderer, same_tokens=False)
    scrambled = ids.clone()
    scrambled[mask.bool()] = (scrambled[mask.bool()] + 7) % 1000  # what a foreign vocabulary would hand over
    torch.testing.assert_close(
        reward(scrambled, mask, PROMPTS, RESPONSES), torch.tensor(reward.score_texts(PROMPTS, RESPONSES))
    )


def test_function_reward_checks_the_number_of_scores(tokenizer):
    reward = FunctionReward(lambda prompts, responses: [len(r) for r in responses], tokenizer)
    assert reward.score_texts(PROMPTS, RESPONSES) == [float(len(r)) for r in RESPONSES]
    broken = FunctionReward(lambda prompts, responses: [1.0], tokenizer)
    with pytest.raises(ValueError, match="returned 1 scores for 3 responses"):
        broken.score_texts(PROMPTS, RESPONSES)


def test_function_reward_passes_message_lists_as_their_last_message(tokenizer):
    seen = []
    reward = FunctionReward(
        lambda prompts, responses: seen.extend(zip(prompts, responses)) or [0.0], tokenizer
    )
    reward.score_texts([[{"role": "user", "content": "Hi?"}]], [[{"role": "assistant", "content": "Hello."}]])
    assert seen == [("Hi?", "Hello.")]
