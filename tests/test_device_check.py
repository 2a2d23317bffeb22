"""The device check's plan and verdicts (scripts/device_check.py) and its GPU page (scripts/gpu_report.py).

The check itself runs in CI as `bash scripts/device_check.sh --cpu`; these are its pure parts.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


device_check = _script("device_check")
gpu_report = _script("gpu_report")


@pytest.mark.parametrize(
    "code, stderr, status",
    [
        (0, "", "ok"),
        (
            2,
            "some log line\nrlhf: error: trainer.accelerator=gpu: not available on this machine\n",
            "refused",
        ),
        # A refusal is one line: a traceback with it, or another exit code, is a failure.
        (2, "Traceback (most recent call last):\n  ...\nrlhf: error: x\n", "failed"),
        (1, "rlhf: error: x\n", "failed"),
        (2, "usage: ...\nerror: unrecognized arguments\n", "failed"),
        (-9, "", "failed"),
    ],
)
def test_a_step_is_ok_refused_in_one_line_or_failed(code, stderr, status):
    got, message = device_check.outcome(code, stderr)
    assert got == status
    if status == "refused":
        assert message.startswith("rlhf: error: trainer.accelerator=gpu")
    if status == "failed":
        assert message.startswith(f"exit {code}")
    # A pipeline step or a benchmark must run: its refusal is a failure, with the refusal as its message.
    assert device_check.outcome(code, stderr, may_refuse=False)[0] == ("ok" if status == "ok" else "failed")


@pytest.mark.parametrize("mode", ["CPU", "GPU"])
def test_the_plan_covers_every_stage_in_both_precisions_the_sharded_strategies_and_the_benchmarks(
    mode, tmp_path
):
    steps = device_check.plan(getattr(device_check, mode), tmp_path / "model", tmp_path / "runs")
    pipeline = {(s.precision, s.stage) for s in steps if s.kind == "pipeline"}
    stages = ("sft", "rm", "ppo", "dpo", "grpo", "eval")
    assert pipeline == {(p, stage) for p in ("bf16-mixed", "32-true") for stage in stages}
    sharded = {(s.args[s.args.index("tracking=none") + 1], s.stage) for s in steps if s.kind == "sharded"}
    assert sharded == {(f"hardware={h}", stage) for h in ("fsdp", "deepspeed") for stage in stages[:-1]}
    assert [s.stage for s in steps if s.kind == "bench"] == ["sft", "rm", "dpo", "ppo", "grpo"]
    # Each stage starts from the directories its pipeline wrote before it; eval compares all four policies.
    made: list[str] = []
    for step in (s for s in steps if s.kind == "pipeline"):
        sources = [
            a.split("=", 1)[1]
            for a in step.args
            if a.startswith(("stage.init_from", "stage.policy_from", "stage.reward_from", "stage.policies"))
        ]
        for source in sources:
            for path in source.strip("[]").split(","):
                assert str(Path(path).parent) in made, (step.label, path)
        made.append(next(a.split("=", 1)[1] for a in step.args if a.startswith("output_dir=")))
    (evaluation,) = [s for s in steps if s.label == "32-true eval"]
    policies = next(a for a in evaluation.args if a.startswith("stage.policies="))
    assert [Path(p).parent.name for p in policies.split("=", 1)[1].strip("[]").split(",")] == [
        "sft",
        "ppo",
        "dpo",
        "grpo",
    ]
    # Every step names the model by its config and tokenizer only, and records nothing in MLflow.
    assert all(
        f"model.name_or_path={tmp_path / 'model'}" in s.args and "tracking=none" in s.args for s in steps
    )


def test_gpu_benchmarks_run_the_issues_workloads_on_smollm2s_shape(tmp_path):
    steps = {s.stage: s for s in device_check.plan(device_check.GPU, tmp_path, tmp_path) if s.kind == "bench"}
    assert {"bench.batch_size=32", "bench.length=1024"} <= set(steps["sft"].args) & set(steps["rm"].args)
    assert {"bench.batch_size=64", "stage.rollout.max_new_tokens=128"} <= set(steps["ppo"].args)
    assert {"bench.batch_size=16", "stage.group_size=8"} <= set(steps["grpo"].args)
    assert all(
        "model.random_init.num_hidden_layers=30" in s.args and "bench.profile=1" in s.args
        for s in steps.values()
    )


def test_benchmark_figures_become_a_record_with_mfu_of_the_gpus_peak_and_generation_rate():
    printed = 'log line {not json}\n{\n  "stage": "ppo",\n  "episodes_per_s": 8.0,\n  "generation_s": 0.5,\n' \
              '  "peak_gpu_mb": 4096.0,\n  "precision": "bf16-mixed"\n}\n'  # fmt: skip
    figures = device_check.bench_figures(printed)
    step = device_check.Step("bench", "ppo", "bench ppo", [], 10, "64 x 128")
    device_check.apply_bench(step, figures, generated_per_step=64 * 128, peak_tflops=989.0)
    assert (step.throughput, step.throughput_unit, step.peak_gpu_mb) == (8.0, "episodes/s", 4096.0)
    assert step.generated_tokens_per_s == 64 * 128 / 0.5 and step.mfu is None
    sft = device_check.Step("bench", "sft", "bench sft", [], 10, "32 x 1024")
    device_check.apply_bench(sft, {"tokens_per_s": 1e5, "model_gflops": 98_900.0, "mfu": 0.9}, 0, 989.0)
    assert sft.mfu == pytest.approx(0.1) and "989" in sft.mfu_basis
    # Without a GPU peak, MFU is the benchmark's own, of the rate it sampled.
    device_check.apply_bench(
        sft, {"tokens_per_s": 1e3, "model_gflops": 1.0, "mfu": 0.25, "matmul_gflops": 4.0}, 0, None
    )
    assert sft.mfu == 0.25 and "sampled" in sft.mfu_basis


def _sample_summary() -> dict:
    steps = device_check.plan(device_check.GPU, Path("/m"), Path("/r"))
    for step in steps:
        step.status, step.seconds = "ok", 12.0
        if step.kind == "sharded":
            step.status, step.message = (
                "refused",
                "rlhf: error: stage=sft with trainer.strategy=fsdp: no | yes",
            )
        if step.kind == "bench":
            unit = device_check.UNITS[step.stage]
            figures = {f"{unit}_per_s": 1000.0, "peak_gpu_mb": 2048.0, "generation_s": 0.25}
            if step.stage in ("sft", "rm", "dpo"):
                figures["model_gflops"] = 395_600.0  # 40% of 989 TFLOP/s
            device_check.apply_bench(
                step, figures, device_check.GPU.benches[step.stage].generated_per_step, 989.0
            )
            step.profile_top = [
                "training step 2 (untimed), sorted by self_device_time_total",
                "ampere_bf16_gemm  42%",
            ]
    summary = device_check.summary(device_check.GPU, "NVIDIA H200", 989.0, steps, 401.0)
    summary["trl"] = {"sft": {"throughput": 400.0, "peak_gpu_mb": 4096.0}}
    return json.loads(json.dumps(summary))  # as read back from docs/gpu.json


def test_gpu_report_renders_a_summary_with_each_figure_beside_its_target(tmp_path):
    source = tmp_path / "gpu.json"
    source.write_text(json.dumps(_sample_summary()))
    assert gpu_report.main([str(source), "-o", str(tmp_path / "gpu.md")]) == 0
    page = (tmp_path / "gpu.md").read_text()
    assert page.startswith("# On the GPU\n")
    assert "**NVIDIA H200**" in page and "`bash scripts/device_check.sh`" in page and "989 TFLOP/s" in page
    rows = {line.split(" | ")[0].lstrip("| "): line for line in page.splitlines() if line.startswith("| ")}
    # SFT at 40% MFU against a 35% target; its TRL figure is 400 tokens/s, 2.5x below it, in less memory.
    assert "| 40.0% |" in rows["SFT"] and "35.0% MFU | met" in rows["SFT"]
    assert "400.0 (2.50x, met, memory no higher)" in rows["SFT"]
    # PPO generates 64 x 128 tokens in 0.25 s: 32,768 new tokens/s against 20,000.
    assert "| 32,768 | 20,000 new tokens/s | met |" in rows["PPO"] and "not measured" in rows["PPO"]
    # GRPO's 16 x 8 x 128 tokens in 0.25 s, and every stage's memory.
    assert "65,536" in rows["GRPO"] and "2.0 GiB GPU" in rows["GRPO"]
    assert (
        "| fsdp sft | refused | 12 | rlhf: error: stage=sft with trainer.strategy=fsdp: no \\| yes |" in page
    )
    assert "### PPO" in page and "ampere_bf16_gemm  42%" in page


def test_gpu_report_says_how_far_a_figure_is_from_its_target():
    summary = _sample_summary()
    (sft,) = [r for r in summary["records"] if r["label"] == "bench sft"]
    sft["mfu"] = 0.07
    summary["passed"] = False
    page = gpu_report.render(summary)
    assert "| 7.0% |" in page and "35.0% MFU | 20% of target" in page and "**Some steps failed**" in page
