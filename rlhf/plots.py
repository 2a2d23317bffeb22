"""Figures logged as run artifacts. Pure: arrays in, matplotlib figures out (Agg, no display)."""

from __future__ import annotations

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


def close(fig) -> None:
    plt.close(fig)
