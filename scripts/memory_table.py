"""Writes docs/memory.md's table: rlhf.memory's estimate per GPU of every stage, for four model sizes,
on one and on eight GPUs of 80 GB, with each stage's default config (conf/stage/*.yaml, data lengths
512 tokens, prompts 256) under bf16 mixed precision.

    python scripts/memory_table.py [--out docs/memory.md]

The models' shapes are written here (their config.json values), so nothing is downloaded.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from hydra import compose, initialize_config_dir

from rlhf.config import register_configs, validate
from rlhf.layout import config_dir
from rlhf.memory import GIB, Devices, ModelShape, estimate_run, replaced
from rlhf.stages import stages

# config.json values of the public checkpoints.
MODELS = {
    "SmolLM2-135M": dict(
        hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, head_dim=64,
        intermediate_size=1536, vocab_size=49152, tie_word_embeddings=True,
    ),
    "Llama-3.2-1B": dict(
        hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8, head_dim=64,
        intermediate_size=8192, vocab_size=128256, tie_word_embeddings=True,
    ),
    "Llama-2-7B": dict(
        hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
        intermediate_size=11008, vocab_size=32000, tie_word_embeddings=False,
    ),
    "Llama-3-70B": dict(
        hidden_size=8192, num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=8,
        intermediate_size=28672, vocab_size=128256, tie_word_embeddings=False,
    ),
}  # fmt: skip
GPU_BYTES = 80e9
# (column, devices, overrides of the run): what a user would try, in order.
SETUPS = [
    ("1 GPU", 1, {}),
    ("1 GPU, LoRA", 1, {"model.lora.enabled": True}),
    ("1 GPU, LoRA + ckpt", 1, {"model.lora.enabled": True, "model.gradient_checkpointing": True}),
    ("8 GPUs DDP", 8, {"trainer.strategy": "ddp"}),
    ("8 GPUs FSDP", 8, {"trainer.strategy": "fsdp"}),
]
BEGIN, END = "<!-- memory-table:begin -->", "<!-- memory-table:end -->"


def stage_runs() -> dict:
    from rlhf.stages import stages

    register_configs(stages())
    runs = {}
    with initialize_config_dir(str(config_dir()), version_base="1.3"):
        for name in stages():
            cfg = compose(
                "config", overrides=[f"stage={name}", "hardware=gpu", "tracking=none", "output_dir=unused"]
            )
            runs[name] = validate(cfg)
    return runs


def cell(run, shape: ModelShape, devices: int, changes: dict) -> str:
    from rlhf.hardware import strategy_family

    for key, value in changes.items():
        run = replaced(run, key, value)
    family = strategy_family(run.trainer.get("strategy"))
    if family in stages()[run.stage.name].refused_strategies:
        return "refused"
    total = estimate_run(run, shape, Devices(devices, "gpu", GPU_BYTES)).total
    return f"{total / GIB:.1f}" + ("" if total <= GPU_BYTES else " ✗")


def table() -> str:
    runs = stage_runs()
    lines = [
        "| model | params | stage | " + " | ".join(name for name, _, _ in SETUPS) + " |",
        "| --- | ---: | --- | " + " | ".join("---:" for _ in SETUPS) + " |",
    ]
    for model, config in MODELS.items():
        shape = ModelShape.from_config(config)
        for stage, run in runs.items():
            cells = [cell(run, shape, devices, changes) for _, devices, changes in SETUPS]
            lines.append(
                f"| {model} | {shape.parameters() / 1e9:.2f} B | {stage} | " + " | ".join(cells) + " |"
            )
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out", type=Path, default=Path(__file__).resolve().parents[1] / "docs" / "memory.md"
    )
    args = parser.parse_args(argv)
    page = args.out.read_text() if args.out.exists() else f"{BEGIN}\n{END}\n"
    if BEGIN not in page:
        page += f"\n{BEGIN}\n{END}\n"
    generated = f"{BEGIN}\n<!-- written by scripts/memory_table.py: do not edit by hand -->\n{table()}\n{END}"
    args.out.write_text(
        re.sub(re.escape(BEGIN) + ".*?" + re.escape(END), lambda _: generated, page, flags=re.S)
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main(sys.argv[1:])
