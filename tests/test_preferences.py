"""Preference data and the reward model's pieces: feedback formats, pair tokenisation and batching,
the Bradley-Terry loss, scalar scoring at the last real token, and calibration figures."""

from __future__ import annotations

import math
from collections import Counter

import datasets
import matplotlib.figure
import numpy as np
import pytest
import torch

from rlhf.config import SourceConfig
from rlhf.data.formats import (
    PREFERENCE_FORMATS,
    DataStats,
    PreferencePair,
    SFTExample,
    check_format,
    common_prefix,
    preference_pairs,
    prompts_of,
    sft_examples,
)
from rlhf.data.prepare import PairCollator, as_comparisons, group_comparisons
from rlhf.data.sources import load_source
from rlhf.data.tokenize import ChatRenderer, encode_preferences, encode_prompts
from rlhf.errors import DataError
from rlhf.plots import (
    calibration_figure,
    calibration_table,
    close,
    expected_calibration_error,
    reward_histogram,
)
from rlhf.preference import bradley_terry, gold_order_agreement, preference_accuracy
from rlhf.scalar import last_index, pair_scores, sequence_scores, token_scores
from rlhf.tasks import assistant

ORIGIN, KEY = "prefs.jsonl", "data.preference"


def stats():
    return DataStats(Counter())


def table(rows):
    return datasets.Dataset.from_list(rows)


def pairs_of(rows, fmt="auto", strict=False, counts=None):
    return preference_pairs(table(rows), fmt, ORIGIN, KEY, strict, counts if counts is not None else stats())


def user(text):
    return {"role": "user", "content": text}


def bot(text):
    return {"role": "assistant", "content": text}


# ---------------------------------------------------------------- explicit pairs


def test_pairs_of_strings():
    pairs = pairs_of([{"prompt": "What is 2+2?", "chosen": "4.", "rejected": "5."}])
    assert pairs == [PreferencePair("What is 2+2?", "4.", "5.", 0.0)]


def test_conversational_pairs_keep_their_messages():
    rows = [
        {
            "prompt": [{"role": "system", "content": "Be brief."}, user("Hi")],
            "chosen": [bot("Hello!")],
            "rejected": [bot("Go away.")],
        }
    ]
    assert pairs_of(rows) == [
        PreferencePair(
            [{"role": "system", "content": "Be brief."}, user("Hi")], [bot("Hello!")], [bot("Go away.")]
        )
    ]


def test_ultrafeedback_layout_loses_the_repeated_user_turn():
    question = "What is the capital of France?"
    rows = [
        {
            "prompt": question,
            "chosen": [user(question), bot("Paris.")],
            "rejected": [user(question), bot("Rome.")],
        }
    ]
    assert pairs_of(rows) == [PreferencePair(question, [bot("Paris.")], [bot("Rome.")])]


def test_explicit_prompt_wins_over_a_shared_beginning():
    # {prompt, chosen, rejected} also holds the columns of implicit pairs: the explicit prompt is used.
    pairs = pairs_of([{"prompt": "Q?", "chosen": "The answer is 4.", "rejected": "The answer is 5."}])
    assert pairs == [PreferencePair("Q?", "The answer is 4.", "The answer is 5.")]


# ---------------------------------------------------------------- implicit pairs


def test_implicit_string_pairs_split_after_the_shared_words():
    pairs = pairs_of(
        [{"chosen": "The capital of France is Paris.", "rejected": "The capital of France is Rome."}]
    )
    assert pairs == [PreferencePair("The capital of France is ", "Paris.", "Rome.")]


def test_implicit_string_pairs_split_at_a_word_boundary_not_mid_word():
    # The shared text ends inside a word ("Bl"): the prompt stops before that word.
    pairs = pairs_of(
        [{"chosen": "Q: colour of the sky?\nBlue, mostly.", "rejected": "Q: colour of the sky?\nBlack."}]
    )
    assert pairs == [PreferencePair("Q: colour of the sky?\n", "Blue, mostly.", "Black.")]


def test_implicit_pairs_without_a_shared_prompt_name_the_row():
    with pytest.raises(DataError, match="row 2"):
        pairs_of([{"chosen": "A b.", "rejected": "A c."}, {"chosen": "Yes.", "rejected": "No."}])


def test_hh_transcripts_become_messages():
    rows = [
        {
            "chosen": "\n\nHuman: What is 2+2?\n\nAssistant: 2+2 is 4.",
            "rejected": "\n\nHuman: What is 2+2?\n\nAssistant: I don't know.",
        }
    ]
    assert pairs_of(rows) == [
        PreferencePair([user("What is 2+2?")], [bot("2+2 is 4.")], [bot("I don't know.")])
    ]


def test_multi_turn_hh_keeps_the_shared_assistant_turn_in_the_prompt():
    history = "\n\nHuman: Hi there.\n\nAssistant: Hello! How can I help?\n\nHuman: Capital of Japan?"
    rows = [
        {"chosen": history + "\n\nAssistant: Tokyo.", "rejected": history + "\n\nAssistant: Kyoto, I think."}
    ]
    assert pairs_of(rows) == [
        PreferencePair(
            [user("Hi there."), bot("Hello! How can I help?"), user("Capital of Japan?")],
            [bot("Tokyo.")],
            [bot("Kyoto, I think.")],
        )
    ]


