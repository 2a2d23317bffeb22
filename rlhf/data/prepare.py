"""From configured sources to tokenised examples, split by split, with counts of what changed."""

from __future__ import annotations

import logging
import math
from collections import Counter
from dataclasses import dataclass, field

import torch

from rlhf.config import DataConfig
from rlhf.data.formats import DataStats, common_prefix, preference_pairs, prompts_of, sft_examples
from rlhf.data.loading import attention_mask, pad, position_ids
from rlhf.data.sources import load_source
from rlhf.data.tokenize import (
    IGNORE_INDEX,
    ChatRenderer,
    encode_pairs,
    encode_preferences,
    encode_prompts,
    sft_features,
)
from rlhf.errors import DataError

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


def _report(kind: str, split: str, kept: int, stats: DataStats, out: dict[str, float]) -> None:
    out[f"data/{kind}_{split}_examples"] = kept
    for reason, n in sorted(stats.counts.items()):
        out[f"data/{kind}_{split}_{reason}"] = n
    if stats.total:
        detail = ", ".join(f"{n} {reason.replace('_', ' ')}" for reason, n in sorted(stats.counts.items()))
        log.warning("data.%s %s: %d examples kept; %s", kind, split, kept, detail)


def prepare_sft(data: DataConfig, renderer: ChatRenderer, seed: int) -> Prepared:
    """Tokenised SFT examples {input_ids, labels} for every split of data.sft."""
    sources = load_source(data.sft, "data.sft", data.validation_fraction, seed, data.task_seed, data.task_noise)
    prepared = Prepared({})
    for split, source in sources.items():
        stats = DataStats(Counter())
        examples = sft_examples(source.records, data.sft.format, source.origin, "data.sft", data.strict, stats)
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
        prepared.splits[split] = [sft_features(p, r) for p, r in zip(encoded.prompt_ids, encoded.response_ids)]
        prepared.prompts[split] = [examples[i].prompt for i in encoded.kept]
        prepared.references[split] = [examples[i].completion for i in encoded.kept]
        _report("sft", split, len(prepared.splits[split]), stats, prepared.stats)
        if not prepared.splits[split]:
            raise DataError(f"data.sft: {source.origin}: no usable examples left ({dict(stats.counts)})")
    return prepared


def prepare_preferences(data: DataConfig, renderer: ChatRenderer, seed: int) -> Prepared:
    """Tokenised preference pairs {chosen, rejected, margin} for every split of data.preference."""
    sources = load_source(
        data.preference, "data.preference", data.validation_fraction, seed, data.task_seed, data.task_noise
    )
    prepared = Prepared({})
    for split, source in sources.items():
        stats = DataStats(Counter())
        pairs = preference_pairs(source.records, data.preference.format, source.origin, "data.preference", data.strict, stats)
        features, kept = encode_preferences(
            renderer, pairs, data.max_length, data.max_prompt_length, stats, f"{source.origin}: ", data.strict
        )
        prepared.splits[split] = features
        prepared.prompts[split] = [pairs[i].prompt for i in kept]
        prepared.references[split] = [(pairs[i].chosen, pairs[i].rejected) for i in kept]
        _report("preference", split, len(features), stats, prepared.stats)
        if not features:
            raise DataError(f"data.preference: {source.origin}: no usable pairs left ({dict(stats.counts)})")
    return prepared


def prepare_prompts(data: DataConfig, renderer: ChatRenderer, seed: int, max_new_tokens: int) -> Prepared:
    """Tokenised prompts {prompt, prompt_ids} for every split of data.prompts.

    A prompt must leave room for max_new_tokens within data.max_length (and fit data.max_prompt_length);
    longer ones are skipped and counted as prompt_too_long.
    """
    sources = load_source(data.prompts, "data.prompts", data.validation_fraction, seed, data.task_seed, data.task_noise)
    limit = min(data.max_prompt_length, data.max_length - max_new_tokens)
    if limit < 1:
        raise DataError(
            f"data.max_length ({data.max_length}) leaves no room for a prompt before "
            f"stage.rollout.max_new_tokens ({max_new_tokens}) new tokens"
        )
    prepared = Prepared({})
    for split, source in sources.items():
        stats = DataStats(Counter())
        prompts = prompts_of(source.records, data.prompts.format, source.origin, "data.prompts")
        items = []
        for prompt, ids in zip(prompts, encode_prompts(renderer, prompts)):
            if len(ids) > limit:
                if data.strict:
                    raise DataError(f"{source.origin}: a prompt of {len(ids)} tokens is over {limit} (data.strict=true)")
                stats.add("prompt_too_long")
                continue
            items.append({"prompt": prompt, "prompt_ids": ids})
        prepared.splits[split] = items
        prepared.prompts[split] = [i["prompt"] for i in items]
        _report("prompts", split, len(items), stats, prepared.stats)
        if not items:
            raise DataError(f"data.prompts: {source.origin}: no usable prompts left ({dict(stats.counts)})")
    return prepared


