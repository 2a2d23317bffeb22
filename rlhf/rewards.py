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


class RewardSource:
    """Scores finished episodes: a trained reward model, or a function of the texts."""

    model: torch.nn.Module | None = None

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def decode(self, responses: Sequence[Sequence[int]]) -> list[str]:
        return self.tokenizer.batch_decode(responses, skip_special_tokens=True)

    def __call__(self, ids: torch.Tensor, mask: torch.Tensor, prompts: Sequence, texts: Sequence[str]) -> torch.Tensor:
        raise NotImplementedError


class ModelReward(RewardSource):
    """The reward model's score at each sequence's last real token (the response's EOS)."""

    def __init__(self, model: torch.nn.Module, tokenizer):
        super().__init__(tokenizer)
        self.model = model

    @torch.no_grad()
    def __call__(self, ids, mask, prompts, texts) -> torch.Tensor:
        from rlhf.scalar import sequence_scores

        return sequence_scores(self.model, ids, mask)


class FunctionReward(RewardSource):
    """A function of (prompt texts, response texts), e.g. a task's gold annotator."""

    def __init__(self, function: RewardFunction, tokenizer):
        super().__init__(tokenizer)
        self.function = function

    def __call__(self, ids, mask, prompts, texts) -> torch.Tensor:
        from rlhf.data.formats import prompt_text

        scores = self.function([prompt_text(p) for p in prompts], list(texts))
        if len(scores) != len(texts):
            raise ValueError(f"the reward function returned {len(scores)} scores for {len(texts)} responses")
        return torch.tensor([float(s) for s in scores])
