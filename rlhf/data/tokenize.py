"""Text to token ids: chat templates, prompt masking and truncation that is counted, never silent.

A prompt is rendered with the generation prompt (what the policy sees when it samples), a completion
as the rest of the rendered conversation; both are tokenised separately and concatenated, so the
boundary between prompt and response is exact for training, generation and scoring alike.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

from rlhf.data.formats import DataStats, Text
from rlhf.errors import ConfigError, DataError

IGNORE_INDEX = -100


def _messages(text: Text, role: str) -> list[dict[str, str]]:
    return [{"role": role, "content": text}] if isinstance(text, str) else list(text)


class ChatRenderer:
    """Renders prompts and responses the same way in every stage.

    mode "auto": the tokenizer's chat template if it has one; plain text (prompt, then response and
    EOS) if it has none, unless the data is conversational, which uses a fallback template.
    "always": a chat template, the fallback if the tokenizer has none. "never": plain text.
    The fallback template is installed on the tokenizer so that it is saved with the model.
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
        return bool(self.tokenizer.chat_template) or not isinstance(prompt, str)

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
        full = self._template(_messages(prompt, "user") + _messages(response, "assistant"), generation_prompt=False)
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
    """Tokenise (prompt, response) examples in one batched call each.

    A prompt over max_prompt_length keeps its last tokens (the question nearest the answer); a
    response that does not fit in max_length is cut at the end. Both are counted in `stats`
    (truncated_prompt, truncated_response); a response with no token left is skipped.
    """
    tokenizer = renderer.tokenizer
    prompt_texts = [renderer.prompt(p) for p in prompts]
    response_texts = [renderer.response(p, r) for p, r in zip(prompts, responses)]
    prompt_ids = tokenizer(prompt_texts, add_special_tokens=renderer.adds_special_tokens)["input_ids"]
    response_ids = tokenizer(response_texts, add_special_tokens=False)["input_ids"]
    out = EncodedBatch([], [], [])
    for index, (p_ids, r_ids) in enumerate(zip(prompt_ids, response_ids)):
        if len(p_ids) > max_prompt_length:
            if strict:
                raise DataError(
                    f"{where}example {index + 1}: prompt has {len(p_ids)} tokens, over data.max_prompt_length "
                    f"({max_prompt_length}) (data.strict=true)"
                )
            stats.add("truncated_prompt")
            p_ids = p_ids[-max_prompt_length:]
        room = max_length - len(p_ids)
        if len(r_ids) > room:
            stats.add("truncated_response")
            r_ids = r_ids[:room]
        if not r_ids:
            stats.add("empty_response_after_tokenization")
            continue
        out.prompt_ids.append(p_ids)
        out.response_ids.append(r_ids)
        out.kept.append(index)
    return out


def sft_features(prompt_ids: list[int], response_ids: list[int]) -> dict[str, list[int]]:
    """Input ids and labels with the prompt masked out of the loss."""
    return {
        "input_ids": prompt_ids + response_ids,
        "labels": [IGNORE_INDEX] * len(prompt_ids) + response_ids,
    }
