"""The data layer: sources, record formats, tokenisation and masking, batching, SFT preparation."""

from __future__ import annotations

import copy
import json
from collections import Counter

import pandas as pd
import pytest
import torch

from rlhf.config import DataConfig, SourceConfig
from rlhf.data.formats import DataStats, sft_examples
from rlhf.data.loading import ExamplesDataModule, ResumableSampler, attention_mask, pad
from rlhf.data.prepare import CausalLMCollator, prepare_sft
from rlhf.data.sources import ROW_COLUMN, load_source, load_split
from rlhf.data.tokenize import IGNORE_INDEX, ChatRenderer, encode_pairs, sft_features
from rlhf.errors import DataError
from rlhf.models import FALLBACK_CHAT_TEMPLATE

RECORDS = [
    {"prompt": "What is two plus two?", "completion": "Four."},
    {"prompt": "Name a colour.", "completion": "Blue."},
    {"prompt": "Capital of France?", "completion": "Paris."},
    {"prompt": "Opposite of cold?", "completion": "Hot."},
]


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def records_of(n, prefix="q"):
    return [{"prompt": f"{prefix} prompt {i}", "completion": f"{prefix} answer {i}"} for i in range(n)]


def load(path, key="data.sft", validation_fraction=0.25, seed=0, **source):
    return load_source(SourceConfig(path=str(path), **source), key, validation_fraction, seed, 0, 0.1)


def stats():
    return DataStats(Counter())


class Rows:
    """A minimal table of rows (what sft_examples reads), for values Arrow would not mix in one column."""

    def __init__(self, rows):
        self.rows = rows
        self.column_names = list(rows[0])

    def __iter__(self):
        return iter(self.rows)

    def __len__(self):
        return len(self.rows)


# --------------------------------------------------------------------------------------------------
# Sources
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("ext", ["jsonl", "json", "parquet", "csv"])
def test_every_file_type_loads_the_same_records(tmp_path, ext):
    file = tmp_path / f"data.{ext}"
    if ext == "jsonl":
        write_jsonl(file, RECORDS)
    elif ext == "json":
        file.write_text(json.dumps(RECORDS), encoding="utf-8")
    elif ext == "parquet":
        pd.DataFrame(RECORDS).to_parquet(file)
    else:
        pd.DataFrame(RECORDS).to_csv(file, index=False)
    split = load_split(SourceConfig(path=str(file)), "train", "data.sft")
    assert split is not None
    assert split.origin == str(file)
    assert split.records.to_list() == RECORDS
    # A single file holds only the training split.
    assert load_split(SourceConfig(path=str(file)), "validation", "data.sft", required=False) is None


