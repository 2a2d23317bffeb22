"""The hardware group: mixed precision with clipping, every model on the stage's device, PPO's inner
steps through Lightning's optimizer, ranks that agree, and the refusals of what cannot run here."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import OFFLINE, TESTS_DIR, THREADS, runs_of

from rlhf import hardware
from rlhf.errors import ConfigError

REWARD_FN = "stage.reward_from=fn:ppo_rewards.brevity"


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory, tiny_model_config, tokenizer):
    """A tiny causal LM and a tiny reward model saved as local directories (the sources LoRA needs)."""
    from rlhf import models

    root = tmp_path_factory.mktemp("models")
    policy = models.save_model(models.load_causal_lm(tiny_model_config), tokenizer, root / "policy")
    scorer = models.load_scalar_model(tiny_model_config, None, tokenizer.pad_token_id)
    reward = models.save_model(scorer, tokenizer, root / "reward")
    return policy, reward


def local_model(policy_dir: Path) -> list[str]:
    return ["model.random_init=null", "model.gguf_file=null", f"model.name_or_path={policy_dir}"]


def build(compose, tmp_path, overrides: list[str]):
    """The stage's job as a run builds it (tiny model, no tracking), and its validated config."""
    from rlhf.config import validate
    from rlhf.stages import get_stage
    from rlhf.tracking import Launch, start_tracker

    run = validate(compose(["experiment=smoke", "tracking=none", f"output_dir={tmp_path}", *overrides]))
    hardware.check(get_stage(run.stage.name), run.trainer)
    tracker = start_tracker(run, Launch(output_dir=str(tmp_path), launch_dir=str(tmp_path)))
    return run, tracker, get_stage(run.stage.name).build(run, tracker)


def fit(run, tracker, job, tmp_path, callbacks=()):
    from rlhf.runner import stage_trainer

    trainer = stage_trainer(run, tracker, tmp_path, job, callbacks)
    trainer.fit(job.module, datamodule=job.datamodule)
    return trainer


SHORT = [
    "trainer.max_steps=2",
    "trainer.val_check_interval=2",
    "checkpoint.every_n_steps=0",
    "+trainer.limit_val_batches=1",
]
STAGE_ARGS = {
    "sft": ["stage=sft", "stage.num_samples=0"],
    "rm": ["stage=rm", "stage.init_from=base", "stage.gold_eval_prompts=0"],
    "ppo": ["stage=ppo", "stage.policy_from=base", REWARD_FN, "stage.log_samples_every=0"],
}


# -- 1. mixed precision with clipping ---------------------------------------------------------------


@pytest.mark.parametrize("stage", list(STAGE_ARGS))
def test_bf16_mixed_trains_every_stage_with_clipping(compose, tmp_path, stage):
    run, tracker, job = build(
        compose,
        tmp_path,
        [*STAGE_ARGS[stage], *SHORT, "trainer.precision=bf16-mixed", "trainer.gradient_clip_val=1.0"],
    )
    trainer = fit(run, tracker, job, tmp_path)
    assert trainer.global_step == 2
    assert all(torch.isfinite(p).all() for p in job.module.parameters())


def test_adamw_is_fused_except_where_a_gradient_scaler_unscales(compose):
    from rlhf.config import validate
    from rlhf.optim import adamw, param_groups

    stage = validate(compose(["model=tiny", "tracking=none"])).stage
    groups = param_groups(torch.nn.Linear(2, 2).named_parameters(), 0.0, 1e-3)
    for precision, fused in (
        ("32-true", True),
        ("bf16-true", True),
        ("bf16-mixed", True),
        ("16-mixed", False),
    ):
        assert bool(adamw(groups, stage, precision).defaults["fused"]) is fused, precision


# -- 2. every model on the stage's device -----------------------------------------------------------


def stage_models(module) -> list[torch.nn.Module]:
    """Every model the stage's module calls, wherever it keeps it."""
    found = [
        getattr(module, name, None) for name in ("model", "policy", "reference", "value_model", "value_head")
    ]
    reward = getattr(module, "reward", None)
    found.append(getattr(reward, "model", None))
    return [m for m in found if m is not None]


