"""The evaluation report from fixed results: the best policy and whether it is clearly best, the
metrics named by role, the Markdown, HTML and run description, and the plots."""

from __future__ import annotations

import math
import re

import pytest

from rlhf.evaluation import WIN_RATE_INTERVAL, win_rate
from rlhf.report import PolicyScores, compare, html, markdown, mean_interval, metrics, summary, verdict

N = 40
CATEGORIES = ["arithmetic"] * 20 + ["unsafe"] * 20
SFT_GOLD = [0.0] * 20 + [0.5] * 20


def _policy(
    role: str, gold: list[float], rm: list[float], kl: float, run_id: str | None = None
) -> PolicyScores:
    return PolicyScores(
        role,
        {"rm": rm, "gold": gold},
        [kl] * N,
        {"length": 12.0, "eos_share": 1.0},
        stage=role.split("_")[0],
        run_id=run_id,
        source=f"runs:/{run_id}/model" if run_id else "base",
    )


def _policies() -> list[PolicyScores]:
    """SFT; PPO better than SFT on 30 prompts and than DPO on 25 (by gold); DPO better than SFT on 10;
    GRPO pleases the reward model most but the gold annotator least."""
    sft = _policy("sft", SFT_GOLD, [0.0] * N, 0.0, "a" * 32)
    ppo = _policy("ppo", [1.0] * 30 + SFT_GOLD[30:], [1.0] * N, 0.7, "b" * 32)
    dpo = _policy("dpo", [1.0] * 10 + [0.2] * 5 + SFT_GOLD[15:], [0.5] * N, 0.5, "c" * 32)
    grpo = _policy("grpo", [-1.0] * 10 + SFT_GOLD[10:], [2.0] * N, 2.0, "d" * 32)
    return [sft, ppo, dpo, grpo]


def test_best_policy_by_gold_clears_the_others_on_the_same_prompts():
    comparison = compare(_policies(), CATEGORIES, "gold", 0.95)
    assert comparison.ranking == ["ppo", "dpo", "sft", "grpo"]
    assert comparison.best.role == "ppo"
    ppo_gold = comparison.win_rates["ppo"]["gold"]
    assert (ppo_gold.wins, ppo_gold.ties, ppo_gold.losses) == (30, 10, 0)
    # The paired comparison: PPO's own win rate against each other policy on the same prompts.
    dpo_gold = [1.0] * 10 + [0.2] * 5 + SFT_GOLD[15:]
    assert comparison.head_to_head["dpo"] == win_rate([1.0] * 30 + SFT_GOLD[30:], dpo_gold, 0.95)
    assert comparison.head_to_head["sft"] == ppo_gold
    assert set(comparison.head_to_head) == {"sft", "dpo", "grpo"}
    assert all(w.low > 0.5 for w in comparison.head_to_head.values()) and comparison.clears
    first, second = verdict(comparison)
    assert first.startswith("Best by the gold annotator: ppo (run bbbbbbbb), win rate against sft 0.88")
    assert "(30 wins, 10 ties, 0 losses)" in first
    assert second.startswith("It is clearly best") and "the closest, dpo" in second


def test_the_judge_decides_and_a_close_runner_up_is_not_cleared():
    """By the reward model GRPO is best; by gold PPO is, and against a near-copy of it PPO is not clearly best."""
    by_rm = compare(_policies(), CATEGORIES, "rm", 0.95)
    assert by_rm.best.role == "grpo" and by_rm.ranking[0] == "grpo"
    twin_gold = [1.0] * 29 + SFT_GOLD[29:]  # PPO's gold scores but one prompt
    policies = [*_policies()[:2], _policy("ppo_2", twin_gold, [1.0] * N, 0.6, "e" * 32)]
    comparison = compare(policies, CATEGORIES, "gold", 0.95)
    assert comparison.best.role == "ppo" and comparison.ranking[1] == "ppo_2"
    assert comparison.head_to_head["ppo_2"].low <= 0.5 and not comparison.clears
    assert (
        "It is not clearly best" in verdict(comparison)[1]
        and "against ppo_2 0.51 [" in verdict(comparison)[1]
    )


def test_equal_win_rates_fall_back_to_the_mean_score_then_to_the_order():
    sft = _policy("sft", [0.5] * N, [0.0] * N, 0.0)
    # The same wins, ties and losses against SFT; the second wins by more.
    small = _policy("ppo", [0.6] * N, [0.1] * N, 0.1)
    large = _policy("dpo", [0.9] * N, [0.1] * N, 0.1)
    assert compare([sft, small, large], [None] * N, "gold", 0.95).best.role == "dpo"
    same = _policy("grpo", [0.6] * N, [0.1] * N, 0.1)
    assert compare([sft, small, same], [None] * N, "gold", 0.95).ranking[:2] == ["ppo", "grpo"]