def test_message_lists_split_at_the_first_differing_message_and_end_the_prompt_on_a_user_turn():
    # The conversations share a user turn and an assistant turn; the prompt ends with the last
    # shared non-assistant turn, so the shared assistant turn begins both responses.
    rows = [
        {
            "chosen": [user("Hi"), bot("Hello."), user("Sky colour?"), bot("Blue.")],
            "rejected": [user("Hi"), bot("Hello."), user("Grass colour?"), bot("Green.")],
        }
    ]
    assert pairs_of(rows) == [
        PreferencePair(
            [user("Hi")],
            [bot("Hello."), user("Sky colour?"), bot("Blue.")],
            [bot("Hello."), user("Grass colour?"), bot("Green.")],
        )
    ]


# ---------------------------------------------------------------- rankings, ratings, thumbs


def test_ranking_of_four_gives_six_pairs_better_first():
    responses = ["A.", "B.", "C.", "D."]
    pairs = pairs_of([{"prompt": "Q?", "responses": responses, "ranking": [2, 0, 3, 1]}])
    best_first = ["C.", "A.", "D.", "B."]
    expected = [PreferencePair("Q?", best_first[i], best_first[j]) for i in range(4) for j in range(i + 1, 4)]
    assert len(pairs) == 6
    assert sorted(map(repr, pairs)) == sorted(map(repr, expected))


@pytest.mark.parametrize("ranking", [[0, 0, 1, 2], [0, 1, 2, 4], [0, 1, 2]])
def test_ranking_that_is_not_a_permutation_names_the_row(ranking):
    rows = [
        {"prompt": "Q1?", "responses": ["a", "b", "c", "d"], "ranking": [0, 1, 2, 3]},
        {"prompt": "Q2?", "responses": ["a", "b", "c", "d"], "ranking": ranking},
    ]
    with pytest.raises(DataError) as err:
        pairs_of(rows)
    assert f"{ORIGIN}: row 2" in str(err.value)
    assert "ranking" in str(err.value)


def test_ratings_give_every_unequal_pair_with_the_gap_as_margin():
    counts = stats()
    pairs = pairs_of(
        [{"prompt": "Q?", "responses": ["five", "three a", "three b", "one"], "ratings": [5, 3, 3, 1]}],
        counts=counts,
    )
    expected = [
        PreferencePair("Q?", "five", "three a", 2.0),
        PreferencePair("Q?", "five", "three b", 2.0),
        PreferencePair("Q?", "five", "one", 4.0),
        PreferencePair("Q?", "three a", "one", 2.0),
        PreferencePair("Q?", "three b", "one", 2.0),
    ]
    assert sorted(map(repr, pairs)) == sorted(map(repr, expected))
    assert counts.counts == Counter({"tied_ratings": 1})


def test_ratings_in_any_order_put_the_higher_rated_response_first():
    pairs = pairs_of([{"prompt": "Q?", "responses": ["low", "high"], "ratings": [1.5, 4.0]}])
    assert pairs == [PreferencePair("Q?", "high", "low", 2.5)]


def test_thumbs_pair_every_up_with_every_down_of_the_same_prompt():
    counts = stats()
    rows = [
        {"prompt": "A?", "completion": "good one", "label": True},
        {"prompt": "B?", "completion": "fine", "label": True},
        {"prompt": "A?", "completion": "bad", "label": False},
        {"prompt": "A?", "completion": "good two", "label": True},
        {"prompt": "B?", "completion": "also fine", "label": True},
    ]
    pairs = pairs_of(rows, counts=counts)
    assert sorted(map(repr, pairs)) == sorted(
        map(repr, [PreferencePair("A?", "good one", "bad"), PreferencePair("A?", "good two", "bad")])
    )
    assert counts.counts == Counter({"thumbs_without_opposite": 1})


def test_thumbs_prompt_with_only_downs_is_counted():
    counts = stats()
    rows = [
        {"prompt": "A?", "completion": "up", "label": True},
        {"prompt": "A?", "completion": "down", "label": False},
        {"prompt": "C?", "completion": "meh", "label": False},
    ]
    assert pairs_of(rows, counts=counts) == [PreferencePair("A?", "up", "down")]
    assert counts.counts == Counter({"thumbs_without_opposite": 1})


def test_thumbs_label_that_is_not_a_bool_is_an_error():
    rows = [
        {"prompt": "A?", "completion": "up", "label": 1},
        {"prompt": "A?", "completion": "down", "label": 0},
    ]
    with pytest.raises(DataError) as err:
        pairs_of(rows)
    assert f"{ORIGIN}: row 1" in str(err.value)
    assert "label" in str(err.value)


# ---------------------------------------------------------------- skips and errors


@pytest.mark.parametrize(
    "row",
    [
        {"prompt": "Q?", "chosen": "Same.", "rejected": "Same."},
        {"prompt": "Q?", "responses": ["Same.", "Same."], "ranking": [1, 0]},
    ],
)
def test_identical_pair_is_skipped_and_counted(row):
    counts = stats()
    kept = {"prompt": "Q?", "chosen": "Yes.", "rejected": "No."}
    if "ranking" in row:
        kept = {"prompt": "Q?", "responses": ["Yes.", "No."], "ranking": [0, 1]}
    pairs = pairs_of([row, kept], counts=counts)
    assert pairs == [PreferencePair("Q?", "Yes.", "No.")]
    assert counts.counts == Counter({"identical_pair": 1})


