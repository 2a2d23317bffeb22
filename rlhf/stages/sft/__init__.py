"""Supervised fine-tuning: next-token loss on the completion tokens, prompt tokens masked.

Light on purpose: the schema and the descriptor are read when a config is checked, before torch and
Lightning are imported (module.py holds the training code).
"""

from __future__ import annotations

from dataclasses import dataclass

from omegaconf import MISSING

from rlhf.config import StageConfig
from rlhf.memory import Footprint, Held, Pass
from rlhf.stages import Stage


@dataclass
class SFTStageConfig(StageConfig):
    init_from: str = MISSING
    num_samples: int = MISSING
    sample_max_new_tokens: int = MISSING

    def problems(self) -> list[tuple[str, str]]:
        out = super().problems()
        if self.num_samples < 0:
            out.append(("num_samples", f"must be >= 0, got {self.num_samples}"))
        if self.sample_max_new_tokens < 1:
            out.append(("sample_max_new_tokens", f"must be >= 1, got {self.sample_max_new_tokens}"))
        return out


def footprint(run) -> Footprint:
    """The policy, trained on batches of up to data.max_length tokens (its samples come after training)."""
    return Footprint(
        (Held("policy", trained=True),),
        train=Pass(run.stage.batch_size, run.data.max_length),
        batch_key="batch_size",
    )


STAGE = Stage(
    name="sft",
    schema=SFTStageConfig,
    builder="rlhf.stages.sft.module:build",
    sources={},
    accepts={"init_from": ("causal_lm",)},
    objective=("val/loss", "minimize"),
    key_metrics=("val/ppl", "test/loss"),
    bench="rlhf.stages.sft.module:bench_workload",
    footprint=footprint,
)
