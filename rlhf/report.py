"""The evaluation report: which policy is best by the chosen judge, whether it is clearly best, and
the tables a reader compares the policies by, as run metrics, Markdown and self-contained HTML.

Pure: per-prompt scores in, numbers and text out. The first policy is the baseline of the win rates.
The best policy has the highest win rate against the baseline by the judge (then the highest mean
score; the baseline itself counts as 0.5, so when nothing beats it the baseline is best). Whether it
is clearly best is a paired test on the same prompts: its own win rate against each other policy,
whose interval must lie above 0.5.
"""

from __future__ import annotations

import base64
import html as html_lib
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from statistics import NormalDist
from typing import NamedTuple

from rlhf.evaluation import WIN_RATE_INTERVAL, WinRate, mean, win_rate


class Judge(NamedTuple):
    name: str  # in sentences
    score_metric: str  # the metric name of its mean score
    column: str  # in table headers


JUDGES = {
    "gold": Judge("gold annotator", "gold_mean", "gold"),
    "rm": Judge("reward model", "reward_mean", "RM"),
}
# The role whose metrics the best policy's are copied under (eval/best/...).
BEST = "best"


class Estimate(NamedTuple):
    """A mean over the prompts and its confidence interval."""

    value: float
    low: float
    high: float


def mean_interval(values: Sequence[float], confidence: float) -> Estimate:
    """The mean and its normal-approximation interval, mean +- z * s / sqrt(n) with s the sample
    standard deviation (NaN bounds for fewer than two values)."""
    centre = mean(values)
    if len(values) < 2:
        return Estimate(centre, math.nan, math.nan)
    spread = math.sqrt(sum((v - centre) ** 2 for v in values) / (len(values) - 1))
    half = NormalDist().inv_cdf(0.5 + confidence / 2) * spread / math.sqrt(len(values))
    return Estimate(centre, centre - half, centre + half)


@dataclass
class PolicyScores:
    """What evaluation measured of one policy on the shared prompts."""

    # Its name in metrics and the report: its stage (sft, ppo), ppo_2 for a second PPO run.
    role: str
    # judge ("rm", "gold") -> one score per prompt, in the prompts' order
    scores: dict[str, list[float]]
    # KL to the reference of each response, nats
    kl: list[float]
    # Whole-set metrics: length, eos_share, distinct_1, distinct_2, perplexity.
    metrics: dict[str, float] = field(default_factory=dict)
    stage: str | None = None
    run_id: str | None = None
    # The model source as configured (base, a directory, runs:/...).
    source: str = ""


@dataclass
class Comparison:
    policies: list[PolicyScores]  # the first is the baseline
    judge: str  # the judge that picks the best policy
    confidence: float
    # role -> "rm" | "gold" | "kl" -> mean and interval
    means: dict[str, dict[str, Estimate]]
    # role -> judge -> win rate against the baseline (none for the baseline itself)
    win_rates: dict[str, dict[str, WinRate]]
    # category -> role -> judge -> mean score, and win rate against the baseline
    category_means: dict[str, dict[str, dict[str, float]]]
    category_win_rates: dict[str, dict[str, dict[str, WinRate]]]
    category_sizes: dict[str, int]
    # Roles from best to worst by the judge; empty with a single policy.
    ranking: list[str]
    # role -> the best policy's win rate against it on the same prompts, by the judge
    head_to_head: dict[str, WinRate]

    @property
    def n(self) -> int:
        return len(self.policies[0].kl)

    @property
    def baseline(self) -> PolicyScores:
        return self.policies[0]

    @property
    def best(self) -> PolicyScores | None:
        return self.policy(self.ranking[0]) if self.ranking else None

    @property
    def clears(self) -> bool:
        """Whether the best policy beats every other one on the same prompts with its interval above 0.5."""
        return bool(self.head_to_head) and all(w.low > 0.5 for w in self.head_to_head.values())

    def policy(self, role: str) -> PolicyScores:
        return next(p for p in self.policies if p.role == role)

    def judged_win_rate(self, role: str) -> float:
        """A policy's win rate against the baseline by the judge; the baseline's own is 0.5."""
        return self.win_rates[role][self.judge].rate if role in self.win_rates else 0.5


