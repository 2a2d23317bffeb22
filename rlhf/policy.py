"""The causal LM as a policy: losses and log-probabilities over chosen tokens, and batched sampling.

The LM head is applied only where a loss or log-probability is needed (response tokens), not to
every position: for a 49k vocabulary the logits of a batch are often larger than the model, and
prompt positions need none.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from rlhf.data.loading import attention_mask, pad, position_ids
from rlhf.models import unwrap
from rlhf.scalar import _hidden, supports_attention_masks

# Config fields of architectures that transform logits after the head; those take the plain path.
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling")


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
    def forward(
        ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int
    ) -> torch.Tensor:
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


class LinearLogProbs(torch.autograd.Function):
    """log p(target), and optionally the entropy, of softmax((hidden @ weight.T) / temperature).

    What PPO needs per response token, in row chunks, with the gradient from closed forms,
    d log p_t / dz = onehot_t - p and d H / dz = -p * (log p + H), built in place of the softmax.
    The softmax is kept for the backward pass when it is small (PPO minibatches usually are) and
    recomputed chunk by chunk otherwise: each chunk then costs one matmul and one softmax pass.
    """

    KEEP_LIMIT = 2**26  # elements of softmax kept for backward (256 MB in float32)

    @staticmethod
    def _softmax(h, weight, temperature, targets, with_entropy=False):
        """(p, log p of the targets, entropy or None): the chunk's logits become its softmax in place.

        The temperature scales h (a few values per row) rather than the logits (a vocabulary per row).
        """
        z = ((h / temperature if temperature != 1.0 else h) @ weight.T).float()
        rows = torch.arange(z.shape[0], device=z.device)
        target_logits = z[rows, targets]
        top = z.amax(dim=-1, keepdim=True)
        z.sub_(top)
        # H = log total - sum(e * y) / total with y = z - top and e = exp(y): one dot per row, where
        # the elementwise -p log p would take a logarithm per vocabulary entry. y is needed for it,
        # so e goes to a new buffer then; otherwise it overwrites y.
        e = z.exp() if with_entropy else z.exp_()
        total = e.sum(dim=-1, keepdim=True)
        entropy = None
        if with_entropy:
            dots = torch.bmm(e.unsqueeze(1), z.unsqueeze(2)).view(-1, 1)
            entropy = (total.log() - dots / total).squeeze(-1)
        p = e.div_(total)
        return p, target_logits - top.squeeze(-1) - total.log().squeeze(-1), entropy

    @staticmethod
    def forward(ctx, hidden, weight, targets, temperature: float, chunk: int, with_entropy: bool):
        ctx.set_materialize_grads(False)
        keep = hidden.shape[0] * weight.shape[0] <= LinearLogProbs.KEEP_LIMIT
        logp = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        entropy = torch.zeros_like(logp)
        kept = []
        for start in range(0, hidden.shape[0], chunk):
            stop = start + chunk
            p, logp[start:stop], chunk_entropy = LinearLogProbs._softmax(
                hidden[start:stop], weight, temperature, targets[start:stop], with_entropy
            )
            if with_entropy:
                entropy[start:stop] = chunk_entropy
            if keep:
                kept.append(p)
        ctx.save_for_backward(hidden, weight, targets, *kept)
        ctx.temperature, ctx.chunk, ctx.with_entropy = temperature, chunk, with_entropy
        # A softmax recomputed in backward must match forward's: autocast does not reach backward.
        device = hidden.device.type
        ctx.autocast = (
            (device, torch.get_autocast_dtype(device)) if torch.is_autocast_enabled(device) else None
        )
        return logp, entropy

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy):
        hidden, weight, targets, *kept = ctx.saved_tensors
        grad_hidden = torch.zeros_like(hidden)
        grad_weight = torch.zeros_like(weight, dtype=torch.float32)
        use_entropy = ctx.with_entropy and grad_entropy is not None
        if grad_logp is None and not use_entropy:
            return grad_hidden, grad_weight.to(weight.dtype), None, None, None, None
        for index, start in enumerate(range(0, hidden.shape[0], ctx.chunk)):
            stop = start + ctx.chunk
            h, t = hidden[start:stop], targets[start:stop]
            if kept:
                p = kept[index]
            else:
                with torch.autocast(*(ctx.autocast or (h.device.type,)), enabled=ctx.autocast is not None):
                    p = LinearLogProbs._softmax(h, weight, ctx.temperature, t)[0]
            rows = torch.arange(p.shape[0], device=p.device)
            g_lp = grad_logp[start:stop, None] if grad_logp is not None else torch.zeros_like(p[:, :1])
            if use_entropy:
                entropy = torch.special.entr(p).sum(-1, keepdim=True)
                # -g_H * p * (log p + H) - g_lp * p; p log p is 0 where p underflowed to 0
                grad_z = (
                    torch.special.xlogy(p, p)
                    .add_(p * entropy)
                    .mul_(-grad_entropy[start:stop, None])
                    .sub_(p * g_lp)
                )
            else:
                grad_z = p.mul_(-g_lp)
            grad_z[rows, t] += g_lp.squeeze(-1)
            grad_z = grad_z.to(h.dtype)
            # d/dz of the unscaled logits is grad_z / temperature: scaled on the small products instead.
            grad_hidden[start:stop] = grad_z @ weight
            if ctx.temperature != 1.0:
                grad_hidden[start:stop] /= ctx.temperature
            grad_weight.addmm_(grad_z.T.float(), h.float(), alpha=1.0 / ctx.temperature)
        return grad_hidden, grad_weight.to(weight.dtype), None, None, None, None


def _plain_linear_head(model: torch.nn.Module) -> torch.nn.Linear | None:
    """The LM head if it is a bias-free nn.Linear the fused loss can use directly (not a LoRA layer)."""
    head = unwrap(model).get_output_embeddings()
    if type(head) is torch.nn.Linear and head.bias is None and _fast_head(model):
        return head
    return None


def join_prompt_response(
    query: torch.Tensor, query_mask: torch.Tensor, response: torch.Tensor, response_mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ids, mask, where) of left-padded prompts followed by right-padded responses, `where` marking
    the positions whose next-token prediction is a response token (position t predicts token t + 1)."""
    ids = torch.cat([query, response], dim=1)
    mask = torch.cat([query_mask, response_mask], dim=1)
    where = torch.zeros_like(mask, dtype=torch.bool)
    prompt_length = query.shape[1]
    where[:, prompt_length - 1 : prompt_length - 1 + response.shape[1]] = response_mask.bool()
    return ids, mask, where


