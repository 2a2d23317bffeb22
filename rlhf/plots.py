"""Figures logged as run artifacts. Pure: arrays in, matplotlib figures out (Agg, no display)."""

from __future__ import annotations

from dataclasses import dataclass, field

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def calibration_table(chosen: np.ndarray, rejected: np.ndarray, bins: int) -> dict[str, list[float]]:
    """Predicted P(first preferred) = sigmoid(r_first - r_second) against how often it was preferred.

    Each labelled pair is counted in both orders (p with outcome 1, 1 - p with outcome 0), so the
    table spans [0, 1] and a perfectly calibrated model lies on the diagonal.
    """
    p = 1.0 / (1.0 + np.exp(-(chosen - rejected)))
    predicted = np.concatenate([p, 1.0 - p])
    observed = np.concatenate([np.ones_like(p), np.zeros_like(p)])
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(predicted, edges[1:-1]), 0, bins - 1)
    table: dict[str, list[float]] = {
        "bin_low": [],
        "bin_high": [],
        "predicted": [],
        "observed": [],
        "count": [],
    }
    for b in range(bins):
        members = which == b
        if not members.any():
            continue
        table["bin_low"].append(float(edges[b]))
        table["bin_high"].append(float(edges[b + 1]))
        table["predicted"].append(float(predicted[members].mean()))
        table["observed"].append(float(observed[members].mean()))
        table["count"].append(int(members.sum()))
    return table


def expected_calibration_error(table: dict[str, list[float]]) -> float:
    counts = np.asarray(table["count"], dtype=float)
    gaps = np.abs(np.asarray(table["predicted"]) - np.asarray(table["observed"]))
    return float((counts * gaps).sum() / counts.sum()) if counts.sum() else 0.0


def calibration_figure(table: dict[str, list[float]], title: str):
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=1, label="perfect calibration")
    ax.plot(table["predicted"], table["observed"], marker="o", label="reward model")
    ax.set_xlabel("predicted P(preferred) = sigmoid(r_a - r_b)")
    ax.set_ylabel("observed share preferred")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_title(title)
    ax.legend(loc="upper left")
    fig.tight_layout()
    return fig


def reward_histogram(chosen: np.ndarray, rejected: np.ndarray, title: str):
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    low, high = float(min(chosen.min(), rejected.min())), float(max(chosen.max(), rejected.max()))
    edges = np.linspace(low, high if high > low else low + 1.0, 31)
    ax.hist(chosen, bins=edges, alpha=0.6, label=f"chosen (mean {chosen.mean():.2f})")
    ax.hist(rejected, bins=edges, alpha=0.6, label=f"rejected (mean {rejected.mean():.2f})")
    ax.set_xlabel("reward")
    ax.set_ylabel("responses")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    return fig


@dataclass
class KLCurve:
    """A policy's (or a run's validations') mean reward-model and gold scores at distances from the
    reference, the distance as sqrt(KL), the scale on which Gao et al. (2022) find both curves simple.
    Points may carry intervals (low, high), drawn as error bars: a policy's means over n prompts do."""

    sqrt_kl: list[float] = field(default_factory=list)
    reward: list[float] = field(default_factory=list)
    gold: list[float] = field(default_factory=list)
    sqrt_kl_interval: list[tuple[float, float]] = field(default_factory=list)
    reward_interval: list[tuple[float, float]] = field(default_factory=list)
    gold_interval: list[tuple[float, float]] = field(default_factory=list)

    def add(
        self,
        kl: float,
        reward: float,
        gold: float = float("nan"),
        *,
        kl_interval: tuple[float, float] | None = None,
        reward_interval: tuple[float, float] | None = None,
        gold_interval: tuple[float, float] | None = None,
    ) -> None:
        self.sqrt_kl.append(float(np.sqrt(max(kl, 0.0))))
        self.reward.append(float(reward))
        self.gold.append(float(gold))
        if kl_interval is not None:
            self.sqrt_kl_interval.append(tuple(float(np.sqrt(max(k, 0.0))) for k in kl_interval))
        if reward_interval is not None:
            self.reward_interval.append(tuple(map(float, reward_interval)))
        if gold_interval is not None:
            self.gold_interval.append(tuple(map(float, gold_interval)))


