"""The task's data sets: every kind of feedback (demonstrations, pairs, rankings, ratings, thumbs,
prompts) drawn for seeded splits, and written once to a cache directory named by the task's version."""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from pathlib import Path

from rlhf.tasks.assistant.gold import gold_score
from rlhf.tasks.assistant.questions import SPLITS, STREAM_SALT, Question, sample_question, split_pools
from rlhf.tasks.assistant.responses import demonstration, response, styles

TASK_VERSION = "assistant-v3"

KINDS = ("sft", "pairs", "rankings", "ratings", "thumbs", "prompts")
# Every record names its category; evaluation reports accuracy per category.
SLICE_COLUMN = "category"
DEFAULT_SIZES = {
    "sft": {"train": 2000, "validation": 200, "test": 200},
    "pairs": {"train": 3000, "validation": 300, "test": 300},
    "rankings": {"train": 3000, "validation": 300, "test": 300},
    "ratings": {"train": 3000, "validation": 300, "test": 300},
    "thumbs": {"train": 3000, "validation": 300, "test": 300},
    "prompts": {"train": 1000, "validation": 200, "test": 600},
}

THUMBS_UP_THRESHOLD = 0.95


# ---------------------------------------------------------------- feedback shapes


def _draw(q: Question, rng: random.Random, k: int, distinct: bool) -> list[tuple[str, str, float]]:
    """k scored responses of random styles, with pairwise different gold scores if ``distinct``
    and the prompt allows it. Styles are scored lazily: scoring is the cost of generation."""
    order = list(styles(q))
    rng.shuffle(order)
    picked, spare = [], []
    for style in order:
        text = response(q, style, rng)
        item = (style, text, gold_score(q.text, text))
        if distinct and any(item[2] == p[2] or item[1] == p[1] for p in picked):
            spare.append(item)
            continue
        picked.append(item)
        if len(picked) == k:
            return picked
    return (picked + spare)[:k]


def _pair(q: Question, rng: random.Random, noise: float) -> dict:
    good, bad = sorted(_draw(q, rng, 2, distinct=True), key=lambda c: -c[2])
    if rng.random() < noise:
        good, bad = bad, good
    return {
        "prompt": q.text,
        "chosen": good[1],
        "rejected": bad[1],
        "category": q.category,
        "gold_chosen": good[2],
        "gold_rejected": bad[2],
    }


def _ranking(q: Question, rng: random.Random, noise: float) -> dict:
    # Unsafe prompts have only three score levels: their rankings break one tie at random.
    picked = _draw(q, rng, 4, distinct=True)
    rng.shuffle(picked)
    ranking = sorted(range(4), key=lambda i: (-picked[i][2], rng.random()))
    for i in range(3):
        if rng.random() < noise:
            ranking[i], ranking[i + 1] = ranking[i + 1], ranking[i]
    return {
        "prompt": q.text,
        "responses": [c[1] for c in picked],
        "ranking": ranking,
        "category": q.category,
        "gold_scores": [c[2] for c in picked],
    }


def rating_of(score: float) -> int:
    """Gold score -> 1..5 stars (0 -> 1, 1 -> 5)."""
    return 1 + int(score * 4 + 0.5)


def _rating(q: Question, rng: random.Random, noise: float) -> dict:
    picked = _draw(q, rng, 4, distinct=False)
    ratings = []
    for _, _, s in picked:
        delta = rng.choice((-1, 1))  # drawn even when unused: noise changes labels only
        ratings.append(min(5, max(1, rating_of(s) + (delta if rng.random() < noise else 0))))
    return {
        "prompt": q.text,
        "responses": [c[1] for c in picked],
        "ratings": ratings,
        "category": q.category,
        "gold_scores": [c[2] for c in picked],
    }


def _thumbs(q: Question, rng: random.Random, noise: float) -> list[dict]:
    """One thumbs-up-worthy and one thumbs-down-worthy response to the same prompt."""
    order = list(styles(q))
    rng.shuffle(order)
    found: dict[bool, tuple[str, float]] = {}
    for style in order:  # every prompt has both: its ideal response is always up
        text = response(q, style, rng)
        score = gold_score(q.text, text)
        found.setdefault(score >= THUMBS_UP_THRESHOLD, (text, score))
        if len(found) == 2:
            break
    out = [
        {
            "prompt": q.text,
            "completion": text,
            "label": up != (rng.random() < noise),
            "category": q.category,
            "gold_score": score,
        }
        for up, (text, score) in found.items()
    ]
    rng.shuffle(out)
    return out


