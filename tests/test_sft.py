"""SFT end to end through the CLI: what a user runs, and what MLflow holds afterwards."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import OFFLINE, runs_of

SMOKE = ["experiment=smoke"]


def history(client, run_id: str, key: str) -> list[tuple[int, float]]:
    return [(m.step, m.value) for m in client.get_metric_history(run_id, key)]


@pytest.fixture(scope="module")
def smoke_run(pipeline):
    """The SFT run of the shared smoke pipeline (`python -m rlhf -m experiment=smoke stage=sft,rm,ppo,dpo,grpo,eval`)."""
    return pipeline.directory, pipeline.client, pipeline.runs["sft"], pipeline.stderr


def test_smoke_run_is_recorded_in_mlflow(smoke_run):
    directory, client, run, stderr = smoke_run
    assert run.info.status == "FINISHED"
    params = run.data.params
    assert params["stage.name"] == "sft"
    assert float(params["stage.lr"]) == pytest.approx(3e-3)
    assert params["model.name"] == "tiny"
    assert params["trainer.max_steps"] == "24"
    tags = run.data.tags
    assert tags["rlhf.stage"] == "sft" and tags["rlhf.model"] == "tiny" and tags["rlhf.data"] == "assistant"
    assert tags["rlhf.experiment"] == "smoke"
    assert tags["rlhf.command"] == "python -m rlhf -m experiment=smoke stage=sft,rm,ppo,dpo,grpo,eval"
    assert tags["rlhf.job_num"] == "0" and tags["rlhf.sweep_dir"]
    assert tags["rlhf.init_from"] == "base"
    assert Path(tags["rlhf.output_dir"]).is_dir()
    assert run.info.run_id in stderr and "mlflow ui --backend-store-uri" in stderr
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config", "model", "samples"} <= artifacts
    config_files = {a.path for a in client.list_artifacts(run.info.run_id, "config")}
    assert config_files == {"config/config.yaml", "config/overrides.yaml"}


def test_smoke_training_loss_falls_and_metrics_are_logged(smoke_run):
    _, client, run, _ = smoke_run
    losses = [v for _, v in history(client, run.info.run_id, "train/loss")]
    assert len(losses) >= 5
    assert losses[-1] < losses[0] - 1.0, losses
    metrics = run.data.metrics
    for key in ("val/loss", "val/ppl", "test/loss", "train/lr", "perf/tokens_per_s", "peak_rss_mb"):
        assert key in metrics, key
    # Constants of the run are params (columns to compare by), not one-point metrics; paths are tags.
    params, tags = run.data.params, run.data.tags
    assert params["data/sft_train_examples"] == "256" and int(params["model/parameters"]) > 0
    assert not [k for k in metrics if k.startswith(("data/", "model/"))]
    assert "output_dir" not in params and "tracking.uri" not in params
    assert Path(tags["rlhf.output_dir"]).is_dir() and tags["rlhf.tracking_uri"].startswith("sqlite:///")
    # validated at the final step, not only at the last val_check_interval
    assert history(client, run.info.run_id, "val/loss")[-1][0] >= 23


def test_smoke_model_artifact_loads_with_plain_transformers(smoke_run):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, client, run, _ = smoke_run
    local = client.download_artifacts(run.info.run_id, "model")
    model = AutoModelForCausalLM.from_pretrained(local)
    tokenizer = AutoTokenizer.from_pretrained(local)
    assert tokenizer.chat_template and "<|im_start|>" in tokenizer.chat_template
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is 2 + 3?"}], add_generation_prompt=True, return_tensors="pt"
    )["input_ids"]
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=4, do_sample=False)
    assert out.shape[1] > ids.shape[1]
    samples = client.download_artifacts(run.info.run_id, "samples/validation.json")
    table = json.loads(Path(samples).read_text())
    assert table["columns"] == ["prompt", "response", "reference"] and len(table["data"]) == 4


def test_local_directory_model_with_lora_and_own_data(smoke_run, tmp_path, cli, mlflow_client):
    """A local HF directory via model.name_or_path, a user's jsonl via data.sft.path, LoRA on top."""
    directory, _, run, _ = smoke_run
    model_dir = Path(run.data.tags["rlhf.output_dir"]) / "model"
    data = tmp_path / "mine.jsonl"
    rows = [
        {"prompt": f"Say {w}.", "completion": f"{w}!"}
        for w in ["hi", "yes", "no", "ok", "go", "up", "on", "in"] * 4
    ]
    data.write_text("\n".join(json.dumps(r) for r in rows))
    cli(
        "model=tiny",
        "model.random_init=null",
        "model.gguf_file=null",
        f"model.name_or_path={model_dir}",
        "model.lora.enabled=true",
        "model.lora.r=4",
        f"data.sft.path={data}",
        "trainer.max_steps=6",
        "stage.lr=1e-2",
        "stage.num_samples=0",
        "trainer.val_check_interval=3",
        "tracking.experiment=mine",
    )
    (mine,) = runs_of(mlflow_client, "mine")
    assert mine.info.status == "FINISHED"
    counts = {k: int(v) for k, v in mine.data.params.items() if k.startswith(("data/", "model/"))}
    assert counts["model/trainable_parameters"] < counts["model/parameters"] / 5
    assert counts["data/sft_train_examples"] + counts["data/sft_validation_examples"] == 32
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(Path(mine.data.tags["rlhf.output_dir"]) / "model")
    assert not any("lora" in name for name, _ in merged.named_parameters())


