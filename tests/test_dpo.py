"""DPO: its losses against hand-computed values, the response log-probabilities of both batch layouts,
the loss at initialisation, the precomputed reference, learning on the shipped pairs, and resuming."""

from __future__ import annotations

import json
import math
import signal
from pathlib import Path

import pytest
import torch
from conftest import runs_of
from test_sft import _start, _wait_for, history

from rlhf.preference import dpo_loss

SMOKE = ["experiment=smoke", "stage=dpo", "stage.init_from=base"]
LOG2 = math.log(2)


# -- losses ---------------------------------------------------------------------------------------


def _two_pairs():
    """Two pairs with beta = 0.5: log-ratios 0.5 / -0.5 (h = 1) and -0.5 / 0.5 (h = -1)."""
    policy_chosen = torch.tensor([-1.0, -2.0])
    policy_rejected = torch.tensor([-2.0, -1.0])
    reference = torch.tensor([-1.5, -1.5])
    return policy_chosen, policy_rejected, reference, reference


@pytest.mark.parametrize(
    ("loss_type", "smoothing", "expected"),
    [
        # log(1 + e^-0.5) and log(1 + e^0.5)
        ("sigmoid", 0.0, [0.474077, 0.974077]),
        # 0.9 * log(1 + e^-0.5) + 0.1 * log(1 + e^0.5) = 0.474077 + 0.1 * 0.5, and mirrored
        ("sigmoid", 0.1, [0.524077, 0.924077]),
        # (h - 1 / (2 * 0.5))^2
        ("ipo", 0.0, [0.0, 4.0]),
        # max(0, 1 - 0.5 h)
        ("hinge", 0.0, [0.5, 1.5]),
    ],
)
def test_dpo_losses_match_hand_computed_values(loss_type, smoothing, expected):
    losses, chosen, rejected = dpo_loss(
        *_two_pairs(), beta=0.5, loss_type=loss_type, label_smoothing=smoothing
    )
    assert losses.tolist() == pytest.approx(expected, abs=1e-6)
    # implicit rewards: beta * (log pi - log ref)
    assert chosen.tolist() == pytest.approx([0.25, -0.25]) and rejected.tolist() == pytest.approx(
        [-0.25, 0.25]
    )


def test_dpo_sigmoid_loss_is_log_2_when_the_policy_is_the_reference():
    logps = torch.tensor([-3.0, -7.0])
    for smoothing in (0.0, 0.2):
        losses, _, _ = dpo_loss(
            logps, logps.flip(0), logps, logps.flip(0), beta=0.1, label_smoothing=smoothing
        )
        assert losses.tolist() == pytest.approx([LOG2, LOG2])
    with pytest.raises(ValueError, match="unknown DPO loss"):
        dpo_loss(logps, logps, logps, logps, beta=0.1, loss_type="kto")


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["stage.beta=0"], "stage.beta: must be > 0"),
        (["stage.loss=kto"], "stage.loss: must be one of sigmoid, ipo, hinge"),
        (
            ["stage.loss=ipo", "stage.label_smoothing=0.1"],
            "stage.label_smoothing: applies to the sigmoid loss only",
        ),
        (["stage.label_smoothing=0.5"], "stage.label_smoothing: must be in [0, 0.5)"),
    ],
)
def test_bad_dpo_settings_name_the_key(compose, overrides, message):
    from rlhf.config import validate
    from rlhf.errors import ConfigError

    with pytest.raises(
        ConfigError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")
    ):
        validate(compose(["stage=dpo", "tracking=none", *overrides]))


# -- log-probabilities of responses ------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_policy(tiny_model_config):
    from rlhf import models

    model = models.load_causal_lm(tiny_model_config, None, seed=0)
    models.disable_dropout(model)
    return model.eval()


def _direct_logp(model, sequence: list[int], prompt_length: int) -> float:
    """Sum of log p(token) over the response's tokens, from the model run on the sequence alone."""
    ids = torch.tensor([sequence])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, :-1].float()
    logp = torch.log_softmax(logits, -1).gather(-1, ids[0, 1:, None]).squeeze(-1)
    return logp[prompt_length - 1 :].sum().item()


