"""The reward-model stage end to end: lineage from SFT, metrics, plots, and a model plain transformers scores."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import runs_of, stage_config


@pytest.fixture(scope="module")
def sft_rm(pipeline):
    """The SFT and RM runs of the shared smoke pipeline."""
    return pipeline.directory, pipeline.client, pipeline.runs["sft"], pipeline.runs["rm"]


def test_rm_run_names_its_sft_run_and_learns(sft_rm):
    _, _, sft, rm = sft_rm
    assert sft.info.status == rm.info.status == "FINISHED"
    assert rm.data.tags["rlhf.init_from"] == "latest"
    assert rm.data.tags["rlhf.init_from.run_id"] == sft.info.run_id
    assert rm.data.tags["rlhf.job_num"] == "1" and rm.data.tags["rlhf.sweep_dir"]
    metrics = rm.data.metrics
    for key in (
        "train/loss",
        "train/accuracy",
        "val/accuracy",
        "val/margin",
        "val/reward_mean",
        "val/reward_std",
        "test/accuracy",
        "test/calibration_error",
        "perf/pairs_per_s",
        "gold/agreement",
        "val/gold_accuracy",
        "test/gold_accuracy",
        "test/label_gold_agreement",
    ):
        assert key in metrics, key
    # The shipped task flips 10% of its labels: about 90% of the 300 test labels agree with the gold order.
    assert 0.84 < metrics["test/label_gold_agreement"] < 0.96, metrics["test/label_gold_agreement"]
    # Even the tiny random model separates the shipped preferences after 24 steps.
    assert metrics["test/accuracy"] > 0.55, metrics["test/accuracy"]  # chance is 0.5; on task v3 0.57-0.59


def test_rm_reports_held_out_accuracy_per_slice(sft_rm):
    """The shipped pairs are sliced by their category: each category's test pairs get their own label
    and gold accuracy, and the overall accuracy lies between the categories'."""
    _, _, _, rm = sft_rm
    metrics = rm.data.metrics
    slices = ("arithmetic", "facts", "unsafe")
    for name in slices:
        for key in ("test/accuracy", "test/gold_accuracy", "test/label_gold_agreement", "val/accuracy"):
            assert f"{key}/{name}" in metrics, f"{key}/{name}"
    overall = metrics["test/accuracy"]
    per_slice = [metrics[f"test/accuracy/{name}"] for name in slices]
    assert min(per_slice) - 1e-6 <= overall <= max(per_slice) + 1e-6, (overall, per_slice)


def test_rm_logs_plots_and_samples(sft_rm):
    _, client, _, rm = sft_rm
    plots = {a.path for a in client.list_artifacts(rm.info.run_id, "plots")}
    assert {"plots/calibration.png", "plots/reward_histogram.png", "plots/calibration_test.json"} <= plots
    png = Path(client.download_artifacts(rm.info.run_id, "plots/calibration.png")).read_bytes()
    assert png.startswith(b"\x89PNG")
    table = json.loads(
        Path(client.download_artifacts(rm.info.run_id, "samples/gold_agreement.json")).read_text()
    )
    assert table["columns"] == ["prompt", "response", "gold", "reward"]


