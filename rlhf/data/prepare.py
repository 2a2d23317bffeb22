"""From configured sources to tokenised examples, split by split, with counts of what changed."""

from __future__ import annotations

import logging
import math
from collections import Counter
from dataclasses import dataclass, field
from itertools import accumulate

import torch

from rlhf.config import DataConfig
from rlhf.data.formats import (
    PREFERENCE_FORMATS,
    PROMPT_FORMATS,
    DataStats,
    check_format,
    common_prefix,
    preference_pairs,
    prompts_of,
    sft_examples,
    sft_format,
)
from rlhf.data.loading import attention_mask, pad, position_ids
from rlhf.data.sources import load_source, task_slice_column
from rlhf.data.tokenize import (
    IGNORE_INDEX,
    ChatRenderer,
    encode_pairs,
    encode_preferences,
    encode_prompts,
    sft_features,
)
from rlhf.errors import DataError
from rlhf.ranks import is_rank_zero

log = logging.getLogger(__name__)


@dataclass
class Prepared:
    """Examples per split (train, validation, maybe test), and the counts to log."""

    splits: dict[str, list]
    stats: dict[str, float] = field(default_factory=dict)
    # Raw prompts and references per split, for sample generations and evaluation: SFT references
    # are completions, preference references (chosen, rejected) texts.
    prompts: dict[str, list] = field(default_factory=dict)
    references: dict[str, list] = field(default_factory=dict)
    # Values of the preference slice column (data.preference.slice_by), indexed by features' "slice".
    slice_names: list[str] = field(default_factory=list)


def _report(kind: str, split: str, kept: int, stats: DataStats, out: dict[str, float]) -> None:
    out[f"data/{kind}_{split}_examples"] = kept
    for reason, n in sorted(stats.counts.items()):
        out[f"data/{kind}_{split}_{reason}"] = n


def _warn_dropped(kind: str, prepared: Prepared) -> None:
    """One warning for a source, every split in it, with what to change: not one per split."""
    prefix = f"data/{kind}_"
    per_split = {}
    for split in prepared.splits:
        counts = {
            key[len(f"{prefix}{split}_") :]: n
            for key, n in prepared.stats.items()
            if key.startswith(f"{prefix}{split}_") and key != f"{prefix}{split}_examples" and n
        }
        if counts:
            per_split[split] = counts
    if not per_split or not is_rank_zero():  # every rank prepares the same data; one says so
        return
    parts = [
        f"{split} {int(prepared.stats[f'{prefix}{split}_examples'])} kept ("
        + ", ".join(f"{int(n)} {reason.replace('_', ' ')}" for reason, n in sorted(counts.items()))
        + ")"
        for split, counts in per_split.items()
    ]
    reasons = sorted({reason for counts in per_split.values() for reason in counts})
    hints = "; ".join(dict.fromkeys(DROPPED_HINTS[r] for r in reasons if r in DROPPED_HINTS))
    log.warning("data.%s: %s%s", kind, "; ".join(parts), f". To keep them: {hints}" if hints else "")


# What to change to keep records skipped or cut for a reason.
DROPPED_HINTS = {
    "truncated_response": "raise data.max_length",
    "truncated_prompt": "raise data.max_prompt_length",
    "prompt_too_long": "raise data.max_prompt_length (and data.max_length)",
}

# What to change when a reason leaves no record usable.
NOTHING_LEFT_HINTS = {
    "empty_completion": "give the records non-empty completions",
    "empty_response": "give the records non-empty responses",
    "identical_pair": "chosen and rejected must differ",
    "tied_ratings": "a record's responses need different ratings",
    "prompt_too_long": "raise data.max_prompt_length (and data.max_length), or shorten the prompts",
    "empty_response_after_tokenization": "raise data.max_length above data.max_prompt_length",
}


def nothing_left(key: str, origin: str, what: str, records: int, stats: DataStats) -> DataError:
    """The one-line error for a split whose every record was filtered out: counts per reason, the file."""
    counts = ", ".join(f"{n} {reason.replace('_', ' ')}" for reason, n in stats.counts.most_common())
    hints = "; ".join(dict.fromkeys(NOTHING_LEFT_HINTS[r] for r in stats.counts if r in NOTHING_LEFT_HINTS))
    return DataError(
        f"{key}: {origin}: no usable {what} left of {records} records ({counts or 'none produced'})"
        + (f"; {hints}" if hints else "")
    )


