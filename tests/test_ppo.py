"""PPO end to end: lineage and observability, learning, resuming, and the other critic and LoRA set-ups."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
from pathlib import Path

import pytest
from conftest import TESTS_DIR, count_host_reads, runs_of, stage_config
from test_sft import _start, _wait_for, history

# tests/ppo_rewards.py holds simple reward functions the CLI imports.
REWARDS = {"PYTHONPATH": os.pathsep.join([str(TESTS_DIR), os.environ.get("PYTHONPATH", "")])}


def test_ppo_run_names_its_policy_and_reward_runs(pipeline):
    sft, rm, ppo = (pipeline.runs[s] for s in ("sft", "rm", "ppo"))
    assert ppo.info.status == "FINISHED"
    tags = ppo.data.tags
    assert tags["rlhf.policy_from"] == "latest" and tags["rlhf.policy_from.run_id"] == sft.info.run_id
    assert tags["rlhf.reward_from"] == "latest" and tags["rlhf.reward_from.run_id"] == rm.info.run_id
    assert ppo.data.params["stage.critic"] == "separate"


def test_ppo_logs_what_a_researcher_watches(pipeline):
    ppo = pipeline.runs["ppo"]
    expected = [
        "reward/score_raw",
        "reward/score",
        "reward/non_score",
        "reward/total",
        "reward/gold",
        "kl/mean",
        "kl/coef",
        "policy/entropy",
        "policy/clipfrac",
        "policy/approx_kl",
        "value/loss",
        "value/clipfrac",
        "value/explained_variance",
        "advantages/mean",
        "advantages/std",
        "response/length",
        "response/eos_share",
        "time/generation_s",
        "time/scoring_s",
        "time/training_s",
        "perf/episodes_per_s",
        "train/lr",
        "val/score_raw",
        "val/gold",
        "val/kl",
        "peak_rss_mb",
    ]
    missing = [key for key in expected if key not in ppo.data.metrics]
    assert not missing, missing
    # One value per PPO iteration: trainer.max_steps counts iterations, not optimizer updates.
    steps = [step for step, _ in history(pipeline.client, ppo.info.run_id, "reward/score_raw")]
    assert steps == list(range(12))
    assert ppo.data.metrics["ppo/updates"] == 4  # 2 epochs x 8 episodes / minibatches of 4
    table = json.loads(
        Path(pipeline.client.download_artifacts(ppo.info.run_id, "samples/train.json")).read_text()
    )
    assert table["columns"] == ["step", "prompt", "response", "score"]
    assert {row[0] for row in table["data"]} == {0, 4, 8}


def test_ppo_saves_a_plain_causal_lm(pipeline):
    from transformers import AutoModelForCausalLM

    local = pipeline.client.download_artifacts(pipeline.runs["ppo"].info.run_id, "model")
    model = AutoModelForCausalLM.from_pretrained(local)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert (pipeline.model_dir("ppo").parent / "value_model" / "config.json").is_file()


PPO = [
    "experiment=smoke",
    "stage=ppo",
    "stage.reward_from=fn:ppo_rewards.brevity",
    "tracking.log_model=false",
]


def test_ppo_raises_a_simple_reward(pipeline, cli, mlflow_client):
    """Rewarding shorter text, the mean reward rises clearly within a few dozen iterations."""
    cli(
        *PPO,
        f"stage.policy_from={pipeline.model_dir('sft')}",
        "trainer.max_steps=30",
        "stage.lr=3e-3",
        "stage.kl_coef=0.01",
        "stage.ppo_epochs=4",
        env=REWARDS,
    )
    (run,) = runs_of(mlflow_client, "smoke", "ppo")
    rewards = [v for _, v in history(mlflow_client, run.info.run_id, "reward/score_raw")]
    first, last = sum(rewards[:8]) / 8, sum(rewards[-8:]) / 8
    assert last > first + 0.2, rewards
    val = [v for _, v in history(mlflow_client, run.info.run_id, "val/score_raw")]
    assert val[-1] > val[0], val
    assert run.data.tags["rlhf.reward_from"] == "fn:ppo_rewards.brevity"


def test_validation_before_training_starts_the_curves_at_the_initial_policy(cli, mlflow_client):
    """validate_before_training=true validates once at step 0, before any update: the starting
    policy's point, at KL 0, begins the reward-against-sqrt(KL) curve."""
    cli(
        *PPO,
        "stage.policy_from=base",
        "trainer.max_steps=2",
        "trainer.val_check_interval=2",
        "validate_before_training=true",
        env=REWARDS,
    )
    (run,) = runs_of(mlflow_client, "smoke", "ppo")
    roots = dict(history(mlflow_client, run.info.run_id, "val/sqrt_kl"))
    scores = dict(history(mlflow_client, run.info.run_id, "val/score_raw"))
    # Lightning logs a validation during training at the step of the iteration it follows (0-based)
    assert sorted(roots) == sorted(scores) == [0, 1]
    assert roots[0] == pytest.approx(0.0, abs=1e-6)
    assert run.info.status == "FINISHED"


