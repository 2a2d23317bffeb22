"""The callbacks every stage's trainer carries (rlhf.training), on toy modules."""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch

from rlhf.errors import DivergedError
from rlhf.training import FiniteGuard


class Toy(pl.LightningModule):
    """One weight; `loss(w, step)` gives the training loss of each step."""

    def __init__(self, loss, manual: bool = False, start: float = 1.0):
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor([start]))
        self.loss = loss
        self.automatic_optimization = not manual

    def training_step(self, batch, batch_idx):
        loss = self.loss(self.w, self.global_step + 1)
        if self.automatic_optimization:
            return loss
        optimizer = self.optimizers()
        optimizer.zero_grad()
        self.manual_backward(loss)
        optimizer.step()

    def train_dataloader(self):
        return torch.utils.data.DataLoader(torch.zeros(16, 1), batch_size=1)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _fit(module: pl.LightningModule, steps: int = 6) -> None:
    trainer = pl.Trainer(
        max_steps=steps,
        callbacks=[FiniteGuard()],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=4,
        accelerator="cpu",
    )
    trainer.fit(module)


def _nan_from_step_3(w, step):
    return (w**2).sum() * (float("nan") if step >= 3 else 1.0)


@pytest.mark.parametrize("manual", [False, True], ids=["automatic", "manual"])
def test_non_finite_loss_stops_training_naming_its_step(manual):
    with pytest.raises(DivergedError, match=r"diverged at step 3: the training loss was nan"):
        _fit(Toy(_nan_from_step_3, manual))


def test_non_finite_gradient_with_a_finite_loss_stops_training():
    # sqrt at 0: the loss is 0, its gradient infinite.
    with pytest.raises(DivergedError, match=r"diverged at step 1: the gradient norm was inf"):
        _fit(Toy(lambda w, step: torch.sqrt(w).sum(), start=0.0))


def test_finite_training_runs_to_the_end():
    module = Toy(lambda w, step: (w**2).sum())
    _fit(module)
    assert module.w.item() < 1.0


def test_no_checkpoint_is_written_once_training_diverged(tmp_path):
    from pytorch_lightning.callbacks import ModelCheckpoint

    saves = ModelCheckpoint(
        dirpath=tmp_path,
        filename="step-{step}",
        auto_insert_metric_name=False,
        every_n_train_steps=1,
        save_top_k=-1,
    )
    trainer = pl.Trainer(
        max_steps=6,
        callbacks=[FiniteGuard(), saves],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=50,
        accelerator="cpu",
    )
    with pytest.raises(DivergedError, match="at step 3"):
        trainer.fit(Toy(_nan_from_step_3))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-1.ckpt", "step-2.ckpt"]