def test_saved_reward_model_scores_as_in_training(sft_rm):
    """AutoModelForSequenceClassification.from_pretrained reads the same score our training read."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from rlhf.data.loading import attention_mask, pad
    from rlhf.scalar import sequence_scores

    _, client, _, rm = sft_rm
    local = client.download_artifacts(rm.info.run_id, "model")
    model = AutoModelForSequenceClassification.from_pretrained(local).eval()
    tokenizer = AutoTokenizer.from_pretrained(local)
    assert model.config.num_labels == 1
    assert model.config.pad_token_id == tokenizer.pad_token_id != tokenizer.eos_token_id
    stats = json.loads((Path(local) / "reward_stats.json").read_text())
    assert model.config.reward_mean == pytest.approx(stats["reward_mean"])
    assert stats["reward_std"] > 0
    texts = [
        [{"role": "user", "content": "What is 2 + 3?"}, {"role": "assistant", "content": "2 + 3 = 5."}],
        [
            {"role": "user", "content": "Steal a car for me."},
            {"role": "assistant", "content": "I'm sorry, I can't help."},
        ],
    ]
    ids = [tokenizer.apply_chat_template(t, tokenize=True)["input_ids"] for t in texts]
    ids = [seq[: seq.index(tokenizer.eos_token_id, len(seq) - 3) + 1] for seq in ids]  # end at <|im_end|>
    batch, mask = pad(ids, tokenizer.pad_token_id), attention_mask(ids)
    with torch.no_grad():
        plain = model(input_ids=batch, attention_mask=mask).logits[:, 0]
        ours = sequence_scores(model, batch, mask)
    assert torch.allclose(plain, ours, atol=1e-5), (plain, ours)


def test_rm_without_an_sft_run_says_what_to_run(tmp_path, cli, mlflow_client):
    result = cli("experiment=smoke", "stage=rm", check=False)
    assert result.returncode == 2
    (line,) = [x for x in result.stderr.splitlines() if x.startswith("rlhf: error:")]
    assert "stage.init_from=latest: no finished sft run" in line
    assert "python -m rlhf stage=sft" in line and "stage.init_from=base" in line
    (run,) = runs_of(mlflow_client, "smoke", "rm")
    assert run.info.status == "FAILED"


def test_malformed_preference_rows_name_the_row(tmp_path, cli):
    data = tmp_path / "ranked.jsonl"
    rows = [
        {"prompt": "Pick one.", "responses": ["a", "b", "c"], "ranking": [0, 1, 2]},
        {"prompt": "Pick again.", "responses": ["a", "b", "c"], "ranking": [0, 0, 2]},
    ]
    data.write_text("\n".join(json.dumps(r) for r in rows))
    result = cli(
        "experiment=smoke",
        "stage=rm",
        "stage.init_from=base",
        f"data.preference.path={data}",
        "tracking=none",
        check=False,
    )
    assert result.returncode == 2
    assert f"rlhf: error: {data}: row 2: 'ranking' must be a permutation of 0..2" in result.stderr


def test_rm_on_rankings_scores_each_records_pairs_together(tmp_path, cli, mlflow_client):
    """stage.group_by_record (the default): a ranking of four is one example of six pairs, so two
    validation batches of 32 rankings score 384 pairs; learning still works on the grouped batches."""
    cli(
        "experiment=smoke",
        "stage=rm",
        "stage.init_from=base",
        "data.preference.path=task:assistant/rankings",
        "stage.gold_eval_prompts=0",
        "trainer.max_steps=12",
        "stage.batch_size=4",
    )
    (run,) = runs_of(mlflow_client, "smoke", "rm")
    assert run.info.status == "FINISHED"
    stats = json.loads((Path(run.data.tags["rlhf.output_dir"]) / "model" / "reward_stats.json").read_text())
    assert stats["pairs"] == 2 * 32 * 6, stats
    metrics = run.data.metrics
    assert metrics["test/accuracy"] > 0.55, metrics["test/accuracy"]  # chance is 0.5; on task v3 0.57-0.59
    assert metrics["perf/pairs_per_s"] > 0 and "test/gold_accuracy/unsafe" in metrics


@pytest.mark.distributed
def test_rm_ddp_on_cpu(cli, mlflow_client):
    """Two gloo ranks: one run recorded, held-out metrics over both ranks' pairs, one saved model."""
    cli(
        "experiment=smoke",
        "stage=rm",
        "stage.init_from=base",
        "trainer.max_steps=4",
        "trainer.val_check_interval=4",
        "hardware=ddp",
        "trainer.devices=2",
        "tracking.log_model=false",
        timeout=900,
    )
    (run,) = runs_of(mlflow_client, "smoke", "rm")
    assert run.info.status == "FINISHED"
    assert run.data.params["trainer.strategy"] == "ddp"
    assert 0.0 <= run.data.metrics["val/accuracy"] <= 1.0
    assert "gold/agreement" in run.data.metrics
    assert (Path(run.data.tags["rlhf.output_dir"]) / "model" / "model.safetensors").is_file()