def test_identical_pair_is_an_error_when_strict():
    rows = [
        {"prompt": "Q?", "chosen": "Yes.", "rejected": "No."},
        {"prompt": "Q?", "chosen": "Same.", "rejected": "Same."},
    ]
    with pytest.raises(DataError) as err:
        pairs_of(rows, strict=True)
    assert f"{ORIGIN}: row 2" in str(err.value)
    assert "identical" in str(err.value)


@pytest.mark.parametrize(("chosen", "rejected"), [("  ", "No."), ("Yes.", ""), ("Yes.", "\n")])
def test_empty_response_is_skipped_and_counted(chosen, rejected):
    counts = stats()
    rows = [
        {"prompt": "Q?", "chosen": chosen, "rejected": rejected},
        {"prompt": "Q?", "chosen": "Yes.", "rejected": "No."},
    ]
    assert pairs_of(rows, counts=counts) == [PreferencePair("Q?", "Yes.", "No.")]
    assert counts.counts == Counter({"empty_response": 1})


def test_empty_message_response_is_skipped_and_strict_makes_it_an_error():
    rows = [{"prompt": [user("Q?")], "chosen": [bot(" ")], "rejected": [bot("No.")]}]
    counts = stats()
    assert pairs_of(rows, counts=counts) == []
    assert counts.counts == Counter({"empty_response": 1})
    with pytest.raises(DataError, match="empty response"):
        pairs_of(rows, strict=True)


def test_unknown_columns_with_auto_format_list_the_columns():
    with pytest.raises(DataError) as err:
        pairs_of([{"question": "Q?", "good": "Yes.", "bad": "No."}])
    message = str(err.value)
    assert ORIGIN in message
    assert "['bad', 'good', 'question']" in message
    assert f"{KEY}.columns" in message


def test_explicit_format_missing_a_column_names_it():
    with pytest.raises(DataError, match="'ranking'"):
        pairs_of([{"prompt": "Q?", "responses": ["a", "b"], "ratings": [1, 2]}], fmt="rankings")


# ---------------------------------------------------------------- prompts and SFT on chosen responses


def test_prompts_of_pairs_are_distinct_and_in_order():
    rows = [
        {"prompt": "B?", "chosen": "1", "rejected": "2"},
        {"prompt": "A?", "chosen": "3", "rejected": "4"},
        {"prompt": "B?", "chosen": "5", "rejected": "6"},
    ]
    assert prompts_of(table(rows), "auto", ORIGIN, KEY) == ["B?", "A?"]


def test_prompts_of_implicit_pairs_are_their_shared_beginnings():
    rows = [
        {
            "chosen": "\n\nHuman: Hi?\n\nAssistant: Hello.",
            "rejected": "\n\nHuman: Hi?\n\nAssistant: Go away.",
        },
        {"chosen": "\n\nHuman: Hi?\n\nAssistant: Hey.", "rejected": "\n\nHuman: Hi?\n\nAssistant: What?"},
        {"chosen": "\n\nHuman: Bye?\n\nAssistant: Bye.", "rejected": "\n\nHuman: Bye?\n\nAssistant: No."},
    ]
    assert prompts_of(table(rows), "auto", ORIGIN, KEY) == [[user("Hi?")], [user("Bye?")]]


def test_prompts_of_rankings_ratings_and_thumbs():
    assert prompts_of(
        table([{"prompt": "R?", "responses": ["a", "b"], "ranking": [1, 0]}]), "auto", ORIGIN, KEY
    ) == ["R?"]
    assert prompts_of(
        table([{"prompt": "S?", "responses": ["a", "b"], "ratings": [1, 2]}]), "auto", ORIGIN, KEY
    ) == ["S?"]
    thumbs = table(
        [
            {"prompt": "T?", "completion": "a", "label": True},
            {"prompt": "T?", "completion": "b", "label": False},
        ]
    )
    assert prompts_of(thumbs, "auto", ORIGIN, KEY) == ["T?"]


def test_sft_on_chosen_responses_of_pairs():
    rows = [
        {"prompt": "A?", "chosen": "Good A.", "rejected": "Bad A."},
        {"prompt": "B?", "chosen": "Good B.", "rejected": "Bad B."},
        {"prompt": "A?", "chosen": "Good A.", "rejected": "Worse A."},
    ]
    examples = sft_examples(table(rows), "chosen", ORIGIN, "data.sft", False, stats())
    assert examples == [SFTExample("A?", "Good A."), SFTExample("B?", "Good B.")]


def test_sft_on_chosen_responses_of_thumbs():
    rows = [
        {"prompt": "A?", "completion": "Up.", "label": True},
        {"prompt": "A?", "completion": "Down.", "label": False},
    ]
    examples = sft_examples(table(rows), "chosen", ORIGIN, "data.sft", False, stats())
    assert examples == [SFTExample("A?", "Up.")]


# ---------------------------------------------------------------- the shipped task's feedback