def test_when_nothing_beats_the_baseline_the_baseline_is_best():
    sft = _policy("sft", [1.0] * N, [1.0] * N, 0.0, "a" * 32)
    worse = _policy("ppo", [0.0] * 5 + [1.0] * 35, [0.0] * N, 0.5, "b" * 32)
    comparison = compare([sft, worse], [None] * N, "gold", 0.95)
    assert comparison.best is comparison.baseline
    assert "the baseline" in verdict(comparison)[0]
    values = metrics(comparison)
    assert values["eval/best/win_rate"] == 0.5 and values["eval/best/gold_mean"] == 1.0
    assert values["eval/best/vs_runner_up"] == pytest.approx(1 - values["eval/ppo/win_rate_gold"])
    assert "eval/best/win_rate_low" not in values  # the baseline has no win rate against itself


def test_metrics_are_named_by_role_and_the_best_is_repeated_under_best():
    values = metrics(compare(_policies(), CATEGORIES, "gold", 0.95))
    assert not [key for key in values if re.search(r"[0-9a-f]{8}", key)]
    assert values["eval/ppo/win_rate_gold"] == pytest.approx(0.875)
    assert values["eval/ppo/wins_gold"] == 30 and values["eval/ppo/ties_gold"] == 10
    assert values["eval/ppo/win_rate_gold_low"] < 0.875 < values["eval/ppo/win_rate_gold_high"]
    assert values["eval/sft/gold_mean"] == pytest.approx(0.25) and "eval/sft/win_rate_gold" not in values
    assert values["eval/ppo/kl"] == pytest.approx(0.7) and values["eval/ppo/sqrt_kl"] == pytest.approx(
        0.7**0.5
    )
    assert values["eval/ppo/gold_mean/arithmetic"] == 1.0 and values["eval/ppo/gold_mean/unsafe"] == 0.75
    assert values["eval/ppo/win_rate_gold/unsafe"] == pytest.approx(0.75)
    assert "eval/ppo/win_rate_gold/unsafe_low" in values
    assert values["eval/ppo/length"] == 12.0
    for key in ("win_rate_gold", "win_rate_rm", "gold_mean", "reward_mean", "kl", "wins_gold"):
        assert values[f"eval/best/{key}"] == values[f"eval/ppo/{key}"], key
    assert values["eval/best/win_rate"] == values["eval/ppo/win_rate_gold"]  # the judge's
    assert values["eval/best/vs_runner_up"] == pytest.approx(
        win_rate([1.0] * 30 + SFT_GOLD[30:], [1.0] * 10 + [0.2] * 5 + SFT_GOLD[15:]).rate
    )
    assert not [key for key in values if key.startswith("eval/best/") and key.count("/") > 2]


def test_mean_interval_matches_hand_computation():
    # mean 2, sample sd 1, n 4: 2 +- 1.95996 * 1 / 2
    value, low, high = mean_interval([1.0, 2.0, 3.0, 2.0 + 0.0], 0.95)
    sd = math.sqrt(2 / 3)
    assert value == 2.0 and (low, high) == pytest.approx(
        (2 - 1.959964 * sd / 2, 2 + 1.959964 * sd / 2), abs=1e-5
    )
    assert math.isnan(mean_interval([1.0], 0.95).low)


ABOUT = {
    "Prompts": "40 from the test split of task:assistant/prompts",
    "Judge of the best policy": "gold annotator",
}


def test_markdown_report_has_a_row_per_policy_with_intervals_and_outcomes():
    text = markdown(
        compare(_policies(), CATEGORIES, "gold", 0.95), ABOUT, {"Win rates": "plots/win_rates.png"}
    )
    assert text.startswith("# Evaluation report\n\n**Best by the gold annotator: ppo (run bbbbbbbb)")
    policies_table = text.split("## Policies")[1].split("##")[0]
    rows = {line.split("|")[1].strip(): line for line in policies_table.splitlines() if line.startswith("| ")}
    assert {"**ppo**", "sft", "dpo", "grpo"} <= set(rows)  # the best row emphasised
    ppo = rows["**ppo**"]
    assert (
        "bbbbbbbb" in ppo and "0.88 [" in ppo and "(30/10/0)" in ppo and "1.000" in ppo
    )  # gold on arithmetic
    assert "baseline" in rows["sft"]
    assert "gold: arithmetic" in text and "gold: unsafe" in text
    assert "| ppo | unsafe | 20 |" in text  # the per-category table
    assert "- Prompts: 40 from the test split" in text
    assert "![Win rates](plots/win_rates.png)" in text
    assert "Wilson" not in text and "95% interval" in text
    assert WIN_RATE_INTERVAL in text  # the method of the win rates' intervals, named