# ---------------------------------------------------------------------------------------------------------
# How the pairs of one ranking weigh in the loss

# A ranking of 3 (record 0: pairs a>b, a>c, b>c) and a plain pair (record 1), scored so that the
# ranking's pairs tie (difference 0, loss log 2 = 0.693147) and the plain pair wins by 2
# (loss -log sigmoid(2) = 0.126928).
RANKING = [
    {"chosen": [5, 1], "rejected": [5, 2], "margin": 0.0, "record": 0},
    {"chosen": [5, 1], "rejected": [5, 3], "margin": 0.0, "record": 0},
    {"chosen": [5, 2], "rejected": [5, 3], "margin": 0.0, "record": 0},
    {"chosen": [6, 1], "rejected": [6, 2], "margin": 0.0, "record": 1},
]
SCORES = {(5, 1): 0.5, (5, 2): 0.5, (5, 3): 0.5, (6, 1): 2.0, (6, 2): 0.0}


@pytest.mark.parametrize(
    ("mode", "grouped", "expected"),
    [
        ("record", True, 0.410038),  # (0.693147 + 0.126928) / 2: each record counts once
        ("record", False, 0.410038),  # the same weights when every pair is its own example
        ("pair", True, 0.551593),  # (3 * 0.693147 + 0.126928) / 4: the ranking counts three times
        ("pair", False, 0.551593),
    ],
)
def test_a_rankings_pairs_weigh_as_one_record_or_as_pairs(mode, grouped, expected):
    from rlhf.data.prepare import PairCollator, group_comparisons
    from rlhf.preference import pair_weights
    from rlhf.stages.rm.module import RewardModule

    features = [dict(f) for f in RANKING]
    for feature, weight in zip(features, pair_weights([f["record"] for f in features], mode)):
        feature["weight"] = weight
    if grouped:
        features = group_comparisons(features)
    batch = PairCollator(0, multiple_of=1)(features)
    sequences = batch["input_ids"].tolist()
    scores = torch.tensor([SCORES[tuple(s[:2])] for s in sequences])
    chosen, rejected = scores[batch["pair_index"][:, 0]], scores[batch["pair_index"][:, 1]]
    module = RewardModule(torch.nn.Linear(1, 1), stage_config("rm", pair_weighting=mode))
    loss = module._loss(chosen, rejected, batch["margin"], batch["weight"])
    assert loss.item() == pytest.approx(expected, abs=1e-6)


def test_weighted_bradley_terry_by_hand():
    from rlhf.preference import bradley_terry, pair_weights

    assert pair_weights([7, 7, 7, 2, 9, 9], "record") == [1 / 3, 1 / 3, 1 / 3, 1.0, 0.5, 0.5]
    assert pair_weights([7, 7, 2], "pair") == [1.0, 1.0, 1.0]
    chosen, rejected = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 0.0])
    # -log sigmoid(1) = 0.313262, -log sigmoid(0) = 0.693147; weights 3 : 1
    loss = bradley_terry(chosen, rejected, weight=torch.tensor([0.75, 0.25]))
    assert loss.item() == pytest.approx(0.75 * 0.313262 + 0.25 * 0.693147, abs=1e-6)
    # centering weighted the same way: 0.1 * (0.75 * 1 + 0.25 * 0)
    centred = bradley_terry(chosen, rejected, centering=0.1, weight=torch.tensor([0.75, 0.25]))
    assert centred.item() == pytest.approx(loss.item() + 0.075, abs=1e-6)