def compare(
    policies: Sequence[PolicyScores], categories: Sequence[str | None], judge: str, confidence: float
) -> Comparison:
    """Everything the report states, from the policies' per-prompt scores (the first policy is the
    baseline; `categories` holds each prompt's category, None where it has none)."""
    if judge not in policies[0].scores:
        raise ValueError(f"judge {judge!r} scored nothing; judges: {', '.join(policies[0].scores)}")
    baseline = policies[0]
    means = {
        p.role: {
            **{j: mean_interval(s, confidence) for j, s in p.scores.items()},
            "kl": mean_interval(p.kl, confidence),
        }
        for p in policies
    }
    win_rates = {
        p.role: {j: win_rate(s, baseline.scores[j], confidence) for j, s in p.scores.items()}
        for p in policies[1:]
    }
    category_means, category_win_rates, sizes = {}, {}, {}
    for name in sorted({c for c in categories if c is not None}):
        rows = [k for k, c in enumerate(categories) if c == name]
        sizes[name] = len(rows)
        category_means[name] = {
            p.role: {j: mean([s[k] for k in rows]) for j, s in p.scores.items()} for p in policies
        }
        category_win_rates[name] = {
            p.role: {
                j: win_rate([s[k] for k in rows], [baseline.scores[j][k] for k in rows], confidence)
                for j, s in p.scores.items()
            }
            for p in policies[1:]
        }
    comparison = Comparison(
        list(policies), judge, confidence, means, win_rates, category_means, category_win_rates, sizes, [], {}
    )
    if len(policies) > 1:
        # Highest win rate by the judge, then highest mean score; the earlier policy on equal terms.
        order = sorted(
            range(len(policies)),
            key=lambda i: (
                -comparison.judged_win_rate(policies[i].role),
                -means[policies[i].role][judge].value,
                i,
            ),
        )
        comparison.ranking = [policies[i].role for i in order]
        best = comparison.best
        comparison.head_to_head = {
            p.role: win_rate(best.scores[judge], p.scores[judge], confidence)
            for p in policies
            if p is not best
        }
    return comparison


# ---------------------------------------------------------------------------------------------------
# Run metrics


def metrics(comparison: Comparison) -> dict[str, float]:
    """The run's metrics, named by role (eval/ppo/win_rate_gold, eval/sft/gold_mean, per category
    eval/ppo/gold_mean/unsafe), and the best policy's again under eval/best/, with eval/best/win_rate
    (by the judge) and eval/best/vs_runner_up (its paired win rate against the runner-up)."""
    out: dict[str, float] = {}
    for p in comparison.policies:
        prefix = f"eval/{p.role}"
        for judge in p.scores:
            out[f"{prefix}/{JUDGES[judge].score_metric}"] = comparison.means[p.role][judge].value
        kl = comparison.means[p.role]["kl"].value
        out[f"{prefix}/kl"] = kl
        out[f"{prefix}/sqrt_kl"] = math.sqrt(max(kl, 0.0))
        out.update({f"{prefix}/{key}": value for key, value in p.metrics.items()})
        for judge, outcome in comparison.win_rates.get(p.role, {}).items():
            out.update(_win_rate_metrics(f"{prefix}/win_rate_{judge}", outcome))
            out.update(
                {
                    f"{prefix}/{name}_{judge}": float(getattr(outcome, name))
                    for name in ("wins", "ties", "losses")
                }
            )
        for category, by_role in comparison.category_means.items():
            for judge, value in by_role[p.role].items():
                out[f"{prefix}/{JUDGES[judge].score_metric}/{category}"] = value
            for judge, outcome in comparison.category_win_rates[category].get(p.role, {}).items():
                out.update(_win_rate_metrics(f"{prefix}/win_rate_{judge}/{category}", outcome))
    best = comparison.best
    if best is not None:
        prefix = f"eval/{best.role}/"
        out.update(
            {
                f"eval/{BEST}/{key[len(prefix) :]}": value
                for key, value in list(out.items())
                if key.startswith(prefix) and "/" not in key[len(prefix) :]
            }
        )
        out[f"eval/{BEST}/win_rate"] = comparison.judged_win_rate(best.role)
        if best.role in comparison.win_rates:
            outcome = comparison.win_rates[best.role][comparison.judge]
            out[f"eval/{BEST}/win_rate_low"], out[f"eval/{BEST}/win_rate_high"] = outcome.low, outcome.high
        out.update(
            _win_rate_metrics(f"eval/{BEST}/vs_runner_up", comparison.head_to_head[comparison.ranking[1]])
        )
    return out


