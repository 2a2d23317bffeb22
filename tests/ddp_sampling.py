"""Two CPU ranks (gloo) of a PPO module drawing one rollout for the same prompts with the same seed.
rlhf.ranks.join starts rank 1 by running this script again, as it does for `python -m rlhf`. Each
rank writes its responses and a checksum of its initial policy weights to <out>/rank<N>.json.

    python tests/ddp_sampling.py <out>    (tests/ on PYTHONPATH)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytorch_lightning as pl
from hydra import compose, initialize_config_dir
from test_ppo import _batch, _module

from rlhf import ranks
from rlhf.config import register_configs, validate
from rlhf.layout import config_dir
from rlhf.models import load_tokenizer
from rlhf.stages import stages

OUT = Path(sys.argv[1])

ranks.join({"accelerator": "cpu", "devices": 2, "strategy": "ddp"})
register_configs(stages())
with initialize_config_dir(str(config_dir()), version_base="1.3"):
    model_config = validate(
        compose("config", overrides=["model=tiny", "tracking=none", f"output_dir={OUT}"])
    ).model
tokenizer = load_tokenizer(model_config)
pl.seed_everything(0, verbose=False)  # as rlhf.runner does, the same seed on every rank
module = _module(model_config, tokenizer)
rollout, _, _ = module.sample(_batch(tokenizer))
weights = float(sum(p.double().sum() for p in module.policy.parameters()))
(OUT / f"rank{ranks.rank()}.json").write_text(
    json.dumps({"responses": rollout.response.tolist(), "weights": weights})
)