def _features():
    prompt = list(range(100, 120))
    one, two = [prompt + [7, 8, 9, 10], prompt + [7, 8, 11]]
    ranked = [prompt[:12] + [20, 21, 22, 23], prompt[:12] + [20, 21], prompt[:12] + [30]]
    pairs = [{"chosen": one, "rejected": two, "margin": 0.0, "prompt_length": 20, "record": 0}]
    # A ranking of three (its second response is a prefix of the first): three pairs of one record.
    for a, b in ((0, 1), (0, 2), (1, 2)):
        pairs.append(
            {"chosen": ranked[a], "rejected": ranked[b], "margin": 0.0, "prompt_length": 12, "record": 1}
        )
    return pairs, [one, two, *ranked], [20, 20, 12, 12, 12]


@pytest.mark.parametrize("share_prefix", [True, False])
def test_sequence_logprobs_sum_each_responses_own_tokens_in_either_layout(tiny_policy, share_prefix):
    from rlhf.data.prepare import PairCollator, group_comparisons
    from rlhf.policy import sequence_logprobs

    pairs, responses, prompt_lengths = _features()
    batch = PairCollator(0, share_prefix=share_prefix, response_tokens=True)(group_comparisons(pairs))
    assert ("pair_mask" in batch) == share_prefix
    assert batch["pair_index"].tolist() == [[0, 1], [2, 3], [2, 4], [3, 4]]
    with torch.no_grad():
        got = sequence_logprobs(tiny_policy, batch)
    expected = [_direct_logp(tiny_policy, r, p) for r, p in zip(responses, prompt_lengths)]
    assert got.tolist() == pytest.approx(expected, abs=1e-4)


# -- the module ---------------------------------------------------------------------------------------


def _build(compose, *overrides: str):
    from rlhf.config import validate
    from rlhf.stages.dpo.module import build
    from rlhf.tracking import SilentTracker

    run = validate(compose([*SMOKE, "tracking=none", *overrides]))
    return run, build(run, SilentTracker())


def test_loss_at_initialisation_is_log_2_and_rankings_batch_by_record(compose):
    """Policy = reference: every implicit reward is 0 and the sigmoid loss log 2. On rankings of four
    responses a batch of 2 records holds their 2 x 6 pairs, each response computed once."""
    _, job = _build(compose, "data.preference.path=task:assistant/rankings", "stage.batch_size=2")
    batch = next(iter(job.datamodule.train_dataloader()))
    assert batch["pair_index"].shape[0] == 12 and batch["score_index"].shape[0] == 8
    losses, rows = job.module._pair_terms(batch)
    assert losses.tolist() == pytest.approx([LOG2] * 12, abs=1e-5)
    assert rows[:, 1:3].abs().max().item() < 1e-5  # implicit rewards


def test_each_loss_at_initialisation_through_the_module(compose):
    """h = 0 at the start: ipo (1 / (2 beta))^2 = 25 for beta 0.1, hinge 1, sigmoid log 2 with or
    without label smoothing; a training step's loss has a gradient for each."""
    from dataclasses import replace

    _, job = _build(compose)
    batch = next(iter(job.datamodule.train_dataloader()))
    for loss, smoothing, expected in (("sigmoid", 0.2, LOG2), ("ipo", 0.0, 25.0), ("hinge", 0.0, 1.0)):
        job.module.stage = replace(job.module.stage, loss=loss, label_smoothing=smoothing)
        losses, _ = job.module._pair_terms(batch)
        assert losses.tolist() == pytest.approx([expected] * len(losses), rel=1e-4), loss
        assert losses.mean().requires_grad