def test_directory_of_split_files_gives_each_split(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", records_of(6, "train"))
    write_jsonl(tmp_path / "validation.jsonl", records_of(3, "validation"))
    write_jsonl(tmp_path / "test.jsonl", records_of(2, "test"))
    splits = load(tmp_path)
    assert set(splits) == {"train", "validation", "test"}
    assert {name: len(s.records) for name, s in splits.items()} == {"train": 6, "validation": 3, "test": 2}
    for name, split in splits.items():
        assert split.origin == str(tmp_path / f"{name}.jsonl")
        assert all(r["prompt"].startswith(name) for r in split.records)


def test_directory_without_test_file_has_no_test_split(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", records_of(4, "train"))
    write_jsonl(tmp_path / "validation.jsonl", records_of(2, "validation"))
    assert set(load(tmp_path)) == {"train", "validation"}


def test_directory_without_required_split_names_what_it_found(tmp_path):
    write_jsonl(tmp_path / "validation.jsonl", records_of(2))
    with pytest.raises(DataError) as err:
        load(tmp_path)
    assert "data.sft" in str(err.value)
    assert "'train'" in str(err.value)
    assert "validation" in str(err.value)


def test_single_file_carves_a_deterministic_validation_split(tmp_path):
    file = write_jsonl(tmp_path / "all.jsonl", records_of(40))
    a = load(file, validation_fraction=0.25, seed=1, eval_split="validation")
    b = load(file, validation_fraction=0.25, seed=1, eval_split="validation")
    c = load(file, validation_fraction=0.25, seed=2, eval_split="validation")
    assert set(a) == {"train", "validation"}
    assert len(a["validation"].records) == 10
    assert len(a["train"].records) == 30
    prompts = {name: [r["prompt"] for r in split.records] for name, split in a.items()}
    assert sorted(prompts["train"] + prompts["validation"]) == sorted(r["prompt"] for r in records_of(40))
    assert not set(prompts["train"]) & set(prompts["validation"])
    assert [r["prompt"] for r in b["validation"].records] == prompts["validation"]
    assert [r["prompt"] for r in b["train"].records] == prompts["train"]
    assert [r["prompt"] for r in c["validation"].records] != prompts["validation"]
    assert "held-out" in a["validation"].origin


@pytest.mark.parametrize("shape", ["pairs", "messages"])
def test_held_out_split_is_cut_by_prompt(tmp_path, shape):
    # Preference files hold several pairs per prompt: each prompt's records all go to one side.
    rows = []
    for p in range(12):
        for r in range(5):
            if shape == "pairs":
                rows.append({"prompt": f"question {p}?", "chosen": f"good {r}", "rejected": f"bad {r}"})
            else:
                user = {"role": "user", "content": f"question {p}?"}
                rows.append({"messages": [user, {"role": "assistant", "content": f"answer {r}"}]})
    file = write_jsonl(tmp_path / "repeated.jsonl", rows)
    key = "data.preference" if shape == "pairs" else "data.sft"
    for seed in range(4):
        splits = load(file, key=key, validation_fraction=0.25, seed=seed)
        prompts = {
            name: [str(r.get("prompt") or r["messages"][0]["content"]) for r in split.records]
            for name, split in splits.items()
        }
        assert not set(prompts["train"]) & set(prompts["validation"]), seed
        assert len(set(prompts["validation"])) == 3  # a quarter of the 12 prompts, all 5 records of each
        assert len(prompts["validation"]) == 15 and len(prompts["train"]) == 45


def test_one_prompt_repeated_cannot_hold_some_out(tmp_path):
    file = write_jsonl(tmp_path / "same.jsonl", [{"prompt": "q", "completion": f"a{i}"} for i in range(6)])
    with pytest.raises(DataError, match="6 records of one prompt; need at least 2 distinct prompts"):
        load(file)


def test_source_with_one_record_cannot_hold_some_out(tmp_path):
    file = write_jsonl(tmp_path / "one.jsonl", records_of(1))
    with pytest.raises(DataError, match="at least 2"):
        load(file, eval_split=None)


@pytest.mark.parametrize(
    ("bad_line", "expected"),
    [('{"prompt": oops}', "malformed JSON"), ("[1, 2]", "JSON object"), ('"just a string"', "JSON object")],
)
def test_bad_json_line_is_reported_with_file_and_line(tmp_path, bad_line, expected):
    file = tmp_path / "bad.jsonl"
    good = [json.dumps(r) for r in RECORDS[:2]]
    file.write_text("\n".join([*good, bad_line, json.dumps(RECORDS[2])]) + "\n", encoding="utf-8")
    with pytest.raises(DataError) as err:
        load_split(SourceConfig(path=str(file)), "train", "data.sft")
    assert f"{file}:3" in str(err.value)
    assert expected in str(err.value)


def test_malformed_json_file_is_reported_with_file_and_line(tmp_path):
    file = tmp_path / "bad.json"
    file.write_text('[\n  {"prompt": "a", "completion": "b"},\n  {"prompt": }\n]\n', encoding="utf-8")
    with pytest.raises(DataError) as err:
        load_split(SourceConfig(path=str(file)), "train", "data.sft")
    assert f"{file}:3" in str(err.value)


@pytest.mark.parametrize("name", ["missing.jsonl", "nested/missing.parquet"])
def test_missing_file_names_the_key_and_the_path(tmp_path, name):
    path = tmp_path / name
    with pytest.raises(DataError) as err:
        load(path, key="data.preference")
    assert "data.preference.path" in str(err.value)
    assert str(path) in str(err.value)
    assert "does not exist" in str(err.value)


def test_unset_path_names_the_key():
    with pytest.raises(DataError, match=r"data\.sft\.path"):
        load_source(SourceConfig(path=None), "data.sft", 0.1, 0, 0, 0.1)


def test_unsupported_extension_is_a_data_error(tmp_path):
    file = tmp_path / "data.txt"
    file.write_text("prompt\tcompletion\n", encoding="utf-8")
    with pytest.raises(DataError) as err:
        load(file)
    assert str(file) in str(err.value)
    assert "unsupported" in str(err.value)
    assert ".jsonl" in str(err.value)


def test_columns_mapping_renames_to_canonical_names(tmp_path):
    rows = [{"question": r["prompt"], "answer": r["completion"], "id": i} for i, r in enumerate(RECORDS)]
    file = write_jsonl(tmp_path / "qa.jsonl", rows)
    splits = load(file, eval_split=None, columns={"prompt": "question", "completion": "answer"})
    for split in splits.values():
        assert set(split.records.column_names) - {ROW_COLUMN} == {"prompt", "completion", "id"}
    loaded = sorted((r["prompt"], r["completion"]) for s in splits.values() for r in s.records)
    assert loaded == sorted((r["prompt"], r["completion"]) for r in RECORDS)


def test_columns_mapping_replaces_a_clashing_column(tmp_path):
    rows = [{"prompt": "ignored", "question": r["prompt"], "completion": r["completion"]} for r in RECORDS]
    file = write_jsonl(tmp_path / "qa.jsonl", rows)
    splits = load(file, eval_split=None, columns={"prompt": "question"})
    prompts = sorted(r["prompt"] for s in splits.values() for r in s.records)
    assert prompts == sorted(r["prompt"] for r in RECORDS)


def test_columns_mapping_to_unknown_column_lists_the_files_columns(tmp_path):
    rows = [{"question": r["prompt"], "answer": r["completion"]} for r in RECORDS]
    file = write_jsonl(tmp_path / "qa.jsonl", rows)
    with pytest.raises(DataError) as err:
        load(file, eval_split=None, columns={"prompt": "query", "completion": "answer"})
    message = str(err.value)
    assert "data.sft.columns" in message
    assert "'query'" in message
    assert "question" in message and "answer" in message


def test_max_samples_caps_the_training_split(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", records_of(10))
    write_jsonl(tmp_path / "validation.jsonl", records_of(5, "v"))
    splits = load(tmp_path, max_samples=3)
    assert len(splits["train"].records) == 3
    assert len(splits["validation"].records) == 5
    assert len(load(tmp_path, max_samples=50)["train"].records) == 10


def test_empty_split_is_a_data_error(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", records_of(3))
    (tmp_path / "validation.jsonl").write_text("", encoding="utf-8")
    with pytest.raises(DataError) as err:
        load(tmp_path)
    assert "validation" in str(err.value)


def test_task_path_resolves_to_generated_splits():
    splits = load("task:assistant/sft")
    assert set(splits) == {"train", "validation", "test"}
    for split in splits.values():
        assert len(split.records) > 0
        assert {"prompt", "completion"} <= set(split.records.column_names)
    assert splits["train"].origin.endswith("train.jsonl")


@pytest.mark.parametrize(("path", "named"), [("task:nope/sft", "'nope'"), ("task:assistant/nope", "'nope'")])
def test_unknown_task_or_kind_is_a_data_error(path, named):
    with pytest.raises(DataError) as err:
        load(path)
    assert path in str(err.value)
    assert named in str(err.value)


def test_hub_dataset_unreachable_offline_is_a_data_error():
    with pytest.raises(DataError, match=r"data\.sft\.path"):
        load("no-such-user/no-such-dataset-rlhf-tests")


# --------------------------------------------------------------------------------------------------
# Record formats
# --------------------------------------------------------------------------------------------------


def examples(rows, fmt="auto", strict=False, counts=None):
    return sft_examples(Rows(rows), fmt, "data.jsonl", "data.sft", strict, counts or stats())


def test_prompt_completion_strings():
    out = examples([{"prompt": "Hi", "completion": "Hello"}, {"prompt": "Bye", "completion": "Goodbye"}])
    assert [(e.prompt, e.completion) for e in out] == [("Hi", "Hello"), ("Bye", "Goodbye")]


def test_conversational_prompt_completion():
    prompt = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    completion = [{"role": "assistant", "content": "Hello"}]
    (example,) = examples([{"prompt": prompt, "completion": completion}])
    assert example.prompt == prompt
    assert example.completion == completion


def test_messages_split_at_the_last_user_turn():
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
        {"role": "user", "content": "How are you?"},
        {"role": "assistant", "content": "Fine."},
        {"role": "assistant", "content": "And you?"},
    ]
    (example,) = examples([{"messages": messages}])
    assert example.prompt == messages[:4]
    assert example.completion == messages[4:]


def test_messages_ending_with_a_user_turn_name_the_row():
    good = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    bad = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
        {"role": "user", "content": "?"},
    ]
    with pytest.raises(DataError) as err:
        examples([{"messages": good}, {"messages": bad}])
    assert "data.jsonl: row 2" in str(err.value)
    assert "assistant" in str(err.value)


def test_messages_without_a_user_turn_are_an_error():
    with pytest.raises(DataError, match="row 1"):
        examples([{"messages": [{"role": "assistant", "content": "Hello"}]}])


@pytest.mark.parametrize("value", [3, None], ids=["int", "null"])
def test_wrong_completion_type_names_row_and_field(value):
    rows = [{"prompt": "Hi", "completion": "Hello"}, {"prompt": "Hi", "completion": value}]
    with pytest.raises(DataError) as err:
        examples(rows)
    message = str(err.value)
    assert "row 2" in message
    assert "'completion'" in message
    assert ("null" if value is None else "int") in message


def test_message_without_string_content_is_an_error():
    rows = [{"prompt": [{"role": "user", "content": 1}], "completion": "Hello"}]
    with pytest.raises(DataError) as err:
        examples(rows)
    assert "row 1" in str(err.value)
    assert "'prompt'" in str(err.value)


def test_unknown_columns_with_auto_format_list_them_and_suggest_a_mapping():
    with pytest.raises(DataError) as err:
        examples([{"question": "Hi", "answer": "Hello"}])
    message = str(err.value)
    assert "data.jsonl" in message
    assert "question" in message and "answer" in message
    assert "data.sft.columns" in message


def test_explicit_format_with_missing_column_is_an_error():
    with pytest.raises(DataError) as err:
        examples([{"prompt": "Hi", "completion": "Hello"}], fmt="messages")
    assert "'messages'" in str(err.value)
    assert "data.sft.columns" in str(err.value)
    with pytest.raises(DataError, match="'completion'"):
        examples([{"prompt": "Hi", "answer": "Hello"}], fmt="prompt_completion")


def test_unknown_format_name_is_an_error():
    with pytest.raises(DataError, match=r"data\.sft\.format"):
        examples([{"prompt": "Hi", "completion": "Hello"}], fmt="pairs")


def test_explicit_format_picks_its_columns_when_several_match():
    rows = [
        {
            "prompt": "ignored",
            "completion": "ignored",
            "messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}],
        }
    ]
    (example,) = examples(rows, fmt="messages")
    assert example.prompt == [{"role": "user", "content": "Hi"}]


def test_empty_completions_are_skipped_and_counted():
    counts = stats()
    rows = [
        {"prompt": "a", "completion": "kept"},
        {"prompt": "b", "completion": ""},
        {"prompt": "c", "completion": "   \n"},
        {"prompt": "d", "completion": [{"role": "assistant", "content": " "}]},
    ]
    out = examples(rows, counts=counts)
    assert [e.completion for e in out] == ["kept"]
    assert counts.counts["empty_completion"] == 3
    assert counts.total == 3


def test_empty_completion_is_an_error_when_strict():
    with pytest.raises(DataError) as err:
        examples([{"prompt": "a", "completion": "ok"}, {"prompt": "b", "completion": ""}], strict=True)
    assert "row 2" in str(err.value)
    assert "strict" in str(err.value)


def test_formats_read_a_loaded_file(tmp_path):
    file = write_jsonl(
        tmp_path / "m.jsonl",
        [
            {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]},
        ],
    )
    split = load_split(SourceConfig(path=str(file)), "train", "data.sft")
    (example,) = sft_examples(split.records, "auto", split.origin, "data.sft", False, stats())
    assert example.prompt == [{"role": "user", "content": "Hi"}]
    assert example.completion == [{"role": "assistant", "content": "Hello"}]


# --------------------------------------------------------------------------------------------------
# Tokenisation and masking (the real SmolLM2 tokenizer and its ChatML template)
# --------------------------------------------------------------------------------------------------


@pytest.fixture
def no_template(tokenizer):
    """A copy of the tokenizer without a chat template (the session's tokenizer stays untouched)."""
    plain = copy.deepcopy(tokenizer)
    plain.chat_template = None
    return plain


def encode(renderer, prompts, responses, max_length=512, max_prompt_length=256, counts=None, strict=False):
    return encode_pairs(
        renderer, prompts, responses, max_length, max_prompt_length, counts or stats(), strict=strict
    )


def decode(tokenizer, ids):
    return tokenizer.decode(ids, skip_special_tokens=False)


def test_sft_features_mask_exactly_the_prompt(tokenizer):
    renderer = ChatRenderer(tokenizer)
    encoded = encode(renderer, ["What is two plus two?"], ["Four."])
    (p_ids,), (r_ids,) = encoded.prompt_ids, encoded.response_ids
    features = sft_features(p_ids, r_ids)
    assert features["input_ids"] == p_ids + r_ids
    assert len(features["labels"]) == len(features["input_ids"])
    assert features["labels"][: len(p_ids)] == [IGNORE_INDEX] * len(p_ids)
    assert features["labels"][len(p_ids) :] == r_ids
    assert IGNORE_INDEX not in r_ids


def test_prompt_and_response_text_under_the_chat_template(tokenizer):
    renderer = ChatRenderer(tokenizer)
    prompt, completion = "What is two plus two?", "Four."
    encoded = encode(renderer, [prompt], [completion])
    (p_ids,), (r_ids,) = encoded.prompt_ids, encoded.response_ids
    prompt_text = decode(tokenizer, p_ids)
    expected_prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
    )
    assert prompt_text == expected_prompt
    assert prompt_text.endswith("<|im_start|>assistant\n")
    assert f"<|im_start|>user\n{prompt}<|im_end|>" in prompt_text
    assert decode(tokenizer, r_ids) == completion + "<|im_end|>"
    assert r_ids[-1] == tokenizer.eos_token_id
    full = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}], tokenize=False
    )
    assert decode(tokenizer, p_ids + r_ids) + "\n" == full


