"""Where PPO's rewards come from: a reward model, or a function named `module.function` in the config."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence

import torch

from rlhf.errors import ConfigError

RewardFunction = Callable[[Sequence[str], Sequence[str]], Sequence[float]]


def load_function(dotted: str, key: str) -> RewardFunction:
    """Import `package.module.function`; ConfigError names `key` if it is not there or not callable."""
    module_name, _, attribute = dotted.rpartition(".")
    if not module_name:
        raise ConfigError(f"{key}: {dotted!r} is not a dotted path module.function")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ConfigError(f"{key}: cannot import {module_name!r}: {err}") from None
    function = getattr(module, attribute, None)
    if not callable(function):
        raise ConfigError(f"{key}: {module_name!r} has no function {attribute!r}")
    return function


def load_gold(setting: str | None, data_path: str | None) -> RewardFunction | None:
    """The gold annotator of data read from `data_path` (data.gold_reward is `setting`; see
    rlhf.data.sources.gold_annotator), None when that data has none."""
    from rlhf.data.sources import gold_annotator

    dotted = gold_annotator(setting, data_path)
    return load_function(dotted, "data.gold_reward") if dotted else None


class RewardSource:
    """Scores finished episodes: a trained reward model, or a function of the texts.

    `tokenizer` is the policy's (it decodes responses). `score_texts` scores (prompt, response)
    texts, the one entry point evaluation uses; PPO calls the source with the episodes' token ids
    as well, which a reward model sharing the policy's tokenizer scores without re-tokenising.
    """

    model: torch.nn.Module | None = None

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def decode(self, responses: Sequence[Sequence[int]]) -> list[str]:
        return self.tokenizer.batch_decode(responses, skip_special_tokens=True)

    def score_texts(self, prompts: Sequence, responses: Sequence[str]) -> list[float]:
        raise NotImplementedError

    def __call__(
        self, ids: torch.Tensor, mask: torch.Tensor, prompts: Sequence, texts: Sequence[str]
    ) -> torch.Tensor:
        return torch.tensor(self.score_texts(prompts, texts), dtype=torch.float32)


def shares_tokens(policy_tokenizer, reward_tokenizer) -> bool:
    """Whether every token of the policy has the same id for the reward model (which may add a pad)."""
    reward_vocab = reward_tokenizer.get_vocab()
    return all(reward_vocab.get(token) == index for token, index in policy_tokenizer.get_vocab().items())


class ModelReward(RewardSource):
    """The reward model's score at each sequence's last real token (the response's EOS).

    `renderer` is the reward model's own tokenizer and chat template, for texts; the policy's token
    ids are scored as they are only when `same_tokens` (see shares_tokens).
    """

    def __init__(self, model: torch.nn.Module, tokenizer, renderer, same_tokens: bool, batch_size: int = 16):
        super().__init__(tokenizer)
        self.model, self.renderer, self.same_tokens, self.batch_size = (
            model,
            renderer,
            same_tokens,
            batch_size,
        )

    @torch.no_grad()
    def score_texts(self, prompts, responses) -> list[float]:
        from rlhf.data.loading import attention_mask, pad
        from rlhf.data.tokenize import encode_prompts, encode_responses
        from rlhf.scalar import sequence_scores

        sequences = [
            p + r
            for p, r in zip(
                encode_prompts(self.renderer, prompts), encode_responses(self.renderer, prompts, responses)
            )
        ]
        scores: list[float] = []
        for start in range(0, len(sequences), self.batch_size):
            part = sequences[start : start + self.batch_size]
            ids, mask = pad(part, self.renderer.tokenizer.pad_token_id), attention_mask(part)
            scores += sequence_scores(
                self.model, ids.to(self.model.device), mask.to(self.model.device)
            ).tolist()
        return scores

    @torch.no_grad()
    def __call__(self, ids, mask, prompts, texts) -> torch.Tensor:
        if not self.same_tokens:
            return super().__call__(ids, mask, prompts, texts)
        from rlhf.scalar import sequence_scores

        return sequence_scores(self.model, ids, mask)


class FunctionReward(RewardSource):
    """A function of (prompt texts, response texts), e.g. a task's gold annotator. Message lists are
    passed as the text of their last message."""

    def __init__(self, function: RewardFunction, tokenizer):
        super().__init__(tokenizer)
        self.function = function

    def score_texts(self, prompts, responses) -> list[float]:
        from rlhf.data.formats import prompt_text

        scores = self.function([prompt_text(p) for p in prompts], [prompt_text(r) for r in responses])
        if len(scores) != len(responses):
            raise ValueError(
                f"the reward function returned {len(scores)} scores for {len(responses)} responses"
            )
        return [float(s) for s in scores]


def load_reward(
    spec: str,
    key: str,
    model_config,
    chat_template: str,
    needed_stage: str | None,
    tracker,
    policy_tokenizer,
    batch_size: int = 16,
    accepts: tuple[str, ...] = (),
) -> tuple[RewardSource, str | None]:
    """The reward `spec` names (fn:module.function, or a reward model source as lineage resolves it,
    `latest` finding the newest finished `needed_stage` run), and the reward model's directory (None
    for a function). Tags the run with where it came from; `batch_size`: sequences per scoring pass
    of texts. The model loads as `model_config` says, its prompts rendered with `chat_template`;
    `accepts`: the kinds of model it may be (the stage descriptor's)."""
    from rlhf import models
    from rlhf.data.tokenize import ChatRenderer
    from rlhf.lineage import resolve_source, tag_name

    if spec.startswith("fn:"):
        tracker.set_tags({tag_name(key): spec})
        return FunctionReward(load_function(spec[len("fn:") :], key), policy_tokenizer), None
    source = resolve_source(spec, key, needed_stage, tracker, accepts)
    if source.location is None:
        raise ConfigError(f"{key}=base: a reward model must be trained; use latest, a path, or fn:...")
    tokenizer = models.load_tokenizer(model_config, source.location)
    model = models.load_scalar_model(model_config, source.location, tokenizer.pad_token_id).eval()
    renderer = ChatRenderer(tokenizer, chat_template)
    reward = ModelReward(
        model, policy_tokenizer, renderer, shares_tokens(policy_tokenizer, tokenizer), batch_size
    )
    return reward, source.location
