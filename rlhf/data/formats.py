"""Record shapes the project reads, turned into canonical examples (the formats of Hugging Face TRL).

SFT:         {"prompt", "completion"} with strings or message lists, or {"messages": [...]} whose last
             assistant turn is the completion and everything before it the prompt; or "chosen", the
             chosen response of any preference format below (SFT on preferred answers).
Preference:  pairs           {"prompt", "chosen", "rejected"}
             implicit_pairs  {"chosen", "rejected"}: their shared beginning is the prompt (HH-RLHF's
                             "\n\nHuman: ... \n\nAssistant:" turns become messages)
             rankings        {"prompt", "responses": [...], "ranking": [indices, best first]} -> every
                             ordered pair
             ratings         {"prompt", "responses": [...], "ratings": [numbers]} -> every pair with
                             different ratings, the rating gap kept as a margin; ties dropped, counted
             thumbs          {"prompt", "completion", "label": bool} -> every (up, down) pair of
                             responses to the same prompt; prompts without both, counted
Prompts:     {"prompt"} (any of the formats above also gives its prompts).
A prompt or response is either a string (plain text) or a list of {"role", "content"} messages.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from rlhf.errors import DataError

Message = dict[str, str]
Text = str | list[Message]

SFT_FORMATS = {"prompt_completion": ("prompt", "completion"), "messages": ("messages",)}
PREFERENCE_FORMATS = {
    "pairs": ("prompt", "chosen", "rejected"),
    "implicit_pairs": ("chosen", "rejected"),
    "rankings": ("prompt", "responses", "ranking"),
    "ratings": ("prompt", "responses", "ratings"),
    "thumbs": ("prompt", "completion", "label"),
}
PROMPT_FORMATS = {"prompt": ("prompt",), **{k: v for k, v in PREFERENCE_FORMATS.items() if k != "pairs"}}


@dataclass(frozen=True)
class SFTExample:
    prompt: Text
    completion: Text


@dataclass(frozen=True)
class PreferencePair:
    prompt: Text
    chosen: Text
    rejected: Text
    # How much more chosen is preferred (e.g. a rating gap); 0 for plain pairs.
    margin: float = 0.0
    # The record's value of the column evaluation is sliced by (data.preference.slice_by), if any.
    slice: str | None = None
    # Which record it came from (a ranking, ratings or a prompt's thumbs give several pairs each).
    record: int = field(default=0, compare=False)


@dataclass
class DataStats:
    """Records skipped or truncated, by reason; logged with the run so nothing changes silently."""

    counts: Counter

    def add(self, reason: str) -> None:
        self.counts[reason] += 1

    @property
    def total(self) -> int:
        return sum(self.counts.values())


def row_name(origin: str, row: dict, index: int) -> str:
    """Where a record is, for errors: its row in the source file (1-based), even after a split."""
    return f"{origin}: row {row.get('__row__', index + 1)}"


def detect_format(columns: Sequence[str], formats: dict[str, tuple[str, ...]], origin: str, key: str) -> str:
    present = set(columns) - {"__row__"}
    for name, needed in formats.items():
        if set(needed) <= present:
            return name
    lacking = [[c for c in needed if c not in present] for needed in formats.values()]
    missing = "; or ".join(", ".join(repr(c) for c in columns) for columns in lacking)
    # The file's other columns, in its order, as the suggested mapping of the first format's.
    canonical = {c for needed in formats.values() for c in needed}
    spare = [c for c in columns if c in present and c not in canonical]
    example = " ".join(
        f"+{key}.columns.{name}={spare[i] if i < len(spare) else '<your column>'}"
        for i, name in enumerate(lacking[0])
    )
    raise DataError(
        f"{origin}: columns {sorted(present)} match no known format: missing {missing}; "
        f"map yours with {key}.columns, e.g. {example}"
    )


def check_format(
    fmt: str, columns: Iterable[str], formats: dict[str, tuple[str, ...]], origin: str, key: str
) -> str:
    if fmt == "auto":
        return detect_format(columns, formats, origin, key)
    if fmt not in formats:
        raise DataError(f"{key}.format: unknown format {fmt!r}; use auto or one of {', '.join(formats)}")
    columns = set(columns) - {"__row__"}
    missing = [c for c in formats[fmt] if c not in columns]
    if missing:
        raise DataError(
            f"{origin}: format {fmt} needs column {missing[0]!r} (columns: {', '.join(sorted(columns))}); "
            f"map it with +{key}.columns.{missing[0]}=<your column>"
        )
    return fmt


def sft_format(fmt: str, columns: Iterable[str], origin: str, key: str) -> str:
    """The SFT format of records with these columns; "chosen" reads any preference format."""
    if fmt == "chosen":
        return check_format("auto", columns, PREFERENCE_FORMATS, origin, key)
    return check_format(fmt, columns, SFT_FORMATS, origin, key)


def prompt_keys(records: Any) -> list[str]:
    """Each record's prompt as a comparable key, for holding out whole prompts: every pair or
    demonstration of one prompt lands on the same side of a split. A record whose prompt cannot be
    read is its own group (its error is reported, with its row, when the split is read)."""
    columns = records.column_names
    if "prompt" in columns:
        return [repr(p) for p in records["prompt"]]
    keys = []
    for index, row in enumerate(records):
        try:
            if "messages" in columns:
                keys.append(repr(_split_messages(as_text(row["messages"], "messages", ""), "")[0]))
            elif {"chosen", "rejected"} <= set(columns):
                chosen = as_text(row["chosen"], "chosen", "")
                keys.append(repr(_split_implicit(chosen, as_text(row["rejected"], "rejected", ""), "")[0]))
            else:
                keys.append(f"row {index}")
        except (DataError, TypeError, KeyError):
            keys.append(f"row {index}")
    return keys


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


def prompt_text(text: Text) -> str:
    """Plain text of a prompt or response: itself, or the content of its last message."""
    return text if isinstance(text, str) else (text[-1]["content"] if text else "")


def _split_messages(messages: list[Message], where: str) -> tuple[list[Message], list[Message]]:
    last_user = max((i for i, m in enumerate(messages) if m["role"] != "assistant"), default=-1)
    if last_user < 0:
        raise DataError(f"{where}: 'messages' has no user turn before the assistant's")
    if last_user == len(messages) - 1:
        raise DataError(f"{where}: 'messages' does not end with an assistant turn to learn")
    return messages[: last_user + 1], messages[last_user + 1 :]


def sft_examples(
    records: Any, fmt: str, origin: str, key: str, strict: bool, stats: DataStats
) -> list[SFTExample]:
    """Canonical SFT examples from rows; empty completions are skipped (counted) or, if strict, errors.

    Format "chosen" trains on the preferred response of preference records (any preference format).
    """
    if fmt == "chosen":
        pairs = preference_pairs(records, "auto", origin, key, strict, stats)
        # The best responses only: those never rejected for their prompt (a ranking's top answer,
        # not its runners-up).
        rejected = {repr((p.prompt, p.rejected)) for p in pairs}
        unique = {
            repr((p.prompt, p.chosen)): SFTExample(p.prompt, p.chosen)
            for p in pairs
            if repr((p.prompt, p.chosen)) not in rejected
        }
        return list(unique.values())
    fmt = sft_format(fmt, records.column_names, origin, key)
    out = []
    for index, row in enumerate(records):
        where = row_name(origin, row, index)
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


HUMAN, ASSISTANT = "\n\nHuman:", "\n\nAssistant:"


def _hh_messages(text: str) -> list[Message] | None:
    """HH-RLHF's "\n\nHuman: ...\n\nAssistant: ..." transcript as messages (None if it is not one)."""
    if HUMAN not in text:
        return None
    messages = []
    for chunk in text.split(HUMAN)[1:]:
        user, sep, assistant = chunk.partition(ASSISTANT)
        messages.append({"role": "user", "content": user.strip()})
        if sep:
            messages.append({"role": "assistant", "content": assistant.strip()})
    return messages


