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


class LinearCrossEntropy(torch.autograd.Function):
    """sum(cross_entropy(hidden @ weight.T, targets)) computed in row chunks, gradients included.

    The (tokens x vocabulary) logits are never held whole: each chunk's logits become its softmax and
    then its gradient in place, and the gradients of hidden and weight are accumulated right away, so
    the separate log-softmax passes and their full-size buffers disappear (on CPU they cost as much as
    a transformer layer for a 49k vocabulary). The backward pass only scales what forward computed.
    """

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int) -> torch.Tensor:
        want_grad = any(ctx.needs_input_grad[:2])
        loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if want_grad else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if want_grad else None
        for start in range(0, hidden.shape[0], chunk):
            h, t = hidden[start : start + chunk], targets[start : start + chunk]
            logits = (h @ weight.T).float()
            rows = torch.arange(len(t), device=t.device)
            target_logits = logits[rows, t]
            top = logits.amax(dim=-1, keepdim=True)
            probs = logits.sub_(top).exp_()  # in place: one pass, no copy of the logits
            total = probs.sum(dim=-1, keepdim=True)
            loss += (top.squeeze(-1) + total.log().squeeze(-1) - target_logits).sum()
            if want_grad:
                probs.div_(total)  # the softmax
                probs[rows, t] -= 1.0  # d(sum CE)/d logits
                probs = probs.to(h.dtype)
                grad_hidden[start : start + chunk] = probs @ weight
                grad_weight.addmm_(probs.T.float(), h.float())
        if want_grad:
            ctx.save_for_backward(grad_hidden, grad_weight.to(weight.dtype))
        return loss

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        grad_hidden, grad_weight = ctx.saved_tensors
        return grad_hidden * grad_loss, grad_weight * grad_loss, None, None


def _plain_linear_head(model: torch.nn.Module) -> torch.nn.Linear | None:
    """The LM head if it is a bias-free nn.Linear the fused loss can use directly (not a LoRA layer)."""
    head = unwrap(model).get_output_embeddings()
    if type(head) is torch.nn.Linear and head.bias is None and _fast_head(model):
        return head
    return None


def completion_loss(
    model: torch.nn.Module, input_ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor, chunk: int = 1024
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token cross-entropy over labelled tokens, and their count (labels -100 are ignored)."""
    targets = labels[:, 1:]
    select = torch.zeros_like(labels, dtype=torch.bool)
    select[:, :-1] = targets != -100
    wanted = targets[targets != -100]
    head = _plain_linear_head(model)
    if head is not None:
        inner = unwrap(model)
        hidden = inner.base_model(
            input_ids=input_ids, attention_mask=mask, position_ids=position_ids(mask), use_cache=False
        ).last_hidden_state
        loss_sum = LinearCrossEntropy.apply(hidden[select], head.weight, wanted, chunk)
    else:
        loss_sum = F.cross_entropy(selected_logits(model, input_ids, mask, select), wanted, reduction="sum")
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