@pytest.mark.parametrize("kind", ["pairs", "rankings", "ratings", "thumbs"])
def test_every_feedback_shape_of_the_task_agrees_with_the_gold_annotator(kind):
    splits = load_source(SourceConfig(path=f"task:assistant/{kind}", max_samples=200), KEY, 0.1, 0, 0, 0.1)
    records = splits["train"].records
    assert len(records) == 200
    assert check_format("auto", records.column_names, PREFERENCE_FORMATS, ORIGIN, KEY) == kind
    counts = stats()
    pairs = preference_pairs(records, "auto", splits["train"].origin, KEY, False, counts)
    assert len(pairs) >= 50
    for pair in pairs:
        assert isinstance(pair.prompt, str) and pair.chosen and pair.rejected and pair.chosen != pair.rejected
    agree = sum(
        assistant.gold_score(p.prompt, p.chosen) > assistant.gold_score(p.prompt, p.rejected) for p in pairs
    )
    assert agree / len(pairs) > 0.75, (kind, agree, len(pairs), dict(counts.counts))
    if kind == "ratings":
        assert all(p.margin >= 1 for p in pairs)
    else:
        assert all(p.margin == 0 for p in pairs)


def test_pairs_carry_their_records_slice_in_every_shape():
    rows = {
        "pairs": [{"prompt": "Q?", "chosen": "Yes.", "rejected": "No.", "topic": "a"}],
        # Values that are not strings are reported as strings.
        "rankings": [
            {"prompt": "Q?", "responses": ["x", "y", "z"], "ranking": [2, 0, 1], "topic": 1},
            {"prompt": "R?", "responses": ["u", "v"], "ranking": [0, 1], "topic": 7},
        ],
        "ratings": [{"prompt": "Q?", "responses": ["x", "y", "z"], "ratings": [1, 3, 3], "topic": "a"}],
        "thumbs": [
            {"prompt": "Q?", "completion": "up", "label": True, "topic": "a"},
            {"prompt": "Q?", "completion": "down", "label": False, "topic": "a"},
            {"prompt": "R?", "completion": "down", "label": False, "topic": "b"},
            {"prompt": "R?", "completion": "up", "label": True, "topic": "b"},
        ],
    }
    expected = {"pairs": ["a"], "rankings": ["1", "1", "1", "7"], "ratings": ["a", "a"], "thumbs": ["a", "b"]}
    # Each pair's record: a ranking's or ratings' row; for thumbs, the prompt's first row.
    records_of = {"pairs": [0], "rankings": [0, 0, 0, 1], "ratings": [0, 0], "thumbs": [0, 2]}
    for shape, records in rows.items():
        pairs = preference_pairs(table(records), shape, ORIGIN, KEY, False, stats(), slice_by="topic")
        assert [p.slice for p in pairs] == expected[shape], shape
        assert [p.record for p in pairs] == records_of[shape], shape
    assert pairs_of(rows["pairs"])[0].slice is None


def test_slicing_by_a_missing_column_names_it_and_the_columns():
    rows = [{"prompt": "Q?", "chosen": "Y", "rejected": "N"}]
    with pytest.raises(DataError) as err:
        preference_pairs(table(rows), "auto", ORIGIN, KEY, False, stats(), slice_by="categroy")
    message = str(err.value)
    assert message.startswith(f"{ORIGIN}: {KEY}.slice_by: no column 'categroy'")
    assert "(columns: chosen, prompt, rejected)" in message and f"{KEY}.slice_by=null" in message


# ---------------------------------------------------------------- tokenised pairs


@pytest.fixture(scope="module")
def renderer(tokenizer):
    return ChatRenderer(tokenizer)


def test_encoded_pairs_share_the_prompt_and_end_the_turn(renderer, tokenizer):
    pairs = [
        PreferencePair("What is 2+2?", "4.", "It is five, I believe.", 1.5),
        PreferencePair(
            [user("Hi"), bot("Hello."), user("Sky colour?")], [bot("Blue.")], [bot("Green.")], 0.0
        ),
    ]
    counts = stats()
    features, kept = encode_preferences(renderer, pairs, 256, 128, counts)
    assert kept == [0, 1]
    assert counts.counts == Counter()
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    prompt_ids = encode_prompts(renderer, [p.prompt for p in pairs])
    for feature, pair, p_ids in zip(features, pairs, prompt_ids):
        assert feature["chosen"][: len(p_ids)] == p_ids
        assert feature["rejected"][: len(p_ids)] == p_ids
        assert feature["chosen"][-1] == im_end
        assert feature["rejected"][-1] == im_end
        assert feature["margin"] == pair.margin
    decoded = tokenizer.decode(features[0]["chosen"][len(prompt_ids[0]) :])
    assert decoded == "4.<|im_end|>"
    assert tokenizer.decode(features[1]["rejected"][len(prompt_ids[1]) :]) == "Green.<|im_end|>"


def test_pair_with_a_long_prompt_is_skipped_and_counted(renderer):
    long_prompt = " ".join(f"word{i}" for i in range(100)) + " Which came last?"
    pairs = [
        PreferencePair("Short?", "Yes.", "No.", 0.0),
        PreferencePair(long_prompt, "word99.", "word1.", 0.0),
        PreferencePair("Also short?", "Sure.", "Nope.", 2.0),
    ]
    counts = stats()
    features, kept = encode_preferences(renderer, pairs, 256, 48, counts)
    assert kept == [0, 2]
    assert [f["margin"] for f in features] == [0.0, 2.0]
    assert counts.counts == Counter({"prompt_too_long": 1})