def _win_rate_metrics(name: str, outcome: WinRate) -> dict[str, float]:
    return {name: outcome.rate, f"{name}_low": outcome.low, f"{name}_high": outcome.high}


# ---------------------------------------------------------------------------------------------------
# Text


@dataclass
class Table:
    title: str
    headers: list[str]
    rows: list[list[str]]
    # Rows to emphasise (the best policy's).
    marked: set[int] = field(default_factory=set)
    note: str = ""


def _short(run_id: str | None) -> str:
    return run_id[:8] if run_id else ""


def _name(p: PolicyScores) -> str:
    return f"{p.role} (run {_short(p.run_id)})" if p.run_id else p.role


def _fmt(value: float, digits: int = 3) -> str:
    return f"{value:.{digits}f}" if math.isfinite(value) else "–"


def _with_interval(estimate: Estimate | WinRate, digits: int = 3) -> str:
    value = estimate.rate if isinstance(estimate, WinRate) else estimate.value
    if not (math.isfinite(estimate.low) and math.isfinite(estimate.high)):
        return _fmt(value, digits)
    return f"{_fmt(value, digits)} [{_fmt(estimate.low, digits)}, {_fmt(estimate.high, digits)}]"


def _outcome(w: WinRate) -> str:
    return f"{_with_interval(w, 2)} ({w.wins}/{w.ties}/{w.losses})"


def judge_name(judge: str) -> str:
    return JUDGES[judge].name


def verdict(comparison: Comparison) -> list[str]:
    """The report's conclusion in plain sentences: which policy is best by the judge, and whether it
    clearly is (the paired comparisons on the same prompts)."""
    best, judge, level = comparison.best, comparison.judge, f"{comparison.confidence:.0%}"
    if best is None:
        return [f"One policy only ({comparison.baseline.role}): nothing to compare."]
    by = f"by the {judge_name(judge)}"
    baseline = comparison.baseline.role
    if best is comparison.baseline:
        lines = [
            f"Best {by}: {_name(best)}, the baseline: no other policy wins more than half of its comparisons "
            "against it."
        ]
    else:
        w = comparison.win_rates[best.role][judge]
        lines = [
            f"Best {by}: {_name(best)}, win rate against {baseline} {_with_interval(w, 2)} "
            f"({w.wins} wins, {w.ties} ties, {w.losses} losses)."
        ]
    against = comparison.head_to_head
    unclear = [role for role, w in against.items() if not w.low > 0.5]
    if not unclear:
        weakest = min(against, key=lambda role: against[role].low)
        lines.append(
            f"It is clearly best: on the same prompts its win rate against every other policy has its "
            f"{level} interval above 0.5 (the closest, {weakest}: {_with_interval(against[weakest], 2)})."
        )
    else:
        closest = ", ".join(f"{role} {_with_interval(against[role], 2)}" for role in unclear)
        each = "each of " if len(unclear) > 1 else ""
        lines.append(
            f"It is not clearly best: on the same prompts its win rate against {each}{closest} has a "
            f"{level} interval that reaches 0.5, so the order between them may be chance."
        )
    return lines