def test_lora_reference_is_the_policy_with_its_adapters_off(compose, tiny_policy, tokenizer, tmp_path):
    from rlhf import models

    local = models.save_model(tiny_policy, tokenizer, tmp_path / "tiny")
    _, job = _build(
        compose,
        "model.random_init=null",
        "model.gguf_file=null",
        f"model.name_or_path={local}",
        "model.lora.enabled=true",
    )
    module = job.module
    assert module.reference is None
    with torch.no_grad():  # move the adapters away from their zero start
        for name, parameter in module.policy.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.05)
    batch = next(iter(job.datamodule.train_dataloader()))
    losses, rows = module._pair_terms(batch)
    assert rows[:, 1:3].abs().min().item() > 0 and not torch.allclose(losses, torch.full_like(losses, LOG2))


def test_precomputed_reference_gives_the_live_references_loss(compose):
    """The reference's log-probabilities computed before training, carried in the batches, give the
    loss the frozen reference model gives, once the policy has moved."""
    from rlhf.stages.dpo.module import attach_reference_logps

    _, live = _build(compose)
    _, pre = _build(compose, "stage.precompute_ref=true")
    assert pre.module.reference is None
    features = pre.datamodule.splits["validation"][:8]
    attach_reference_logps(pre.module.policy, pre.datamodule.collate, features, 3, torch.device("cpu"))
    with torch.no_grad():
        for a, b in zip(live.module.policy.parameters(), pre.module.policy.parameters()):
            a.add_(torch.randn_like(a) * 0.02)
            b.copy_(a)
    live_batch = live.datamodule.collate(live.datamodule.splits["validation"][:8])
    pre_batch = pre.datamodule.collate(features)
    assert "reference_logps" in pre_batch and "reference_logps" not in live_batch
    live_losses, _ = live.module._pair_terms(live_batch)
    pre_losses, _ = pre.module._pair_terms(pre_batch)
    assert not torch.allclose(live_losses, torch.full_like(live_losses, LOG2), atol=1e-3)
    assert pre_losses.tolist() == pytest.approx(live_losses.tolist(), abs=1e-4)


def test_precomputed_reference_is_computed_under_the_trainers_precision(compose):
    """Under bf16-mixed the policy's log-probabilities in the step are bf16 autocast ones; the
    reference's, computed once in setup, must be too, or every implicit reward starts off by the
    rounding (a first loss of 0.713, not log 2, on a real model)."""
    import pytorch_lightning as pl

    from rlhf.policy import sequence_logprobs

    _, job = _build(compose, "stage.precompute_ref=true")
    features = job.datamodule.splits["validation"][:4]
    batch = job.datamodule.collate(features)
    with torch.no_grad():
        full = sequence_logprobs(job.module.policy, batch)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            autocast = sequence_logprobs(job.module.policy, batch).float()
    assert (full - autocast).abs().max() > 1e-3  # the two precisions do differ on this model
    trainer = pl.Trainer(
        precision="bf16-mixed",
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=1,
    )
    trainer.validate(job.module, datamodule=job.datamodule)  # runs setup, which precomputes
    stored = torch.tensor([logp for feature in features for logp in feature["reference_logps"]])
    torch.testing.assert_close(stored, autocast, atol=1e-4, rtol=0)


# -- end to end --------------------------------------------------------------------------------------


def test_dpo_learns_on_the_shipped_pairs_and_saves_a_policy(tmp_path, cli, mlflow_client):
    """From 0.5 at the start (every implicit reward 0), held-out accuracy rises within 24 tiny-model
    steps; the run logs TRL's metrics, the KL and gold score of held-out samples, and saves a causal LM."""
    from transformers import AutoModelForCausalLM

    cli(*SMOKE, "+trainer.limit_test_batches=1")
    (run,) = runs_of(mlflow_client, "smoke", "dpo")
    assert run.info.status == "FINISHED" and run.data.tags["rlhf.init_from"] == "base"
    metrics = run.data.metrics
    for split in ("train", "val", "test"):
        for name in (
            "loss",
            "rewards/chosen",
            "rewards/rejected",
            "rewards/margins",
            "rewards/accuracies",
            "logps/chosen",
            "logps/rejected",
        ):
            assert f"{split}/{name}" in metrics, (split, name)
    assert metrics["val/rewards/accuracies"] > 0.6, metrics["val/rewards/accuracies"]
    assert metrics["val/loss"] < LOG2 and metrics["val/rewards/margins"] > 0
    assert metrics["val/kl"] > 0 and "val/gold" in metrics and metrics["perf/pairs_per_s"] > 0
    table = json.loads(
        Path(mlflow_client.download_artifacts(run.info.run_id, "samples/validation.json")).read_text()
    )
    assert table["columns"] == ["prompt", "response", "kl", "gold"] and len(table["data"]) == 8
    model = AutoModelForCausalLM.from_pretrained(mlflow_client.download_artifacts(run.info.run_id, "model"))
    assert model.config.model_type == "llama"


