"""data.prompt_mix: the RL training prompts drawn again by category, and its bad values failing in
one line that names the key."""

from __future__ import annotations

from collections import Counter

import pytest
from test_bad_inputs import _run_in_process

from rlhf.data.mix import mix_by_category, mix_problems
from rlhf.errors import DataError

# The shipped task's proportions: 45 arithmetic, 40 facts, 15 unsafe prompts.
ITEMS = [
    {"prompt": f"{category} {i}", "slice": category}
    for category, count in (("arithmetic", 45), ("facts", 40), ("unsafe", 15))
    for i in range(count)
]


def test_named_shares_are_honoured_and_the_rest_keeps_its_proportions():
    mixed = mix_by_category(ITEMS, {"unsafe": 0.3}, seed=0)
    counts = Counter(item["slice"] for item in mixed)
    assert len(mixed) == 100 and counts["unsafe"] == 30
    # 15 unsafe prompts for 30 places: each twice, none left out
    assert Counter(item["prompt"] for item in mixed if item["slice"] == "unsafe") == {
        f"unsafe {i}": 2 for i in range(15)
    }
    # 70 places from 85 others, drawn without repeats
    others = [item["prompt"] for item in mixed if item["slice"] != "unsafe"]
    assert len(others) == len(set(others)) == 70


def test_the_mix_is_reproducible_with_the_seed_and_empty_is_no_mix():
    assert mix_by_category(ITEMS, {"unsafe": 0.3}, 1) == mix_by_category(ITEMS, {"unsafe": 0.3}, 1)
    assert mix_by_category(ITEMS, {"unsafe": 0.3}, 1) != mix_by_category(ITEMS, {"unsafe": 0.3}, 2)
    assert mix_by_category(ITEMS, {}, 0) is ITEMS


def test_a_commoner_category_is_subsampled():
    counts = Counter(item["slice"] for item in mix_by_category(ITEMS, {"arithmetic": 0.1, "facts": 0.1}, 0))
    assert counts == {"arithmetic": 10, "facts": 10, "unsafe": 80}


@pytest.mark.parametrize(
    ("mix", "key", "text"),
    [
        ({"unsafe": 1.5}, "prompt_mix.unsafe", "[0, 1]"),
        ({"unsafe": -0.1}, "prompt_mix.unsafe", "[0, 1]"),
        ({"unsafe": 0.6, "facts": 0.6}, "prompt_mix", "over 1"),
    ],
)
def test_shares_outside_0_1_are_config_problems(mix, key, text):
    [(where, message)] = mix_problems(mix)
    assert where == key and text in message


def test_an_unknown_category_or_prompts_without_one_are_data_errors():
    with pytest.raises(DataError, match=r"data\.prompt_mix\.nope: .*categories: arithmetic, facts, unsafe"):
        mix_by_category(ITEMS, {"nope": 0.3}, 0)
    with pytest.raises(DataError, match=r"data\.prompt_mix: the prompts name no category"):
        mix_by_category([{"prompt": "p"}], {"unsafe": 0.3}, 0)
    with pytest.raises(DataError, match=r"data\.prompt_mix: shares sum to 0\.6 but name every category"):
        mix_by_category(ITEMS, {"arithmetic": 0.2, "facts": 0.2, "unsafe": 0.2}, 0)


RL = [
    "experiment=smoke",
    "stage=ppo",
    "stage.policy_from=base",
    "stage.reward_from=fn:rlhf.tasks.assistant.gold_reward",
]


@pytest.mark.parametrize(
    ("override", "names"),
    [
        ("+data.prompt_mix.nope=0.3", ["data.prompt_mix.nope", "categories: arithmetic, facts, unsafe"]),
        ("+data.prompt_mix.unsafe=1.5", ["data.prompt_mix.unsafe", "[0, 1]"]),
        ("data.prompt_mix.unsafe=0.3", ["+data.prompt_mix.unsafe=<share>"]),
    ],
)
def test_bad_prompt_mix_fails_in_one_line(tmp_path, monkeypatch, capfd, override, names):
    argv = [*RL, "tracking=none", f"hydra.run.dir={tmp_path}/out", override]
    code, stdout, stderr = _run_in_process(argv, tmp_path, monkeypatch, capfd)
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert code == 2 and lines[-1].startswith("rlhf: error:"), (stdout + stderr)[-3000:]
    assert all(name in lines[-1] for name in names), lines[-1]
    assert "Traceback" not in stdout + stderr