def test_malformed_data_fails_with_one_line_and_a_failed_run(tmp_path, cli, mlflow_client):
    data = tmp_path / "broken.jsonl"
    data.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "c", "completion": \n')
    result = cli(*SMOKE, f"data.sft.path={data}", check=False)
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("rlhf: error:")]
    assert errors == [f"rlhf: error: {data}:2: malformed JSON line (Expecting value)"], result.stderr[-2000:]
    (run,) = runs_of(mlflow_client, "smoke")
    assert run.info.status == "FAILED"
    assert f"{data}:2" in run.data.tags["rlhf.error"]


def test_diverged_run_fails_and_saves_no_model(tmp_path, cli, mlflow_client):
    result = cli(*SMOKE, "stage.lr=1e12", "trainer.max_steps=6", check=False)
    assert result.returncode == 2, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert re.match(
        r"rlhf: error: training diverged at step \d+: the (training loss|gradient norm) was (nan|inf)",
        lines[-1],
    )
    assert "Traceback" not in result.stderr
    (run,) = runs_of(mlflow_client, "smoke")
    assert run.info.status == "FAILED"
    assert "training diverged" in run.data.tags["rlhf.error"]
    assert "model" not in {a.path for a in mlflow_client.list_artifacts(run.info.run_id)}
    assert not (Path(run.data.tags["rlhf.output_dir"]) / "model").exists()


def test_fallback_chat_template_is_saved_with_the_model(tmp_path, cli, tokenizer):
    import copy

    from transformers import AutoTokenizer

    from rlhf.data.tokenize import ChatRenderer

    plain = copy.deepcopy(tokenizer)
    plain.chat_template = None
    plain.save_pretrained(tmp_path / "plain-tokenizer")
    (tmp_path / "plain-tokenizer" / "config.json").write_text('{"model_type": "llama"}')
    data = tmp_path / "chats.jsonl"
    chats = [
        [{"role": "user", "content": f"What is {i} plus {i}?"}, {"role": "assistant", "content": f"{2 * i}."}]
        for i in range(16)
    ]
    data.write_text("".join(json.dumps({"messages": m}) + "\n" for m in chats))
    out = tmp_path / "out"
    cli(
        *SMOKE,
        f"model.tokenizer={tmp_path / 'plain-tokenizer'}",
        f"data.sft.path={data}",
        "trainer.max_steps=2",
        "tracking=none",
        f"output_dir={out}",
    )
    saved = AutoTokenizer.from_pretrained(out / "model")
    assert saved.chat_template
    # What training rendered (the fallback, on a template-less tokenizer), later stages render from
    # the saved tokenizer, for a conversation and for a plain-string prompt alike.
    trained = ChatRenderer(copy.deepcopy(plain), "auto")
    later = ChatRenderer(saved, "auto")
    conversation = chats[0][:1]
    assert later.prompt(conversation) == trained.prompt(conversation)
    assert later.prompt(conversation[0]["content"]) == trained.prompt(conversation)
    assert later.response(conversation, chats[0][1:]) == trained.response(conversation, chats[0][1:])


