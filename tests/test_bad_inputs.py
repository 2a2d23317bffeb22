"""Every bad input ends the same way: exit code 2, one last line `rlhf: error: ...` naming the key, file
or column, no traceback, the MLflow run (if one was made) FAILED with the error as a tag, no run left
RUNNING, and nothing already written (earlier outputs, the cached task data) touched.

One table, run through the CLI's entry point in one shared directory (so the cases also check each
other's outputs stay untouched); each fails at validation, data loading or model loading. Most run in
this process (the libraries are imported once: about a second a case); a few, one per phase they fail
in, run as a separate `python -m rlhf` process as a user would.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
from conftest import run_cli, store_uri

# Cases: (id, command-line arguments, what the error line must name). {d} is the directory of the
# prepared files and models, {m} the user's own model directory.
GOOD_SFT = [{"prompt": f"What is {i} plus {i}?", "completion": f"{2 * i}."} for i in range(12)]
CASES = [
    # files
    ("missing-file", ["data.sft.path={d}/nowhere.jsonl"], ["data.sft.path", "nowhere.jsonl"]),
    ("not-utf8", ["data.sft.path={d}/latin1.jsonl"], ["latin1.jsonl:2", "byte", "UTF-8"]),
    ("utf16", ["data.sft.path={d}/utf16.jsonl"], ["utf16.jsonl", "UTF-16"]),
    ("empty-file", ["data.sft.path={d}/empty.jsonl"], ["empty.jsonl", "empty"]),
    ("wrapped-json", ["data.sft.path={d}/wrapped.json"], ["wrapped.json", "'data'"]),
    ("arrays-per-line", ["data.sft.path={d}/arrays.jsonl"], ["arrays.jsonl:1", "JSON object"]),
    ("malformed-line", ["data.sft.path={d}/broken.jsonl"], ["broken.jsonl:3", "malformed"]),
    ("unknown-suffix", ["data.sft.path={d}/notes.txt"], ["notes.txt", "unsupported file type"]),
    ("csv-not-utf8", ["data.sft.path={d}/latin1.csv"], ["latin1.csv:2", "UTF-8"]),
    ("empty-csv", ["data.sft.path={d}/empty.csv"], ["empty.csv", "empty"]),
    ("one-record", ["data.sft.path={d}/one.jsonl"], ["one.jsonl", "at least 2"]),
    # the wrong columns are the culprit, however few the records
    (
        "one-record-wrong-columns",
        ["data.sft.path={d}/one_qa.jsonl"],
        ["one_qa.jsonl", "'prompt'", "question"],
    ),
    (
        "one-prompt-repeated",
        ["data.sft.path={d}/same_prompt.jsonl"],
        ["same_prompt.jsonl", "2 distinct prompts"],
    ),
    # columns
    (
        "unknown-columns-sft",
        ["data.sft.path={d}/qa.jsonl"],
        ["qa.jsonl", "'prompt'", "question", "data.sft.columns"],
    ),
    (
        "unknown-columns-rm",
        ["stage=rm", "stage.init_from=base", "data.preference.path={d}/qa.jsonl"],
        ["qa.jsonl", "'chosen'", "data.preference.columns"],
    ),
    (
        "mapped-column-absent",
        ["data.sft.path={d}/qa.jsonl", "+data.sft.columns.prompt=quest"],
        ["data.sft.columns", "'quest'"],
    ),
    ("mapping-without-plus", ["data.sft.columns.prompt=question"], ["+data.sft.columns.prompt"]),
    (
        "format-lacks-column",
        ["data.sft.path={d}/sft.jsonl", "data.sft.format=messages"],
        ["sft.jsonl", "'messages'"],
    ),
    (
        "slice-column-absent",
        ["stage=rm", "stage.init_from=base", "data.preference.slice_by=nope"],
        ["data.preference.slice_by", "'nope'"],
    ),
    # records
    ("empty-completions", ["data.sft.path={d}/blank.jsonl"], ["blank.jsonl", "empty completion"]),
    (
        "identical-pairs",
        ["stage=rm", "stage.init_from=base", "data.preference.path={d}/identical.jsonl"],
        ["identical.jsonl", "identical pair"],
    ),
    (
        "prompts-too-long-rm",
        ["stage=rm", "stage.init_from=base", "data.preference.path={d}/long_pairs.jsonl"],
        ["long_pairs.jsonl", "prompt too long", "data.max_prompt_length"],
    ),
    (
        "prompts-too-long-ppo",
        [
            "stage=ppo",
            "stage.policy_from=base",
            "stage.reward_from=fn:rlhf.tasks.assistant.gold_reward",
            "data.prompts.path={d}/long_prompts.jsonl",
        ],
        ["long_prompts.jsonl", "prompt too long"],
    ),
    ("messages-not-a-list", ["data.sft.path={d}/bad_messages.jsonl"], ["bad_messages.jsonl", "'messages'"]),
    # models
    (
        "gguf-without-gguf-file",
        ["model.name_or_path={d}/gguf-only"],
        ["model.name_or_path", "model.gguf_file=my.Q4_0.gguf"],
    ),
    # A model group without random_init (model=tiny has one, and trains a config-only directory from scratch).
    (
        "no-weights",
        ["model.name_or_path={d}/no-weights", "model.random_init=null"],
        ["model.name_or_path", "no weights"],
    ),
    ("not-a-model-dir", ["model.name_or_path={d}/empty-dir"], ["model.name_or_path", "config.json"]),
    ("missing-model-dir", ["model.name_or_path={d}/no-such-model"], ["model.name_or_path", "does not exist"]),
    (
        "hub-id-offline",
        ["model.name_or_path=someone/some-model"],
        ["model.name_or_path", "someone/some-model", "offline"],
    ),
    (
        "gguf-file-absent",
        ["model.name_or_path={m}", "model.gguf_file=other.gguf"],
        ["model.gguf_file", "other.gguf"],
    ),
    (
        "gguf-file-given-as-path",
        ["model.name_or_path={d}/gguf-only/my.Q4_0.gguf"],
        ["model.name_or_path", "model.gguf_file=my.Q4_0.gguf"],
    ),
    # tokenizers
    (
        "model-without-tokenizer",
        ["model.name_or_path={d}/no-tokenizer"],
        ["model.name_or_path", "no tokenizer"],
    ),
    ("tokenizer-missing", ["model.tokenizer={d}/no-such-tokenizer"], ["model.tokenizer", "does not exist"]),
    # config values
    ("max-steps-not-int", ["trainer.max_steps=abc"], ["trainer.max_steps", "'abc'"]),
    ("progress-bar-not-bool", ["trainer.enable_progress_bar=maybe"], ["trainer.enable_progress_bar"]),
    ("clip-not-number", ["trainer.gradient_clip_val=high"], ["trainer.gradient_clip_val"]),
    ("lr-not-number", ["stage.lr=fast"], ["stage.lr"]),
    ("prompt-longer-than-max", ["data.max_prompt_length=500"], ["data.max_prompt_length"]),
    ("unknown-stage", ["stage=nosuch"], ["stage=nosuch"]),
    # hardware
    ("zero-devices", ["trainer.devices=0"], ["trainer.devices"]),
    ("devices-not-a-count", ["trainer.devices=many"], ["trainer.devices"]),
    ("unknown-precision", ["trainer.precision=13"], ["trainer.precision"]),
    ("accelerator-not-installed", ["trainer.accelerator=tpu"], ["trainer.accelerator"]),
    # where results go
    (
        "tracking-uri-unwritable",
        ["tracking.uri=sqlite:////proc/rlhf-nowhere/mlflow.db"],
        ["tracking.uri", "/proc/rlhf-nowhere"],
    ),
    ("output-dir-is-a-file", ["output_dir={d}/sft.jsonl"], ["output_dir", "sft.jsonl is a file"]),
    ("output-dir-inside-a-file", ["output_dir={d}/sft.jsonl/out"], ["output_dir", "inside", "a file"]),
    (
        "output-dir-unwritable",
        ["output_dir=/proc/rlhf-out"],
        ["output_dir=/proc/rlhf-out", "cannot be written"],
    ),
    # lineage
    ("resume-not-a-checkpoint", ["resume={d}/sft.jsonl"], ["resume=", "sft.jsonl", "not a checkpoint"]),
    (
        "resume-unknown-run",
        ["resume=0123456789abcdef0123456789abcdef"],
        ["resume=0123456789abcdef0123456789abcdef", "no run"],
    ),
    (
        "reward-from-base",
        ["stage=ppo", "stage.policy_from=base", "stage.reward_from=base"],
        ["stage.reward_from"],
    ),
    # models of the wrong kind: what the directory holds, and what the key needs
    (
        "reward-from-a-language-model",
        ["stage=ppo", "stage.policy_from=base", "stage.reward_from={m}"],
        ["stage.reward_from", "holds a language model", "GPT2LMHeadModel", "needs a reward model"],
    ),
    (
        "policy-from-a-reward-model",
        [
            "stage=grpo",
            "stage.policy_from={d}/reward-model",
            "stage.reward_from=fn:rlhf.tasks.assistant.gold_reward",
        ],
        ["stage.policy_from", "holds a reward model", "needs a language model"],
    ),
    (
        "dpo-from-a-reward-model",
        ["stage=dpo", "stage.init_from={d}/reward-model"],
        ["stage.init_from", "holds a reward model"],
    ),
]


def _write_jsonl(path: Path, rows: list) -> None:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """The prepared bad files and models, and a launch directory holding an earlier run's outputs."""
    from test_own_model import build_own_model

    d = tmp_path_factory.mktemp("inputs")
    _write_jsonl(d / "sft.jsonl", GOOD_SFT)
    (d / "latin1.jsonl").write_bytes(
        b'{"prompt": "a", "completion": "b"}\n{"prompt": "caf\xe9", "completion": "ok"}\n'
    )
    (d / "utf16.jsonl").write_text("".join(json.dumps(r) + "\n" for r in GOOD_SFT), encoding="utf-16")
    (d / "empty.jsonl").write_text("")
    (d / "wrapped.json").write_text(json.dumps({"data": GOOD_SFT}))
    (d / "arrays.jsonl").write_text('["a", "b"]\n' * 4)
    (d / "broken.jsonl").write_text(
        '{"prompt": "a", "completion": "b"}\n{"prompt": "c", "completion": "d"}\n{"prompt": \n'
    )
    (d / "notes.txt").write_text("prompt: a\n")
    (d / "latin1.csv").write_bytes(b"prompt,completion\ncaf\xe9,b\nx,y\n")
    (d / "empty.csv").write_text("")
    _write_jsonl(d / "one.jsonl", GOOD_SFT[:1])
    _write_jsonl(d / "one_qa.jsonl", [{"question": "q", "answer": "a"}])
    _write_jsonl(d / "same_prompt.jsonl", [{"prompt": "Hi?", "completion": f"Hello {i}."} for i in range(12)])
    _write_jsonl(d / "qa.jsonl", [{"question": f"q{i}", "answer": f"a{i}"} for i in range(12)])
    _write_jsonl(d / "blank.jsonl", [{"prompt": f"q{i}", "completion": "  "} for i in range(12)])
    _write_jsonl(
        d / "identical.jsonl", [{"prompt": f"q{i}", "chosen": "same", "rejected": "same"} for i in range(12)]
    )
    _write_jsonl(
        d / "long_pairs.jsonl",
        [{"prompt": f"word {i} " * 100, "chosen": "a", "rejected": "b"} for i in range(12)],
    )
    _write_jsonl(d / "long_prompts.jsonl", [{"prompt": f"word {i} " * 100} for i in range(12)])
    _write_jsonl(d / "bad_messages.jsonl", [{"messages": "hello"} for _ in range(12)])
    model = build_own_model(d / "my-model", "gpt2")
    (d / "gguf-only").mkdir()
    (d / "gguf-only" / "my.Q4_0.gguf").write_bytes(b"GGUF")
    (d / "no-weights").mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (d / "no-weights" / name).write_bytes((model / name).read_bytes())
    (d / "no-tokenizer").mkdir()
    for name in ("config.json", "model.safetensors"):
        (d / "no-tokenizer" / name).write_bytes((model / name).read_bytes())
    (d / "empty-dir").mkdir()
    shutil.copytree(model, d / "reward-model")
    config = json.loads((model / "config.json").read_text())
    (d / "reward-model" / "config.json").write_text(
        json.dumps({**config, "architectures": ["GPT2ForSequenceClassification"]})
    )
    launch = tmp_path_factory.mktemp("launch")
    earlier = launch / "outputs" / "earlier-run" / "model"
    earlier.mkdir(parents=True)
    (earlier / "config.json").write_text('{"earlier": true}')
    return d, model, launch