def test_html_report_stands_alone_and_escapes_what_it_shows():
    policies = _policies()
    policies[2].source = "<script>alert(1)</script>"
    policies[2].run_id = None
    page = html(
        compare(policies, CATEGORIES, "gold", 0.95), ABOUT, {"Win rates": b"\x89PNG fake"}, title="Eval & co"
    )
    assert page.startswith("<!doctype html>") and page.rstrip().endswith("</html>")
    assert "<script>" not in page and "&lt;script&gt;" in page
    assert "Eval &amp; co" in page
    assert 'src="data:image/png;base64,iVBORyBmYWtl"' in page  # the plot embedded, no file beside it
    assert not re.search(r"(src|href)=\"(?!data:)", page)  # nothing fetched from elsewhere
    assert page.count('<tr class="best">') == 2  # the best row of the policy and behaviour tables
    assert "Best by the gold annotator: ppo" in page


def test_summary_is_the_conclusion_and_a_short_table_within_the_tag_limit():
    comparison = compare(_policies(), CATEGORIES, "gold", 0.95)
    text = summary(comparison, ABOUT)
    assert text.startswith("**Best by the gold annotator: ppo")
    assert "| **ppo** | bbbbbbbb | 0.88 [" in text and "report.html" in text
    many = [_policy("sft", SFT_GOLD, [0.0] * N, 0.0)] + [
        _policy(f"ppo_{i}", SFT_GOLD, [0.0] * N, 0.1) for i in range(80)
    ]
    short = summary(compare(many, CATEGORIES, "gold", 0.95), ABOUT)
    assert len(short) <= 5000 and short.startswith("**Best by the gold annotator")


def test_a_single_policy_has_nothing_to_compare():
    comparison = compare(_policies()[:1], CATEGORIES, "gold", 0.95)
    assert comparison.best is None and not comparison.clears
    assert verdict(comparison) == ["One policy only (sft): nothing to compare."]
    assert not [key for key in metrics(comparison) if key.startswith("eval/best/")]
    assert "sft" in markdown(comparison, ABOUT)


def test_eval_plots_name_policies_by_role_with_intervals_and_n():
    from matplotlib.container import ErrorbarContainer

    from rlhf import plots
    from rlhf.stages.evaluate.module import figures

    comparison = compare(_policies(), CATEGORIES, "gold", 0.95)
    made = {name: figure for _, name, figure in figures(comparison)}
    try:
        scatter = made["reward_vs_sqrt_kl.png"]
        texts = {t.get_text() for ax in scatter.axes for t in ax.texts}
        assert texts == {"sft", "ppo", "dpo", "grpo"}
        assert "n = 40" in scatter._suptitle.get_text()
        for ax in scatter.axes:
            bars = [c for c in ax.containers if isinstance(c, ErrorbarContainer)]
            assert len(bars) == 4 and all(b.has_yerr and b.has_xerr for b in bars)
            # every interval inside the axis: the scale shows how far apart the means are next to their noise
            low, high = ax.get_ylim()
            judge = "rm" if "reward" in ax.get_ylabel() else "gold"
            for role in ("sft", "ppo", "dpo", "grpo"):
                estimate = comparison.means[role][judge]
                assert low <= estimate.low and estimate.high <= high
        bars = made["win_rates.png"].axes[0]
        assert [t.get_text() for t in bars.get_xticklabels()] == ["ppo", "dpo", "grpo"]
        assert "n = 40" in bars.get_title() and "95% intervals" in bars.get_title()
        assert bars.get_ylim() == (0.0, 1.0)
        assert {t.get_text() for t in bars.get_legend().get_texts()} == {
            "judged by gold annotator",
            "judged by reward model",
        }
    finally:
        for figure in made.values():
            plots.close(figure)


def test_policies_are_named_by_stage_a_repeated_stage_numbered():
    from rlhf.stages.evaluate.module import policy_roles

    assert policy_roles(["sft", "ppo", "ppo", "base", "policy", "ppo"]) == [
        "sft",
        "ppo",
        "ppo_2",
        "base",
        "policy",
        "ppo_3",
    ]