def response_logprobs(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    mask: torch.Tensor,
    where: torch.Tensor,
    targets: torch.Tensor,
    temperature: float = 1.0,
    hidden: torch.Tensor | None = None,
    with_entropy: bool = True,
    chunk: int = 1024,
) -> tuple[torch.Tensor, torch.Tensor]:
    """log p(target) and the entropy (zeros unless with_entropy) at the positions `where` (N,),
    with logits divided by temperature.

    `hidden` (B, T, H): the backbone's states when the caller has them already (a shared critic).
    """
    head = _plain_linear_head(model)
    if head is None:
        logits = selected_logits(model, input_ids, mask, where) / temperature
        logp = torch.log_softmax(logits, dim=-1)
        return logp.gather(-1, targets[:, None]).squeeze(-1), -(logp.exp() * logp).sum(-1)
    if hidden is None:
        hidden = (
            unwrap(model)
            .base_model(
                input_ids=input_ids, attention_mask=mask, position_ids=position_ids(mask), use_cache=False
            )
            .last_hidden_state
        )
    return LinearLogProbs.apply(hidden[where], head.weight, targets, temperature, chunk, with_entropy)


def sampling_logprobs(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    mask: torch.Tensor,
    where: torch.Tensor,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
) -> torch.Tensor:
    """(N, vocab) log-probabilities of the whole next-token distribution that `generate` samples from
    at the positions `where`: the logits divided by temperature, cut to the top_k tokens and then to
    the top_p nucleus by the same transformers warpers, renormalised; -inf outside what is kept."""
    from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

    scores = selected_logits(model, input_ids, mask, where) / temperature
    if top_k:
        scores = TopKLogitsWarper(top_k)(None, scores)
    if top_p < 1.0:
        scores = TopPLogitsWarper(top_p)(None, scores)
    return torch.log_softmax(scores, dim=-1)


def packs_pairs(model: torch.nn.Module) -> bool:
    """Whether `sequence_logprobs` can read PairCollator's shared-prefix layout with this model."""
    return supports_attention_masks(model) and _fast_head(model)