def test_killed_ppo_resumes_to_the_same_result(pipeline, tmp_path, cli, mlflow_client):
    """Policy, value model, optimizer, KL controller, reward statistics, data position and random
    generators come back from the checkpoint: the resumed run matches an uninterrupted one."""
    args = [
        *PPO,
        f"stage.policy_from={pipeline.model_dir('sft')}",
        "trainer.max_steps=6",
        "checkpoint.every_n_steps=3",
        "stage.kl_target=1.0",
    ]
    assert_resume_matches(args, ("reward/score_raw", "kl/mean", "kl/coef"), tmp_path, cli, mlflow_client)


def assert_resume_matches(args, keys, tmp_path, cli, mlflow_client) -> None:
    """Runs `args` (6 steps, a checkpoint every 3) whole, and again killed after its step-3 checkpoint
    and resumed; each metric of `keys` must be the same at steps 3 to 5."""
    cli(*args, "tracking.experiment=whole", env=REWARDS)
    process = _start([*args, "tracking.experiment=cut"], tmp_path, env=REWARDS)
    _wait_for(lambda: any((tmp_path / "outputs").glob("*/*/checkpoints/step-000003.ckpt")), 600, process)
    process.send_signal(signal.SIGKILL)
    process.wait()
    cli(*args, "tracking.experiment=cut", "resume=true", env=REWARDS)
    (whole,) = runs_of(mlflow_client, "whole")
    (resumed,) = runs_of(mlflow_client, "cut")
    assert resumed.info.status == "FINISHED"
    for key in keys:
        expected = dict(history(mlflow_client, whole.info.run_id, key))
        got = dict(history(mlflow_client, resumed.info.run_id, key))
        assert max(expected) == max(got) == 5
        for step in range(3, 6):
            assert got[step] == pytest.approx(expected[step], rel=1e-4, abs=1e-5), (key, step)


def test_shared_critic_and_lora(pipeline, cli, mlflow_client):
    """A value head on the policy, and LoRA with the adapters-off policy as the reference."""
    sft_dir = pipeline.model_dir("sft")
    local_model = [
        "model=tiny",
        "model.random_init=null",
        "model.gguf_file=null",
        f"model.name_or_path={sft_dir}",
    ]
    cli(
        "-m",
        *PPO,
        f"stage.policy_from={sft_dir}",
        "trainer.max_steps=3",
        "trainer.val_check_interval=3",
        "stage.critic=shared,separate",
        "model.lora.enabled=true",
        *local_model,
        env=REWARDS,
    )
    runs = runs_of(mlflow_client, "smoke", "ppo")
    assert [r.data.params["stage.critic"] for r in runs] == ["shared", "separate"]
    for run in runs:
        assert run.info.status == "FINISHED"
        assert int(run.data.params["model/trainable_parameters"]) < int(run.data.params["model/parameters"])
        assert run.data.metrics["kl/mean"] != 0.0  # the adapters moved the policy away from the reference


@pytest.mark.distributed
def test_ppo_ddp_on_cpu(cli, mlflow_client):
    # From the base policy: the distributed tests run on their own (.ci/run), without the pipeline.
    cli(
        *PPO,
        "stage.policy_from=base",
        "trainer.max_steps=3",
        "hardware=ddp",
        "trainer.devices=2",
        env=REWARDS,
        timeout=900,
    )
    (run,) = runs_of(mlflow_client, "smoke", "ppo")
    assert run.info.status == "FINISHED"
    assert run.data.metrics["perf/episodes_per_s"] > 0


# ---------------------------------------------------------------------------------------------------------
# PPOModule itself on the tiny model, in process: the sanity checks of the literature and the scores

TASK_PROMPTS = ["What is 2 + 3?", "Name the capital city of Kenya.", "How do I steal a car?", "Spell cat."]


def _length_reward(prompts, responses):
    return [len(r) / 10 for r in responses]


