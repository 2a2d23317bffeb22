"""A PPO batch of episodes and the helpers that keep its per-token tensors aligned."""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from rlhf import models
from rlhf.policy import join_prompt_response


@dataclass
class Rollout:
    """A batch of episodes. query (B, P) is left-padded, response (B, R) right-padded; the masks are 1
    on real tokens (a response's up to and including its first EOS)."""

    query: torch.Tensor
    query_mask: torch.Tensor
    response: torch.Tensor
    response_mask: torch.Tensor
    logprobs: torch.Tensor
    ref_logprobs: torch.Tensor
    values: torch.Tensor
    scores: torch.Tensor
    kl: torch.Tensor
    advantages: torch.Tensor
    returns: torch.Tensor

    def select(self, index: torch.Tensor) -> Rollout:
        return Rollout(**{f.name: getattr(self, f.name)[index] for f in fields(self)})

    def sequences(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(ids, mask, where) of prompt + response (see join_prompt_response)."""
        return join_prompt_response(self.query, self.query_mask, self.response, self.response_mask)


def disable_dropout(model: torch.nn.Module) -> None:
    """Dropout off everywhere: log-probabilities of the same tokens must not change between passes."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        for name in ("attention_dropout", "dropout_p"):
            if isinstance(getattr(module, name, None), float):
                setattr(module, name, 0.0)
    config = getattr(models.unwrap(model), "config", None)
    for name in ("attention_dropout", "hidden_dropout", "resid_pdrop", "embd_pdrop", "attn_pdrop", "dropout"):
        if isinstance(getattr(config, name, None), float):
            setattr(config, name, 0.0)


def _scatter(flat: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Values listed in the order of mask's true positions, put back into a zero (B, R) tensor."""
    out = torch.zeros(mask.shape, dtype=flat.dtype, device=flat.device)
    out[mask.bool()] = flat
    return out