def prepare_sft(data: DataConfig, renderer: ChatRenderer, seed: int) -> Prepared:
    """Tokenised SFT examples {input_ids, labels} for every split of data.sft."""
    sources = load_source(
        data.sft,
        "data.sft",
        data.validation_fraction,
        seed,
        data.task_seed,
        data.task_noise,
        lambda columns, origin: sft_format(data.sft.format, columns, origin, "data.sft"),
    )
    prepared = Prepared({})
    for split, source in sources.items():
        stats = DataStats(Counter())
        examples = sft_examples(
            source.records, data.sft.format, source.origin, "data.sft", data.strict, stats
        )
        encoded = encode_pairs(
            renderer,
            [e.prompt for e in examples],
            [e.completion for e in examples],
            data.max_length,
            data.max_prompt_length,
            stats,
            where=f"{source.origin}: ",
            strict=data.strict,
        )
        prepared.splits[split] = [
            sft_features(p, r) for p, r in zip(encoded.prompt_ids, encoded.response_ids)
        ]
        prepared.prompts[split] = [examples[i].prompt for i in encoded.kept]
        prepared.references[split] = [examples[i].completion for i in encoded.kept]
        _report("sft", split, len(prepared.splits[split]), stats, prepared.stats)
        if not prepared.splits[split]:
            raise nothing_left("data.sft", source.origin, "examples", len(source.records), stats)
    _warn_dropped("sft", prepared)
    return prepared


def prepare_preferences(data: DataConfig, renderer: ChatRenderer, seed: int) -> Prepared:
    """Tokenised preference pairs {chosen, rejected, margin} for every split of data.preference."""
    sources = load_source(
        data.preference,
        "data.preference",
        data.validation_fraction,
        seed,
        data.task_seed,
        data.task_noise,
        lambda columns, origin: check_format(
            data.preference.format, columns, PREFERENCE_FORMATS, origin, "data.preference"
        ),
    )
    slice_by = data.preference.slice_by or task_slice_column(data.preference.path)
    prepared = Prepared({})
    slices: dict[str, list[str | None]] = {}
    for split, source in sources.items():
        stats = DataStats(Counter())
        pairs = preference_pairs(
            source.records,
            data.preference.format,
            source.origin,
            "data.preference",
            data.strict,
            stats,
            slice_by,
        )
        features, kept = encode_preferences(
            renderer, pairs, data.max_length, data.max_prompt_length, stats, f"{source.origin}: ", data.strict
        )
        for feature, index in zip(features, kept, strict=True):
            feature["record"] = pairs[index].record
        prepared.splits[split] = features
        prepared.prompts[split] = [pairs[i].prompt for i in kept]
        prepared.references[split] = [(pairs[i].chosen, pairs[i].rejected) for i in kept]
        slices[split] = [pairs[i].slice for i in kept]
        _report("preference", split, len(features), stats, prepared.stats)
        if not features:
            raise nothing_left("data.preference", source.origin, "pairs", len(source.records), stats)
    if slice_by is not None:
        prepared.slice_names = sorted({name for names in slices.values() for name in names})
        index = {name: i for i, name in enumerate(prepared.slice_names)}
        for split, names in slices.items():
            for feature, name in zip(prepared.splits[split], names, strict=True):
                feature["slice"] = index[name]
    _warn_dropped("preference", prepared)
    return prepared


