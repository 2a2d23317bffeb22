"""Two CPU ranks (gloo) of PPO where rank 1 alone sees a large approximate KL after each iteration's
first minibatch. Lightning starts rank 1 by running this script again. Each rank writes the inner
steps it took per iteration and its final KL coefficient to <out>/rank<N>.json.

    python tests/ddp_ppo_agreement.py <out>    (tests/ on PYTHONPATH, for ppo_rewards)
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from hydra import compose, initialize_config_dir

from rlhf.config import register_configs, validate
from rlhf.layout import config_dir
from rlhf.stages import stages

OUT = Path(sys.argv[1])
RANK = int(os.environ.get("LOCAL_RANK", "0"))

register_configs(stages())
with initialize_config_dir(str(config_dir()), version_base="1.3"):
    cfg = compose(
        "config",
        overrides=[
            "experiment=smoke",
            "stage=ppo",
            "stage.policy_from=base",
            "stage.reward_from=fn:ppo_rewards.brevity",
            "tracking=none",
            f"output_dir={OUT}",
            "hardware=ddp",
            "trainer.devices=2",
            "trainer.max_steps=2",
            "+trainer.limit_val_batches=0",
            "checkpoint.every_n_steps=0",
            "trainer.enable_progress_bar=false",
            "stage.kl_target=0.5",
            "stage.max_approx_kl=1.0",
            "stage.log_samples_every=0",
        ],
    )
run = validate(cfg)

from rlhf import rl  # noqa: E402
from rlhf.runner import stage_trainer  # noqa: E402
from rlhf.stages import get_stage  # noqa: E402
from rlhf.stages.ppo import module as ppo  # noqa: E402
from rlhf.tracking import Launch, start_tracker  # noqa: E402

updates: list[float] = []
calls = [0]
policy_loss, update = rl.policy_loss, ppo.PPOModule._update


def skewed_policy_loss(*args, **kwargs):
    loss, stats = policy_loss(*args, **kwargs)
    calls[0] += 1
    if RANK == 1 and calls[0] >= 2:
        stats = {**stats, "approx_kl": stats["approx_kl"] + 100.0}
    return loss, stats


def counting_update(self, episode, optimizer):
    calls[0] = 0
    out = update(self, episode, optimizer)
    updates.append(out["ppo/updates"])
    return out


rl.policy_loss, ppo.PPOModule._update = skewed_policy_loss, counting_update

tracker = start_tracker(run, Launch(output_dir=str(OUT), launch_dir=str(OUT)))
job = get_stage("ppo").build(run, tracker)
trainer = stage_trainer(run, tracker, OUT, job)
trainer.fit(job.module, datamodule=job.datamodule)
(OUT / f"rank{trainer.global_rank}.json").write_text(
    json.dumps({"updates": updates, "kl_coef": job.module.kl_ctl.value})
)