def tables(comparison: Comparison) -> list[Table]:
    """The report's tables: one row per policy, then per policy and category."""
    c, judge = comparison, comparison.judge
    baseline, best = c.baseline.role, c.best
    judges = [j for j in JUDGES if j in c.baseline.scores]
    categories = list(c.category_means)
    headers = ["policy", "stage", "run"]
    headers += [f"{JUDGES[j].column} mean" for j in judges]
    headers += [f"{JUDGES[j].column} win rate vs {baseline} (W/T/L)" for j in judges]
    if c.head_to_head:
        headers.append(f"{best.role} vs it, paired ({JUDGES[judge].column})")
    headers += ["KL to reference", "length"]
    headers += [f"gold: {name}" for name in categories if "gold" in judges]
    rows, marked = [], set()
    for index, p in enumerate(c.policies):
        row = [p.role, p.stage or "", _short(p.run_id) or p.source]
        row += [_with_interval(c.means[p.role][j]) for j in judges]
        row += [_outcome(c.win_rates[p.role][j]) if p.role in c.win_rates else "baseline" for j in judges]
        if c.head_to_head:
            row.append(_with_interval(c.head_to_head[p.role], 2) if p.role in c.head_to_head else "best")
        row += [_with_interval(c.means[p.role]["kl"]), _fmt(p.metrics.get("length", math.nan), 1)]
        row += [_fmt(c.category_means[name][p.role]["gold"]) for name in categories if "gold" in judges]
        rows.append(row)
        if best is p:
            marked.add(index)
    level = f"{c.confidence:.0%}"
    out = [
        Table(
            "Policies",
            headers,
            rows,
            marked,
            f"Means over the n = {c.n} prompts with {level} intervals (normal approximation). A win rate is "
            f"(wins + ties / 2) / n against {baseline} on the same prompts, with its {level} interval "
            f"({WIN_RATE_INTERVAL}) and wins/ties/losses; the paired column is the best policy's win rate "
            f"against each other policy by the {judge_name(judge)}. KL in nats per response, exact per token on the policy's own samples.",
        )
    ]
    extra = ["eos_share", "distinct_1", "distinct_2", "perplexity"]
    out.append(
        Table(
            "Behaviour",
            ["policy", "sqrt(KL)", "EOS share", "distinct-1", "distinct-2", "perplexity"],
            [
                [
                    p.role,
                    _fmt(math.sqrt(max(c.means[p.role]["kl"].value, 0.0))),
                    *(_fmt(p.metrics.get(key, math.nan)) for key in extra),
                ]
                for p in c.policies
            ],
            marked,
            "EOS share: responses that ended rather than being cut off; distinct-n: distinct n-grams over all n-grams of "
            "the responses; perplexity on the SFT data's test split.",
        )
    )
    if categories:
        rows = []
        for p in c.policies:
            for name in categories:
                row = [p.role, name, str(c.category_sizes[name])]
                for j in judges:
                    won = c.category_win_rates[name].get(p.role, {}).get(j)
                    row += [_fmt(c.category_means[name][p.role][j]), _outcome(won) if won else "baseline"]
                rows.append(row)
        headers = ["policy", "category", "n"]
        for j in judges:
            headers += [f"{JUDGES[j].column} mean", f"{JUDGES[j].column} win rate vs {baseline} (W/T/L)"]
        out.append(
            Table(
                "By category",
                headers,
                rows,
                note=f"Win rates with {level} intervals over each category's prompts.",
            )
        )
    return out


def markdown_table(table: Table) -> str:
    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |"

    rows = [[f"**{row[0]}**", *row[1:]] if i in table.marked else row for i, row in enumerate(table.rows)]
    body = [line(table.headers), "| " + " | ".join("---" for _ in table.headers) + " |", *map(line, rows)]
    return "\n".join(body)


def markdown(comparison: Comparison, about: Mapping[str, str], plots: Mapping[str, str] = ()) -> str:
    """The whole report as Markdown. `about` holds the settings shown (label -> value); `plots`
    (caption -> relative path of a PNG) are linked."""
    sentences = verdict(comparison)
    lines = ["# Evaluation report", "", f"**{sentences[0]}**", "", *sentences[1:], ""]
    lines += [f"- {label}: {value}" for label, value in about.items()]
    for table in tables(comparison):
        lines += ["", f"## {table.title}", "", markdown_table(table), "", table.note]
    if plots:
        lines += ["", "## Plots", ""]
        lines += [f"![{caption}]({path})\n" for caption, path in dict(plots).items()]
    return "\n".join(lines).rstrip() + "\n"


def summary(comparison: Comparison, about: Mapping[str, str], limit: int = 5000) -> str:
    """The run's description (MLflow's note, shown on the run's Overview): the conclusion and one
    short table, within `limit` characters."""
    c = comparison
    sentences = verdict(c)
    lines = [f"**{sentences[0]}**", "", *sentences[1:], ""]
    judges = [j for j in JUDGES if j in c.baseline.scores]
    table = Table(
        "",
        [
            "policy",
            "run",
            *(f"{JUDGES[j].column} win rate vs {c.baseline.role}" for j in judges),
            *(f"{JUDGES[j].column} mean" for j in judges),
            "KL",
        ],
        [
            [
                p.role,
                _short(p.run_id) or p.source,
                *(
                    _with_interval(c.win_rates[p.role][j], 2) if p.role in c.win_rates else "baseline"
                    for j in judges
                ),
                *(_fmt(c.means[p.role][j].value) for j in judges),
                _fmt(c.means[p.role]["kl"].value),
            ]
            for p in c.policies
        ],
        {i for i, p in enumerate(c.policies) if p is c.best},
    )
    lines += [markdown_table(table), ""]
    lines.append("; ".join(f"{label}: {value}" for label, value in about.items()))
    lines.append("")
    lines.append("The whole report: artifacts `report.html` (plots included) and `report.md`.")
    text = "\n".join(lines)
    if len(text) > limit:  # many policies: the conclusion alone
        text = "\n".join(
            [
                f"**{sentences[0]}**",
                *sentences[1:],
                "",
                "The whole report: artifacts `report.html` and `report.md`.",
            ]
        )
    return text[:limit]