class PairCollator:
    """Preference pairs as one batch for a single forward pass, in whichever of two layouts holds
    fewer tokens:

    - side by side: chosen rows then rejected rows, right-padded (2B rows);
    - shared prefix (`share_prefix`): one row per pair, [common prefix, chosen rest, rejected rest],
      where the rejected rest attends to the prefix and to itself but not to the chosen rest, and its
      positions continue from the prefix, so each response is computed as it would be alone and the
      prompt once. `pair_mask` (B, 1, W, W) holds that attention pattern (True: attend).

    Either way `score_index` (2B,) gives, chosen first, where each sequence's score is read in the
    flattened (rows x width) positions; `attention_mask` (rows, W) is 1 on real tokens and
    `position_ids` counts each sequence's positions. Per pair: `margin`, and `gold_order` when the
    features carry one (+1: a gold annotator prefers chosen, -1: rejected, 0: tie).
    """

    def __init__(self, pad_token_id: int, multiple_of: int = 8, share_prefix: bool = False):
        self.pad_token_id = pad_token_id
        self.multiple_of = multiple_of
        self.share_prefix = share_prefix

    def length(self, feature: dict) -> int:
        """The padded length this example asks of its batch."""
        chosen, rejected = feature["chosen"], feature["rejected"]
        if self.share_prefix:
            return len(chosen) + len(rejected) - common_prefix(chosen, rejected)
        return max(len(chosen), len(rejected))

    def __call__(self, features: list[dict]) -> dict:
        per_pair = {"margin": torch.tensor([f["margin"] for f in features], dtype=torch.float32)}
        if "gold_order" in features[0]:
            per_pair["gold_order"] = torch.tensor([f["gold_order"] for f in features], dtype=torch.float32)
        side_by_side = [f["chosen"] for f in features] + [f["rejected"] for f in features]
        plain_width = self._round_up(max(map(len, side_by_side)))
        if self.share_prefix:
            prefixes = [common_prefix(f["chosen"], f["rejected"]) for f in features]
            packed_width = self._round_up(
                max(len(f["chosen"]) + len(f["rejected"]) - p for f, p in zip(features, prefixes))
            )
            if packed_width * len(features) < plain_width * len(side_by_side):
                return {**self._packed(features, prefixes, packed_width), **per_pair}
        mask = attention_mask(side_by_side, multiple_of=self.multiple_of)
        ends = mask.sum(-1) - 1
        return {
            "input_ids": pad(side_by_side, self.pad_token_id, multiple_of=self.multiple_of),
            "attention_mask": mask,
            "position_ids": position_ids(mask),
            "score_index": torch.arange(len(side_by_side)) * mask.shape[1] + ends,
            **per_pair,
        }

    def _round_up(self, length: int) -> int:
        return math.ceil(length / self.multiple_of) * self.multiple_of

    def _packed(self, features: list[dict], prefixes: list[int], width: int) -> dict:
        rows = len(features)
        ids = torch.full((rows, width), self.pad_token_id, dtype=torch.long)
        positions = torch.zeros((rows, width), dtype=torch.long)
        # Segment of each position: 0 prefix, 1 chosen rest, 2 rejected rest, 3 padding.
        segment = torch.full((rows, width), 3, dtype=torch.long)
        chosen_at, rejected_at = [], []
        for row, (f, p) in enumerate(zip(features, prefixes)):
            chosen, rejected = f["chosen"], f["rejected"]
            c, r = len(chosen) - p, len(rejected) - p
            ids[row, : p + c] = torch.as_tensor(chosen)
            ids[row, p + c : p + c + r] = torch.as_tensor(rejected[p:], dtype=torch.long)
            positions[row, : p + c] = torch.arange(p + c)
            positions[row, p + c : p + c + r] = torch.arange(p, p + r)
            segment[row, p : p + c], segment[row, p + c : p + c + r] = 1, 2
            segment[row, :p] = 0
            chosen_at.append(row * width + p + c - 1)
            rejected_at.append(row * width + (p + c + r - 1 if r else p - 1))
        query, key = segment[:, :, None], segment[:, None, :]
        index = torch.arange(width)
        causal = index[None, :] <= index[:, None]
        allowed = causal & ((key == 0) | (key == query)) & (query != 3)
        allowed |= torch.eye(width, dtype=torch.bool)  # padding attends to itself: no empty softmax rows
        return {
            "input_ids": ids,
            "attention_mask": (segment != 3).long(),
            "position_ids": positions,
            "pair_mask": allowed[:, None],
            "score_index": torch.tensor(chosen_at + rejected_at),
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