def sequence_logprobs(model: torch.nn.Module, batch: dict, chunk: int = 1024) -> torch.Tensor:
    """(N,) the summed log-probabilities of each response's own tokens (the prompt masked) in a
    PairCollator batch built with `response_tokens`, from one forward pass in either of its layouts."""
    mask = batch.get("pair_mask", batch["attention_mask"])
    index, targets = batch["target_index"], batch["target_ids"]
    if _fast_head(model):
        hidden = _hidden(model, batch["input_ids"], mask, batch["position_ids"]).flatten(0, 1)[index]
        head = _plain_linear_head(model)
        if head is not None:
            logp, _ = LinearLogProbs.apply(hidden, head.weight, targets, 1.0, chunk, False)
        else:
            logits = unwrap(model).get_output_embeddings()(hidden).float()
            logp = torch.log_softmax(logits, dim=-1).gather(-1, targets[:, None]).squeeze(-1)
    else:
        if mask.dim() == 4:
            raise ValueError("a model that transforms its logits needs side-by-side pairs (share_prefix off)")
        ids, positions = batch["input_ids"], batch["position_ids"]
        logits = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False).logits
        logp = (
            torch.log_softmax(logits.flatten(0, 1)[index].float(), dim=-1)
            .gather(-1, targets[:, None])
            .squeeze(-1)
        )
    sums = torch.zeros(batch["score_index"].shape[0], dtype=logp.dtype, device=logp.device)
    return sums.index_add(0, batch["target_response"], logp)