def test_missing_column_names_the_file_and_columns(tmp_path, cli):
    data = tmp_path / "cols.jsonl"
    data.write_text("\n".join(json.dumps({"question": f"q{i}", "answer": "b"}) for i in range(4)))
    result = cli(*SMOKE, f"data.sft.path={data}", "tracking=none", check=False)
    assert result.returncode == 2
    assert "['answer', 'question'] match no known format" in result.stderr
    assert "data.sft.columns" in result.stderr


def _wait_for(predicate, timeout: float, process: subprocess.Popen) -> None:
    deadline = time.time() + timeout
    while not predicate():
        if process.poll() is not None:
            raise AssertionError(f"process ended early:\n{process.stderr.read()[-3000:]}")
        if time.time() > deadline:
            process.kill()
            raise AssertionError("timed out")
        time.sleep(0.1)


def _start(args: list[str], cwd: Path, env: dict | None = None) -> subprocess.Popen:
    """The CLI in a process group of its own: os.killpg(process.pid, ...) also reaches the ranks it starts."""
    env = {**os.environ, **OFFLINE, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.Popen(
        [sys.executable, "-m", "rlhf", *args],
        cwd=cwd,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def test_killed_run_resumes_to_the_same_result(tmp_path, cli, mlflow_client):
    """SIGKILL after the first checkpoint, resume=true, and the run ends as an uninterrupted one does."""
    args = [*SMOKE, "trainer.max_steps=20", "checkpoint.every_n_steps=5", "trainer.val_check_interval=10"]
    cli(*args, "tracking.experiment=whole")
    process = _start([*args, "tracking.experiment=cut"], tmp_path)
    checkpoints = tmp_path / "outputs"
    _wait_for(lambda: any(checkpoints.glob("*/*/checkpoints/step-000005.ckpt")), 300, process)
    process.send_signal(signal.SIGKILL)
    process.wait()
    (cut,) = runs_of(mlflow_client, "cut")
    assert cut.info.status == "RUNNING"  # killed without a chance to say otherwise
    cli(*args, "tracking.experiment=cut", "resume=true")

    (whole,) = runs_of(mlflow_client, "whole")
    (resumed,) = runs_of(mlflow_client, "cut")
    assert resumed.info.run_id == cut.info.run_id and resumed.info.status == "FINISHED"
    assert "rlhf.resumed_from" in resumed.data.tags
    expected = history(mlflow_client, whole.info.run_id, "train/loss")
    got = dict(history(mlflow_client, resumed.info.run_id, "train/loss"))
    assert expected[-1][0] == 19 and 19 in got
    for step, value in expected:
        if step in got:
            assert got[step] == pytest.approx(value, rel=1e-5, abs=1e-5), step
    assert resumed.data.metrics["val/loss"] == pytest.approx(whole.data.metrics["val/loss"], rel=1e-5)


def test_sigterm_marks_the_run_killed(tmp_path, mlflow_client):
    process = _start([*SMOKE, "trainer.max_steps=400", "checkpoint.every_n_steps=0"], tmp_path)
    _wait_for(
        lambda: bool(runs_of_safe(mlflow_client)) and _has_metric(mlflow_client, "train/loss"), 300, process
    )
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=120) != 0
    (run,) = runs_of(mlflow_client, "smoke")
    assert run.info.status == "KILLED"
    assert "train/loss" in run.data.metrics  # what was logged before the signal is kept


def runs_of_safe(client):
    try:
        return runs_of(client, "smoke")
    except Exception:
        return []


def _has_metric(client, key: str) -> bool:
    runs = runs_of_safe(client)
    return bool(runs) and key in runs[0].data.metrics


def test_logged_samples_show_blank_and_repetitive_responses_for_what_they_are():
    from rlhf.stages.sft.module import shown

    assert shown("." * 48) == "\"['.' x 48]\""
    assert shown("  ") == "(empty: '  ')"
    assert shown("The answer is 4.") == "'The answer is 4.'"
    assert shown("x" * 300).endswith("...'") is False  # one run of a character is counted, not cut
    assert len(shown("ab" * 200)) <= 125