# Run as their own process: failing at validation, at composition, in data and in model loading.
SUBPROCESS = {"max-steps-not-int", "unknown-stage", "unknown-columns-sft", "no-weights"}


def _run_in_process(argv: list[str], cwd: Path, monkeypatch, capfd) -> tuple[int, str, str]:
    from hydra.core.global_hydra import GlobalHydra

    import rlhf.__main__ as entry

    monkeypatch.chdir(cwd)
    monkeypatch.setattr(sys, "argv", ["rlhf", *argv])
    # The entry point sets it to 1 for Hydra; set here, it is restored (unset) after the case.
    monkeypatch.setenv("HYDRA_FULL_ERROR", "0")
    capfd.readouterr()
    code = 0
    try:
        entry.main()
    except SystemExit as exit_:
        code = exit_.code
    finally:
        GlobalHydra.instance().clear()
    out, err = capfd.readouterr()
    return code, out, err


def _snapshot(*roots: Path) -> dict[str, tuple[int, int]]:
    return {
        str(path): (path.stat().st_size, path.stat().st_mtime_ns)
        for root in roots
        if root.exists()
        for path in root.rglob("*")
        if path.is_file()
    }


def _runs(launch: Path) -> dict:
    if not (launch / "mlflow.db").exists():
        return {}
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=store_uri(launch))
    experiments = [e.experiment_id for e in client.search_experiments()]
    return {run.info.run_id: run for run in client.search_runs(experiments)} if experiments else {}