def prepare_prompts(data: DataConfig, renderer: ChatRenderer, seed: int, max_new_tokens: int) -> Prepared:
    """Tokenised prompts {prompt, prompt_ids} for every split of data.prompts.

    A prompt must leave room for max_new_tokens within data.max_length (and fit data.max_prompt_length);
    longer ones are skipped and counted as prompt_too_long.
    """
    sources = load_source(
        data.prompts,
        "data.prompts",
        data.validation_fraction,
        seed,
        data.task_seed,
        data.task_noise,
        lambda columns, origin: check_format(
            data.prompts.format, columns, PROMPT_FORMATS, origin, "data.prompts"
        ),
    )
    limit = min(data.max_prompt_length, data.max_length - max_new_tokens)
    if limit < 1:
        raise DataError(
            f"data.max_length ({data.max_length}) leaves no room for a prompt before "
            f"stage.rollout.max_new_tokens ({max_new_tokens}) new tokens"
        )
    # A shipped task's prompts name their category: evaluation reports each category apart.
    slice_by = task_slice_column(data.prompts.path)
    prepared = Prepared({})
    for split, source in sources.items():
        stats = DataStats(Counter())
        prompts = prompts_of(source.records, data.prompts.format, source.origin, "data.prompts")
        slice_of = {}
        if slice_by is not None and {"prompt", slice_by} <= set(source.records.column_names):
            slice_of = {repr(p): str(v) for p, v in zip(source.records["prompt"], source.records[slice_by])}
        items = []
        for prompt, ids in zip(prompts, encode_prompts(renderer, prompts)):
            if len(ids) > limit:
                if data.strict:
                    raise DataError(
                        f"{source.origin}: a prompt of {len(ids)} tokens is over {limit} (data.strict=true)"
                    )
                stats.add("prompt_too_long")
                continue
            items.append({"prompt": prompt, "prompt_ids": ids})
            if repr(prompt) in slice_of:
                items[-1]["slice"] = slice_of[repr(prompt)]
        prepared.splits[split] = items
        prepared.prompts[split] = [i["prompt"] for i in items]
        _report("prompts", split, len(items), stats, prepared.stats)
        if not items:
            raise nothing_left("data.prompts", source.origin, "prompts", len(source.records), stats)
    _warn_dropped("prompts", prepared)
    return prepared


# Per-pair fields of preference features besides the two sequences (the last two are optional).
PER_PAIR_FIELDS = ("margin", "gold_order", "slice", "weight")
# Per-response fields of a comparison group, in the order of its responses (optional): DPO's
# reference log-probabilities when they are computed before training.
PER_RESPONSE_FIELDS = ("reference_logps",)


def as_comparisons(feature: dict) -> dict:
    """A preference feature as a comparison group: {"responses": [ids, ...], "pairs": [(better, worse),
    ...] indexing responses, and each per-pair field as a list}. A single pair is a group of two."""
    if "responses" in feature:
        return feature
    group = {"responses": [feature["chosen"], feature["rejected"]], "pairs": [(0, 1)]}
    group.update({key: [feature[key]] for key in PER_PAIR_FIELDS if key in feature})
    group.update({key: feature[key] for key in ("prompt_length", *PER_RESPONSE_FIELDS) if key in feature})
    return group


def group_comparisons(features: list[dict]) -> list[dict]:
    """Pair features (with a "record" index) grouped by record: every pair of a ranking, of a prompt's
    ratings or thumbs becomes one example, each distinct response listed once (InstructGPT's
    batching: a record's comparisons share one forward pass and are never split across batches)."""
    groups: dict[int, dict] = {}
    for feature in features:
        group = groups.get(feature["record"])
        if group is None:
            group = groups[feature["record"]] = {"responses": [], "pairs": []}
            group.update({key: [] for key in PER_PAIR_FIELDS if key in feature})
            if "prompt_length" in feature:  # a record's responses answer one prompt
                group["prompt_length"] = feature["prompt_length"]
        pair = []
        for sequence in (feature["chosen"], feature["rejected"]):
            if sequence not in group["responses"]:
                group["responses"].append(sequence)
            pair.append(group["responses"].index(sequence))
        group["pairs"].append(tuple(pair))
        for key in PER_PAIR_FIELDS:
            if key in group:
                group[key].append(feature[key])
    return list(groups.values())


def _shared_prefix(responses: list[list[int]]) -> int:
    return min(common_prefix(responses[0], other) for other in responses[1:]) if len(responses) > 1 else 0


