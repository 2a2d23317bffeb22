"""Model set-up options that must not change what is computed."""

from __future__ import annotations

import dataclasses
import warnings

import torch

from rlhf.config import LoraConfig
from rlhf.models import apply_lora, load_causal_lm


def _loss_and_lora_grads(model_config, checkpointing: bool):
    cfg = dataclasses.replace(model_config, gradient_checkpointing=checkpointing)
    base = load_causal_lm(cfg, seed=1)
    torch.manual_seed(2)  # the adapters' initial values
    model = apply_lora(base, LoraConfig(enabled=True, r=4, dropout=0.0), "CAUSAL_LM")
    model.train()
    ids = torch.randint(0, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return loss.detach(), grads


def test_activation_checkpointing_with_lora_computes_the_same_loss_and_gradients(tiny_model_config):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loss, grads = _loss_and_lora_grads(tiny_model_config, checkpointing=True)
    assert not [w for w in caught if "gradient_checkpointing_enable` is deprecated" in str(w.message)]
    want_loss, want_grads = _loss_and_lora_grads(tiny_model_config, checkpointing=False)
    torch.testing.assert_close(loss, want_loss)
    assert grads.keys() == want_grads.keys() and any(n for n in grads if "lora_" in n)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, want_grads[name], msg=name)


def _saved(directory, architectures):
    import json

    directory.mkdir()
    (directory / "config.json").write_text(json.dumps({"architectures": architectures}))
    return str(directory)


def test_each_stage_accepts_models_of_the_kinds_it_can_use(tmp_path):
    import pytest

    from rlhf.errors import LineageError
    from rlhf.lineage import ModelSource, check_kind
    from rlhf.models import model_kind
    from rlhf.stages import get_stage

    lm = _saved(tmp_path / "sft", ["LlamaForCausalLM"])
    rm = _saved(tmp_path / "rm", ["LlamaForSequenceClassification"])
    unknown = _saved(tmp_path / "other", ["SomethingNew"])
    assert model_kind(lm) == ("causal_lm", "LlamaForCausalLM")
    assert model_kind(rm) == ("reward_model", "LlamaForSequenceClassification")
    assert model_kind(unknown) == (None, "SomethingNew")

    def check(stage, key, location):
        check_kind(ModelSource(location, location), f"stage.{key}", get_stage(stage).accepts[key])

    # Legal: an RM initialised from a language model or from a reward model; policies from language
    # models; a directory whose kind is not known is not second-guessed.
    for stage, key, location in [
        ("rm", "init_from", lm),
        ("rm", "init_from", rm),
        ("ppo", "policy_from", lm),
        ("ppo", "reward_from", rm),
        ("dpo", "init_from", lm),
        ("eval", "reward_from", rm),
        ("ppo", "reward_from", unknown),
    ]:
        check(stage, key, location)
    for stage, key, location, found in [
        ("ppo", "reward_from", lm, "a language model"),
        ("grpo", "reward_from", lm, "a language model"),
        ("eval", "reward_from", lm, "a language model"),
        ("ppo", "policy_from", rm, "a reward model"),
        ("dpo", "init_from", rm, "a reward model"),
        ("sft", "init_from", rm, "a reward model"),
        ("eval", "policies", rm, "a reward model"),
    ]:
        with pytest.raises(LineageError, match=f"stage.{key}={location} holds {found}"):
            check(stage, key, location)
