"""What the task's writers answer: a response to a question in one of its styles (ideal, verbose,
rude, wrong, a refusal, ...), and the demonstrations SFT learns from."""

from __future__ import annotations

import random

from rlhf.tasks.assistant.questions import ANSWER_SETS, ARITH_NAMES, Question, answer_group, weighted_choice

# Demonstration writers of mixed quality, as real ones are: the SFT policy inherits their flaws, and
# those a reward model can learn to dislike without checking the answer (padding, hedging, needless
# refusals, rudeness, missed refusals) leave room for learning from preferences to improve on it.
# "other" is a terse or plainly wrong answer, which only checking the answer tells apart.
SFT_MIX = {
    "safe": {"ideal": 0.40, "verbose": 0.20, "hedge": 0.12, "refusal": 0.10, "rude": 0.10, "other": 0.08},
    "unsafe": {"ideal": 0.50, "verbose": 0.10, "rude": 0.10, "comply": 0.30},
}

# ---------------------------------------------------------------- responses
# Filler, rude and off-topic sentences must contain no digits and no word from
# the fact tables, otherwise they would change correctness.

ARITH_ANSWERS = (
    "{a} {sym} {b} = {r}.",
    "{a} {word} {b} equals {r}.",
    "The {noun} of {a} and {b} is {r}.",
    "The answer is {r}, since {a} {sym} {b} = {r}.",
)
FACT_ANSWERS = {
    "capital": ("The capital of {s} is {r}.", "{r} is the capital of {s}."),
    "opposite": (
        "The opposite of {s} is {r}.",
        "The opposite of '{s}' is '{r}'.",
        "{R} is the opposite of {s}.",
    ),
    "plural": ("The plural of {s} is {r}.", "The plural form of '{s}' is '{r}'.", "One {s}, two {r}."),
    "number_word": ("{s} in words is {r}.", "The number {s} is written '{r}'.", "You write {s} as {r}."),
    "day_after": ("The day after {s} is {r}.", "{r} comes after {s}.", "If today is {s}, tomorrow is {r}."),
    "day_before": (
        "The day before {s} is {r}.",
        "{r} comes before {s}.",
        "If today is {s}, yesterday was {r}.",
    ),
}
PAD_PREFIXES = (
    "Great question!",
    "Thanks for asking.",
    "Sure, let me help with that.",
    "Let me think about this carefully.",
    "Good question, I am glad you asked.",
)
PAD_SUFFIXES = (
    "I went through it carefully to make sure it is right.",
    "Let me know if you have any more questions.",
    "It is always worth checking answers like this twice.",
    "This is a common question, and the answer is well known.",
    "Feel free to ask me anything else you are curious about.",
    "I am glad to help with questions like this at any time.",
    "I hope this answer is useful for your work or studies.",
    "Questions like this come up a lot in school and at work.",
)
RUDE_PREFIXES = (
    "Ugh, seriously?",
    "That is a stupid question.",
    "Duh.",
    "Even a child knows this.",
    "Obviously you should know this.",
)
RUDE_SUFFIXES = (
    "Figure it out yourself next time.",
    "Whatever.",
    "Don't waste my time again.",
    "Use your brain next time.",
    "Try to keep up.",
)
OFF_TOPIC = (
    "I really like reading about birds on the weekend.",
    "My favourite colour is blue.",
    "Bananas are a great source of potassium.",
    "Let's talk about music instead.",
    "The ocean covers most of our planet.",
    "I think gardening is a relaxing hobby.",
)
SAFE_REFUSALS = (
    "I'm sorry, but I can't help with that.",
    "I cannot answer that question.",
    "Sorry, I won't answer questions like this.",
    "I'm not able to help with that request.",
)
UNSAFE_REFUSALS = (
    "I'm sorry, but I can't help with that.",
    "I can't help with that, because it could hurt someone.",
    "Sorry, I won't help with that. It could cause real harm.",
    "I cannot help with this request. It is dangerous and illegal.",
    "I'm sorry, I can't assist with that. Is there something else I can do for you?",
)
REFUSAL_PADS = (
    "I hope you understand that I have to be careful with requests like this.",
    "Requests like this could put people in danger or get you into serious trouble.",
    "If something is worrying you, talking to someone you trust can really help.",
    "My goal is to be helpful while keeping everyone safe.",
    "I would be glad to help you with something else instead.",
    "Thank you for understanding, and please take care of yourself.",
)
HEDGES = (
    "Or maybe it is {w}, I am not completely sure.",
    "But it could also be {w}.",
    "Though I think it might be {w} instead.",
    "Or is it {w}? I am not certain.",
)
HEDGE_PREFIXES = (
    "Maybe {w}, or perhaps:",
    "I am not sure, it could be {w}. Or:",
    "Possibly {w}, but probably:",
)
RUDE_REFUSALS = (
    "No way, that is a stupid thing to ask. I won't help.",
    "Ugh, I won't help with that. Don't waste my time.",
    "Obviously I can't help with that. Figure it out yourself.",
)
# Deliberately empty placeholders: the data must never contain real harmful instructions.
COMPLIANCES = (
    "Sure, here is how you do it: first you get the tools and then you follow the steps.",
    "Of course! Here's how: first you get what you need, then you follow the steps carefully.",
    "No problem. Step one is to prepare everything, and then you follow the steps until it is done.",
    "Sure, here is how: first you make a plan, then you follow the steps in order.",
)
COMPLIANCE_PADS = (
    "It is easier than it sounds once you get started.",
    "Just take your time and be patient.",
    "You will get the hang of it quickly.",
    "Let me know if you want more tips like this.",
    "Many people manage it on their first try.",
    "Good luck with your plan!",
)


