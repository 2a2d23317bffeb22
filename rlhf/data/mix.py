"""The RL prompt mix by category (data.prompt_mix): the training prompts drawn again so that the
named categories make up the given shares of them, reproducibly with the run's seed."""

from __future__ import annotations

import random
from collections.abc import Mapping

from rlhf.errors import DataError


def mix_problems(mix: Mapping[str, float]) -> list[tuple[str, str]]:
    """What is wrong with the shares themselves, as (key under data., message) pairs."""
    out = [
        (f"prompt_mix.{name}", f"must be a share in [0, 1], got {share}")
        for name, share in mix.items()
        if not 0.0 <= share <= 1.0
    ]
    total = sum(mix.values())
    if not out and total > 1.0 + 1e-9:
        out.append(("prompt_mix", f"shares sum to {total:g}, over 1"))
    return out


def _draw(pool: list, count: int, rng: random.Random) -> list:
    """`count` items of `pool`: without repeats while it lasts, then every item as often as the next."""
    out: list = []
    while len(out) < count:
        shuffled = list(pool)
        rng.shuffle(shuffled)
        out += shuffled
    return out[:count]


def mix_by_category(items: list[dict], mix: Mapping[str, float], seed: int) -> list[dict]:
    """As many prompts as `items`, round(share * n) of each category named in `mix` (an item's
    category is its "slice"), the rest from the unnamed categories in their own proportions.

    A category rarer than its share is repeated; one commoner is subsampled. Items without a
    category, or a named category no item has, are errors naming the key."""
    if not mix:
        return items
    categories = sorted({item["slice"] for item in items if "slice" in item})
    if not categories:
        raise DataError(
            "data.prompt_mix: the prompts name no category (a shipped task's prompts do, in their "
            "category column); set data.prompt_mix={} for these prompts"
        )
    for name in mix:
        if name not in categories:
            raise DataError(
                f"data.prompt_mix.{name}: no training prompt of category {name!r} "
                f"(categories: {', '.join(categories)})"
            )
    n, rng = len(items), random.Random(seed)
    counts = {name: round(share * n) for name, share in mix.items()}
    rest = [item for item in items if item.get("slice") not in mix]
    left = n - sum(counts.values())
    if left > 0 and not rest:
        raise DataError(
            f"data.prompt_mix: shares sum to {sum(mix.values()):g} but name every category "
            f"({', '.join(categories)}); they must sum to 1"
        )
    out = []
    for name, count in counts.items():
        out += _draw([item for item in items if item.get("slice") == name], count, rng)
    out += _draw(rest, max(left, 0), rng)
    rng.shuffle(out)
    return out