def _error_bars(values: list[float], intervals: list) -> np.ndarray | None:
    """matplotlib's (2, N) distances below and above each value, if every value has an interval."""
    if not intervals or len(intervals) != len(values):
        return None
    low, high = np.asarray(intervals, dtype=float).T
    return np.nan_to_num(np.stack([np.asarray(values) - low, high - np.asarray(values)]).clip(min=0.0))


def reward_vs_sqrt_kl(curves: dict[str, KLCurve], title: str):
    """Reward-model score and gold score against sqrt(KL to the reference), one line (or point) per
    curve: over-optimisation shows as the reward model's score rising while the gold score falls."""

    def measured(attribute: str) -> bool:
        return any(np.isfinite(v) for c in curves.values() for v in getattr(c, attribute))

    # DPO has no reward model: its points are on the gold panel only.
    panels = [("reward model score", "reward")] if measured("reward") or not measured("gold") else []
    panels += [("gold score", "gold")] if measured("gold") else []
    fig, axes = plt.subplots(1, len(panels), figsize=(4.8 * len(panels), 4), squeeze=False)
    for ax, (name, attribute) in zip(axes[0], panels):
        for label, curve in curves.items():
            values = getattr(curve, attribute)
            bars = ax.errorbar(
                curve.sqrt_kl,
                values,
                yerr=_error_bars(values, getattr(curve, f"{attribute}_interval")),
                xerr=_error_bars(curve.sqrt_kl, curve.sqrt_kl_interval),
                marker="o",
                markersize=4,
                capsize=3,
                elinewidth=1,
                label=label,
            )
            if len(values) == 1 or len(curves) > 1:
                ax.annotate(
                    label,
                    (curve.sqrt_kl[-1], values[-1]),
                    fontsize=7,
                    xytext=(3, 3),
                    textcoords="offset points",
                    color=bars[0].get_color(),
                )
        # sqrt(KL) is never negative: the axis starts just left of 0, so a point at 0 shows whole.
        ax.set_xlim(left=-0.03 * max(ax.get_xlim()[1], 0.1))
        ax.set_xlabel("sqrt(KL to the reference), sqrt(nats per response)")
        ax.set_ylabel(f"mean {name}")
        ax.set_title(f"{name} vs sqrt(KL)")
        if len(curves) > 1:
            ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig


def win_rates(wins: dict, baseline: str, confidence: float, n: int):
    """Win rate of each policy against the baseline on the same n prompts, per judge, with its
    confidence interval, on the whole [0, 1] scale."""
    fig, ax = plt.subplots(figsize=(6, 3.5))
    labels = list(wins)
    judges = sorted({judge for judged in wins.values() for judge in judged})
    width = 0.8 / max(len(judges), 1)
    for j, judge in enumerate(judges):
        xs = [i + j * width for i in range(len(labels))]
        rates = [wins[label][judge].rate for label in labels]
        # clipped at 0: an interval's bound computed in floating point may pass its rate by a rounding error
        lows = [max(r - wins[label][judge].low, 0.0) for label, r in zip(labels, rates)]
        highs = [max(wins[label][judge].high - r, 0.0) for label, r in zip(labels, rates)]
        ax.bar(xs, rates, width=width, yerr=[lows, highs], capsize=4, label=f"judged by {judge}")
    ax.axhline(0.5, color="grey", linestyle="--", linewidth=1)
    ax.set_xticks([i + width * (len(judges) - 1) / 2 for i in range(len(labels))], labels, fontsize=9)
    ax.set_ylim(0, 1)
    ax.set_ylabel(f"win rate vs {baseline}")
    ax.set_title(
        f"Win rates vs {baseline}, n = {n} prompts ({confidence:.0%} intervals; a tie counts half)",
        fontsize=9,
    )
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def close(fig) -> None:
    plt.close(fig)