class PairCollator:
    """Preference examples (pairs, or comparison groups of several responses, see `as_comparisons`)
    as one batch for a single forward pass, in whichever of two layouts holds fewer tokens:

    - side by side: every distinct response of the batch as its own right-padded row;
    - shared prefix (`share_prefix`): one row per example, [common prefix, first rest, second rest,
      ...], where each rest attends to the prefix and to itself but not to the other rests, and its
      positions continue from the prefix, so each response is computed as it would be alone and the
      prompt once. `pair_mask` (B, 1, W, W) holds that attention pattern (True: attend).

    Either way `score_index` (N,) gives where each response's score is read in the flattened
    (rows x width) positions, and `pair_index` (P, 2) the (preferred, other) responses of each pair
    among those N scores; `attention_mask` (rows, W) is 1 on real tokens and `position_ids` counts
    each sequence's positions. Per pair: `margin`, and when the features carry them `gold_order` (+1:
    a gold annotator prefers the preferred one, -1: the other, 0: tie) and `slice`. Per response,
    when the features carry them: `reference_logps` (N,).

    `response_tokens` (for DPO; the features then carry `prompt_length`): also where each response's
    own tokens are predicted, as `target_index` (M,) positions in the flattened (rows x width)
    layout whose next-token prediction is a response token, `target_ids` (M,) those tokens and
    `target_response` (M,) which of the N responses each belongs to. In the shared-prefix layout a
    position can predict a token of several responses (the end of the prefix predicts each first
    token that follows it), so positions may repeat.
    """

    def __init__(
        self,
        pad_token_id: int,
        multiple_of: int = 8,
        share_prefix: bool = False,
        response_tokens: bool = False,
    ):
        self.pad_token_id = pad_token_id
        self.multiple_of = multiple_of
        self.share_prefix = share_prefix
        self.response_tokens = response_tokens

    def length(self, feature: dict) -> int:
        """The padded length this example asks of its batch."""
        responses = as_comparisons(feature)["responses"]
        if self.share_prefix:
            return self._packed_length(responses, _shared_prefix(responses))
        return max(map(len, responses))

    @staticmethod
    def _packed_length(responses: list[list[int]], prefix: int) -> int:
        return prefix + sum(len(r) - prefix for r in responses)

    def __call__(self, features: list[dict]) -> dict:
        groups = [as_comparisons(f) for f in features]
        per_pair = {
            key: torch.tensor([v for g in groups for v in g[key]], dtype=torch.float32)
            for key in PER_PAIR_FIELDS
            if key in groups[0]
        }
        offsets = accumulate((len(g["responses"]) for g in groups[:-1]), initial=0)
        per_pair["pair_index"] = torch.tensor(
            [(offset + a, offset + b) for g, offset in zip(groups, offsets) for a, b in g["pairs"]],
            dtype=torch.long,
        )
        for key in PER_RESPONSE_FIELDS:
            if key in groups[0]:
                per_pair[key] = torch.tensor([v for g in groups for v in g[key]], dtype=torch.float32)
        responses = [r for g in groups for r in g["responses"]]
        plain_width = self._round_up(max(map(len, responses)))
        if self.share_prefix:
            prefixes = [_shared_prefix(g["responses"]) for g in groups]
            packed_width = self._round_up(
                max(self._packed_length(g["responses"], p) for g, p in zip(groups, prefixes))
            )
            if packed_width * len(groups) < plain_width * len(responses):
                packed = self._packed(groups, prefixes, packed_width)
                if self.response_tokens:
                    packed.update(self._packed_targets(groups, prefixes, packed_width))
                return {**packed, **per_pair}
        mask = attention_mask(responses, multiple_of=self.multiple_of)
        ends = mask.sum(-1) - 1
        batch = {
            "input_ids": pad(responses, self.pad_token_id, multiple_of=self.multiple_of),
            "attention_mask": mask,
            "position_ids": position_ids(mask),
            "score_index": torch.arange(len(responses)) * mask.shape[1] + ends,
            **per_pair,
        }
        if self.response_tokens:
            starts = [g["prompt_length"] for g in groups for _ in g["responses"]]
            # Response n sits in row n: its token j is predicted at position j - 1 of that row.
            width = mask.shape[1]
            where = [
                [n * width + j - 1 for j in range(max(s, 1), len(r))]
                for n, (r, s) in enumerate(zip(responses, starts))
            ]
            batch.update(_targets(responses, starts, where))
        return batch

    @staticmethod
    def _packed_targets(groups: list[dict], prefixes: list[int], width: int) -> dict:
        responses, starts, where = [], [], []
        for row, (group, p) in enumerate(zip(groups, prefixes)):
            rest = p  # where the current response's rest begins in the row
            for response in group["responses"]:
                # A response's token k lies at k within the prefix, at rest + (k - p) after it; its
                # token j is predicted where token j - 1 lies.
                first = max(group["prompt_length"], 1)
                where.append(
                    [
                        row * width + (j - 1 if j - 1 < p else rest + j - 1 - p)
                        for j in range(first, len(response))
                    ]
                )
                responses.append(response)
                starts.append(group["prompt_length"])
                rest += len(response) - p
        return _targets(responses, starts, where)

    def _round_up(self, length: int) -> int:
        return math.ceil(length / self.multiple_of) * self.multiple_of

    def _packed(self, groups: list[dict], prefixes: list[int], width: int) -> dict:
        rows = len(groups)
        ids = torch.full((rows, width), self.pad_token_id, dtype=torch.long)
        positions = torch.zeros((rows, width), dtype=torch.long)
        # Segment of each position: 0 the shared prefix, k the k-th response's rest, -1 padding.
        segment = torch.full((rows, width), -1, dtype=torch.long)
        score_at = []
        for row, (group, p) in enumerate(zip(groups, prefixes)):
            first = group["responses"][0]
            ids[row, :p] = torch.as_tensor(first[:p], dtype=torch.long)
            positions[row, :p] = torch.arange(p)
            segment[row, :p] = 0
            start = p
            for k, response in enumerate(group["responses"], start=1):
                rest = len(response) - p
                ids[row, start : start + rest] = torch.as_tensor(response[p:], dtype=torch.long)
                positions[row, start : start + rest] = torch.arange(p, p + rest)
                segment[row, start : start + rest] = k
                # A response that is all prefix is scored where the prefix ends.
                score_at.append(row * width + (start + rest - 1 if rest else p - 1))
                start += rest
        query, key = segment[:, :, None], segment[:, None, :]
        index = torch.arange(width)
        causal = index[None, :] <= index[:, None]
        allowed = causal & ((key == 0) | (key == query)) & (query != -1)
        allowed |= torch.eye(width, dtype=torch.bool)  # padding attends to itself: no empty softmax rows
        return {
            "input_ids": ids,
            "attention_mask": (segment != -1).long(),
            "position_ids": positions,
            "pair_mask": allowed[:, None],
            "score_index": torch.tensor(score_at),
        }