def _sft(q: Question, rng: random.Random, mix: dict[str, dict[str, float]] | None) -> dict:
    style, text = demonstration(q, rng, mix)
    return {
        "prompt": q.text,
        "completion": text,
        "category": q.category,
        "gold_style": style,
        "gold_score": gold_score(q.text, text),
    }


# ---------------------------------------------------------------- generate / materialize


_SHAPES = {"pairs": _pair, "rankings": _ranking, "ratings": _rating, "thumbs": _thumbs}


def _resolve_sizes(sizes: dict | None) -> dict[str, dict[str, int]]:
    out = {k: dict(v) for k, v in DEFAULT_SIZES.items()}
    for kind, value in (sizes or {}).items():
        if kind not in out:
            raise ValueError(f"unknown kind {kind!r}; expected one of {KINDS}")
        value = dict(zip(SPLITS, value, strict=True)) if isinstance(value, (list, tuple)) else value
        for split, n in value.items():
            if split not in SPLITS:
                raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
            out[kind][split] = int(n)
    return out


def generate(
    seed: int = 0,
    noise: float = 0.1,
    sizes: dict | None = None,
    sft_mix: dict[str, dict[str, float]] | None = None,
) -> dict[str, dict[str, list[dict]]]:
    """kind -> split -> records; pure and deterministic for (seed, noise, sizes, sft_mix).

    ``sizes`` overrides ``DEFAULT_SIZES`` per kind, as {split: n} or (train, validation, test).
    Prompts of different splits come from disjoint units (an operand pair, a country, a word
    pair, an unsafe request phrasing), so a test question is never seen in training.
    """
    if not 0.0 <= noise <= 1.0:
        raise ValueError(f"noise must be in [0, 1], got {noise}")
    resolved = _resolve_sizes(sizes)
    pools = split_pools(seed)
    data: dict[str, dict[str, list[dict]]] = {}
    for kind in KINDS:
        data[kind] = {}
        for split in SPLITS:
            # One stream per (kind, split): resizing one kind leaves the others unchanged.
            rng = random.Random(f"{STREAM_SALT}-{seed}-{kind}-{split}")
            n, records = resolved[kind][split], []
            while len(records) < n:
                q = sample_question(rng, pools[split])
                if kind == "sft":
                    records.append(_sft(q, rng, sft_mix))
                elif kind == "prompts":
                    records.append({"prompt": q.text, "category": q.category})
                else:
                    shaped = _SHAPES[kind](q, rng, noise)
                    records.extend(shaped if isinstance(shaped, list) else [shaped])
            data[kind][split] = records[:n]
    return data


def task_dirname(seed: int = 0, noise: float = 0.1) -> str:
    return f"{TASK_VERSION}-seed{seed}-noise{noise:g}"


def materialize(root: str | os.PathLike, seed: int = 0, noise: float = 0.1) -> Path:
    """Write the task under root/<version-seed-noise>/<kind>/<split>.jsonl once and return that dir.

    Files are written into a private temporary dir and renamed into place, so readers never see a
    half-written task and concurrent callers all end up with the same complete dir.
    """
    root = Path(root)
    final = root / task_dirname(seed, noise)
    if final.is_dir():
        return final
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=root))
    try:
        data = generate(seed=seed, noise=noise)
        for kind, splits in data.items():
            (tmp / kind).mkdir()
            for split, records in splits.items():
                with open(tmp / kind / f"{split}.jsonl", "w", encoding="utf-8") as f:
                    f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
        meta = {
            "version": TASK_VERSION,
            "seed": seed,
            "noise": noise,
            "sizes": {k: {s: len(v) for s, v in d.items()} for k, d in data.items()},
        }
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        try:
            os.rename(tmp, final)
        except OSError:
            if not final.is_dir():  # a real failure, not a lost race
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final
