"""Direct preference optimisation: the policy learns from preference pairs directly, against a frozen
reference, without a reward model. The schema and the stage's descriptor; the training code is in
`module` (imported only when the stage runs)."""

from __future__ import annotations

from dataclasses import dataclass

from rlhf.config import StageConfig

# The losses of rlhf.losses.dpo_loss.
DPO_LOSSES = ("sigmoid", "ipo", "hinge")


@dataclass
class DPOStageConfig(StageConfig):
    name: str = "dpo"
    # TRL's default; DPO moves a policy far with little: 5e-7 to 5e-6 is the usual range for full
    # fine-tuning.
    lr: float = 1e-6
    # Where the policy (and the reference, its frozen initial copy) starts: latest (the newest finished
    # SFT run in this MLflow experiment), base, a local directory, or runs:/<run_id>/model.
    init_from: str = "latest"
    # Strength of the KL regularisation: the implicit reward is beta * log(policy / reference).
    # Higher keeps the policy nearer the reference.
    beta: float = 0.1
    # sigmoid (DPO), ipo (IPO; its log-probabilities are per-token means, as in TRL) or hinge (SLiC).
    loss: str = "sigmoid"
    # Conservative DPO: the probability that a label is flipped (sigmoid loss only; 0: plain DPO).
    label_smoothing: float = 0.0
    # Compute the reference's log-probabilities of every example once before training, and hold no
    # reference model while training (with LoRA the reference costs no memory anyway: it is the policy
    # with its adapters off).
    precompute_ref: bool = False
    # Chosen and rejected in one sequence over their shared prompt (each attends only to the prompt and
    # itself): the same log-probabilities, the prompt computed once. Used for a batch when it is smaller.
    share_prefix: bool = True
    # Keep all pairs of one record (a ranking, a prompt's ratings or thumbs) together as one example:
    # each response is computed once for all its pairs, and batch_size counts records.
    group_by_record: bool = True
    # Validation prompts whose responses, sampled from the trained policy at the end, give the
    # KL-to-reference estimate and the gold annotator's score (data.gold_reward) (0: skip).
    sample_prompts: int = 32
    # Length of those sampled responses.
    sample_max_new_tokens: int = 48

    def problems(self) -> list[tuple[str, str]]:
        out = super().problems()
        if not self.beta > 0:
            out.append(("beta", f"must be > 0, got {self.beta}"))
        if self.loss not in DPO_LOSSES:
            out.append(("loss", f"must be one of {', '.join(DPO_LOSSES)}, got {self.loss!r}"))
        if not 0.0 <= self.label_smoothing < 0.5:
            out.append(("label_smoothing", f"must be in [0, 0.5), got {self.label_smoothing}"))
        elif self.label_smoothing and self.loss != "sigmoid":
            out.append(("label_smoothing", f"applies to the sigmoid loss only, not {self.loss}"))
        if self.sample_prompts < 0:
            out.append(("sample_prompts", f"must be >= 0, got {self.sample_prompts}"))
        if self.sample_max_new_tokens < 1:
            out.append(("sample_max_new_tokens", f"must be >= 1, got {self.sample_max_new_tokens}"))
        return out


STAGE_INFO = {
    "builder": "rlhf.stages.dpo.module:build",
    "sources": {"init_from": "sft"},
    "objective": ("val/rewards/accuracies", "maximize"),
    "bench": "rlhf.stages.dpo.module:bench_workload",
}
