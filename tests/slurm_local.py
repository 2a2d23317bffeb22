"""`python -m rlhf <args>` with submitit's SLURM executor swapped for its local one, so that a multirun
with the shipped launcher (hydra/launcher=slurm) is composed, pickled and submitted as on a cluster
and its jobs run here. sbatch-only options (slurm_*) have no local meaning and are dropped.

    python tests/slurm_local.py -m experiment=smoke stage=sft hydra/launcher=slurm ...
"""

from __future__ import annotations

import sys

import submitit


class LocalInsteadOfSlurm(submitit.AutoExecutor):
    def __init__(self, folder, cluster=None, **kwargs):
        super().__init__(folder, cluster="local")

    def update_parameters(self, **kwargs):
        super().update_parameters(**{k: v for k, v in kwargs.items() if not k.startswith("slurm_")})


submitit.AutoExecutor = LocalInsteadOfSlurm

from rlhf.__main__ import main  # noqa: E402

sys.argv = ["rlhf", *sys.argv[1:]]
main()