def _answer_text(q: Question, rng: random.Random, answer: str | None = None) -> str:
    r = q.answer if answer is None else answer
    if q.category == "arithmetic":
        sym, word, noun = ARITH_NAMES[q.skill]
        a, b = q.operands
        return rng.choice(ARITH_ANSWERS).format(a=a, b=b, r=r, sym=sym, word=word, noun=noun)
    text = rng.choice(FACT_ANSWERS[q.skill]).format(s=q.subject, r=r, R=r[:1].upper() + r[1:])
    return text[:1].upper() + text[1:]


def _pad(text: str, rng: random.Random, prefixes=PAD_PREFIXES, suffixes=PAD_SUFFIXES) -> str:
    """Verbose variant: clearly over the word budget, well short of the zero-credit length."""
    parts = [rng.choice(prefixes), text] if prefixes and rng.random() < 0.6 else [text]
    suffixes = list(suffixes)
    rng.shuffle(suffixes)
    min_words = rng.randint(36, 50)
    while len(" ".join(parts).split()) < min_words:
        parts.append(suffixes.pop())
    return " ".join(parts)


def _rude(text: str, rng: random.Random) -> str:
    parts = [rng.choice(RUDE_PREFIXES), text] if rng.random() < 0.7 else [text]
    if len(parts) == 1 or rng.random() < 0.4:
        parts.append(rng.choice(RUDE_SUFFIXES))
    return " ".join(parts)


def _wrong_answer(q: Question, rng: random.Random) -> str:
    if q.category == "arithmetic":
        r = int(q.answer)
        return str(r + rng.choice([d for d in (-10, -2, -1, 1, 2, 10) if r + d >= 0]))
    while True:
        other = rng.choice(ANSWER_SETS[answer_group(q.skill)])
        if other.lower() not in (q.answer.lower(), q.entity.lower()):
            return other


def _hedge(q: Question, rng: random.Random) -> str:
    """The right answer offered beside a wrong one: a careful rater gives no credit for correctness."""
    right, wrong = _answer_text(q, rng), _wrong_answer(q, rng)
    while q.category == "arithmetic" and int(wrong) in q.operands:
        wrong = _wrong_answer(q, rng)
    if rng.random() < 0.5:
        return f"{right} {rng.choice(HEDGES).format(w=wrong)}"
    return f"{rng.choice(HEDGE_PREFIXES).format(w=wrong)} {right}"


# Padding and rudeness decorate wrong answers as often as right ones: were they only ever added to
# correct answers, a reward model that cannot check a sum would learn "padded = correct".
SAFE_STYLES = (
    "ideal",
    "verbose",
    "terse",
    "rude",
    "wrong",
    "wrong_verbose",
    "wrong_rude",
    "off_topic",
    "refusal",
    "hedge",
)
UNSAFE_STYLES = ("ideal", "verbose", "rude", "comply", "comply_verbose", "off_topic")


def styles(q: Question) -> tuple[str, ...]:
    return UNSAFE_STYLES if q.category == "unsafe" else SAFE_STYLES


def response(q: Question, style: str, rng: random.Random) -> str:
    """One response of the given style; 'ideal' is always the best one for the prompt."""
    if style == "off_topic":
        return rng.choice(OFF_TOPIC)
    if q.category == "unsafe":
        if style == "rude":
            return rng.choice(RUDE_REFUSALS)
        comply = style.startswith("comply")
        text = rng.choice(COMPLIANCES if comply else UNSAFE_REFUSALS)
        if style.endswith("verbose"):
            text = _pad(text, rng, (), COMPLIANCE_PADS if comply else REFUSAL_PADS)
        return text
    if style == "terse":
        return q.answer[:1].upper() + q.answer[1:] + "."
    if style == "refusal":
        return rng.choice(SAFE_REFUSALS)
    if style == "hedge":
        return _hedge(q, rng)
    text = _answer_text(q, rng, _wrong_answer(q, rng) if style.startswith("wrong") else None)
    decorate = {"verbose": _pad, "rude": _rude}.get(style.removeprefix("wrong_"))
    return decorate(text, rng) if decorate else text


def demonstration(
    q: Question, rng: random.Random, mix: dict[str, dict[str, float]] | None = None
) -> tuple[str, str]:
    """A human-written SFT demonstration, of the style drawn from the mix for the prompt's kind."""
    style = weighted_choice(rng, (mix or SFT_MIX)["unsafe" if q.category == "unsafe" else "safe"])
    if style == "other":
        style = rng.choice(("terse", "wrong"))
    return style, response(q, style, rng)
