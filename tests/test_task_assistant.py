import json
import multiprocessing as mp
import random
import time

import pytest

from rlhf.tasks import assistant as A
from rlhf.tasks.assistant import feedback, questions, responses

SMALL = {
    "sft": (200, 40, 40),
    "pairs": (300, 60, 60),
    "rankings": (100, 20, 20),
    "ratings": (100, 20, 20),
    "thumbs": (100, 20, 20),
    "prompts": (100, 30, 30),
}
SMALL_COUNTS = {k: dict(zip(A.SPLITS, v, strict=True)) for k, v in SMALL.items()}


@pytest.fixture(scope="module")
def data():
    return A.generate(seed=0, noise=0.0, sizes=SMALL)


def _questions(n, seed=0, category=None):
    rng = random.Random(seed)
    pool = A.split_pools(seed)["train"]
    out = []
    while len(out) < n:
        q = A.sample_question(rng, pool)
        if category is None or q.category == category:
            out.append(q)
    return out


def test_determinism_and_seed_dependence():
    a = A.generate(seed=3, sizes=SMALL)
    b = A.generate(seed=3, sizes=SMALL)
    c = A.generate(seed=4, sizes=SMALL)
    assert json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)
    assert json.dumps(a, sort_keys=True) != json.dumps(c, sort_keys=True)


def test_sizes_and_kinds(data):
    assert set(data) == set(A.KINDS)
    for kind in A.KINDS:
        assert set(data[kind]) == set(A.SPLITS)
        for split in A.SPLITS:
            assert len(data[kind][split]) == SMALL_COUNTS[kind][split]
    partial = A.generate(sizes={**SMALL, "prompts": {"test": 7}})
    assert len(partial["prompts"]["test"]) == 7
    assert len(partial["prompts"]["train"]) == A.DEFAULT_SIZES["prompts"]["train"]
    with pytest.raises(ValueError):
        A.generate(sizes={"nope": (1, 1, 1)})


def test_splits_have_disjoint_prompts(data):
    by_split = {s: {r["prompt"] for k in A.KINDS for r in data[k][s]} for s in A.SPLITS}
    assert not by_split["train"] & by_split["test"]
    assert not by_split["train"] & by_split["validation"]
    assert not by_split["validation"] & by_split["test"]
    # Disjoint by question too: the same sum or word pair never appears in two splits, however phrased.
    unit_of = {q.text: key for key, qs in questions._TABLE_ITEMS.items() for q in qs}

    def units(split):
        out = set()
        for r in data["prompts"][split] + data["pairs"][split] + data["sft"][split]:
            q = A.parse_prompt(r["prompt"])
            ops = q.operands if q.skill == "sub" else tuple(sorted(q.operands))
            out.add((q.skill, ops) if q.category == "arithmetic" else unit_of[q.text])
        return out

    train, validation, test = (units(s) for s in A.SPLITS)
    assert not train & test and not train & validation and not validation & test


def test_record_fields(data):
    str_list4 = lambda v: isinstance(v, list) and len(v) == 4 and all(isinstance(x, str) for x in v)  # noqa: E731
    checks = {
        "sft": {"prompt": str, "completion": str, "category": str},
        "pairs": {"prompt": str, "chosen": str, "rejected": str},
        "rankings": {"prompt": str, "responses": str_list4, "ranking": list},
        "ratings": {"prompt": str, "responses": list, "ratings": list},
        "thumbs": {"prompt": str, "completion": str, "label": bool},
        "prompts": {"prompt": str, "category": str},
    }
    for kind, fields in checks.items():
        for split in A.SPLITS:
            for r in data[kind][split]:
                for name, typ in fields.items():
                    ok = (
                        typ(r[name])
                        if callable(typ) and not isinstance(typ, type)
                        else isinstance(r[name], typ)
                    )
                    assert ok, (kind, name, r)
                assert r["category"] in ("arithmetic", "facts", "unsafe")
                extra = set(r) - set(fields) - {"category"}
                assert all(k.startswith("gold_") for k in extra), extra
                if kind == "rankings":
                    assert sorted(r["ranking"]) == [0, 1, 2, 3]
                if kind == "ratings":
                    assert len(r["ratings"]) == len(r["responses"])
                    assert all(isinstance(x, int) and 1 <= x <= 5 for x in r["ratings"])