def test_long_prompt_is_an_error_when_strict(renderer):
    long_prompt = " ".join(f"word{i}" for i in range(100))
    with pytest.raises(DataError, match="max_prompt_length"):
        encode_preferences(
            renderer, [PreferencePair(long_prompt, "a", "b")], 256, 48, stats(), "x: ", strict=True
        )


def test_long_response_is_truncated_and_counted(renderer, tokenizer):
    long_answer = " ".join(f"word{i}" for i in range(100))
    pairs = [PreferencePair("Count.", long_answer, "No.", 0.0)]
    counts = stats()
    features, kept = encode_preferences(renderer, pairs, 48, 48, counts)
    assert kept == [0]
    assert len(features[0]["chosen"]) == 48
    assert features[0]["chosen"][-1] != tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert features[0]["rejected"][-1] == tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert counts.counts == Counter({"truncated_response": 1})


# ---------------------------------------------------------------- batches of pairs


def test_pair_collator_puts_each_pair_in_two_rows_and_masks_only_padding():
    pad_id = 0
    features = [
        {"chosen": [5, 6, 7], "rejected": [8, 9], "margin": 0.5},
        {"chosen": [0, 11], "rejected": [12, 13, 14, 15, 16], "margin": 0.0},  # a real token equal to pad
        {"chosen": [17], "rejected": [18, 19, 20], "margin": 2.0},
    ]
    batch = PairCollator(pad_id, multiple_of=8)(features)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    assert ids.shape == (6, 8)
    assert mask.shape == (6, 8)
    rows = [seq for f in features for seq in (f["chosen"], f["rejected"])]
    assert batch["pair_index"].tolist() == [[0, 1], [2, 3], [4, 5]]
    for row, seq in enumerate(rows):
        assert ids[row, : len(seq)].tolist() == seq
        assert ids[row, len(seq) :].tolist() == [pad_id] * (8 - len(seq))
        assert mask[row].tolist() == [1] * len(seq) + [0] * (8 - len(seq))
    assert batch["margin"].dtype == torch.float32
    assert batch["margin"].tolist() == [0.5, 0.0, 2.0]


@pytest.mark.parametrize("share_prefix", [False, True])
def test_pair_collator_passes_gold_order_and_slice_through_either_layout(share_prefix):
    features = [
        {
            "chosen": [1, 2, 3, 4, 5, 6],
            "rejected": [1, 2, 3, 4, 5, 7],
            "margin": 0.0,
            "gold_order": 1.0,
            "slice": 2,
        },
        {
            "chosen": [1, 2, 3, 4, 5, 8],
            "rejected": [1, 2, 3, 4, 5, 9, 9],
            "margin": 0.0,
            "gold_order": -1.0,
            "slice": 0,
        },
    ]
    batch = PairCollator(0, multiple_of=1, share_prefix=share_prefix)(features)
    assert ("pair_mask" in batch) == share_prefix
    assert batch["gold_order"].tolist() == [1.0, -1.0]
    assert batch["slice"].tolist() == [2.0, 0.0]
    plain = PairCollator(0)([{k: f[k] for k in ("chosen", "rejected", "margin")} for f in features])
    assert "gold_order" not in plain and "slice" not in plain


def test_pair_collator_without_rounding_pads_to_the_longest():
    batch = PairCollator(3, multiple_of=1)([{"chosen": [1, 2], "rejected": [4, 5, 6], "margin": 0.0}])
    assert batch["input_ids"].tolist() == [[1, 2, 3], [4, 5, 6]]
    assert batch["attention_mask"].tolist() == [[1, 1, 0], [1, 1, 1]]
    assert batch["score_index"].tolist() == [1, 5] and batch["pair_index"].tolist() == [[0, 1]]


# Pairs sharing prompts of different lengths, a chosen response that is a prefix of the rejected one
# and the other way round, and a pair with nothing in common.
PAIRS = [
    {"chosen": [5, 6, 7, 8, 9, 10], "rejected": [5, 6, 7, 11], "margin": 0.0},
    {"chosen": [3, 4], "rejected": [3, 4, 12, 13, 14], "margin": 1.0},
    {"chosen": [20, 21, 22, 23, 24, 25], "rejected": [20, 21, 22], "margin": 0.0},
    {"chosen": [30, 31], "rejected": [32, 33, 34], "margin": 0.0},
]


def test_common_prefix():
    assert common_prefix([1, 2, 3], [1, 2, 4, 5]) == 2
    assert common_prefix([1, 2], [1, 2, 3]) == 2
    assert common_prefix([7], [8]) == 0


def test_pair_collator_shares_the_prefix_only_when_that_is_fewer_tokens():
    shared = PairCollator(0, multiple_of=1, share_prefix=True)
    batch = shared(PAIRS)
    assert "pair_mask" in batch and batch["input_ids"].shape == (4, 7)  # 6 + 4 - 3 = 7 against 2 rows of 6
    assert batch["attention_mask"].sum().item() == sum(
        len(f["chosen"]) + len(f["rejected"]) - common_prefix(f["chosen"], f["rejected"]) for f in PAIRS
    )
    assert batch["input_ids"][0].tolist() == [5, 6, 7, 8, 9, 10, 11]
    assert batch["position_ids"][0].tolist() == [0, 1, 2, 3, 4, 5, 3]
    assert shared.length(PAIRS[0]) == 7 and PairCollator(0).length(PAIRS[0]) == 6
    nothing_shared = shared([PAIRS[3]])  # 5 tokens packed against 2 x 3 side by side: still packed
    assert "pair_mask" in nothing_shared
    equal_lengths = shared([{"chosen": [1, 2], "rejected": [3, 4], "margin": 0.0}])  # 4 against 4
    assert "pair_mask" not in equal_lengths and equal_lengths["input_ids"].shape == (2, 2)


