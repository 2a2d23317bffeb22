"""The benchmark's FLOP accounting (by hand) and its command line (figures printed, rate sampled)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import torch
from conftest import OFFLINE, THREADS
from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

from rlhf.bench import FlopCount, MatmulRate, attended_pairs, matmul_dtype
from rlhf.data.prepare import PairCollator


def _config(**overrides) -> LlamaConfig:
    settings = dict(
        vocab_size=100, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False, pad_token_id=0,
    )  # fmt: skip
    return LlamaConfig(**{**settings, **overrides})


def test_attended_pairs_are_causal_over_real_tokens():
    batch = {"attention_mask": torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]])}
    assert attended_pairs(batch) == (1 + 2 + 3) + 1


def test_attended_pairs_of_a_shared_prompt_row_count_the_prompt_once():
    batch = PairCollator(pad_token_id=0, share_prefix=True)(
        [{"chosen": [5, 6, 7, 8], "rejected": [5, 6, 9], "margin": 0.0}]
    )
    assert "pair_mask" in batch  # the packed layout, padding included in its width
    # The chosen sequence attends causally (1 + 2 + 3 + 4); the rejected token sees the prompt and itself.
    assert attended_pairs(batch) == 10 + 3


def test_flop_count_of_a_language_model_counts_its_head_on_trained_tokens_only():
    model = LlamaForCausalLM(_config())
    count = FlopCount.of(model, lm_head=True)
    total = sum(p.numel() for p in model.parameters())
    assert (count.head, count.layers, count.attention_width) == (100 * 16, 2, 16)
    assert count.body == count.body_trainable == total - 2 * 100 * 16  # neither embedding nor head
    batch = {"attention_mask": torch.tensor([[1, 1, 1]]), "labels": torch.tensor([[-100, 4, 5]])}
    assert count.step(batch) == 6 * count.body * 3 + 6 * count.head * 2 + 12 * 2 * 16 * 6


def test_flop_count_of_frozen_weights_leaves_out_their_gradient():
    model = LlamaForSequenceClassification(_config(num_labels=1))
    for name, parameter in model.named_parameters():
        parameter.requires_grad = "mlp" not in name
    count = FlopCount.of(model, lm_head=False)
    frozen = sum(p.numel() for n, p in model.named_parameters() if "mlp" in n)
    assert count.head == 0 and count.body_trainable == count.body - frozen
    batch = {"attention_mask": torch.tensor([[1, 1], [1, 1]])}
    assert count.step(batch) == (6 * count.body - 2 * frozen) * 4 + 12 * 2 * 16 * 6


def test_flop_count_under_lora_trains_only_the_adapters():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(LlamaForCausalLM(_config()), LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    count = FlopCount.of(model, lm_head=True)
    adapters = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    assert count.body_trainable == adapters and count.head_trainable == 0
    assert (
        count.head == 100 * 16
        and count.body == FlopCount.of(LlamaForCausalLM(_config()), lm_head=True).body + adapters
    )


def test_bench_prints_throughput_and_utilisation_against_sampled_rates(tmp_path):
    args = [
        "stage=rm",
        "model=tiny",
        "stage.init_from=base",
        "bench.synthetic=0",
        "bench.steps=3",
        "bench.warmup=2",
        "bench.profile=1",
        "tracking=none",
    ]
    result = subprocess.run(
        [sys.executable, "-m", "rlhf.bench", *args],
        cwd=tmp_path,
        env={**os.environ, **OFFLINE, **THREADS},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    figures = json.loads(result.stdout[result.stdout.index("{") :])
    assert figures["steps_timed"] == 3 and figures["pairs_per_s"] > 0
    assert figures["matmul_gflops_peak"] >= figures["matmul_gflops"] > 0
    assert 0 < figures["mfu_of_peak"] <= figures["mfu"]
    assert figures["model_gflops"] > 0
    # MFU is measured against the rate of the arithmetic in force, and both rates are printed.
    in_force = "matmul_gflops_bf16" if figures["precision"].startswith("bf16") else "matmul_gflops_fp32"
    assert figures["matmul_gflops"] == figures[in_force]
    assert figures["matmul_gflops_fp32"] > 0 and figures["matmul_gflops_bf16"] > 0
    # The last warm-up step's operators, most time first, outside the timed steps.
    profile = (tmp_path / figures["profile"]).read_text()
    assert profile.startswith("training step 2 (untimed), sorted by self_cpu_time_total")
    assert "aten::" in profile


def test_mfu_denominator_follows_the_precision():
    assert matmul_dtype("bf16-mixed") == matmul_dtype("bf16-true") == matmul_dtype("bf16") == torch.bfloat16
    assert matmul_dtype("32-true") == matmul_dtype(32) == torch.float32
    assert matmul_dtype("16-mixed") == torch.float16 and matmul_dtype("64-true") == torch.float64
    for precision, expected in (("bf16-mixed", 300e9), ("32-true", 100e9)):
        rate = MatmulRate(warmup=0, in_force=matmul_dtype(precision), size=8)
        rate.readings = {torch.float32: [90e9, 100e9, 120e9], torch.bfloat16: [280e9, 300e9, 390e9]}
        assert rate.sustained() == expected
        assert rate.peak() == {"bf16-mixed": 390e9, "32-true": 120e9}[precision]
    rate = MatmulRate(warmup=0, in_force=torch.bfloat16, size=8)
    rate.sample(2)
    assert {dtype: len(values) for dtype, values in rate.readings.items()} == {
        torch.float32: 2,
        torch.bfloat16: 2,
    }


def test_rate_probe_shrinks_for_an_arithmetic_too_slow_to_sample_at_full_size():
    from rlhf.bench import probe_size

    def at(gflops: float):
        return lambda size: 2 * size**3 / (gflops * 1e9)

    # fp32 at 70 GFLOP/s reaches the full size; bf16 emulated at 1.3 GFLOP/s (13 s per 2048 product
    # on such a processor) is sampled at 256, 35 ms a product.
    assert probe_size(at(70), largest=2048, budget=1.0) == 2048
    assert probe_size(at(1.3), largest=2048, budget=0.05) == 256
    assert probe_size(at(1e4), largest=512) == 512
    rate = MatmulRate(warmup=0, in_force=torch.float32, size=64)
    rate.sample(1)
    assert set(rate.sizes.values()) == {64}