def common_prefix(a: Sequence, b: Sequence) -> int:
    """Length of the longest common prefix of two sequences (strings, message or token lists)."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _split_implicit(chosen: Text, rejected: Text, where: str) -> tuple[Text, Text, Text]:
    """Shared beginning -> prompt. Message lists split at the first differing message; HH transcripts
    become messages; other strings split after the shared text, at a word boundary."""
    if isinstance(chosen, str) and isinstance(rejected, str):
        hh_c, hh_r = _hh_messages(chosen), _hh_messages(rejected)
        if hh_c and hh_r:
            chosen, rejected = hh_c, hh_r
    if isinstance(chosen, list) and isinstance(rejected, list):
        shared = common_prefix(chosen, rejected)
        # The prompt ends with the last non-assistant turn of the shared part.
        while shared > 0 and chosen[shared - 1]["role"] == "assistant":
            shared -= 1
        if shared == 0:
            raise DataError(f"{where}: chosen and rejected share no prompt turn")
        return chosen[:shared], chosen[shared:], rejected[shared:]
    if isinstance(chosen, str) and isinstance(rejected, str):
        shared = common_prefix(chosen, rejected)
        cut = (
            max(chosen.rfind(" ", 0, shared), chosen.rfind("\n", 0, shared)) + 1
            if shared < len(chosen)
            else shared
        )
        if cut <= 0:
            raise DataError(f"{where}: chosen and rejected share no prompt text")
        return chosen[:cut], chosen[cut:], rejected[cut:]
    raise DataError(f"{where}: chosen and rejected must both be strings or both message lists")


def _strip_prompt(prompt: Text, response: Text) -> Text:
    """Conversational responses that repeat the prompt's turns (UltraFeedback's layout) lose them."""
    if isinstance(response, list):
        turns = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        if response[: len(turns)] == turns:
            return response[len(turns) :]
    return response


def _index_list(value: Any, size: int, field: str, where: str) -> list:
    if not isinstance(value, list) or len(value) != size:
        raise DataError(f"{where}: field {field!r} must be a list with one entry per response ({size})")
    return value


def preference_pairs(
    records: Any, fmt: str, origin: str, key: str, strict: bool, stats: DataStats, slice_by: str | None = None
) -> list[PreferencePair]:
    """Canonical preference pairs from any supported feedback shape (see the module docstring).

    Each pair carries the index of its record (for thumbs: the prompt's first row) and, with
    `slice_by`, the record's value of that column as a string.
    """
    fmt = check_format(fmt, records.column_names, PREFERENCE_FORMATS, origin, key)
    if slice_by is not None and slice_by not in records.column_names:
        columns = ", ".join(sorted(c for c in records.column_names if c != "__row__"))
        raise DataError(
            f"{origin}: {key}.slice_by: no column {slice_by!r} (columns: {columns}); "
            f"name one of them or set {key}.slice_by=null"
        )
    pairs: list[PreferencePair] = []
    thumbs: dict[str, tuple[Text, list[Text], list[Text], int]] = {}
    slices: list[str | None] = []  # per record

    def add(prompt: Text, chosen: Text, rejected: Text, where: str, record: int, margin: float = 0.0) -> None:
        reason = None
        if is_blank(chosen) or is_blank(rejected):
            reason = "empty_response"
        elif chosen == rejected:
            reason = "identical_pair"
        if reason:
            if strict:
                raise DataError(f"{where}: {reason.replace('_', ' ')} (data.strict=true)")
            stats.add(reason)
            return
        pairs.append(PreferencePair(prompt, chosen, rejected, margin, slices[record], record))

    for index, row in enumerate(records):
        where = row_name(origin, row, index)
        slices.append(None if slice_by is None else str(row[slice_by]))
        if fmt == "implicit_pairs":
            prompt, chosen, rejected = _split_implicit(
                as_text(row["chosen"], "chosen", where), as_text(row["rejected"], "rejected", where), where
            )
            add(prompt, chosen, rejected, where, index)
        elif fmt == "pairs":
            prompt = as_text(row["prompt"], "prompt", where)
            chosen = _strip_prompt(prompt, as_text(row["chosen"], "chosen", where))
            rejected = _strip_prompt(prompt, as_text(row["rejected"], "rejected", where))
            add(prompt, chosen, rejected, where, index)
        elif fmt in ("rankings", "ratings"):
            prompt = as_text(row["prompt"], "prompt", where)
            responses = row["responses"]
            if not isinstance(responses, list) or len(responses) < 2:
                raise DataError(f"{where}: field 'responses' must list at least two responses")
            responses = [as_text(r, "responses", where) for r in responses]
            if fmt == "rankings":
                order = _index_list(row["ranking"], len(responses), "ranking", where)
                if sorted(order) != list(range(len(responses))):
                    raise DataError(f"{where}: 'ranking' must be a permutation of 0..{len(responses) - 1}")
                for better, i in enumerate(order):
                    for j in order[better + 1 :]:
                        add(prompt, responses[i], responses[j], where, index)
            else:
                ratings = _index_list(row["ratings"], len(responses), "ratings", where)
                for i in range(len(responses)):
                    for j in range(len(responses)):
                        if ratings[i] is None or ratings[j] is None:
                            raise DataError(f"{where}: 'ratings' has an empty entry")
                        if i < j and ratings[i] == ratings[j]:
                            stats.add("tied_ratings")
                        elif ratings[i] > ratings[j]:
                            add(
                                prompt,
                                responses[i],
                                responses[j],
                                where,
                                index,
                                float(ratings[i] - ratings[j]),
                            )
        else:  # thumbs: group by prompt, pair every up with every down
            prompt = as_text(row["prompt"], "prompt", where)
            label = row["label"]
            if not isinstance(label, bool):
                raise DataError(f"{where}: field 'label' must be true (thumbs up) or false (thumbs down)")
            # A prompt's thumbs are one record: the first row of the prompt stands for it.
            group = thumbs.setdefault(repr(prompt), (prompt, [], [], index))
            group[1 if label else 2].append(as_text(row["completion"], "completion", where))
    for prompt, ups, downs, record in thumbs.values():
        if not ups or not downs:
            stats.add("thumbs_without_opposite")
            continue
        for up in ups:
            for down in downs:
                add(prompt, up, down, f"{origin}: prompt {prompt!r}"[:200], record)
    return pairs


def prompts_of(records: Any, fmt: str, origin: str, key: str) -> list[Text]:
    """The distinct prompts of a prompt set (or of any SFT or preference data), in order."""
    fmt = check_format(fmt, records.column_names, PROMPT_FORMATS, origin, key)
    seen, out = set(), []
    for index, row in enumerate(records):
        where = row_name(origin, row, index)
        if fmt == "implicit_pairs":
            prompt = _split_implicit(
                as_text(row["chosen"], "chosen", where), as_text(row["rejected"], "rejected", where), where
            )[0]
        else:
            prompt = as_text(row["prompt"], "prompt", where)
        if is_blank(prompt):
            continue
        marker = repr(prompt)
        if marker not in seen:
            seen.add(marker)
            out.append(prompt)
    return out
