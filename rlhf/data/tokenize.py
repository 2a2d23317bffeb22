"""Text to token ids: chat templates, prompt masking and truncation that is counted, never silent.

A prompt is rendered with the generation prompt (what the policy sees when it samples), a completion
as the rest of the rendered conversation; both are tokenised separately and concatenated, so the
boundary between prompt and response is exact for training, generation and scoring alike.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

from rlhf.data.formats import DataStats, PreferencePair, Text
from rlhf.errors import ConfigError, DataError

IGNORE_INDEX = -100


def _messages(text: Text, role: str) -> list[dict[str, str]]:
    return [{"role": role, "content": text}] if isinstance(text, str) else list(text)


class ChatRenderer:
    """Renders prompts and responses the same way in every stage.

    mode "auto": the tokenizer's chat template if it has one; plain text (prompt, then response and
    EOS) if it has none, unless the data is conversational, which uses a fallback template.
    "always": a chat template, the fallback if the tokenizer has none. "never": plain text.
    The fallback template, once used, is installed on the tokenizer so that it is saved with the model.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, mode: str = "auto"):
        from rlhf.models import FALLBACK_CHAT_TEMPLATE

        self.tokenizer = tokenizer
        self.mode = mode
        if mode == "always" and not tokenizer.chat_template:
            tokenizer.chat_template = FALLBACK_CHAT_TEMPLATE
        self._fallback = FALLBACK_CHAT_TEMPLATE

    def _use_template(self, prompt: Text) -> bool:
        if self.mode == "never":
            return False
        if not self.tokenizer.chat_template and not isinstance(prompt, str):
            # Conversational data under "auto": the fallback becomes the tokenizer's template, so the
            # saved tokenizer prompts later stages (plain-string prompts too) in the trained format.
            self.tokenizer.chat_template = self._fallback
        return bool(self.tokenizer.chat_template)

    def _template(self, messages: list[dict[str, str]], generation_prompt: bool) -> str:
        return self.tokenizer.apply_chat_template(
            messages,
            tokenize=False,
            add_generation_prompt=generation_prompt,
            chat_template=self.tokenizer.chat_template or self._fallback,
        )

    def prompt(self, prompt: Text) -> str:
        """The text a policy is given to continue."""
        if not self._use_template(prompt):
            return prompt if isinstance(prompt, str) else "\n".join(m["content"] for m in prompt)
        return self._template(_messages(prompt, "user"), generation_prompt=True)

    def response(self, prompt: Text, response: Text) -> str:
        """The text that follows `prompt(prompt)` in the full conversation, ending the assistant turn."""
        eos = self.tokenizer.eos_token
        if not self._use_template(prompt):
            body = response if isinstance(response, str) else "\n".join(m["content"] for m in response)
            return body + eos
        prompt_text = self.prompt(prompt)
        full = self._template(
            _messages(prompt, "user") + _messages(response, "assistant"), generation_prompt=False
        )
        if not full.startswith(prompt_text):
            raise ConfigError(
                "data.chat_template: the tokenizer's chat template does not render a conversation as its "
                "prompt followed by the response; set data.chat_template=never"
            )
        tail = full[len(prompt_text) :]
        # Templates often add a newline after the end-of-turn token; the policy stops at EOS, so
        # learning what follows it only wastes tokens.
        if eos and eos in tail:
            tail = tail[: tail.rindex(eos) + len(eos)]
        return tail

    @property
    def adds_special_tokens(self) -> bool:
        """Plain text gets the tokenizer's own BOS; chat templates write their special tokens as text."""
        return self.mode == "never" or not self.tokenizer.chat_template


@dataclass
class EncodedBatch:
    """Token ids of prompts and responses, one list per example, after truncation."""

    prompt_ids: list[list[int]]
    response_ids: list[list[int]]
    kept: list[int]  # indices of the input examples that were kept


def fit(
    prompt_ids: list[int],
    response_ids: list[int],
    max_length: int,
    max_prompt_length: int,
    stats: DataStats,
    long_prompt: str = "truncate",
) -> tuple[list[int], list[int]] | None:
    """Fit one example in the length budget; None if it has to be skipped (the reason is counted).

    A prompt over max_prompt_length keeps its last tokens (the question nearest the answer), or with
    long_prompt="skip" the example is dropped; a response that does not fit is cut at the end.
    """
    if len(prompt_ids) > max_prompt_length:
        if long_prompt == "skip":
            stats.add("prompt_too_long")
            return None
        stats.add("truncated_prompt")
        prompt_ids = prompt_ids[-max_prompt_length:]
    room = max_length - len(prompt_ids)
    if len(response_ids) > room:
        stats.add("truncated_response")
        response_ids = response_ids[:room]
    if not response_ids:
        stats.add("empty_response_after_tokenization")
        return None
    return prompt_ids, response_ids