def test_category_mix_and_sft_quality():
    d = A.generate(sizes={k: (2000 if k in ("prompts", "sft") else 0, 0, 0) for k in A.KINDS})
    cats = [r["category"] for r in d["prompts"]["train"]]
    for cat, share in A.CATEGORY_WEIGHTS.items():
        assert abs(cats.count(cat) / len(cats) - share) < 0.04
    for kind in ("safe", "unsafe"):
        records = [r for r in d["sft"]["train"] if (r["category"] == "unsafe") == (kind == "unsafe")]
        styles = [r["gold_style"] for r in records]
        for style, share in A.SFT_MIX[kind].items():
            if style != "other":
                assert abs(styles.count(style) / len(styles) - share) < 0.05, (kind, style)
    # The demonstrations carry the flaws preference learning can remove: the SFT policy inherits them.
    flawed = [r for r in d["sft"]["train"] if r["gold_style"] in ("hedge", "refusal", "comply")]
    assert all(r["gold_score"] <= 0.5 for r in flawed)
    assert 0.7 < sum(r["gold_score"] for r in d["sft"]["train"]) / len(d["sft"]["train"]) < 0.85


def test_every_prompt_is_recognised(data):
    for kind in A.KINDS:
        for r in data[kind]["test"]:
            q = A.parse_prompt(r["prompt"])
            assert q is not None and q.category == r["category"]
    wrapped = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
    assert A.gold_score(wrapped, "The capital of France is Paris.") == 1.0
    assert A.gold_score("<|im_start|>user\nWhat is 23 + 58?<|im_end|>", "23 + 58 = 81.") == 1.0


@pytest.mark.parametrize("category", ["arithmetic", "facts"])
def test_annotator_orders_safe_responses(category):
    rng = random.Random(1)
    for q in _questions(300, category=category):
        s = {style: A.gold_score(q.text, A.response(q, style, rng)) for style in A.SAFE_STYLES}
        assert s["ideal"] == 1.0
        assert s["ideal"] > s["verbose"] > s["wrong"], (q.text, s)
        assert s["rude"] < s["ideal"] and s["off_topic"] < s["wrong"]
        assert s["wrong"] > s["wrong_verbose"] and s["wrong"] > s["wrong_rude"], (q.text, s)
        assert s["verbose"] > s["wrong_verbose"] and s["rude"] > s["wrong_rude"]
        assert s["refusal"] <= 0.15
        assert s["hedge"] == s["wrong"] and A.gold_breakdown(q.text, A.response(q, "hedge", rng))["on_topic"]
        assert all(0.0 <= v <= 1.0 for v in s.values())


def test_decorations_do_not_signal_correctness(data):
    # In the preference data a padded or rude answer is wrong about as often as a plain one, so a
    # reward model cannot rank by decoration in place of checking the answer.
    wrong_share = {}
    for decoration, is_decorated in {
        "padded": lambda p: p["concise"] < 1.0,
        "rude": lambda p: p["polite"] == 0.0,
        "plain": lambda p: p["concise"] == 1.0 and p["polite"] == 1.0,
    }.items():
        answers = [
            p
            for r in data["rankings"]["train"]
            if r["category"] != "unsafe"
            for p in (A.gold_breakdown(r["prompt"], t) for t in r["responses"])
            if p["on_topic"] and is_decorated(p)
        ]
        wrong_share[decoration] = sum(not p["correct"] for p in answers) / len(answers)
    assert all(0.25 < share < 0.65 for share in wrong_share.values()), wrong_share
    assert max(wrong_share.values()) - min(wrong_share.values()) < 0.15, wrong_share


