"""The shipped offline "assistant" task and its gold annotator.

A seeded, pure-Python generator of short assistant-style prompts (small arithmetic, simple facts from
built-in tables, a few unsafe requests), the responses of varying quality that human writers and
raters would produce for them, and ``gold_score``: the rater whose judgement the whole pipeline
(SFT -> reward model -> PPO) tries to recover from noisy feedback.

Everything is kept short on purpose so that a ~135M instruct model learns it in minutes on a CPU and
PPO sees its reward move quickly. By responsibility: questions.py (the tables and prompts),
responses.py (the writers), gold.py (the annotator), feedback.py (the data sets on disk). The task
interface rlhf.data reads (KINDS, SLICE_COLUMN, materialize) and the annotator
(data.gold_reward=rlhf.tasks.assistant.gold_reward) are importable from here.
"""

from rlhf.tasks.assistant.feedback import (
    DEFAULT_SIZES,
    KINDS,
    SLICE_COLUMN,
    TASK_VERSION,
    THUMBS_UP_THRESHOLD,
    generate,
    materialize,
    rating_of,
    task_dirname,
)
from rlhf.tasks.assistant.gold import WEIGHTS, gold_breakdown, gold_reward, gold_score
from rlhf.tasks.assistant.questions import (
    CATEGORY_WEIGHTS,
    SPLITS,
    Question,
    parse_prompt,
    sample_question,
    split_pools,
)
from rlhf.tasks.assistant.responses import (
    OFF_TOPIC,
    PAD_PREFIXES,
    PAD_SUFFIXES,
    RUDE_PREFIXES,
    RUDE_SUFFIXES,
    SAFE_STYLES,
    SFT_MIX,
    UNSAFE_STYLES,
    demonstration,
    response,
    styles,
)

__all__ = [
    "CATEGORY_WEIGHTS",
    "DEFAULT_SIZES",
    "KINDS",
    "OFF_TOPIC",
    "PAD_PREFIXES",
    "PAD_SUFFIXES",
    "RUDE_PREFIXES",
    "RUDE_SUFFIXES",
    "SAFE_STYLES",
    "SFT_MIX",
    "SLICE_COLUMN",
    "SPLITS",
    "TASK_VERSION",
    "THUMBS_UP_THRESHOLD",
    "UNSAFE_STYLES",
    "WEIGHTS",
    "Question",
    "demonstration",
    "generate",
    "gold_breakdown",
    "gold_reward",
    "gold_score",
    "materialize",
    "parse_prompt",
    "rating_of",
    "response",
    "sample_question",
    "split_pools",
    "styles",
    "task_dirname",
]