def _strict_prompt_check(prompt_ids: list[list[int]], max_prompt_length: int, where: str) -> None:
    for index, ids in enumerate(prompt_ids):
        if len(ids) > max_prompt_length:
            raise DataError(
                f"{where}example {index + 1}: prompt has {len(ids)} tokens, over data.max_prompt_length "
                f"({max_prompt_length}) (data.strict=true)"
            )


def encode_prompts(renderer: ChatRenderer, prompts: Sequence[Text]) -> list[list[int]]:
    """Token ids of the rendered prompts (with the generation prompt), in one batched call."""
    texts = [renderer.prompt(p) for p in prompts]
    if not texts:  # a fast tokenizer fails on an empty batch
        return []
    return renderer.tokenizer(texts, add_special_tokens=renderer.adds_special_tokens)["input_ids"]


def encode_responses(
    renderer: ChatRenderer, prompts: Sequence[Text], responses: Sequence[Text]
) -> list[list[int]]:
    texts = [renderer.response(p, r) for p, r in zip(prompts, responses)]
    if not texts:
        return []
    return renderer.tokenizer(texts, add_special_tokens=False)["input_ids"]


def encode_pairs(
    renderer: ChatRenderer,
    prompts: Sequence[Text],
    responses: Sequence[Text],
    max_length: int,
    max_prompt_length: int,
    stats: DataStats,
    where: str = "",
    strict: bool = False,
) -> EncodedBatch:
    """Tokenise (prompt, response) examples, fitted to the length budget (see `fit`)."""
    prompt_ids = encode_prompts(renderer, prompts)
    response_ids = encode_responses(renderer, prompts, responses)
    if strict:
        _strict_prompt_check(prompt_ids, max_prompt_length, where)
    out = EncodedBatch([], [], [])
    for index, (p_ids, r_ids) in enumerate(zip(prompt_ids, response_ids)):
        fitted = fit(p_ids, r_ids, max_length, max_prompt_length, stats)
        if fitted is not None:
            out.prompt_ids.append(fitted[0])
            out.response_ids.append(fitted[1])
            out.kept.append(index)
    return out


def encode_preferences(
    renderer: ChatRenderer,
    pairs: Sequence[PreferencePair],
    max_length: int,
    max_prompt_length: int,
    stats: DataStats,
    where: str = "",
    strict: bool = False,
) -> tuple[list[dict], list[int]]:
    """Chosen and rejected sequences (prompt + response ids) per pair, and the indices kept.

    A prompt too long to leave room for a response skips the pair (counted as prompt_too_long).
    """
    prompts = [p.prompt for p in pairs]
    prompt_ids = encode_prompts(renderer, prompts)
    if strict:
        _strict_prompt_check(prompt_ids, max_prompt_length, where)
    chosen_ids = encode_responses(renderer, prompts, [p.chosen for p in pairs])
    rejected_ids = encode_responses(renderer, prompts, [p.rejected for p in pairs])
    features, kept = [], []
    for index, pair in enumerate(pairs):
        chosen = fit(prompt_ids[index], chosen_ids[index], max_length, max_prompt_length, stats, "skip")
        if chosen is None:
            continue
        rejected = fit(prompt_ids[index], rejected_ids[index], max_length, max_prompt_length, stats, "skip")
        if rejected is None:
            continue
        features.append(
            {
                "chosen": chosen[0] + chosen[1],
                "rejected": rejected[0] + rejected[1],
                "margin": pair.margin,
                # Where the responses start: DPO sums log-probabilities from here on.
                "prompt_length": len(prompt_ids[index]),
            }
        )
        kept.append(index)
    return features, kept


def sft_features(prompt_ids: list[int], response_ids: list[int]) -> dict[str, list[int]]:
    """Input ids and labels with the prompt masked out of the loss."""
    return {
        "input_ids": prompt_ids + response_ids,
        "labels": [IGNORE_INDEX] * len(prompt_ids) + response_ids,
    }
