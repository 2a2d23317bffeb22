"""The SFT objective is a mean over the training tokens, whatever the batching."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from rlhf.data.loading import ExamplesDataModule
from rlhf.data.prepare import CausalLMCollator
from rlhf.data.tokenize import sft_features
from rlhf.models import load_causal_lm
from rlhf.policy import completion_loss
from rlhf.stages.sft.module import SFTModule, trained_tokens_per_example

BATCH = 4
# Demonstrations from 2 to 40 tokens long, as short answers and padded ones are in the shipped task.
EXAMPLES = [
    sft_features([3 + i % 5] * 4, [7 + (5 * i + k) % 90 for k in range(2 + (11 * i) % 39)]) for i in range(24)
]


def _epoch_gradients(model, group_by_length: bool, per_batch_mean: bool = False):
    """Gradients summed over one epoch of the training loader, and the batches' compositions."""
    model.zero_grad()
    module = SFTModule(model, stage=None, tokens_per_batch=BATCH * trained_tokens_per_example(EXAMPLES))
    module._trainer = SimpleNamespace(_logger_connector=SimpleNamespace(should_update_logs=False))
    data = ExamplesDataModule(
        {"train": EXAMPLES}, CausalLMCollator(0), BATCH, BATCH, seed=0, group_by_length=group_by_length
    )
    shapes = []
    for i, batch in enumerate(data.train_dataloader()):
        if per_batch_mean:  # what the loss was: a token's weight set by its batch-mates' lengths
            loss_sum, tokens = completion_loss(
                model, batch["input_ids"], batch["attention_mask"], batch["labels"]
            )
            loss = loss_sum / tokens
        else:
            loss = module.training_step(batch, i)
        loss.backward()
        shapes.append(tuple(batch["input_ids"].shape))
    return [p.grad.clone() for p in model.parameters()], shapes


def test_epoch_gradient_is_the_same_with_and_without_length_grouping(tiny_model_config):
    model = load_causal_lm(tiny_model_config, seed=0)
    grouped, grouped_shapes = _epoch_gradients(model, group_by_length=True)
    plain, plain_shapes = _epoch_gradients(model, group_by_length=False)
    assert grouped_shapes != plain_shapes  # the batches really were composed differently
    for g, p in zip(grouped, plain, strict=True):
        torch.testing.assert_close(g, p, rtol=1e-4, atol=1e-6)

    # The per-batch mean is not invariant: grouped, it weighs each example alike, long or short.
    grouped, _ = _epoch_gradients(model, group_by_length=True, per_batch_mean=True)
    plain, _ = _epoch_gradients(model, group_by_length=False, per_batch_mean=True)
    assert max((g - p).abs().max() / p.abs().max().clamp(min=1e-12) for g, p in zip(grouped, plain)) > 0.02


def test_tokens_per_example_counts_the_labelled_targets():
    examples = [sft_features([1, 2, 3], [4, 5]), sft_features([1], [6, 7, 8, 9])]
    assert trained_tokens_per_example(examples) == (2 + 4) / 2
