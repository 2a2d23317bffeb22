"""Reward modelling: a scalar head trained with the Bradley-Terry loss on preference pairs.

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
class RMStageConfig(StageConfig):
    init_from: str = MISSING
    share_prefix: bool = MISSING
    group_by_record: bool = MISSING
    pair_weighting: str = MISSING
    use_margin: bool = MISSING
    center_rewards: float = MISSING
    calibration_bins: int = MISSING
    gold_eval_prompts: int = MISSING
    gold_eval_max_new_tokens: int = MISSING

    def problems(self) -> list[tuple[str, str]]:
        out = super().problems()
        if self.center_rewards < 0:
            out.append(("center_rewards", f"must be >= 0, got {self.center_rewards}"))
        if self.pair_weighting not in ("record", "pair"):
            out.append(("pair_weighting", f"must be record or pair, got {self.pair_weighting!r}"))
        if self.calibration_bins < 2:
            out.append(("calibration_bins", f"must be >= 2, got {self.calibration_bins}"))
        if self.gold_eval_prompts < 0:
            out.append(("gold_eval_prompts", f"must be >= 0, got {self.gold_eval_prompts}"))
        if self.gold_eval_max_new_tokens < 1:
            out.append(("gold_eval_max_new_tokens", f"must be >= 1, got {self.gold_eval_max_new_tokens}"))
        return out


def footprint(run) -> Footprint:
    """The reward model, trained on the chosen and rejected responses of each pair in one pass."""
    return Footprint(
        (Held("reward", trained=True, scalar=True),),
        train=Pass(2 * run.stage.batch_size, run.data.max_length, roles=("reward",)),
        batch_key="batch_size",
    )


STAGE = Stage(
    name="rm",
    schema=RMStageConfig,
    builder="rlhf.stages.rm.module:build",
    sources={"init_from": "sft"},
    # A reward model starts from a language model (its head new) or from a reward model (kept).
    accepts={"init_from": ("causal_lm", "reward_model")},
    objective=("val/accuracy", "maximize"),
    key_metrics=("val/gold_accuracy", "val/margin", "val/loss"),
    bench="rlhf.stages.rm.module:bench_workload",
    footprint=footprint,
)
