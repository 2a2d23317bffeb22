"""The causal LM as a policy: losses and log-probabilities over chosen tokens, and batched sampling.

The LM head is applied only where a loss or log-probability is needed (response tokens), not to
every position: for a 49k vocabulary the logits of a batch are often larger than the model, and
prompt positions need none.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from rlhf.data.loading import attention_mask, pad
from rlhf.models import unwrap

# Config fields of architectures that transform logits after the head; those take the plain path.
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling")


def position_ids(mask: torch.Tensor) -> torch.Tensor:
    """Positions counted over real tokens only, so left padding does not shift them."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


def _fast_head(model: torch.nn.Module) -> bool:
    config = unwrap(model).config
    return all(getattr(config, name, None) in (None, 1, 1.0) for name in _LOGIT_TRANSFORMS)


def selected_logits(
    model: torch.nn.Module, input_ids: torch.Tensor, mask: torch.Tensor, select: torch.Tensor
) -> torch.Tensor:
    """Next-token logits at the positions where `select` (B, T) is true, as (N, vocab) in float32.

    Position t's logits predict token t + 1.
    """
    pos = position_ids(mask)
    if _fast_head(model):
        inner = unwrap(model)
        hidden = inner.base_model(input_ids=input_ids, attention_mask=mask, position_ids=pos, use_cache=False)
        return inner.get_output_embeddings()(hidden.last_hidden_state[select]).float()
    logits = model(input_ids=input_ids, attention_mask=mask, position_ids=pos, use_cache=False).logits
    return logits[select].float()


def completion_loss(
    model: torch.nn.Module, input_ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token cross-entropy over labelled tokens, and their count (labels -100 are ignored)."""
    targets = labels[:, 1:]
    select = torch.zeros_like(labels, dtype=torch.bool)
    select[:, :-1] = targets != -100
    logits = selected_logits(model, input_ids, mask, select)
    loss_sum = F.cross_entropy(logits, targets[targets != -100], reduction="sum")
    return loss_sum, select.sum()


@torch.no_grad()
def generate(
    model: torch.nn.Module,
    prompt_ids: Sequence[Sequence[int]],
    pad_token_id: int,
    eos_token_ids: Sequence[int],
    max_new_tokens: int,
    do_sample: bool = True,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
) -> list[list[int]]:
    """Sample one response per prompt with the KV cache; each ends at (and includes) its first EOS."""
    device = next(model.parameters()).device
    ids = pad(prompt_ids, pad_token_id, left=True).to(device)
    mask = attention_mask(prompt_ids, left=True).to(device)
    sampling = {"temperature": temperature, "top_k": top_k, "top_p": top_p} if do_sample else {}
    was_training = model.training
    model.eval()
    try:
        out = model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=max_new_tokens,
            do_sample=do_sample,
            pad_token_id=pad_token_id,
            eos_token_id=list(eos_token_ids),
            **sampling,
        )
    finally:
        model.train(was_training)
    responses = []
    stops = set(eos_token_ids)
    for row in out[:, ids.shape[1] :].tolist():
        end = next((i + 1 for i, token in enumerate(row) if token in stops), len(row))
        responses.append(row[:end])
    return responses


def eos_ids(tokenizer, model: torch.nn.Module | None = None) -> list[int]:
    """The token ids that end a response: the tokenizer's EOS and any the model's generation config adds."""
    ids = {tokenizer.eos_token_id}
    config = getattr(unwrap(model), "generation_config", None) if model is not None else None
    extra = getattr(config, "eos_token_id", None)
    if isinstance(extra, int):
        ids.add(extra)
    elif extra:
        ids.update(extra)
    return sorted(i for i in ids if i is not None)