def _targets(responses: list[list[int]], starts: list[int], where: list[list[int]]) -> dict:
    """The response-token fields of a PairCollator batch (see its `response_tokens`)."""
    return {
        "target_index": torch.tensor([i for positions in where for i in positions], dtype=torch.long),
        "target_ids": torch.tensor(
            [t for r, s in zip(responses, starts) for t in r[max(s, 1) :]], dtype=torch.long
        ),
        "target_response": torch.tensor(
            [n for n, positions in enumerate(where) for _ in positions], dtype=torch.long
        ),
    }


class CausalLMCollator:
    """Right-padded input ids, attention mask and labels (padding is ignored by the loss)."""

    def __init__(self, pad_token_id: int, multiple_of: int = 8):
        self.pad_token_id = pad_token_id
        self.multiple_of = multiple_of

    @staticmethod
    def length(feature: dict) -> int:
        """The padded length this example asks of its batch."""
        return len(feature["input_ids"])

    def __call__(self, features: list[dict[str, list[int]]]) -> dict:
        ids = [f["input_ids"] for f in features]
        return {
            "input_ids": pad(ids, self.pad_token_id, multiple_of=self.multiple_of),
            "attention_mask": attention_mask(ids, multiple_of=self.multiple_of),
            "labels": pad([f["labels"] for f in features], IGNORE_INDEX, multiple_of=self.multiple_of),
        }


def count_pairs(batch: dict) -> dict[str, float]:
    """Throughput units of a PairCollator batch: its comparisons and its tokens."""
    return {"pairs": float(batch["pair_index"].shape[0]), "tokens": float(batch["attention_mask"].sum())}
