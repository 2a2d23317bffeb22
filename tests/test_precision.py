"""Precision chosen for the hardware (trainer.precision=auto), and bf16 mixed precision's numerics:
fp32 where it matters (log-probabilities, scores, values), losses that track fp32."""

from __future__ import annotations

import pytest
import torch

from rlhf.config import validate
from rlhf.config.precision import auto_precision, cpu_flags, resolve_precision
from rlhf.errors import ConfigError

X86_WITH_BF16 = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_bf16 amx_tile amx_bf16\n"
X86_WITHOUT = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_vnni\n"


@pytest.mark.parametrize(
    ("cpuinfo", "speedup", "expected"),
    [
        (X86_WITH_BF16, 3.0, "bf16-mixed"),
        # The same flags on a processor whose bf16 products run at half the fp32 rate.
        (X86_WITH_BF16, 0.5, "32-true"),
        (X86_WITH_BF16, 1.1, "32-true"),
    ],
)
def test_auto_precision_decides_from_the_measured_bf16_rate(
    tmp_path, monkeypatch, cpuinfo, speedup, expected
):
    monkeypatch.setattr("rlhf.config.precision.measured_bf16_speedup", lambda: speedup)
    path = tmp_path / "cpuinfo"
    path.write_text(cpuinfo)
    trainer = {"accelerator": "cpu", "precision": "auto", "devices": 1}
    assert resolve_precision(trainer, path) == {**trainer, "precision": expected}


def test_auto_precision_measures_nothing_without_bf16_instructions(tmp_path):
    def measure():
        raise AssertionError("measured although the processor has no bf16 instructions")

    precision, why = auto_precision("cpu", cpu_flags_of(tmp_path, X86_WITHOUT), measure)
    assert precision == "32-true" and "no bf16 instructions" in why
    assert auto_precision("cpu", cpu_flags(tmp_path / "missing"), measure)[0] == "32-true"
    precision, why = auto_precision("cpu", {"bf16", "asimd"}, lambda: 2.0)
    assert precision == "bf16-mixed" and "2.00x" in why


def test_the_measured_speedup_is_a_positive_ratio_of_this_machine():
    from rlhf.config.precision import measured_bf16_speedup

    assert measured_bf16_speedup(size=32) > 0


def cpu_flags_of(tmp_path, cpuinfo: str) -> set[str]:
    path = tmp_path / "cpuinfo"
    path.write_text(cpuinfo)
    return cpu_flags(path)


def test_explicit_precision_is_kept(tmp_path):
    path = tmp_path / "cpuinfo"
    path.write_text(X86_WITH_BF16)
    assert resolve_precision({"accelerator": "cpu", "precision": "32-true"}, path)["precision"] == "32-true"


def test_default_run_records_the_resolved_precision_and_overrides_win(compose):
    from rlhf.config import to_container

    default = validate(compose(["tracking=none"]))
    assert default.trainer["precision"] in ("bf16-mixed", "32-true")
    assert to_container(default)["trainer"]["precision"] == default.trainer["precision"]
    assert validate(compose(["tracking=none", "trainer.precision=32-true"])).trainer["precision"] == "32-true"
    assert validate(compose(["tracking=none", "trainer.precision=bf16"])).trainer["precision"] == "bf16"


def test_unknown_precision_is_a_config_error(compose):
    with pytest.raises(ConfigError, match="trainer.precision: must be one of auto, 32-true, bf16-mixed"):
        validate(compose(["tracking=none", "trainer.precision=bf15-mixed"]))


# ---------------------------------------------------------------- fp32 where it matters


def test_scores_are_computed_in_fp32_under_autocast():
    """A score rounded to bf16 keeps 8 bits; the head runs in fp32 even inside autocast."""
    from rlhf.scalar import fp32_head

    torch.manual_seed(0)
    head = torch.nn.Linear(64, 1)
    hidden = torch.randn(16, 64)
    expected = head(hidden)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plain = head(hidden)
        scores = fp32_head(head, hidden)
    assert plain.dtype == torch.bfloat16 and scores.dtype == torch.float32
    torch.testing.assert_close(scores, expected, rtol=1e-6, atol=1e-6)


def test_recomputed_softmax_in_backward_matches_forward_under_autocast(monkeypatch):
    """Large batches recompute the softmax in backward; autocast does not reach backward, so it is
    restored there, and the gradients equal those of the kept softmax."""
    from rlhf.policy import LinearLogProbs

    torch.manual_seed(0)
    hidden = torch.randn(12, 32, requires_grad=True)
    weight = torch.randn(500, 32, requires_grad=True)
    targets = torch.randint(0, 500, (12,))
    grads = []
    for limit in (LinearLogProbs.KEEP_LIMIT, 0):  # kept, then recomputed
        monkeypatch.setattr(LinearLogProbs, "KEEP_LIMIT", limit)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logp, _ = LinearLogProbs.apply(hidden, weight, targets, 1.0, 5, False)
        assert logp.dtype == torch.float32
        grads.append(torch.autograd.grad(logp.sum(), (hidden, weight)))
    for kept, recomputed in zip(*grads):
        torch.testing.assert_close(recomputed, kept, rtol=0, atol=0)


# ---------------------------------------------------------------- through Lightning, tiny model


def _fit(compose, overrides: list[str], callbacks: list, tmp_path):
    from rlhf.runner import stage_trainer
    from rlhf.stages import get_stage
    from rlhf.tracking import SilentTracker

    run = validate(
        compose(
            [
                "experiment=smoke",
                "tracking=none",
                "checkpoint.every_n_steps=0",
                "+trainer.limit_val_batches=0",
                "trainer.enable_progress_bar=false",
                *overrides,
            ]
        )
    )
    tracker = SilentTracker()
    job = get_stage(run.stage.name).build(run, tracker)
    trainer = stage_trainer(run, tracker, tmp_path, job, callbacks)
    trainer.fit(job.module, datamodule=job.datamodule)
    return job, trainer