def completion_loss(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    mask: torch.Tensor,
    labels: torch.Tensor,
    chunk: int = 1024,
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


def sample_tokens(scores: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One token id per row drawn from softmax(scores) (B, vocab), by inverting the cumulative
    distribution with one uniform number per row (in float64), from `generator` (else torch's global one).

    Exact sampling at a small fraction of torch.multinomial's cost on the CPU: multinomial draws one
    exponential random number per vocabulary entry (about 15 ms per step for 8 x 49k here, half of a
    small model's decoding time), this about 1 ms.
    """
    probs = torch.softmax(scores.double(), dim=-1)
    cdf = probs.cumsum(-1)
    u = (
        torch.rand(scores.shape[0], 1, dtype=torch.float64, device=scores.device, generator=generator)
        * cdf[:, -1:]
    )
    return torch.searchsorted(cdf, u, right=True).clamp(max=scores.shape[-1] - 1).squeeze(-1)


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
    generator: torch.Generator | None = None,
) -> list[list[int]]:
    """Sample one response per prompt with the KV cache; each ends at (and includes) its first EOS.
    Random numbers come from `generator` (on the model's device), else from torch's global generator.

    A plain decoding loop rather than `model.generate`, whose per-step bookkeeping cost more than a
    small model's forward pass: each step runs the model on the newest token of the rows still
    going, with the LM head on that position only, and rows that reached EOS leave the batch and
    the cache, so a batch whose responses are mostly short stops paying for them.
    """
    from transformers import DynamicCache
    from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

    device = next(model.parameters()).device
    inputs = pad(prompt_ids, pad_token_id, left=True).to(device)
    mask = attention_mask(prompt_ids, left=True).to(device)
    positions = position_ids(mask)
    warpers = []
    if do_sample and top_k:
        warpers.append(TopKLogitsWarper(top_k))
    if do_sample and top_p < 1.0:
        warpers.append(TopPLogitsWarper(top_p))
    stops = torch.tensor(sorted(set(eos_token_ids)), dtype=torch.long, device=device)
    inner = unwrap(model)
    cache = DynamicCache(config=inner.config)
    head = _plain_linear_head(model)
    rows = torch.arange(len(prompt_ids), device=device)  # the prompt each batch row belongs to
    responses: list[list[int]] = [[] for _ in prompt_ids]
    was_training = model.training
    model.eval()
    # Decoding runs outside autocast, in the weights' own dtype: each step reads every weight for a
    # few rows, and autocast would first write a bf16 copy of each (it caches none between calls), so
    # bf16 mixed precision made decoding slower, not faster. Sampling then draws from fp32 logits.
    try:
        with torch.autocast(device.type, enabled=False):
            for index in range(max_new_tokens):
                step = dict(
                    input_ids=inputs, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True
                )
                if head is None:
                    logits = model(**step, logits_to_keep=1).logits[:, -1]
                else:
                    last = inner.base_model(**step).last_hidden_state[:, -1]
                    # weight @ last.T rather than last @ weight.T: the same products, but CPU BLAS runs a
                    # few rows against a 49k-row matrix up to 4x faster in this orientation.
                    logits = (head.weight @ last.T).T.contiguous()
                if do_sample:
                    scores = logits.float() / temperature if temperature != 1.0 else logits.float()
                    for warp in warpers:
                        scores = warp(inputs, scores)
                    tokens = sample_tokens(scores, generator)
                else:
                    tokens = logits.argmax(-1)
                for row, token in zip(rows.tolist(), tokens.tolist()):
                    responses[row].append(token)
                going = ~torch.isin(tokens, stops)
                if index == max_new_tokens - 1 or not going.any():
                    break
                if not going.all():
                    keep = going.nonzero().squeeze(-1)
                    cache.batch_select_indices(keep)
                    rows, tokens, mask, positions = rows[keep], tokens[keep], mask[keep], positions[keep]
                inputs = tokens[:, None]
                mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
                positions = positions[:, -1:] + 1
    finally:
        model.train(was_training)
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


@dataclass(frozen=True)
class Sampler:
    """How a stage draws responses, set up in one place: the tokens that end one, the length cap and
    the sampling settings (a stage's `rollout` config, or greedy decoding for logged samples)."""

    pad_token_id: int
    eos_token_ids: tuple[int, ...]
    max_new_tokens: int
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    greedy: bool = False

    @classmethod
    def of(cls, tokenizer, model: torch.nn.Module, max_new_tokens: int, **settings) -> Sampler:
        return cls(tokenizer.pad_token_id, tuple(eos_ids(tokenizer, model)), max_new_tokens, **settings)

    @classmethod
    def from_rollout(cls, rollout, tokenizer, model: torch.nn.Module) -> Sampler:
        """A stage's `rollout` settings (RolloutConfig)."""
        return cls.of(
            tokenizer,
            model,
            rollout.max_new_tokens,
            temperature=rollout.temperature,
            top_k=rollout.top_k,
            top_p=rollout.top_p,
        )

    def ended(self, response: Sequence[int]) -> bool:
        return bool(response) and response[-1] in self.eos_token_ids

    def __call__(
        self,
        model: torch.nn.Module,
        prompt_ids: Sequence[Sequence[int]],
        seed: int | None = None,
        batch_size: int | None = None,
        generator: torch.Generator | None = None,
    ) -> list[list[int]]:
        """One response per prompt, `batch_size` prompts at a time. With `seed`, the draws are the
        same for every model and caller (policies compared on one prompt set see the same random
        numbers) and the caller's random state is left as it was; with `generator`, they come from it."""
        if seed is None:
            return self._draw(model, prompt_ids, batch_size, generator)
        with torch.random.fork_rng(
            devices=[torch.cuda.current_device()] if torch.cuda.is_available() else []
        ):
            torch.manual_seed(seed)
            return self._draw(model, prompt_ids, batch_size)

    def _draw(self, model, prompt_ids, batch_size: int | None, generator=None) -> list[list[int]]:
        step = batch_size or max(len(prompt_ids), 1)
        responses: list[list[int]] = []
        for start in range(0, len(prompt_ids), step):
            responses += generate(
                model,
                prompt_ids[start : start + step],
                pad_token_id=self.pad_token_id,
                eos_token_ids=self.eos_token_ids,
                max_new_tokens=self.max_new_tokens,
                do_sample=not self.greedy,
                temperature=self.temperature,
                top_k=self.top_k,
                top_p=self.top_p,
                generator=generator,
            )
        return responses


def pad_episodes(
    prompt_ids: Sequence[Sequence[int]],
    responses: Sequence[Sequence[int]],
    pad_token_id: int,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(query, query_mask, response, response_mask): prompts left-padded, responses right-padded, so
    that every response starts at the same position (join_prompt_response puts them side by side)."""
    return (
        pad(prompt_ids, pad_token_id, left=True).to(device),
        attention_mask(prompt_ids, left=True).to(device),
        pad(responses, pad_token_id).to(device),
        attention_mask(responses).to(device),
    )


def episode_inputs(
    prompt_ids: Sequence[Sequence[int]],
    responses: Sequence[Sequence[int]],
    pad_token_id: int,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ids, mask, where, targets) of each prompt followed by its response, as response_logprobs and
    a reward model take them: `targets` are the response tokens at the positions `where` predicts."""
    query, query_mask, response, response_mask = pad_episodes(prompt_ids, responses, pad_token_id, device)
    ids, mask, where = join_prompt_response(query, query_mask, response, response_mask)
    return ids, mask, where, response[response_mask.bool()]