def scores_and_gradients(scorer, batch):
    """(preferred scores, other scores, parameter gradients of the Bradley-Terry loss) of a batch."""
    scorer.zero_grad()
    better, worse = pair_scores(scorer, batch)
    bradley_terry(better, worse).backward()
    return better.detach(), worse.detach(), [p.grad.clone() for p in scorer.parameters()]


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_shared_prefix_scores_and_gradients_equal_separate_sequences(attention):
    scorer = tiny_scorer()
    scorer.config._attn_implementation = attention
    plain = PairCollator(0, multiple_of=8)(PAIRS)
    packed = PairCollator(0, multiple_of=8, share_prefix=True)(PAIRS)
    assert "pair_mask" in packed and "pair_mask" not in plain
    results = [scores_and_gradients(scorer, batch) for batch in (plain, packed)]
    alone = [
        sequence_scores(scorer, torch.tensor([f[k]]), torch.ones(1, len(f[k]), dtype=torch.long))
        for k in ("chosen", "rejected")
        for f in PAIRS
    ]
    (c1, r1, g1), (c2, r2, g2) = results
    assert torch.allclose(torch.cat([c1, r1]), torch.cat(alone).detach(), atol=1e-5)
    assert torch.allclose(c1, c2, atol=1e-5) and torch.allclose(r1, r2, atol=1e-5)
    for a, b in zip(g1, g2):
        assert torch.allclose(a, b, atol=1e-5)


@torch.no_grad()
def test_a_rejected_response_does_not_see_the_chosen_one():
    scorer = tiny_scorer()
    other = [{**PAIRS[0], "chosen": [5, 6, 7, 40, 41, 42]}]  # same prefix and rejected, chosen rest changed
    first = pair_scores(scorer, PairCollator(0, share_prefix=True)(PAIRS[:1]))
    second = pair_scores(scorer, PairCollator(0, share_prefix=True)(other))
    assert not torch.allclose(first[0], second[0])
    assert torch.allclose(first[1], second[1], atol=1e-6)


# A ranking of three responses to prompt [1, 2] (best first: [1, 2, 7, 8], [1, 2, 5], [1, 2, 6, 6]) as
# the three pair features the data layer gives, plus a pair from another record.
RANKED = [
    {
        "chosen": [1, 2, 7, 8],
        "rejected": [1, 2, 5],
        "margin": 0.0,
        "gold_order": 1.0,
        "slice": 1,
        "record": 3,
    },
    {
        "chosen": [1, 2, 7, 8],
        "rejected": [1, 2, 6, 6],
        "margin": 0.5,
        "gold_order": 1.0,
        "slice": 1,
        "record": 3,
    },
    {"chosen": [9, 9, 4], "rejected": [9, 9, 3], "margin": 0.0, "gold_order": -1.0, "slice": 0, "record": 5},
    {
        "chosen": [1, 2, 5],
        "rejected": [1, 2, 6, 6],
        "margin": 0.0,
        "gold_order": 0.0,
        "slice": 1,
        "record": 3,
    },
]


def test_group_comparisons_lists_each_response_once_per_record():
    ranking, other = group_comparisons(RANKED)
    assert ranking == {
        "responses": [[1, 2, 7, 8], [1, 2, 5], [1, 2, 6, 6]],
        "pairs": [(0, 1), (0, 2), (1, 2)],
        "margin": [0.0, 0.5, 0.0],
        "gold_order": [1.0, 1.0, 0.0],
        "slice": [1, 1, 1],
    }
    assert other["responses"] == [[9, 9, 4], [9, 9, 3]] and other["pairs"] == [(0, 1)]
    assert as_comparisons(RANKED[2])["responses"] == other["responses"]


@pytest.mark.parametrize("share_prefix", [False, True])
def test_grouped_batch_scores_every_pair_as_the_ungrouped_one(share_prefix):
    """A ranking's three pairs from its three responses, prompt once: the same scores and gradients as
    the three pairs scored separately (six sequences)."""
    scorer = tiny_scorer()
    collate = PairCollator(0, multiple_of=1, share_prefix=share_prefix)
    grouped = collate(group_comparisons(RANKED))
    ungrouped = collate(RANKED)
    assert len(grouped["score_index"]) == 5 and len(ungrouped["score_index"]) == 8
    assert ("pair_mask" in grouped) == share_prefix
    if share_prefix:  # [1, 2 | 7, 8 | 5 | 6, 6] and [9, 9 | 4 | 3]
        assert grouped["input_ids"][0].tolist() == [1, 2, 7, 8, 5, 6, 6]
        assert grouped["position_ids"][0].tolist() == [0, 1, 2, 3, 2, 2, 3]
    assert grouped["pair_index"].tolist() == [[0, 1], [0, 2], [1, 2], [3, 4]]
    results = [scores_and_gradients(scorer, batch) for batch in (grouped, ungrouped)]
    (b1, w1, g1), (b2, w2, g2) = results
    order = [0, 1, 3, 2]  # the grouped batch lists the other record's pair last
    assert torch.allclose(b1, b2[order], atol=1e-5) and torch.allclose(w1, w2[order], atol=1e-5)
    for a, b in zip(g1, g2):
        assert torch.allclose(a, b, atol=1e-5)
    assert grouped["margin"].tolist() == [0.0, 0.5, 0.0, 0.0]
    assert collate.length(group_comparisons(RANKED)[0]) == (7 if share_prefix else 4)


