"""A user's own model: a local directory holding a non-Llama causal LM whose tokenizer has no pad
token and no chat template (GPT-2 style byte-level BPE with only <|endoftext|>), and their own data
file. Every stage must run on it, and runs are named after what was loaded."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import runs_of

LINES = [
    "What is two plus two? Four.",
    "Name a colour: blue, red, green.",
    "The quick brown fox jumps over the lazy dog.",
    "Which city is the capital of France? Paris.",
]


def build_own_model(directory: Path, arch: str) -> Path:
    """A 2-layer random model of `arch` (gpt2 or gpt-neox) with a byte-level BPE tokenizer trained on
    a few lines, saved the way a user's fine-tuned model would be."""
    import torch
    from tokenizers import ByteLevelBPETokenizer
    from transformers import (
        GPT2Config,
        GPT2LMHeadModel,
        GPTNeoXConfig,
        GPTNeoXForCausalLM,
        PreTrainedTokenizerFast,
    )

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(LINES * 3, vocab_size=400, min_frequency=1, special_tokens=["<|endoftext|>"])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe._tokenizer, bos_token="<|endoftext|>", eos_token="<|endoftext|>"
    )
    assert tokenizer.pad_token is None and not tokenizer.chat_template
    eos = tokenizer.eos_token_id
    if arch == "gpt2":
        config = GPT2Config(
            vocab_size=len(tokenizer),
            n_embd=32,
            n_layer=2,
            n_head=2,
            n_positions=256,
            bos_token_id=eos,
            eos_token_id=eos,
        )
        model_class = GPT2LMHeadModel
    else:
        config = GPTNeoXConfig(
            vocab_size=len(tokenizer),
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            max_position_embeddings=256,
            bos_token_id=eos,
            eos_token_id=eos,
        )
        model_class = GPTNeoXForCausalLM
    torch.manual_seed(0)
    model_class(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def own(directory: Path, *extra: str) -> list[str]:
    # Short runs: validation and checkpoints once, at the end.
    return [
        "experiment=smoke",
        f"model.name_or_path={directory}",
        "trainer.max_steps=2",
        "trainer.val_check_interval=2",
        "checkpoint.every_n_steps=0",
        *extra,
    ]


def test_own_model_and_data_file_name_the_run(tmp_path, cli, mlflow_client):
    model_dir = build_own_model(tmp_path / "my-model", "gpt2")
    data = tmp_path / "my-demos.jsonl"
    data.write_text(
        "".join(
            json.dumps({"prompt": f"What is {i} plus {i}?", "completion": f"{2 * i}."}) + "\n"
            for i in range(20)
        )
    )
    cli(*own(model_dir, f"data.sft.path={data}"))
    (run,) = runs_of(mlflow_client, "smoke", "sft")
    assert run.info.status == "FINISHED"
    assert run.data.tags["rlhf.model"] == "my-model"
    assert run.data.tags["rlhf.data"] == "my-demos"
    assert run.info.run_name.startswith("sft-my-model-my-demos"), run.info.run_name
    assert "name_or_path" not in run.info.run_name and "my-demos.jsonl" not in run.info.run_name
    # The model group's GGUF file and random initialisation belong to its own model, not this one.
    assert run.data.params["model.gguf_file"] == "None"
    assert run.data.params["model.random_init"] == "None"
    saved = Path(run.data.tags["rlhf.output_dir"]) / "model"
    from transformers import AutoTokenizer

    # Pads with EOS: no token the model's embedding lacks was added.
    tokenizer = AutoTokenizer.from_pretrained(saved)
    assert tokenizer.pad_token_id == tokenizer.eos_token_id
    assert len(tokenizer) == len(AutoTokenizer.from_pretrained(model_dir))


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["gpt2", "gpt-neox"])
def test_own_model_without_pad_token_or_chat_template_runs_every_stage(arch, tmp_path, cli, mlflow_client):
    model_dir = build_own_model(tmp_path / f"my-{arch}", arch)
    for stage in ("sft", "rm", "ppo", "eval"):
        cli(*own(model_dir, f"stage={stage}"))
    for stage in ("sft", "rm", "ppo", "eval"):
        (run,) = runs_of(mlflow_client, "smoke", stage)
        assert run.info.status == "FINISHED", (stage, run.data.tags.get("rlhf.error"))
        assert run.data.tags["rlhf.model"] == f"my-{arch}"
    from transformers import AutoTokenizer

    vocabulary = len(AutoTokenizer.from_pretrained(model_dir))
    for stage in ("sft", "rm", "ppo"):
        (run,) = runs_of(mlflow_client, "smoke", stage)
        saved = AutoTokenizer.from_pretrained(Path(run.data.tags["rlhf.output_dir"]) / "model")
        assert len(saved) == vocabulary and saved.pad_token_id == saved.eos_token_id, stage