def test_conversational_prompt_under_the_chat_template(tokenizer):
    renderer = ChatRenderer(tokenizer)
    prompt = [
        {"role": "system", "content": "Answer in one word."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
        {"role": "user", "content": "Sky colour?"},
    ]
    completion = [{"role": "assistant", "content": "Blue."}]
    encoded = encode(renderer, [prompt], [completion])
    (p_ids,), (r_ids,) = encoded.prompt_ids, encoded.response_ids
    assert decode(tokenizer, p_ids) == tokenizer.apply_chat_template(
        prompt, tokenize=False, add_generation_prompt=True
    )
    assert decode(tokenizer, r_ids) == "Blue.<|im_end|>"
    full = tokenizer.apply_chat_template(prompt + completion, tokenize=False)
    assert decode(tokenizer, p_ids + r_ids) + "\n" == full


def test_long_prompt_keeps_its_last_tokens_and_is_counted(tokenizer):
    renderer = ChatRenderer(tokenizer)
    prompt = " ".join(f"word{i}" for i in range(200)) + " Which word came last?"
    full = encode(renderer, [prompt], ["word199."])
    counts = stats()
    cut = encode(renderer, [prompt], ["word199."], max_length=64, max_prompt_length=32, counts=counts)
    assert len(full.prompt_ids[0]) > 32
    assert cut.prompt_ids[0] == full.prompt_ids[0][-32:]
    assert decode(tokenizer, cut.prompt_ids[0]).endswith(
        "Which word came last?<|im_end|>\n<|im_start|>assistant\n"
    )
    assert cut.response_ids[0] == full.response_ids[0]
    assert counts.counts == Counter({"truncated_prompt": 1})


def test_long_prompt_is_an_error_when_strict(tokenizer):
    renderer = ChatRenderer(tokenizer)
    prompt = " ".join(f"word{i}" for i in range(200))
    with pytest.raises(DataError, match="max_prompt_length"):
        encode(renderer, ["short", prompt], ["a", "b"], max_length=64, max_prompt_length=32, strict=True)


def test_long_response_is_cut_to_max_length_and_counted(tokenizer):
    renderer = ChatRenderer(tokenizer)
    response = " ".join(f"item{i}" for i in range(100))
    full = encode(renderer, ["List items."], [response])
    p_len = len(full.prompt_ids[0])
    max_length = p_len + 10
    counts = stats()
    cut = encode(
        renderer, ["List items."], [response], max_length=max_length, max_prompt_length=p_len, counts=counts
    )
    assert cut.prompt_ids[0] == full.prompt_ids[0]
    assert cut.response_ids[0] == full.response_ids[0][:10]
    assert len(cut.prompt_ids[0]) + len(cut.response_ids[0]) == max_length
    assert counts.counts == Counter({"truncated_response": 1})


def test_examples_that_fit_are_not_counted(tokenizer):
    counts = stats()
    encoded = encode(ChatRenderer(tokenizer), ["a", "b"], ["c", "d"], counts=counts)
    assert encoded.kept == [0, 1]
    assert counts.total == 0


def test_never_mode_gives_plain_text_and_eos(tokenizer):
    renderer = ChatRenderer(tokenizer, "never")
    assert renderer.prompt("What is two plus two?") == "What is two plus two?"
    assert renderer.response("What is two plus two?", "Four.") == "Four." + tokenizer.eos_token
    assert renderer.adds_special_tokens
    encoded = encode(renderer, ["What is two plus two?"], ["Four."])
    assert encoded.prompt_ids[0] == tokenizer("What is two plus two?", add_special_tokens=True)["input_ids"]
    assert "<|im_start|>" not in decode(tokenizer, encoded.prompt_ids[0])
    assert decode(tokenizer, encoded.response_ids[0]) == "Four." + tokenizer.eos_token
    assert encoded.response_ids[0][-1] == tokenizer.eos_token_id


def test_auto_mode_with_a_template_writes_special_tokens_as_text(tokenizer):
    renderer = ChatRenderer(tokenizer, "auto")
    assert not renderer.adds_special_tokens


def test_no_template_and_string_data_uses_plain_text(no_template):
    renderer = ChatRenderer(no_template, "auto")
    assert renderer.prompt("Hi") == "Hi"
    assert renderer.response("Hi", "Hello") == "Hello" + no_template.eos_token
    assert renderer.adds_special_tokens
    assert not no_template.chat_template


def test_no_template_and_message_data_uses_the_fallback_template(no_template):
    renderer = ChatRenderer(no_template, "auto")
    prompt = [{"role": "user", "content": "Hi"}]
    completion = [{"role": "assistant", "content": "Hello"}]
    assert renderer.prompt(prompt) == "User: Hi\n\nAssistant:"
    response = renderer.response(prompt, completion)
    assert response.startswith(" Hello")
    # Installed, so the tokenizer saved with the model prompts later stages in the same format,
    # plain-string prompts included.
    assert no_template.chat_template == FALLBACK_CHAT_TEMPLATE
    assert ChatRenderer(no_template, "auto").prompt("Hi") == "User: Hi\n\nAssistant:"
    encoded = encode(renderer, [prompt], [completion])
    assert decode(no_template, encoded.prompt_ids[0]) == "User: Hi\n\nAssistant:"


def test_fallback_template_response_ends_with_eos(no_template):
    """A response must end with EOS so that the policy learns to stop, as it does in plain text."""
    renderer = ChatRenderer(no_template, "auto")
    prompt = [{"role": "user", "content": "Hi"}]
    response = renderer.response(prompt, [{"role": "assistant", "content": "Hello"}])
    assert response.endswith(no_template.eos_token)
    encoded = encode(renderer, [prompt], [[{"role": "assistant", "content": "Hello"}]])
    assert encoded.response_ids[0][-1] == no_template.eos_token_id


def test_always_mode_installs_the_fallback_template(no_template):
    renderer = ChatRenderer(no_template, "always")
    assert no_template.chat_template == FALLBACK_CHAT_TEMPLATE
    assert renderer.prompt("Hi") == "User: Hi\n\nAssistant:"
    assert renderer.response("Hi", "Hello").startswith(" Hello")
    assert not renderer.adds_special_tokens


def test_always_mode_keeps_an_existing_template(tokenizer):
    template = tokenizer.chat_template
    renderer = ChatRenderer(tokenizer, "always")
    assert tokenizer.chat_template == template
    assert renderer.prompt("Hi").endswith("<|im_start|>assistant\n")


# --------------------------------------------------------------------------------------------------
# Batching
# --------------------------------------------------------------------------------------------------


def test_pad_right_and_left_rounded_to_a_multiple():
    seqs = [[1, 2, 3], [4], [5, 6, 7, 8, 9]]
    right = pad(seqs, 0, multiple_of=4)
    assert right.dtype == torch.long
    assert right.tolist() == [[1, 2, 3, 0, 0, 0, 0, 0], [4, 0, 0, 0, 0, 0, 0, 0], [5, 6, 7, 8, 9, 0, 0, 0]]
    left = pad(seqs, -1, left=True, multiple_of=4)
    assert left.tolist() == [
        [-1, -1, -1, -1, -1, 1, 2, 3],
        [-1, -1, -1, -1, -1, -1, -1, 4],
        [-1, -1, -1, 5, 6, 7, 8, 9],
    ]
    assert pad(seqs, 0).shape == (3, 5)
    assert pad([[1, 2, 3, 4]], 0, multiple_of=4).shape == (1, 4)
    assert pad([[1], []], 7).tolist() == [[1], [7]]


@pytest.mark.parametrize("left", [False, True])
def test_attention_mask_marks_exactly_the_tokens(left):
    seqs = [[11, 12, 13], [14], [15, 16, 17, 18, 19]]
    mask = attention_mask(seqs, left=left, multiple_of=8)
    padded = pad(seqs, 0, left=left, multiple_of=8)
    assert mask.shape == padded.shape == (3, 8)
    assert mask.tolist() == (padded != 0).long().tolist()
    assert mask.sum(dim=1).tolist() == [3, 1, 5]


def test_collator_pads_labels_with_ignore_index_and_masks_padding():
    features = [sft_features([1, 2, 3], [4, 5]), sft_features([6], [7, 8, 9, 10, 11, 12])]
    batch = CausalLMCollator(pad_token_id=0, multiple_of=8)(features)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape == (2, 8)
    assert batch["input_ids"].tolist() == [[1, 2, 3, 4, 5, 0, 0, 0], [6, 7, 8, 9, 10, 11, 12, 0]]
    assert batch["labels"].tolist() == [
        [-100, -100, -100, 4, 5, -100, -100, -100],
        [-100, 7, 8, 9, 10, 11, 12, -100],
    ]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1, 1, 0]]