PLACEMENTS = {
    "sft": ["stage=sft"],
    "sft-lora": ["stage=sft", "model.lora.enabled=true"],
    "rm": ["stage=rm"],
    "rm-lora": ["stage=rm", "model.lora.enabled=true"],
    "ppo-rm-separate": ["stage=ppo", "stage.critic=separate"],
    "ppo-rm-shared": ["stage=ppo", "stage.critic=shared"],
    "ppo-rm-separate-lora": ["stage=ppo", "stage.critic=separate", "model.lora.enabled=true"],
    "ppo-rm-shared-lora": ["stage=ppo", "stage.critic=shared", "model.lora.enabled=true"],
    "ppo-fn-separate": ["stage=ppo", "stage.critic=separate", REWARD_FN],
    "ppo-fn-shared-lora": ["stage=ppo", "stage.critic=shared", "model.lora.enabled=true", REWARD_FN],
}


@pytest.mark.parametrize("case", list(PLACEMENTS))
def test_every_model_a_stage_calls_moves_with_its_module(compose, tmp_path, model_dirs, case):
    """Moving the LightningModule (as the trainer's setup does) moves every model its stage calls:
    on the meta device, nothing may be left on the CPU."""
    policy_dir, reward_dir = model_dirs
    sources = (
        [f"stage.init_from={policy_dir}"]
        if not case.startswith("ppo")
        else [f"stage.policy_from={policy_dir}"]
    )
    if case.startswith("ppo") and REWARD_FN not in PLACEMENTS[case]:
        sources.append(f"stage.reward_from={reward_dir}")
    _, _, job = build(compose, tmp_path, [*PLACEMENTS[case], *sources, *local_model(policy_dir)])
    models = stage_models(job.module)
    job.module.to("meta")
    left = [
        name
        for model in models
        for name, tensor in [*model.named_parameters(), *model.named_buffers()]
        if tensor.device.type != "meta"
    ]
    assert not left, f"left on the CPU: {left[:5]}"


def test_eval_and_gold_sampling_run_where_lightning_puts_a_trainer():
    assert hardware.device({"accelerator": "cpu"}) == torch.device("cpu")
    assert hardware.device({"accelerator": "auto", "devices": 2, "strategy": "ddp"}).type in ("cpu", "cuda")


# -- 3. PPO's inner steps through Lightning's optimizer ---------------------------------------------


@pytest.mark.parametrize("precision", ["bf16-mixed", "16-mixed"])
def test_ppo_inner_steps_go_through_the_precision_plugin_and_are_clipped(
    compose, tmp_path, monkeypatch, precision
):
    """16-mixed (fp16 with loss scaling, a GPU precision) runs here through a CPU gradient scaler:
    the gradients must be unscaled before they are clipped."""
    import functools

    import pytorch_lightning as pl
    from pytorch_lightning.plugins import MixedPrecision

    from rlhf import training

    clip = 1e-3  # small enough to bind on every step
    setting = f"trainer.precision={precision}"
    scaler = None
    if precision == "16-mixed":  # Lightning turns 16-mixed into bf16-mixed on the CPU unless given the plugin
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
        plugin = MixedPrecision("16-mixed", "cpu", scaler=scaler)
        monkeypatch.setattr(training.pl, "Trainer", functools.partial(pl.Trainer, plugins=[plugin]))
        setting = "trainer.precision=null"
    run, tracker, job = build(
        compose,
        tmp_path,
        [
            *STAGE_ARGS["ppo"],
            *SHORT,
            setting,
            f"trainer.gradient_clip_val={clip}",
            "stage.max_approx_kl=null",
        ],
    )
    module = job.module
    events: list[str] = []
    norms: list[float] = []
    updates: list[float] = []

    class Hooks(pl.Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            events.append("plugin")

    clip_gradients, update = module.clip_gradients, module._update

    def counting_clip(optimizer, **kwargs):
        if scaler is not None:
            assert scaler._per_optimizer_states[id(optimizer)]["stage"].name == "UNSCALED"
        clip_gradients(optimizer, **kwargs)
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        norms.append(
            float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])))
        )
        events.append("clip")

    def counting_update(*args):
        out = update(*args)
        updates.append(out["ppo/updates"])
        return out

    module.clip_gradients, module._update = counting_clip, counting_update
    trainer = fit(run, tracker, job, tmp_path, callbacks=[Hooks()])
    assert trainer.global_step == 2, "trainer.max_steps counts PPO iterations"
    assert updates == [4.0, 4.0]  # 2 epochs x 8 episodes / minibatches of 4
    assert events == ["plugin", "clip"] * 8, "one clipping after the precision plugin's hook per inner step"
    assert max(norms) <= clip * 1.01, norms