def _module(config, tokenizer, *, lora=False, critic="separate", reward_stats=None, **overrides):
    """A PPOModule on the tiny model as rlhf.stages.ppo.build assembles it: a separate reference, or
    with LoRA the adapters-off policy; a value model or a value head on the policy."""
    from rlhf.config import LoraConfig
    from rlhf.models import apply_lora, load_causal_lm, load_scalar_model
    from rlhf.policy import Sampler
    from rlhf.rewards import FunctionReward
    from rlhf.stages.ppo.module import PPOModule

    rollout = dataclasses.replace(
        stage_config("ppo").rollout, batch_size=4, max_new_tokens=6, temperature=0.7
    )
    stage = stage_config(
        "ppo",
        **{
            "rollout": rollout,
            "batch_size": 4,
            "minibatch_size": 2,
            "ppo_epochs": 2,
            "critic": critic,
            **overrides,
        },
    )
    policy = load_causal_lm(config, None, seed=0)
    reference = None
    if lora:
        policy = apply_lora(policy, LoraConfig(enabled=True, r=4, alpha=8), "CAUSAL_LM")
    else:
        reference = load_causal_lm(config, None, seed=0)
    value_model = (
        load_scalar_model(config, None, tokenizer.pad_token_id, seed=1) if critic == "separate" else None
    )
    return PPOModule(
        policy,
        reference,
        FunctionReward(_length_reward, tokenizer),
        stage,
        value_model=value_model,
        sampler=Sampler.from_rollout(rollout, tokenizer, policy),
        max_grad_norm=None,
        reward_stats=reward_stats,
    )


def _batch(tokenizer):
    from rlhf.data.tokenize import ChatRenderer, encode_prompts

    return {
        "prompt_ids": encode_prompts(ChatRenderer(tokenizer), TASK_PROMPTS),
        "prompts": list(TASK_PROMPTS),
    }


def _fit_one_iteration(module, tokenizer):
    """One PPO iteration through Lightning; returns what it logged."""
    import pytorch_lightning as pl
    from torch.utils.data import DataLoader

    from rlhf.rollout import PromptCollator

    data = [{"prompt_ids": ids, "prompt": p} for ids, p in zip(_batch(tokenizer)["prompt_ids"], TASK_PROMPTS)]
    trainer = pl.Trainer(
        max_steps=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        accelerator="cpu",
        devices=1,
    )
    trainer.fit(module, DataLoader(data, batch_size=4, collate_fn=PromptCollator()))
    return {k: float(v) for k, v in trainer.callback_metrics.items()}


@pytest.mark.parametrize(("lora", "critic"), [(False, "separate"), (True, "shared")])
def test_first_rollout_has_zero_kl_to_the_reference(tiny_model_config, tokenizer, lora, critic):
    """The policy starts as the reference (a separate copy, or itself with its fresh LoRA adapters
    off), so every token's KL is 0 at the first rollout."""
    import torch

    module = _module(tiny_model_config, tokenizer, lora=lora, critic=critic)
    torch.manual_seed(0)
    episode, stats, _ = module.rollout(_batch(tokenizer))
    assert episode.response_mask.sum() > 0
    torch.testing.assert_close(episode.logprobs, episode.ref_logprobs, atol=1e-5, rtol=0)
    assert episode.kl.abs().max().item() < 1e-5
    assert abs(stats["kl/mean"]) < 1e-4


def test_shown_kl_is_never_negative_while_the_penalty_keeps_its_estimator(tiny_model_config, tokenizer):
    """A reference that finds the policy's samples likelier than the policy does gives a negative k1
    sum; kl/mean (shown, validated, plotted as sqrt_kl) is k3 and stays >= 0, kl/penalty is k1."""
    import torch

    module = _module(tiny_model_config, tokenizer, kl_estimator="k1")
    original = module._reference_logprobs
    module._reference_logprobs = lambda *args: original(*args) + 0.3
    torch.manual_seed(0)
    episode, stats, _ = module.rollout(_batch(tokenizer))
    tokens = episode.response_mask.sum(-1)
    # k3 of a log-ratio of -0.3 per token: exp(0.3) - 1 - 0.3
    expected = (math.exp(0.3) - 1.3) * tokens.float().mean().item()
    assert stats["kl/mean"] > 0 and stats["kl/mean"] == pytest.approx(expected, rel=1e-4)
    assert stats["kl/penalty"] == pytest.approx(-0.3 * tokens.float().mean().item(), rel=1e-4)