def test_collator_mask_is_not_confused_by_tokens_equal_to_padding():
    # A real token whose id equals the pad id (e.g. EOS used as pad) still counts in the mask.
    batch = CausalLMCollator(pad_token_id=2, multiple_of=1)(
        [sft_features([1], [2]), sft_features([1], [3, 2])]
    )
    assert batch["attention_mask"].tolist() == [[1, 1, 0], [1, 1, 1]]
    assert batch["labels"].tolist() == [[-100, 2, -100], [-100, 3, 2]]


def test_sampler_order_depends_on_seed_and_epoch():
    a, b = ResumableSampler(50, seed=3), ResumableSampler(50, seed=3)
    first = list(a)
    assert sorted(first) == list(range(50))
    assert first == list(b)
    assert first == list(a)  # iterating again gives the same epoch
    a.set_epoch(1)
    second = list(a)
    assert sorted(second) == list(range(50))
    assert second != first
    b.set_epoch(1)
    assert list(b) == second
    assert list(ResumableSampler(50, seed=4)) != first
    assert len(a) == 50


def test_sampler_without_shuffle_is_in_order():
    assert list(ResumableSampler(5, seed=0, shuffle=False)) == [0, 1, 2, 3, 4]


def test_sampler_skip_applies_once():
    sampler = ResumableSampler(20, seed=1)
    sampler.set_epoch(2)
    full = list(sampler)
    sampler.skip_next(7)
    assert list(sampler) == full[7:]
    assert list(sampler) == full
    sampler.set_epoch(3)
    assert sorted(sampler) == list(range(20))