# -- 4. ranks agree under DDP -----------------------------------------------------------------------


@pytest.mark.distributed
def test_ppo_ranks_stop_together_and_share_one_kl_coefficient(tmp_path):
    """Rank 1 alone sees an approximate KL over stage.max_approx_kl after its first minibatch; both
    ranks must take the same inner steps, and end with the same adaptive KL coefficient."""
    env = {
        **os.environ,
        **OFFLINE,
        **THREADS,
        "PYTHONUNBUFFERED": "1",
        "PYTHONPATH": os.pathsep.join([str(TESTS_DIR), os.environ.get("PYTHONPATH", "")]),
    }
    result = subprocess.run(
        [sys.executable, str(TESTS_DIR / "ddp_ppo_agreement.py"), str(tmp_path)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["updates"] == ranks[1]["updates"], ranks
    assert ranks[0]["updates"][0] < 4, "the early stop never happened"
    assert ranks[0]["kl_coef"] == ranks[1]["kl_coef"], ranks
    assert ranks[0]["kl_coef"] != 0.05, "the coefficient never adapted"


# -- 5 and 6. refusals ------------------------------------------------------------------------------


@pytest.mark.parametrize("stage", ["sft", "rm", "ppo", "eval"])
@pytest.mark.parametrize("strategy", ["fsdp", "fsdp_cpu_offload", "deepspeed_stage_2", "deepspeed_stage_3"])
def test_each_stage_runs_or_refuses_each_sharded_strategy(stage, strategy):
    from rlhf.stages import get_stage

    family = hardware.strategy_family(strategy)
    refused = family in get_stage(stage).refused_strategies
    trainer = {"accelerator": "cpu", "strategy": strategy}
    try:
        hardware.check(get_stage(stage), trainer)
    except ConfigError as err:
        message = str(err)
        assert "\n" not in message
        if refused:
            assert (
                f"stage={stage}" in message
                and f"trainer.strategy={strategy}" in message
                and "use hardware=" in message
            )
        elif family == "fsdp":  # FSDP2 is trainer.strategy=fsdp; Lightning's variants are not supported
            assert strategy != "fsdp" and "trainer.strategy=fsdp (" in message
        else:  # only refused for a missing install
            assert family == "deepspeed" and "pip install deepspeed" in message
    else:
        assert not refused


@pytest.mark.parametrize("stage", ["ppo", "grpo"])
def test_the_rl_stages_refuse_fsdp_naming_ddp_with_lora_instead(stage):
    from rlhf.stages import get_stage

    with pytest.raises(ConfigError) as err:
        hardware.check(get_stage(stage), {"accelerator": "cpu", "strategy": "fsdp"})
    message = str(err.value)
    assert "generates with the policy inside its training step" in message
    assert "; use hardware=ddp trainer.accelerator=gpu model.lora.enabled=true (" in message


def test_gpu_without_a_gpu_is_one_line_and_a_failed_run(cli, mlflow_client):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    result = cli("experiment=smoke", "hardware=gpu", check=False)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2 and len(lines) == 1, result.stderr[-3000:]
    assert lines[0].startswith("rlhf: error: trainer.accelerator=gpu:") and "hardware=cpu" in lines[0]
    (run,) = runs_of(mlflow_client, "smoke")
    assert run.info.status == "FAILED"
    assert "trainer.accelerator" in run.data.tags["rlhf.error"]