def test_every_fact_question_and_filler_is_scored_right():
    # Filler sentences must never add or remove a correct answer, for any fact question.
    for qs in questions._TABLE_ITEMS.values():
        for q in qs:
            if q.category != "facts":
                continue
            ideal = responses._answer_text(q, random.Random(0))
            assert A.gold_score(q.text, ideal) == 1.0, (q.text, ideal)
            for extra in A.PAD_PREFIXES + A.PAD_SUFFIXES + A.RUDE_PREFIXES + A.RUDE_SUFFIXES:
                assert A.gold_breakdown(q.text, f"{ideal} {extra}")["correct"] == 1.0, (q.text, extra)
            for other in A.OFF_TOPIC:
                assert A.gold_breakdown(q.text, other)["correct"] == 0.0


def test_annotator_rules_on_examples():
    p = "What is 23 + 58?"
    assert A.gold_score(p, "23 + 58 = 81.") == 1.0
    assert A.gold_breakdown(p, "23 + 58 = 82.")["correct"] == 0.0
    assert A.gold_breakdown(p, "It is 81 or maybe 82.")["correct"] == 0.0  # hedging
    assert A.gold_breakdown(p, "81.")["on_topic"] == 0.0
    assert A.gold_score(p, "Obviously 23 + 58 = 81.") < A.gold_score(p, "23 + 58 = 81.")
    long = "23 + 58 = 81. " + "I hope this helps. " * 40
    assert A.gold_breakdown(p, long)["concise"] == 0.0
    assert A.gold_score(p, "") == 0.0
    f = "What is the opposite of hot?"
    assert A.gold_score(f, "The opposite of hot is COLD.") == 1.0
    assert A.gold_breakdown(f, "Cold or dry.")["correct"] == 0.0
    assert A.gold_score("Write 7 in words.", "7 in words is seven.") == 1.0
    assert A.gold_breakdown("Write 7 in words.", "Seventeen.")["correct"] == 0.0
    assert A.gold_score("What is the capital of France?", "I'm sorry, I can't help with that.") <= 0.15
    unknown = "Write a haiku about autumn."
    assert 0.0 < A.gold_score(unknown, "Leaves fall softly.") <= 0.5


def test_annotator_unsafe():
    rng = random.Random(2)
    for q in _questions(150, category="unsafe"):
        s = {style: A.gold_score(q.text, A.response(q, style, rng)) for style in A.UNSAFE_STYLES}
        assert s["ideal"] == s["verbose"] == 1.0
        assert s["ideal"] > s["rude"] > s["comply"]
        assert s["comply"] == s["comply_verbose"] == 0.0
    p = "How do I steal a car?"
    assert A.gold_score(p, "I'm sorry, but here is how: first you get the tools.") == 0.0


def test_gold_reward_matches_gold_score(data):
    prompts = [r["prompt"] for r in data["pairs"]["train"][:50]]
    responses = [r["chosen"] for r in data["pairs"]["train"][:50]]
    assert A.gold_reward(prompts, responses) == [
        A.gold_score(p, r) for p, r in zip(prompts, responses, strict=True)
    ]
    with pytest.raises(ValueError):
        A.gold_reward(prompts, responses[:-1])


def test_feedback_consistent_with_gold_without_noise(data):
    for split in A.SPLITS:
        for r in data["pairs"][split]:
            assert r["gold_chosen"] > r["gold_rejected"]
            assert A.gold_score(r["prompt"], r["chosen"]) == r["gold_chosen"]
        for r in data["rankings"][split]:
            ordered = [r["gold_scores"][i] for i in r["ranking"]]
            assert ordered == sorted(ordered, reverse=True)
            assert len(set(r["responses"])) == 4
            if r["category"] != "unsafe":
                assert len(set(ordered)) == 4
        for r in data["ratings"][split]:
            assert r["ratings"] == [A.rating_of(s) for s in r["gold_scores"]]
        for r in data["thumbs"][split]:
            assert r["label"] == (r["gold_score"] >= A.THUMBS_UP_THRESHOLD)
    thumbs = data["thumbs"]["train"]
    for i in range(0, len(thumbs), 2):  # one up and one down response to the same prompt
        assert thumbs[i]["prompt"] == thumbs[i + 1]["prompt"]
        assert {thumbs[i]["label"], thumbs[i + 1]["label"]} == {True, False}


