"""Record shapes the project reads, turned into canonical examples (the formats of Hugging Face TRL).

SFT:  {"prompt", "completion"} with strings or message lists, or {"messages": [...]} whose last
      assistant turn is the completion and everything before it the prompt.
A prompt or response is either a string (plain text) or a list of {"role", "content"} messages.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from rlhf.errors import DataError

Message = dict[str, str]
Text = str | list[Message]

SFT_FORMATS = {"prompt_completion": ("prompt", "completion"), "messages": ("messages",)}


@dataclass(frozen=True)
class SFTExample:
    prompt: Text
    completion: Text


@dataclass
class DataStats:
    """Records skipped or truncated, by reason; logged with the run so nothing changes silently."""

    counts: Counter

    def add(self, reason: str) -> None:
        self.counts[reason] += 1

    @property
    def total(self) -> int:
        return sum(self.counts.values())


def detect_format(columns: Iterable[str], formats: dict[str, tuple[str, ...]], origin: str, key: str) -> str:
    present = set(columns)
    for name, needed in formats.items():
        if set(needed) <= present:
            return name
    wanted = " or ".join("{" + ", ".join(needed) + "}" for needed in formats.values())
    raise DataError(
        f"{origin}: columns {sorted(present)} match no known format (expected {wanted}); "
        f"map yours with {key}.columns, e.g. {key}.columns.prompt=question"
    )


def check_format(fmt: str, columns: Iterable[str], formats: dict[str, tuple[str, ...]], origin: str, key: str) -> str:
    if fmt == "auto":
        return detect_format(columns, formats, origin, key)
    if fmt not in formats:
        raise DataError(f"{key}.format: unknown format {fmt!r}; use auto or one of {', '.join(formats)}")
    missing = [c for c in formats[fmt] if c not in set(columns)]
    if missing:
        raise DataError(
            f"{origin}: format {fmt} needs column {missing[0]!r} (columns: {', '.join(sorted(columns))}); "
            f"map it with {key}.columns.{missing[0]}=<your column>"
        )
    return fmt


def is_blank(text: Text) -> bool:
    if isinstance(text, str):
        return not text.strip()
    return all(not str(m.get("content", "")).strip() for m in text)


def as_text(value: Any, field: str, where: str) -> Text:
    """A string, or a validated list of messages; anything else is a DataError naming the row."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(m, dict) for m in value):
        for m in value:
            if not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise DataError(f"{where}: field {field!r}: each message needs string 'role' and 'content'")
        return [{"role": m["role"], "content": m["content"]} for m in value]
    shown = "null" if value is None else type(value).__name__
    raise DataError(f"{where}: field {field!r} must be a string or a list of messages, got {shown}")


def _split_messages(messages: list[Message], where: str) -> tuple[list[Message], list[Message]]:
    last_user = max((i for i, m in enumerate(messages) if m["role"] != "assistant"), default=-1)
    if last_user < 0:
        raise DataError(f"{where}: 'messages' has no user turn before the assistant's")
    if last_user == len(messages) - 1:
        raise DataError(f"{where}: 'messages' does not end with an assistant turn to learn")
    return messages[: last_user + 1], messages[last_user + 1 :]


def sft_examples(records: Any, fmt: str, origin: str, key: str, strict: bool, stats: DataStats) -> list[SFTExample]:
    """Canonical SFT examples from rows; empty completions are skipped (counted) or, if strict, errors."""
    fmt = check_format(fmt, records.column_names, SFT_FORMATS, origin, key)
    out = []
    for index, row in enumerate(records):
        where = f"{origin}: row {index + 1}"
        if fmt == "messages":
            messages = as_text(row["messages"], "messages", where)
            if isinstance(messages, str):
                raise DataError(f"{where}: field 'messages' must be a list of messages")
            prompt, completion = _split_messages(messages, where)
        else:
            prompt = as_text(row["prompt"], "prompt", where)
            completion = as_text(row["completion"], "completion", where)
        if is_blank(completion):
            if strict:
                raise DataError(f"{where}: empty completion (data.strict=true)")
            stats.add("empty_completion")
            continue
        out.append(SFTExample(prompt, completion))
    return out