# ---------------------------------------------------------------- loss


def test_bradley_terry_of_one_pair():
    loss = bradley_terry(torch.tensor([1.0]), torch.tensor([0.0]))
    assert loss.item() == pytest.approx(0.3132617, abs=1e-6)
    assert loss.item() == pytest.approx(-math.log(1 / (1 + math.exp(-1))), abs=1e-6)


def test_bradley_terry_with_a_margin():
    loss = bradley_terry(torch.tensor([1.0]), torch.tensor([0.0]), margin=torch.tensor([0.5]))
    assert loss.item() == pytest.approx(0.4740770, abs=1e-6)


def test_bradley_terry_is_the_batch_mean():
    chosen, rejected = torch.tensor([1.0, 0.0, -2.0]), torch.tensor([0.0, 0.0, 1.0])
    expected = sum(math.log1p(math.exp(-d)) for d in (1.0, 0.0, -3.0)) / 3
    assert bradley_terry(chosen, rejected).item() == pytest.approx(expected, abs=1e-6)
    margin = torch.tensor([0.5, 1.0, 0.0])
    expected = sum(math.log1p(math.exp(-d)) for d in (0.5, -1.0, -3.0)) / 3
    assert bradley_terry(chosen, rejected, margin).item() == pytest.approx(expected, abs=1e-6)


def test_bradley_terry_centering_adds_the_mean_squared_sum():
    chosen, rejected = torch.tensor([1.0, 0.5]), torch.tensor([0.0, 1.5])
    plain = bradley_terry(chosen, rejected).item()
    centred = bradley_terry(chosen, rejected, centering=0.01).item()
    assert centred - plain == pytest.approx(0.01 * (1.0**2 + 2.0**2) / 2, abs=1e-6)


def test_bradley_terry_gradient_raises_chosen_and_lowers_rejected():
    chosen = torch.tensor([0.3, -1.0], requires_grad=True)
    rejected = torch.tensor([0.1, 2.0], requires_grad=True)
    bradley_terry(chosen, rejected).backward()
    assert (chosen.grad < 0).all()
    assert (rejected.grad > 0).all()
    assert torch.allclose(chosen.grad, -rejected.grad)
    # d/dc of mean(-log sigmoid(c - r)) = -(1 - sigmoid(c - r)) / B
    expected = -(1 - torch.sigmoid(torch.tensor([0.2, -3.0]))) / 2
    assert torch.allclose(chosen.grad, expected, atol=1e-6)


def test_preference_accuracy_counts_ties_as_half():
    chosen = torch.tensor([1.0, 0.0, 2.0, 3.0])
    rejected = torch.tensor([0.0, 0.0, 3.0, 1.0])
    assert preference_accuracy(chosen, rejected).item() == pytest.approx(0.625)


def test_gold_order_agreement_by_hand():
    chosen = torch.tensor([1.0, 0.0, 2.0, 3.0, 5.0])
    rejected = torch.tensor([0.0, 1.0, 3.0, 1.0, 5.0])
    # Pairs 1 and 2 have their labels flipped against the gold order, pair 3 is a gold tie (left out).
    gold_order = torch.tensor([1.0, -1.0, -1.0, 0.0, 1.0])
    accuracy, label_agreement = gold_order_agreement(chosen, rejected, gold_order)
    # Against gold: pair 0 right, 1 right (rejected scored higher), 2 right, 4 a score tie (half).
    assert accuracy.item() == pytest.approx(3.5 / 4)
    assert label_agreement.item() == pytest.approx(2 / 4)
    assert gold_order_agreement(chosen, rejected, torch.zeros(5)) is None


# ---------------------------------------------------------------- scoring at the last real token


def test_last_index_with_right_and_left_padding():
    right = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]])
    left = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 0, 0, 0, 1]])
    assert last_index(right).tolist() == [2, 4, 0]
    assert last_index(left).tolist() == [4, 4, 4]
    assert last_index(right.bool()).tolist() == [2, 4, 0]


def tiny_scorer(vocab_size=64):
    from transformers import LlamaConfig, LlamaForSequenceClassification

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        intermediate_size=64,
        pad_token_id=0,
        num_labels=1,
    )
    return LlamaForSequenceClassification(config).eval()


SEQUENCES = [[5, 9, 17, 3, 8], [12, 4], [7, 7, 30, 2]]


def padded(sequences, left, pad_id=0):
    width = max(map(len, sequences))
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        cols = slice(width - len(seq), width) if left else slice(0, len(seq))
        ids[row, cols] = torch.tensor(seq)
        mask[row, cols] = 1
    return ids, mask


@pytest.fixture(scope="module")
def scorer():
    return tiny_scorer()