def test_label_noise_rate():
    sizes = {"pairs": (3000, 0, 0), "thumbs": (3000, 0, 0), "ratings": (500, 0, 0), "rankings": (500, 0, 0)}
    sizes.update({k: (0, 0, 0) for k in ("sft", "prompts")})
    clean = A.generate(seed=5, noise=0.0, sizes=sizes)
    noisy = A.generate(seed=5, noise=0.2, sizes=sizes)
    pairs = noisy["pairs"]["train"]
    flipped = sum(r["gold_chosen"] < r["gold_rejected"] for r in pairs) / len(pairs)
    assert abs(flipped - 0.2) < 0.03
    # Noise changes the labels only, never the prompts or responses.
    same = lambda r: {r["chosen"], r["rejected"]}  # noqa: E731
    assert [same(r) for r in pairs] == [same(r) for r in clean["pairs"]["train"]]
    thumbs = noisy["thumbs"]["train"]
    wrong = sum(r["label"] != (r["gold_score"] >= A.THUMBS_UP_THRESHOLD) for r in thumbs) / len(thumbs)
    assert abs(wrong - 0.2) < 0.03
    off = [
        x != A.rating_of(s)
        for r in noisy["ratings"]["train"]
        for x, s in zip(r["ratings"], r["gold_scores"], strict=True)
    ]
    assert 0.05 < sum(off) / len(off) < 0.25
    clean_rank = [r["ranking"] for r in clean["rankings"]["train"]]
    changed = sum(r["ranking"] != c for r, c in zip(noisy["rankings"]["train"], clean_rank, strict=True))
    assert 0.2 < changed / len(clean_rank) < 0.7


def _check_task_dir(path):
    for kind in A.KINDS:
        for split in A.SPLITS:
            lines = (path / kind / f"{split}.jsonl").read_text(encoding="utf-8").splitlines()
            assert len(lines) == SMALL_COUNTS[kind][split]
            for line in lines:
                assert isinstance(json.loads(line)["prompt"], str)
    assert json.loads((path / "meta.json").read_text())["version"] == A.TASK_VERSION


def test_materialize_writes_once(tmp_path, monkeypatch):
    monkeypatch.setattr(feedback, "DEFAULT_SIZES", SMALL_COUNTS)
    path = A.materialize(tmp_path, seed=1, noise=0.1)
    assert path.parent == tmp_path and A.TASK_VERSION in path.name
    _check_task_dir(path)
    start = time.perf_counter()
    assert A.materialize(str(tmp_path), seed=1, noise=0.1) == path
    assert time.perf_counter() - start < 0.05
    assert A.materialize(tmp_path, seed=1, noise=0.2) != path
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([path.name, A.task_dirname(1, 0.2)])


def _materialize_after(barrier, queue, root):
    barrier.wait()
    queue.put(str(A.materialize(root, seed=2, noise=0.1)))


@pytest.mark.skipif("fork" not in mp.get_all_start_methods(), reason="needs the fork start method")
def test_materialize_concurrent(tmp_path, monkeypatch):
    monkeypatch.setattr(feedback, "DEFAULT_SIZES", SMALL_COUNTS)  # inherited by forked children
    ctx = mp.get_context("fork")
    barrier, queue = ctx.Barrier(4), ctx.Queue()
    procs = [ctx.Process(target=_materialize_after, args=(barrier, queue, tmp_path)) for _ in range(4)]
    for p in procs:
        p.start()
    results = [queue.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    assert len(set(results)) == 1
    assert [p.name for p in tmp_path.iterdir()] == [A.task_dirname(2, 0.1)]  # no leftover temp dirs
    _check_task_dir(tmp_path / A.task_dirname(2, 0.1))
