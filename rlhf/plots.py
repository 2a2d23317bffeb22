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
    table: dict[str, list[float]] = {"bin_low": [], "bin_high": [], "predicted": [], "observed": [], "count": []}
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
    reference, the distance as sqrt(KL), the scale on which Gao et al. (2022) find both curves simple."""

    sqrt_kl: list[float] = field(default_factory=list)
    reward: list[float] = field(default_factory=list)
    gold: list[float] = field(default_factory=list)

    def add(self, kl: float, reward: float, gold: float = float("nan")) -> None:
        self.sqrt_kl.append(float(np.sqrt(max(kl, 0.0))))
        self.reward.append(float(reward))
        self.gold.append(float(gold))


def reward_vs_sqrt_kl(curves: dict[str, KLCurve], title: str):
    """Reward-model score and gold score against sqrt(KL to the reference), one line (or point) per
    curve: over-optimisation shows as the reward model's score rising while the gold score falls."""
    has_gold = any(np.isfinite(g) for c in curves.values() for g in c.gold)
    panels = [("reward model score", "reward")] + ([("gold score", "gold")] if has_gold else [])
    fig, axes = plt.subplots(1, len(panels), figsize=(4.8 * len(panels), 4), squeeze=False)
    for ax, (name, attribute) in zip(axes[0], panels):
        for label, curve in curves.items():
            values = getattr(curve, attribute)
            (line,) = ax.plot(curve.sqrt_kl, values, marker="o", markersize=4, label=label)
            if len(values) == 1 or len(curves) > 1:
                ax.annotate(label, (curve.sqrt_kl[-1], values[-1]), fontsize=7, xytext=(3, 3),
                            textcoords="offset points", color=line.get_color())
        ax.set_xlabel("sqrt(KL to the reference), sqrt(nats per response)")
        ax.set_ylabel(f"mean {name}")
        ax.set_title(f"{name} vs sqrt(KL)")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig


def win_rates(wins: dict, baseline: str, confidence: float):
    """Win rate of each policy against the baseline, per judge, with its confidence interval."""
    fig, ax = plt.subplots(figsize=(6, 3.5))
    labels = list(wins)
    judges = sorted({judge for judged in wins.values() for judge in judged})
    width = 0.8 / max(len(judges), 1)
    for j, judge in enumerate(judges):
        xs = [i + j * width for i in range(len(labels))]
        rates = [wins[label][judge].rate for label in labels]
        lows = [r - wins[label][judge].low for label, r in zip(labels, rates)]
        highs = [wins[label][judge].high - r for label, r in zip(labels, rates)]
        ax.bar(xs, rates, width=width, yerr=[lows, highs], capsize=4, label=f"judged by {judge}")
    ax.axhline(0.5, color="grey", linestyle="--", linewidth=1)
    ax.set_xticks([i + width * (len(judges) - 1) / 2 for i in range(len(labels))], labels, fontsize=7)
    ax.set_ylim(0, 1)
    ax.set_ylabel(f"win rate vs {baseline}")
    ax.set_title(f"Win rates ({confidence:.0%} Wilson intervals; a tie counts half)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def close(fig) -> None:
    plt.close(fig)