def test_dpo_without_an_sft_run_says_what_to_run(tmp_path, cli):
    result = cli("experiment=smoke", "stage=dpo", "tracking.experiment=empty", check=False)
    assert result.returncode == 2
    (line,) = [x for x in result.stderr.splitlines() if x.startswith("rlhf: error:")]
    assert "stage.init_from=latest: no finished sft run" in line and "python -m rlhf stage=sft" in line


@pytest.mark.parametrize("precompute", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_killed_dpo_resumes_to_the_same_result(tmp_path, cli, mlflow_client, precompute):
    """SIGKILL after the first checkpoint, resume=true: the policy, optimizer and data position come
    back, the reference is rebuilt (or recomputed from the initial policy), and the run ends as an
    uninterrupted one does."""
    args = [
        *SMOKE,
        "trainer.max_steps=8",
        "checkpoint.every_n_steps=4",
        "trainer.val_check_interval=4",
        "trainer.log_every_n_steps=1",
        "stage.sample_prompts=0",
        "+trainer.limit_test_batches=1",
        f"stage.precompute_ref={str(precompute).lower()}",
    ]
    cli(*args, "tracking.experiment=whole")
    process = _start([*args, "tracking.experiment=cut"], tmp_path)
    _wait_for(lambda: any((tmp_path / "outputs").glob("*/*/checkpoints/step-000004.ckpt")), 300, process)
    process.send_signal(signal.SIGKILL)
    process.wait()
    cli(*args, "tracking.experiment=cut", "resume=true")
    (whole,) = runs_of(mlflow_client, "whole")
    (resumed,) = runs_of(mlflow_client, "cut")
    assert resumed.info.status == "FINISHED" and "rlhf.resumed_from" in resumed.data.tags
    expected = dict(history(mlflow_client, whole.info.run_id, "train/loss"))
    got = dict(history(mlflow_client, resumed.info.run_id, "train/loss"))
    assert max(expected) == max(got) == 7
    for step in range(4, 8):
        assert got[step] == pytest.approx(expected[step], rel=1e-5, abs=1e-6), step
    for key in ("val/loss", "val/rewards/accuracies", "test/loss"):
        assert resumed.data.metrics[key] == pytest.approx(whole.data.metrics[key], rel=1e-5), key


def test_bench_workload_counts_pairs_and_the_reference_forward_pass(compose):
    from rlhf.bench import FlopCount, attended_pairs
    from rlhf.stages.dpo.module import bench_workload

    run, job = _build(compose)
    settings = {"batch_size": 4, "length": 32, "synthetic": 1}
    workload = bench_workload(job, run, settings)
    batch = job.datamodule.collate(job.datamodule.splits["train"][:4])
    assert workload.unit == "pairs" and workload.count(batch) == 4
    # Random responses after a shared prompt of 16 tokens: each response's 16 tokens are trained.
    assert batch["target_index"].numel() == 8 * 16
    count = FlopCount.of(job.module.policy, lm_head=True)
    tokens, trained, attended = float(batch["attention_mask"].sum()), 8 * 16, attended_pairs(batch)
    policy = (4 * count.body + 2 * count.body_trainable) * tokens + (
        4 * count.head + 2 * count.head_trainable
    ) * trained
    policy += 12 * count.layers * count.attention_width * attended
    reference = (
        2 * count.body * tokens
        + 2 * count.head * trained
        + 4 * count.layers * count.attention_width * attended
    )
    assert workload.flops.step(batch) == pytest.approx(policy + reference)