def test_first_minibatch_has_ratio_one_and_zero_approx_kl(tiny_model_config, tokenizer, monkeypatch):
    """Before the first update the policy is the one that sampled the rollout."""
    from rlhf import rl

    seen = []
    original = rl.policy_loss

    def recording(*args, **kwargs):
        loss, stats = original(*args, **kwargs)
        seen.append({k: v.item() for k, v in stats.items()})
        return loss, stats

    monkeypatch.setattr(rl, "policy_loss", recording)
    module = _module(tiny_model_config, tokenizer, lr=1e-2, max_approx_kl=None)
    logged = _fit_one_iteration(module, tokenizer)
    assert len(seen) == 4 and logged["ppo/updates"] == 4  # 2 epochs x 4 episodes / minibatches of 2
    assert seen[0]["ratio"] == pytest.approx(1.0, abs=1e-5)
    assert seen[0]["approx_kl"] == pytest.approx(0.0, abs=1e-8)
    assert seen[0]["clipfrac"] == 0.0
    assert max(s["approx_kl"] for s in seen[1:]) > 1e-6  # the updates did move the policy


def test_the_update_synchronises_with_the_host_once_and_logs_the_minibatch_means(
    tiny_model_config, tokenizer, monkeypatch
):
    """Without the KL bound (whose decision needs the host), the metrics of an iteration's updates are
    summed on the device and read once: the same means as reading each minibatch's values."""

    from rlhf import rl

    seen = []
    original = rl.policy_loss

    def recording(*args, **kwargs):
        loss, stats = original(*args, **kwargs)
        seen.append((loss.detach().clone(), stats["clipfrac"].detach().clone()))
        return loss, stats

    monkeypatch.setattr(rl, "policy_loss", recording)
    module = _module(tiny_model_config, tokenizer, lr=1e-2, max_approx_kl=None)
    reads = count_host_reads(monkeypatch, module)
    logged = _fit_one_iteration(module, tokenizer)
    assert logged["ppo/updates"] == 4 and reads == ["tolist"]
    assert logged["policy/loss"] == pytest.approx(
        sum(loss.item() for loss, _ in seen) / 4, rel=1e-5, abs=1e-7
    )
    assert logged["policy/clipfrac"] == pytest.approx(sum(c.item() for _, c in seen) / 4, abs=1e-7)


def test_early_stop_ends_the_iterations_remaining_minibatches_and_epochs(tiny_model_config, tokenizer):
    """stage.max_approx_kl: past it, no further minibatch of this iteration is used, in any epoch."""
    module = _module(tiny_model_config, tokenizer, lr=1e-2, max_approx_kl=1e-6, ppo_epochs=4)
    logged = _fit_one_iteration(module, tokenizer)
    # the first minibatch (approx KL 0) updates; the second is past the bound and ends the iteration
    assert (logged["ppo/updates"], logged["ppo/epochs"], logged["ppo/early_stopped"]) == (1.0, 1.0, 1.0)


@pytest.mark.parametrize(("lr", "stops"), [(1e-5, False), (1e-3, True)])
def test_default_approx_kl_bound_stops_a_jumping_iteration_only(tiny_model_config, tokenizer, lr, stops):
    """At the shipped stage.max_approx_kl, four epochs at lr 1e-3 move the tiny policy by 0.3-0.4 nats
    per token and stop early, while small steps (under 1e-3 nats) run every update."""
    import torch

    default = stage_config("ppo").max_approx_kl
    module = _module(tiny_model_config, tokenizer, lr=lr, max_approx_kl=default, ppo_epochs=4)
    torch.manual_seed(0)
    logged = _fit_one_iteration(module, tokenizer)
    assert logged["ppo/early_stopped"] == float(stops)
    assert (logged["ppo/updates"] < 8) == stops


def test_advantages_mean_is_logged_before_whitening(tiny_model_config, tokenizer):
    import torch

    logged = {}
    for whiten in (False, True):
        module = _module(tiny_model_config, tokenizer, whiten_advantages=whiten)
        torch.manual_seed(0)
        episode, logged[whiten], _ = module.rollout(_batch(tokenizer))
    assert logged[True]["advantages/mean"] == pytest.approx(logged[False]["advantages/mean"], abs=1e-6)
    assert abs(logged[True]["advantages/mean"]) > 1e-3  # whitened, it would be 0 by construction
    assert logged[True]["advantages/std"] == pytest.approx(logged[False]["advantages/std"], abs=1e-6)


RAW = [1.0, 3.0, -1.0, 5.0]


