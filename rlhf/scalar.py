"""The one scalar-head model of the project: a causal-LM backbone with a linear `score` head.

The reward model reads the score at a sequence's last real token (found from the attention mask,
never from the pad id); a PPO value model reads it at every token. Saved as
AutoModelForSequenceClassification (one label). Its pad token is the policy's: a tokenizer without
one pads with EOS rather than gaining a token the policy's embedding lacks, so plain transformers,
which pools the last token that is not the pad id, then reads the token before a final EOS.
"""

from __future__ import annotations

import torch
from transformers import PreTrainedModel

from rlhf.data.loading import position_ids
from rlhf.models import unwrap


def _hidden(
    model: torch.nn.Module, input_ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor | None = None
) -> torch.Tensor:
    inner = unwrap(model)
    if positions is None:
        positions = position_ids(mask)
    if mask.dim() == 4:
        mask = _attention_bias(inner, mask)
    out = inner.base_model(input_ids=input_ids, attention_mask=mask, position_ids=positions, use_cache=False)
    return out.last_hidden_state


def supports_attention_masks(model: torch.nn.Module) -> bool:
    """Whether the model's attention takes an explicit (B, 1, T, T) mask (sdpa and eager do)."""
    return getattr(unwrap(model).config, "_attn_implementation", None) in ("sdpa", "eager")


def _attention_bias(model: PreTrainedModel, allowed: torch.Tensor) -> torch.Tensor:
    """A (B, 1, T, T) boolean mask (True: attend) in the form the model's attention adds or applies."""
    if model.config._attn_implementation == "eager":
        dtype = model.dtype
        return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(
            ~allowed, torch.finfo(dtype).min
        )
    return allowed


def _head(model: torch.nn.Module) -> torch.nn.Module:
    head = getattr(unwrap(model), "score", None)
    if head is None:
        raise TypeError(
            f"{type(unwrap(model)).__name__} has no `score` head; use a decoder-only architecture"
        )
    return head


def fp32_head(head: torch.nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """head(hidden) as float32 outside autocast: a score or value rounded to bf16 keeps 8 bits, too
    few for the Bradley-Terry loss, reward normalisation and value targets. The head is one row of
    weights, so computing it in full precision costs nothing measurable.

    Weights stored in a lower dtype (model.dtype=bfloat16) are the user's choice and kept.
    """
    weight = next(head.parameters())
    with torch.autocast(hidden.device.type, enabled=False):
        out = head(hidden.to(weight.dtype) if weight.dtype != torch.float32 else hidden.float())
    return out.float()


def last_index(mask: torch.Tensor) -> torch.Tensor:
    """Index of each row's last real token, for right or left padding alike."""
    positions = torch.arange(mask.shape[1], device=mask.device)
    return (positions * mask.long()).argmax(-1)


def sequence_scores(model: torch.nn.Module, input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B,) the score at each sequence's last real token, in float32."""
    hidden = _hidden(model, input_ids, mask)
    rows = torch.arange(hidden.shape[0], device=hidden.device)
    return fp32_head(_head(model), hidden[rows, last_index(mask)]).squeeze(-1)


def token_scores(model: torch.nn.Module, input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, T) the score at every position (a value model's per-token estimates), in float32."""
    return fp32_head(_head(model), _hidden(model, input_ids, mask)).squeeze(-1)


def pair_scores(model: torch.nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores of the preferred and of the other response of every pair of a PairCollator batch, in
    float32, from one forward pass in either of its layouts (each response scored once)."""
    mask = batch.get("pair_mask", batch["attention_mask"])
    hidden = _hidden(model, batch["input_ids"], mask, batch["position_ids"])
    scores = fp32_head(_head(model), hidden.flatten(0, 1)[batch["score_index"]]).squeeze(-1)
    return scores[batch["pair_index"][:, 0]], scores[batch["pair_index"][:, 1]]


def fold_normalisation(model: torch.nn.Module, mean: float, std: float) -> None:
    """Make the score head output (score - mean) / std: weight / std and (bias - mean) / std, adding
    a bias to a head without one. A value model started from a reward model then predicts returns on
    the scale of the normalised scores it learns from, rather than raw scores."""
    inner = unwrap(model)
    head = _head(inner)
    folded = torch.nn.Linear(
        head.in_features, head.out_features, bias=True, device=head.weight.device, dtype=head.weight.dtype
    )
    with torch.no_grad():
        folded.weight.copy_(head.weight / std)
        bias = head.bias if head.bias is not None else torch.zeros_like(folded.bias)
        folded.bias.copy_((bias - mean) / std)
    inner.score = folded