@pytest.mark.parametrize("case, args, names", [pytest.param(i, a, n, id=i) for i, a, n in CASES])
def test_bad_input_fails_in_one_line(workspace, case, args, names, monkeypatch, capfd):
    from rlhf.models import cache_root

    d, model, launch = workspace
    before_runs = _runs(launch)
    before = _snapshot(launch / "outputs", cache_root() / "tasks")
    # Its own output directory: cases a second apart would share Hydra's timestamped one.
    argv = ["experiment=smoke", f"hydra.run.dir=outputs/{case}", *(a.format(d=d, m=model) for a in args)]
    if case in SUBPROCESS:
        result = run_cli(argv, launch, timeout=300)
        code, stdout, stderr = result.returncode, result.stdout, result.stderr
    else:
        code, stdout, stderr = _run_in_process(argv, launch, monkeypatch, capfd)
    output = stdout + stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert code == 2, output[-3000:]
    assert lines and lines[-1].startswith("rlhf: error:"), output[-3000:]
    for name in names:
        assert name in lines[-1], (name, lines[-1])
    assert "Traceback" not in output, output[-3000:]
    runs = _runs(launch)
    assert not [r for r in runs.values() if r.info.status == "RUNNING"]
    for run_id, run in runs.items():
        if run_id not in before_runs:
            assert run.info.status == "FAILED", run.info
            assert run.data.tags.get("rlhf.error"), run.data.tags
    after = _snapshot(launch / "outputs", cache_root() / "tasks")
    assert {k: v for k, v in after.items() if k in before} == before