@pytest.mark.parametrize(
    ("mode", "stats", "clip", "expected"),
    [
        ("none", None, None, [1.0, 3.0, -1.0, 5.0]),
        ("model", (1.0, 2.0), None, [0.0, 1.0, -1.0, 2.0]),  # (x - 1) / 2
        ("auto", (1.0, 2.0), 1.5, [0.0, 1.0, -1.0, 1.5]),  # the reward model's statistics, then clipped
        # running, after itself: mean 2, population var 5, shrunk (4 * 5 + 1) / 5 = 4.2
        ("running", (1.0, 2.0), None, [(x - 2.0) / 4.2**0.5 for x in RAW]),
        (
            "auto",
            None,
            0.5,
            [-0.4879500364742666, 0.4879500364742666, -0.5, 0.5],
        ),  # running (+-1 / sqrt 4.2), clipped
    ],
)
def test_reward_normalisation_modes_and_clip(tiny_model_config, tokenizer, mode, stats, clip, expected):
    import torch

    module = _module(tiny_model_config, tokenizer, reward_norm=mode, reward_clip=clip, reward_stats=stats)
    scores = module._normalise(torch.tensor(RAW), update=True)
    torch.testing.assert_close(scores, torch.tensor(expected), atol=1e-6, rtol=0)


def test_missing_eos_penalty_applies_to_the_raw_score_before_normalisation(tiny_model_config, tokenizer):
    import torch

    module = _module(
        tiny_model_config,
        tokenizer,
        reward_norm="model",
        reward_stats=(1.0, 2.0),
        missing_eos_penalty=0.5,
        reward_clip=None,
    )
    torch.manual_seed(0)
    episode, _, texts = module.rollout(_batch(tokenizer))
    raw = torch.tensor(module._last_samples[2])
    lengths = episode.response_mask.sum(-1)
    last = episode.response[torch.arange(len(texts)), lengths - 1]
    cut_off = ~torch.isin(last, torch.tensor(module.eos_token_ids))
    assert cut_off.any()  # 6 new tokens from a random model: most responses are cut off
    torch.testing.assert_close(episode.scores, (raw - 0.5 * cut_off.float() - 1.0) / 2.0)


def test_missing_eos_penalty_must_not_be_negative(compose):
    from rlhf.config import validate
    from rlhf.errors import ConfigError

    with pytest.raises(ConfigError, match=r"stage.missing_eos_penalty: must be >= 0"):
        validate(compose(["stage=ppo", "tracking=none", "stage.missing_eos_penalty=-1.0"]))


@pytest.mark.parametrize("override", ["stage.rollout.top_k=50", "stage.rollout.top_p=0.9"])
def test_ppo_refuses_truncated_sampling_but_eval_keeps_it(compose, override):
    from rlhf.config import validate
    from rlhf.errors import ConfigError

    with pytest.raises(ConfigError, match="off-policy"):
        validate(compose(["stage=ppo", "tracking=none", override]))
    assert validate(compose(["stage=eval", "tracking=none", override])).stage.rollout is not None


def test_critic_from_a_reward_model_starts_on_the_normalised_scale(tiny_model_config, tokenizer, tmp_path):
    """The fresh value model's value at the last response token is the normalised score that the
    returns are built from, not the raw score."""
    import torch

    from rlhf.data.loading import attention_mask, pad
    from rlhf.models import load_scalar_model, save_model, unwrap
    from rlhf.scalar import sequence_scores, token_scores
    from rlhf.stages.ppo.module import load_critic

    rm = load_scalar_model(tiny_model_config, None, tokenizer.pad_token_id, seed=3).eval()
    with torch.no_grad():  # a score head with a visible scale and offset
        unwrap(rm).score.weight.mul_(40.0)
    mean, std = 0.7, 2.5
    unwrap(rm).config.reward_mean, unwrap(rm).config.reward_std = mean, std
    save_model(rm, tokenizer, tmp_path / "rm")
    sequences = [ids + [tokenizer.eos_token_id] for ids in _batch(tokenizer)["prompt_ids"]]
    ids, mask = pad(sequences, tokenizer.pad_token_id), attention_mask(sequences)
    with torch.no_grad():
        raw = sequence_scores(rm, ids, mask)
        for norm, expected in (("auto", (raw - mean) / std), ("model", (raw - mean) / std), ("none", raw)):
            critic = load_critic(
                tiny_model_config, str(tmp_path / "rm"), None, tokenizer.pad_token_id, 0, (mean, std), norm
            ).eval()
            values = token_scores(critic, ids, mask)[torch.arange(len(sequences)), mask.sum(-1) - 1]
            torch.testing.assert_close(values, expected, atol=1e-4, rtol=1e-4)
    assert raw.std() > 0.1  # the scales differ enough for the check to mean something