@torch.no_grad()
def test_sequence_scores_match_the_models_own_pooling(scorer):
    ids, mask = padded(SEQUENCES, left=False)
    ours = sequence_scores(scorer, ids, mask)
    theirs = scorer(input_ids=ids, attention_mask=mask).logits[:, 0]
    assert ours.shape == (3,)
    assert ours.dtype == torch.float32
    assert torch.allclose(ours, theirs, atol=1e-5)


@torch.no_grad()
def test_sequence_scores_do_not_depend_on_the_padding_side(scorer):
    right = sequence_scores(scorer, *padded(SEQUENCES, left=False))
    left = sequence_scores(scorer, *padded(SEQUENCES, left=True))
    assert torch.allclose(left, right, atol=1e-5)
    alone = torch.stack([sequence_scores(scorer, *padded([s], left=False))[0] for s in SEQUENCES])
    assert torch.allclose(alone, right, atol=1e-5)


@torch.no_grad()
def test_token_scores_read_the_sequence_score_at_the_last_real_token(scorer):
    for left in (False, True):
        ids, mask = padded(SEQUENCES, left=left)
        per_token = token_scores(scorer, ids, mask)
        assert per_token.shape == ids.shape
        picked = per_token[torch.arange(len(SEQUENCES)), last_index(mask)]
        assert torch.allclose(picked, sequence_scores(scorer, ids, mask), atol=1e-5)


# ---------------------------------------------------------------- calibration


def logit(p):
    return math.log(p / (1 - p))


def test_calibration_table_counts_each_pair_in_both_orders():
    rejected = np.array([0.5, -1.0, 2.0])
    chosen = rejected + np.array([logit(0.83), logit(0.64), logit(0.12)])
    # predicted: 0.83, 0.64, 0.12 (observed 1) and 0.17, 0.36, 0.88 (observed 0)
    got = calibration_table(chosen, rejected, bins=4)
    assert got["bin_low"] == [0.0, 0.25, 0.5, 0.75]
    assert got["bin_high"] == [0.25, 0.5, 0.75, 1.0]
    assert got["predicted"] == pytest.approx([0.145, 0.36, 0.64, 0.855])
    assert got["observed"] == pytest.approx([0.5, 0.0, 1.0, 0.5])
    assert got["count"] == [2, 1, 1, 2]


def test_calibration_table_leaves_out_empty_bins():
    rejected = np.zeros(3)
    chosen = np.array([logit(0.83), logit(0.64), logit(0.12)])
    got = calibration_table(chosen, rejected, bins=10)
    assert got["bin_low"] == pytest.approx([0.1, 0.3, 0.6, 0.8])
    assert got["bin_high"] == pytest.approx([0.2, 0.4, 0.7, 0.9])
    assert got["predicted"] == pytest.approx([0.145, 0.36, 0.64, 0.855])
    assert got["observed"] == pytest.approx([0.5, 0.0, 1.0, 0.5])
    assert got["count"] == [2, 1, 1, 2]
    assert sum(got["count"]) == 2 * len(chosen)


def test_calibration_table_puts_certain_predictions_in_the_end_bins():
    got = calibration_table(np.array([50.0]), np.array([-50.0]), bins=5)
    assert got["bin_low"] == [0.0, 0.8]
    assert got["predicted"] == pytest.approx([0.0, 1.0])
    assert got["observed"] == [0.0, 1.0]
    assert got["count"] == [1, 1]


def labelled_pairs(scores_a, scores_b, rng):
    """Which of each pair a rater whose P(a over b) is sigmoid(a - b) prefers, as (chosen, rejected)."""
    a_wins = rng.random(len(scores_a)) < 1 / (1 + np.exp(-(scores_a - scores_b)))
    return np.where(a_wins, scores_a, scores_b), np.where(a_wins, scores_b, scores_a)


def test_expected_calibration_error_is_small_when_calibrated_and_larger_when_overconfident():
    rng = np.random.default_rng(0)
    a, b = rng.normal(0, 1.5, 20000), rng.normal(0, 1.5, 20000)
    chosen, rejected = labelled_pairs(a, b, rng)
    calibrated = expected_calibration_error(calibration_table(chosen, rejected, bins=10))
    overconfident = expected_calibration_error(calibration_table(4 * chosen, 4 * rejected, bins=10))
    assert calibrated < 0.02
    assert overconfident > 0.1
    assert overconfident > 5 * calibrated


def test_expected_calibration_error_by_hand():
    tab = {"predicted": [0.2, 0.7], "observed": [0.0, 1.0], "count": [1, 3]}
    assert expected_calibration_error(tab) == pytest.approx((1 * 0.2 + 3 * 0.3) / 4)
    assert expected_calibration_error({"predicted": [], "observed": [], "count": []}) == 0.0


def test_figures_are_matplotlib_figures():
    rng = np.random.default_rng(1)
    chosen, rejected = rng.normal(1, 1, 50), rng.normal(0, 1, 50)
    figures = [
        calibration_figure(calibration_table(chosen, rejected, bins=10), "validation"),
        reward_histogram(chosen, rejected, "validation"),
        reward_histogram(np.ones(3), np.ones(3), "all equal"),
    ]
    for fig in figures:
        assert isinstance(fig, matplotlib.figure.Figure)
        assert fig.axes
        close(fig)