STYLE = """
body { font: 15px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: #1d232a; margin: 0;
       background: #f6f7f9; }
main { max-width: 1200px; margin: 0 auto; padding: 24px 32px 48px; background: #fff; }
h1 { font-size: 24px; margin: 0 0 12px; }
h2 { font-size: 18px; margin: 32px 0 8px; border-bottom: 1px solid #e3e6ea; padding-bottom: 4px; }
.verdict { font-size: 16px; background: #eef5ff; border-left: 4px solid #2f6fde; padding: 10px 14px; margin: 0 0 16px; }
.verdict p { margin: 4px 0; }
dl { display: grid; grid-template-columns: max-content 1fr; gap: 2px 16px; margin: 0; font-size: 14px; }
dt { color: #5b6570; } dd { margin: 0; word-break: break-all; }
.scroll { overflow-x: auto; }
table { border-collapse: collapse; font-size: 13.5px; font-variant-numeric: tabular-nums; }
th, td { border: 1px solid #dde1e6; padding: 4px 8px; text-align: right; white-space: nowrap; }
th { background: #f0f2f5; position: sticky; top: 0; }
td:first-child, th:first-child { text-align: left; }
tr.best td { background: #fff8dc; font-weight: 600; }
.note { color: #5b6570; font-size: 13px; max-width: 900px; }
figure { margin: 16px 0; } figure img { max-width: 100%; border: 1px solid #e3e6ea; }
figcaption { color: #5b6570; font-size: 13px; }
"""


def html(
    comparison: Comparison, about: Mapping[str, str], images: Mapping[str, bytes] = (), title: str = ""
) -> str:
    """The whole report as one self-contained HTML page: the plots (caption -> PNG bytes) embedded."""
    esc = html_lib.escape
    sentences = verdict(comparison)
    parts = [
        "<!doctype html>",
        '<html lang="en">',
        "<head>",
        '<meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{esc(title or 'Evaluation report')}</title>",
        f"<style>{STYLE}</style>",
        "</head>",
        "<body><main>",
        f"<h1>{esc(title or 'Evaluation report')}</h1>",
        '<div class="verdict">',
        f"<p><strong>{esc(sentences[0])}</strong></p>",
        *(f"<p>{esc(s)}</p>" for s in sentences[1:]),
        "</div>",
        "<dl>",
        *(f"<dt>{esc(label)}</dt><dd>{esc(value)}</dd>" for label, value in about.items()),
        "</dl>",
    ]
    for table in tables(comparison):
        parts += [
            f"<h2>{esc(table.title)}</h2>",
            '<div class="scroll"><table>',
            "<thead><tr>" + "".join(f"<th>{esc(h)}</th>" for h in table.headers) + "</tr></thead><tbody>",
        ]
        for i, row in enumerate(table.rows):
            marked = ' class="best"' if i in table.marked else ""
            parts.append(f"<tr{marked}>" + "".join(f"<td>{esc(cell)}</td>" for cell in row) + "</tr>")
        parts += ["</tbody></table></div>", f'<p class="note">{esc(table.note)}</p>']
    if images:
        parts.append("<h2>Plots</h2>")
        for caption, png in dict(images).items():
            data = base64.b64encode(png).decode("ascii")
            parts.append(
                f'<figure><img src="data:image/png;base64,{data}" alt="{esc(caption)}">'
                f"<figcaption>{esc(caption)}</figcaption></figure>"
            )
    parts += ["</main></body>", "</html>"]
    return "\n".join(parts) + "\n"