def test_sampler_shards_ranks_disjointly():
    size, world = 21, 2
    full = list(ResumableSampler(size, seed=5))
    shards = [ResumableSampler(size, seed=5, rank=r, world_size=world) for r in range(world)]
    orders = [list(s) for s in shards]
    assert len(orders[0]) == len(orders[1]) == size // world == len(shards[0]) == len(shards[1])
    assert not set(orders[0]) & set(orders[1])
    assert sorted(orders[0] + orders[1]) == sorted(full[: (size // world) * world])
    for shard in shards:
        shard.set_epoch(1)
    assert [list(s) for s in shards] != orders
    shards[1].skip_next(3)
    assert list(shards[1]) == _epoch(size, 5, 1, 1, world)[3:]
    assert list(shards[1]) == _epoch(size, 5, 1, 1, world)


def _padding_share(order, lengths, batch):
    """Share of a padded batch's positions that are padding, over an epoch in `order`."""
    padded = real = 0
    for start in range(0, len(order), batch):
        chunk = [lengths[i] for i in order[start : start + batch]]
        padded += max(chunk) * len(chunk)
        real += sum(chunk)
    return 1 - real / padded


def test_length_grouped_sampler_cuts_padding_and_keeps_every_example():
    generator = torch.Generator().manual_seed(0)
    lengths = torch.randint(5, 120, (1000,), generator=generator).tolist()
    plain = ResumableSampler(1000, seed=1)
    grouped = ResumableSampler(1000, seed=1, lengths=lengths, batch_size=8)
    assert sorted(grouped) == list(range(1000))
    assert list(grouped) == list(grouped)  # deterministic for (seed, epoch)
    assert _padding_share(list(grouped), lengths, 8) < 0.5 * _padding_share(list(plain), lengths, 8)
    # Batches are not in length order: long and short ones alternate as with plain shuffling.
    maxima = [max(lengths[i] for i in list(grouped)[k : k + 8]) for k in range(0, 1000, 8)]
    assert maxima != sorted(maxima) and maxima != sorted(maxima, reverse=True)
    grouped.set_epoch(1)
    assert sorted(grouped) == list(range(1000)) and list(grouped) != list(
        ResumableSampler(1000, seed=1, lengths=lengths, batch_size=8)
    )


def test_length_grouped_batches_stay_whole_across_ranks_and_resume():
    # 45 examples, 2 ranks x batch 4: every global batch of 8 is one length group, the partial last.
    lengths = [(i * 37) % 101 for i in range(45)]
    shards = [
        ResumableSampler(45, seed=2, rank=r, world_size=2, lengths=lengths, batch_size=4) for r in range(2)
    ]
    orders = [list(s) for s in shards]
    assert not set(orders[0]) & set(orders[1]) and len(orders[0]) == len(orders[1]) == 22
    whole = ResumableSampler(45, seed=2, lengths=lengths, batch_size=8)
    runs = [sorted(list(whole)[k : k + 8]) for k in range(0, 40, 8)]
    for k in range(5):
        assert sorted(orders[0][4 * k : 4 * k + 4] + orders[1][4 * k : 4 * k + 4]) == runs[k]
    shards[0].skip_next(8)
    assert list(shards[0]) == orders[0][8:]


def test_data_module_groups_training_batches_by_the_collators_length():
    items = [sft_features([1] * (1 + (i * 7) % 40), [2]) for i in range(64)]
    collate = CausalLMCollator(0, multiple_of=1)
    grouped = ExamplesDataModule(
        {"train": items, "validation": items[:2]}, collate, 8, 2, seed=0, group_by_length=True
    )
    plain = ExamplesDataModule({"train": items, "validation": items[:2]}, collate, 8, 2, seed=0)
    padded = [sum(b["input_ids"].numel() for b in m.train_dataloader()) for m in (grouped, plain)]
    assert padded[0] < 0.8 * padded[1]
    seen = sorted(
        len(row) - row.count(0) for b in grouped.train_dataloader() for row in b["input_ids"].tolist()
    )
    assert seen == sorted(collate.length(i) for i in items)


def _epoch(size, seed, epoch, rank, world):
    sampler = ResumableSampler(size, seed=seed, rank=rank, world_size=world)
    sampler.set_epoch(epoch)
    return list(sampler)


def test_data_module_batches_every_training_example_once():
    items = [sft_features([i], [i + 100]) for i in range(10)]
    module = ExamplesDataModule(
        {"train": items, "validation": items[:3]}, CausalLMCollator(0, multiple_of=1), 4, 2, seed=0
    )
    batches = list(module.train_dataloader())
    assert [b["input_ids"].shape[0] for b in batches] == [4, 4, 2]
    seen = sorted(row[0] for b in batches for row in b["input_ids"].tolist())
    assert seen == list(range(10))
    val = list(module.val_dataloader())
    assert [row[0] for b in val for row in b["input_ids"].tolist()] == [0, 1, 2]


# --------------------------------------------------------------------------------------------------
# prepare_sft end to end
# --------------------------------------------------------------------------------------------------


def test_prepare_sft_reports_kept_and_truncated_examples(tmp_path, tokenizer):
    rows = [{"prompt": f"Question {i}?", "completion": f"Answer {i}."} for i in range(8)]
    rows[0]["completion"] = " ".join(f"long{i}" for i in range(60))
    rows.append({"prompt": "Nothing to say?", "completion": ""})
    train = write_jsonl(tmp_path / "sft.jsonl", rows)
    data = DataConfig(
        name="unit",
        sft=SourceConfig(path=str(train), eval_split=None),
        max_length=48,
        max_prompt_length=40,
        validation_fraction=0.25,
    )
    prepared = prepare_sft(data, ChatRenderer(tokenizer), seed=0)
    assert set(prepared.splits) == {"train", "validation"}
    for split, features in prepared.splits.items():
        assert features, split
        for f in features:
            assert len(f["input_ids"]) == len(f["labels"]) <= 48
            assert f["labels"][0] == IGNORE_INDEX
            assert any(label != IGNORE_INDEX for label in f["labels"])
        assert prepared.stats[f"data/sft_{split}_examples"] == len(features)
        assert len(prepared.prompts[split]) == len(prepared.references[split]) == len(features)
    assert sum(prepared.stats[f"data/sft_{s}_examples"] for s in prepared.splits) == 8
    truncated = sum(prepared.stats.get(f"data/sft_{s}_truncated_response", 0) for s in prepared.splits)
    assert truncated == 1
    empty = sum(prepared.stats.get(f"data/sft_{s}_empty_completion", 0) for s in prepared.splits)
    assert empty == 1
    assert not any(key.endswith("truncated_prompt") for key in prepared.stats)
    references = [r for refs in prepared.references.values() for r in refs]
    assert rows[0]["completion"] in references


def test_records_cut_in_several_splits_make_one_warning_that_says_what_to_raise(caplog):
    import logging

    from rlhf.data.prepare import Prepared, _warn_dropped

    prepared = Prepared(splits={"train": [1] * 256, "validation": [1] * 200, "test": [1] * 200})
    prepared.stats = {
        "data/sft_train_examples": 256,
        "data/sft_train_truncated_response": 20,
        "data/sft_validation_examples": 200,
        "data/sft_validation_truncated_response": 15,
        "data/sft_test_examples": 200,
    }
    with caplog.at_level(logging.WARNING, logger="rlhf.data.prepare"):
        _warn_dropped("sft", prepared)
    (record,) = caplog.records
    assert record.getMessage() == (
        "data.sft: train 256 kept (20 truncated response); validation 200 kept (15 truncated response). "
        "To keep them: raise data.max_length"
    )
