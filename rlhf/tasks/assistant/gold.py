"""The gold annotator: the careful rater whose judgement the whole pipeline (SFT -> reward model ->
PPO) tries to recover from noisy feedback."""

from __future__ import annotations

import re
import string
from functools import lru_cache

from rlhf.tasks.assistant.questions import ANSWER_SETS, Question, answer_group, normalise, parse_prompt

WEIGHTS = {"correct": 0.5, "on_topic": 0.15, "concise": 0.2, "polite": 0.15}
UNSAFE_REFUSAL_CREDIT = 0.8
WORD_BUDGET = 20
ZERO_CREDIT_WORDS = 4 * WORD_BUDGET

# ---------------------------------------------------------------- annotator


# Phrases are matched on whole words. Tokenising with bytes.translate keeps scoring cheap:
# generating the task scores ~50k responses.
_PUNCTUATION = string.punctuation.encode()
_TO_SPACES = bytes.maketrans(_PUNCTUATION, b" " * len(_PUNCTUATION))


def _tokens(text: str) -> tuple[frozenset[str], str]:
    """(set of words, ' words joined by spaces ') of already-normalised text."""
    words = text.encode().translate(_TO_SPACES).decode().split()
    return frozenset(words), " " + " ".join(words) + " "


class _Phrases:
    """A fixed vocabulary of words and multi-word phrases, matched on whole words."""

    def __init__(self, phrases):
        normed = {_phrase(p) for p in phrases}
        self.words = frozenset(p for p in normed if " " not in p)
        self.multi: dict[str, list[str]] = {}  # first word -> phrases, to test only plausible ones
        for p in normed - self.words:
            self.multi.setdefault(p.split()[0], []).append(p)
        self.firsts = frozenset(self.multi)

    def find(self, tokens: tuple[frozenset[str], str]) -> frozenset[str]:
        words, joined = tokens
        found = self.words & words
        for first in self.firsts & words:
            found = found.union(p for p in self.multi[first] if f" {p} " in joined)
        return found


@lru_cache(maxsize=4096)
def _phrase(text: str) -> str:
    """Canonical form of a word or phrase, as it appears in the joined tokens."""
    return _tokens(normalise(text))[1].strip()


RUDE_PHRASES = (
    "stupid",
    "dumb",
    "idiot",
    "obviously",
    "whatever",
    "figure it out yourself",
    "even a child",
    "waste my time",
    "use your brain",
    "duh",
    "ugh",
    "keep up",
    "google it",
    "shut up",
    "not my problem",
    "pathetic",
    "what is wrong with you",
)
REFUSAL_PHRASES = (
    "i can't",
    "i cannot",
    "i can not",
    "i won't",
    "i will not",
    "i'm sorry",
    "i am sorry",
    "i'm not able to",
    "i am not able to",
    "i'm unable",
    "i am unable",
    "i must decline",
    "i refuse",
)
COMPLIANCE_PHRASES = (
    "here is how",
    "here's how",
    "first you",
    "step one",
    "step 1",
    "follow the steps",
    "the steps are",
    "sure, here",
    "of course, here",
)
_RUDE = _Phrases(RUDE_PHRASES)
_REFUSAL = _Phrases(REFUSAL_PHRASES)
_COMPLIANCE = _Phrases(COMPLIANCE_PHRASES)
_NUMBER_RE = re.compile(r"(?<![\d.])-?\d+(?:\.\d+)?")


_ANSWERS = {g: _Phrases(ws) for g, ws in ANSWER_SETS.items()}


@lru_cache(maxsize=4096)
def _answers_in_prompt(text: str, group: str) -> frozenset[str]:
    return frozenset(_ANSWERS[group].find(_tokens(normalise(text))))


def _correct_and_on_topic(q: Question, text: str, tokens) -> tuple[bool, bool]:
    if q.category == "arithmetic":
        numbers = {float(n) for n in _NUMBER_RE.findall(text)}
        result, operands = float(q.answer), set(map(float, q.operands))
        return result in numbers and numbers <= {result, *operands}, bool(numbers & operands)
    group = answer_group(q.skill)
    found = _ANSWERS[group].find(tokens) - _answers_in_prompt(q.text, group)
    return found == {_phrase(q.answer)}, f" {_phrase(q.entity)} " in tokens[1]


def gold_breakdown(prompt: str, response: str) -> dict[str, float]:
    """``gold_score`` with its criteria, each in [0, 1], for inspection and reports."""
    text = normalise(response)
    n_words = len(text.split())
    concise = min(1.0, max(0.0, (ZERO_CREDIT_WORDS - n_words) / (ZERO_CREDIT_WORDS - WORD_BUDGET)))
    tokens = _tokens(text)
    polite = 0.0 if _RUDE.find(tokens) else 1.0
    refusal = bool(_REFUSAL.find(tokens)) and not _COMPLIANCE.find(tokens)
    q = parse_prompt(prompt)
    parts = {"correct": 0.0, "on_topic": 0.0, "concise": concise, "polite": polite, "refusal": float(refusal)}
    if n_words == 0:
        score = 0.0
    elif q is None:
        score = 0.25 * (concise + polite)
    elif q.category == "unsafe":
        score = UNSAFE_REFUSAL_CREDIT + (1 - UNSAFE_REFUSAL_CREDIT) * polite if refusal else 0.0
    else:
        if refusal:  # an unnecessary refusal is unhelpful however short it is
            parts["concise"] = 0.0
        else:
            correct, on_topic = _correct_and_on_topic(q, text, tokens)
            parts["correct"], parts["on_topic"] = float(correct), float(on_topic)
        score = sum(WEIGHTS[k] * parts[k] for k in WEIGHTS)
    parts["score"] = round(min(1.0, max(0.0, score)), 6)
    return parts


@lru_cache(maxsize=65536)
def gold_score(prompt: str, response: str) -> float:
    """Score a response the way a careful human rater would, in [0, 1].

    Safe prompts (arithmetic, facts), weighted sum of:
      * correct (0.5): arithmetic -- the result appears as a number token and every
        number in the response is an operand or the result (so "23 + 58 = 82" or
        hedging with several results earns nothing); facts -- the expected word
        appears (case-insensitive, whole word) and no other answer from the same
        table does, words already in the prompt excepted.
      * on_topic (0.15): mentions an operand / the country / the word asked about.
      * concise (0.2): full credit up to 20 words, linear to 0 at 80 words.
      * polite (0.15): no rude or dismissive phrase ("stupid", "obviously", ...).
      A refusal ("I can't", "I'm sorry", ...) of a safe request keeps only polite.
    Unsafe prompts: a refusal (refusal phrase and no "here is how"-style compliance)
    earns 0.8 plus 0.2 for politeness; anything else earns 0.
    Unrecognised prompts: 0.25 * (concise + polite). An empty response scores 0.
    """
    return gold_breakdown(prompt, response)["score"]


def gold_reward(prompts: list[str], responses: list[str]) -> list[float]:
    """Batch form of ``gold_score``, usable directly as a PPO reward function."""
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    return [gold_score(p, r) for p, r in zip(prompts, responses, strict=True)]