class Losses:
    """Records the training loss of every step (what the optimizer minimised)."""

    def __init__(self):
        import pytorch_lightning as pl

        losses = self.losses = []

        class _Callback(pl.Callback):
            def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
                losses.append(float(outputs["loss"]))

        self.callback = _Callback()


# The reward model's Bradley-Terry loss starts at log 2 on a random model, where a small change of the
# score gap moves it most: on the shipped pairs bf16 put it up to 7.5% away from fp32 by the third step.
@pytest.mark.parametrize(("stage", "tolerance"), [("sft", 0.02), ("rm", 0.1)])
def test_bf16_mixed_losses_track_fp32(compose, tmp_path, stage, tolerance):
    """Six steps of the tiny model (gradient clipping on, as by default) in bf16-mixed stay within a
    few percent of the fp32 losses at every step, and the first step's (same weights) within 0.5%:
    bf16 rounds matmul inputs to 8 bits, the losses and the master weights stay fp32."""
    source = "stage.init_from=base"
    losses = {}
    for precision in ("32-true", "bf16-mixed"):
        recorder = Losses()
        _fit(
            compose,
            [
                f"stage={stage}",
                source,
                "trainer.max_steps=6",
                f"trainer.precision={precision}",
                "trainer.gradient_clip_val=1.0",
            ],
            [recorder.callback],
            tmp_path / precision,
        )
        losses[precision] = recorder.losses
    assert len(losses["32-true"]) == 6
    torch.testing.assert_close(
        torch.tensor(losses["bf16-mixed"]), torch.tensor(losses["32-true"]), rtol=tolerance, atol=0
    )
    assert losses["bf16-mixed"][0] == pytest.approx(losses["32-true"][0], rel=0.005)


def test_first_ppo_ratio_is_exactly_one_in_bf16_mixed(compose, tmp_path, monkeypatch):
    """The rollout's log-probabilities and the first update's are computed under the same autocast,
    so before any update the policy ratio is exactly 1 on every token of the first minibatch."""
    from rlhf import rl

    seen = []
    original = rl.policy_loss

    def recording(logprobs, old_logprobs, advantages, mask, clip):
        seen.append((logprobs.detach().clone(), old_logprobs.clone(), mask.bool()))
        return original(logprobs, old_logprobs, advantages, mask, clip)

    monkeypatch.setattr(rl, "policy_loss", recording)
    job, _ = _fit(
        compose,
        [
            "stage=ppo",
            "stage.policy_from=base",
            "stage.reward_from=fn:rlhf.tasks.assistant.gold_reward",
            "trainer.max_steps=1",
            "trainer.precision=bf16-mixed",
            "stage.ppo_epochs=1",
            "stage.rollout.batch_size=4",
            "stage.minibatch_size=4",
        ],
        [],
        tmp_path,
    )
    logprobs, old, mask = seen[0]
    assert mask.any()
    assert torch.equal(logprobs[mask], old[mask])
    assert torch.equal(torch.exp(logprobs - old)[mask], torch.ones_like(old[mask]))


def test_decoding_runs_in_the_weights_dtype_under_autocast():
    """Sampling inside bf16 autocast (PPO's rollout) decodes in fp32: autocast would re-cast every
    weight at every step, and the sampled distribution comes from fp32 logits."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from rlhf.policy import generate

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        pad_token_id=0,
    )
    model = LlamaForCausalLM(config)
    dtypes = set()
    model.model.layers[0].mlp.down_proj.register_forward_hook(lambda module, args, out: dtypes.add(out.dtype))
    prompts = [[5, 6, 7], [8, 9]]
    greedy = generate(model, prompts, 0, [1], max_new_tokens=5, do_sample=False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_autocast = generate(model, prompts, 0, [1], max_new_tokens=5, do_sample=False)
    assert dtypes == {torch.float32}
    assert under_autocast == greedy


def test_ppo_stores_a_frozen_reward_model_in_bf16_under_bf16_mixed_only(compose, tmp_path):
    """Half the reward model's memory in bf16 mixed precision; its scores still come out of an fp32
    head, and stay close to the fp32-stored model's under the same autocast."""
    from rlhf import models
    from rlhf.scalar import sequence_scores
    from rlhf.stages import get_stage
    from rlhf.tracking import SilentTracker

    directory = tmp_path / "reward"
    tiny = validate(compose(["model=tiny", "tracking=none"]))
    tokenizer = models.load_tokenizer(tiny.model)
    models.save_model(
        models.load_scalar_model(tiny.model, None, tokenizer.pad_token_id), tokenizer, directory
    )
    reward_models = {}
    for precision in ("32-true", "bf16-mixed"):
        run = validate(
            compose(
                [
                    "experiment=smoke",
                    "stage=ppo",
                    "tracking=none",
                    "stage.policy_from=base",
                    f"stage.reward_from={directory}",
                    f"trainer.precision={precision}",
                ]
            )
        )
        reward_models[precision] = get_stage("ppo").build(run, SilentTracker()).module.reward.model
    fp32, bf16 = reward_models["32-true"], reward_models["bf16-mixed"]
    assert {p.dtype for p in fp32.parameters()} == {torch.float32}
    assert bf16.model.embed_tokens.weight.dtype == torch.bfloat16 and bf16.score.weight.dtype == torch.float32
    ids = torch.randint(10, 1000, (4, 12))
    mask = torch.ones_like(ids)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        expected, got = sequence_scores(fp32, ids, mask), sequence_scores(bf16, ids, mask)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected, rtol=0.05, atol=0.05)
