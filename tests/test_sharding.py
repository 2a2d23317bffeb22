"""trainer.strategy=fsdp: FSDP2 through Lightning, for the stages that train with Lightning's loop.

The parts that need no process group are checked in one process; the distributed test trains SFT,
RM and DPO sharded over two CPU processes (gloo), as they run sharded over GPUs.
"""

from __future__ import annotations

import math
import os
import signal
import time
from pathlib import Path

import pytest
import torch
from conftest import runs_of
from test_policy import _tiny_lm as tiny_llama
from test_sft import _start

from rlhf import hardware, sharding
from rlhf.errors import ConfigError, LineageError
from rlhf.lineage import find_resume_point
from rlhf.stages import get_stage


def _tiny_lm(tie: bool = True):
    return tiny_llama(num_hidden_layers=3, tie_word_embeddings=tie)


IDS = torch.tensor([[5, 9, 17, 3, 8, 2], [12, 4, 7, 7, 30, 2]])


def test_fsdp_is_lightnings_fsdp2_strategy_sharding_over_every_device():
    from pytorch_lightning.strategies import ModelParallelStrategy

    strategy = sharding.lightning_strategy("fsdp", 4)
    assert isinstance(strategy, ModelParallelStrategy)
    # Data parallel over all four devices, one tensor-parallel rank each (Lightning's default would
    # spend the devices of a node on tensor parallelism).
    assert (strategy._data_parallel_size, strategy._tensor_parallel_size) == (4, 1)
    assert sharding.lightning_strategy("ddp", 4) == "ddp"
    assert sharding.lightning_strategy("auto", 1) == "auto"


def test_each_decoder_layer_is_a_unit_also_under_lora():
    from rlhf.config import LoraConfig
    from rlhf.models import apply_lora

    model = _tiny_lm()
    layers = list(model.model.layers)
    assert list(sharding.blocks(model)) == layers
    wrapped = apply_lora(model, LoraConfig(enabled=True, r=4, alpha=8), "CAUSAL_LM")
    assert list(sharding.blocks(wrapped)) == layers


@pytest.mark.parametrize("tie", [True, False])
def test_a_replica_costs_no_weights_and_becomes_the_model_from_a_full_state_dict(tie):
    model = _tiny_lm(tie)
    replica = sharding.meta_replica(model)
    assert all(p.is_meta for p in replica.parameters())
    assert not any(b.is_meta for b in replica.buffers())  # rotary frequencies are not in a state dict
    assert (replica.lm_head.weight is replica.model.embed_tokens.weight) == tie
    full = {k: v.clone() for k, v in model.state_dict().items()}
    filled = sharding.filled(replica, full)
    assert (filled.lm_head.weight is filled.model.embed_tokens.weight) == tie
    with torch.no_grad():
        assert torch.equal(filled(IDS).logits, model(IDS).logits)


def test_a_lora_replica_merges_into_the_trained_model():
    from rlhf.config import LoraConfig
    from rlhf.models import apply_lora

    model = apply_lora(_tiny_lm(), LoraConfig(enabled=True, r=4, alpha=8), "CAUSAL_LM").eval()
    with torch.no_grad():  # adapters that change the output (B starts at zero)
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_()
    replica = sharding.meta_replica(model)
    filled = sharding.filled(replica, {k: v.clone() for k, v in model.state_dict().items()})
    assert not any(p.is_meta for p in filled.parameters())
    with torch.no_grad():
        expected = model(IDS).logits
        assert torch.allclose(filled(IDS).logits, expected, atol=1e-6)
        merged = filled.merge_and_unload()
        assert torch.allclose(merged(IDS).logits, expected, atol=1e-5)


def test_unsharded_modules_run_their_models_directly():
    class Plain(sharding.Sharded, torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = torch.nn.Linear(2, 1)
            self.device_mesh = None

    module = Plain()
    module.configure_model()
    assert module.call("model", lambda m, x: m is module.model and x, 7) == 7
    module.gather_on_rank_zero()  # nothing sharded: nothing to gather
    assert isinstance(module.model, torch.nn.Linear)


@pytest.mark.parametrize("stage", ["sft", "rm", "dpo"])
def test_the_stages_trained_in_lightnings_loop_accept_fsdp(stage):
    hardware.check(get_stage(stage), {"accelerator": "cpu", "strategy": "fsdp"})


def test_fsdp_variants_are_refused_in_one_line_naming_fsdp():
    with pytest.raises(ConfigError) as err:
        hardware.check(get_stage("sft"), {"accelerator": "cpu", "strategy": "fsdp_cpu_offload"})
    message = str(err.value)
    assert "\n" not in message and "trainer.strategy=fsdp_cpu_offload" in message
    assert "trainer.strategy=fsdp (" in message


def test_resume_takes_a_sharded_checkpoint_directory(tmp_path):
    checkpoint = tmp_path / "run" / "checkpoints" / "step-000003.ckpt"
    checkpoint.mkdir(parents=True)
    (checkpoint / "__0_0.distcp").write_bytes(b"shard")
    with pytest.raises(LineageError, match="not a checkpoint"):  # no meta.pt: not one Lightning wrote
        find_resume_point(str(checkpoint), "sft", None, None)
    torch.save({"global_step": 3}, checkpoint / "meta.pt")
    point = find_resume_point(str(checkpoint), "sft", None, None)
    assert point.checkpoint == str(checkpoint) and point.output_dir == str(tmp_path / "run")


# -- two processes ----------------------------------------------------------------------------------

TWO_CPU_RANKS = ("trainer.accelerator=cpu", "trainer.devices=2", "trainer.precision=32-true")


def _weights(model_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(model_dir / "model.safetensors")


def _history(client, run, key: str) -> dict[int, float]:
    return {m.step: m.value for m in client.get_metric_history(run.info.run_id, key)}


@pytest.mark.distributed
def test_fsdp_trains_as_ddp_resumes_sharded_and_saves_one_model_for_sft_rm_and_dpo(
    tmp_path, cli, mlflow_client
):
    # Clipping binds on every step: a norm taken over one rank's shard would clip differently.
    sft = [
        "experiment=smoke",
        "stage=sft",
        *TWO_CPU_RANKS,
        "trainer.max_steps=8",
        "checkpoint.every_n_steps=4",
        "trainer.val_check_interval=4",
        "trainer.gradient_clip_val=0.05",
        "stage.num_samples=2",
    ]
    cli(*sft, "hardware=ddp", "tracking.experiment=ddp", f"output_dir={tmp_path / 'ddp'}")
    # Sharded, killed (both ranks) once its first sharded checkpoint is written, then resumed.
    sharded_dir = tmp_path / "fsdp"
    process = _start(
        [*sft, "hardware=fsdp", "tracking.experiment=fsdp", f"output_dir={sharded_dir}"], tmp_path
    )
    checkpoint = sharded_dir / "checkpoints" / "step-000004.ckpt"
    deadline = time.time() + 300
    while not (checkpoint / "meta.pt").is_file():  # rank 0 writes meta.pt after every rank's shards
        assert process.poll() is None, process.stderr.read()[-3000:]
        assert time.time() < deadline, "no sharded checkpoint"
        time.sleep(0.1)
    time.sleep(0.5)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert len(list(checkpoint.glob("*.distcp"))) == 2, "one file of shards per rank"
    cli(*sft, "hardware=fsdp", "tracking.experiment=fsdp", "resume=true")

    (ddp,) = runs_of(mlflow_client, "ddp")
    (fsdp,) = runs_of(mlflow_client, "fsdp")
    assert fsdp.info.status == "FINISHED" and "rlhf.resumed_from" in fsdp.data.tags
    assert ddp.info.status == "FINISHED" and ddp.data.params["trainer.strategy"] == "ddp"
    assert fsdp.data.params["trainer.strategy"] == "fsdp"
    expected, got = _history(mlflow_client, ddp, "train/loss"), _history(mlflow_client, fsdp, "train/loss")
    assert max(got) == max(expected) == 7
    for step, value in expected.items():
        assert got[step] == pytest.approx(value, rel=1e-4, abs=1e-5), step
    assert fsdp.data.metrics["val/loss"] == pytest.approx(ddp.data.metrics["val/loss"], rel=1e-4)
    # One full Hugging Face directory, rank 0's, with the weights DDP trained.
    reference, saved = _weights(tmp_path / "ddp" / "model"), _weights(sharded_dir / "model")
    assert sorted(saved) == sorted(reference)
    for key, tensor in reference.items():
        assert torch.allclose(saved[key], tensor, atol=1e-4), key

    # RM and DPO from the sharded SFT model (DPO without LoRA: its frozen reference is sharded too).
    short = [*TWO_CPU_RANKS, "hardware=fsdp", "trainer.max_steps=4", "validate_before_training=true"]
    cli(
        "experiment=smoke",
        "stage=rm",
        *short,
        f"stage.init_from={sharded_dir}/model",
        "tracking.experiment=rm",
    )
    cli(
        "experiment=smoke",
        "stage=dpo",
        *short,
        f"stage.init_from={sharded_dir}/model",
        "tracking.experiment=dpo",
    )
    (rm,) = runs_of(mlflow_client, "rm")
    (dpo,) = runs_of(mlflow_client, "dpo")
    assert rm.info.status == dpo.info.status == "FINISHED"
    assert (Path(rm.data.tags["rlhf.output_dir"]) / "model" / "reward_stats.json").is_file()
    # Policy and sharded reference agree before training: the loss is exactly log 2.
    assert _history(mlflow_client, dpo, "val/loss")[0] == pytest.approx(math.log(2), abs=1e-5)
    assert "val/kl" in dpo.data.metrics  # rank 0 sampled with the gathered policy


@pytest.mark.distributed
def test_a_sharded_run_that_diverges_stops_every_rank_in_one_line(cli, mlflow_client):
    """Both ranks read the sharded gradient's whole norm and agree on the first non-finite step."""
    result = cli(
        "experiment=smoke",
        "stage=sft",
        *TWO_CPU_RANKS,
        "hardware=fsdp",
        "stage.lr=1e12",
        "trainer.max_steps=6",
        check=False,
        timeout=300,
    )
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    errors = {line for line in result.stderr.splitlines() if line.startswith("rlhf: error:")}
    assert len(errors) == 1 and "training diverged at step" in errors.pop(), result.stderr[-3000:]
    (run,) = runs_of(mlflow_client, "smoke")
    assert run.info.status == "FAILED" and "training diverged" in run.data.tags["rlhf.error"]
    assert not (Path(run.data.tags["rlhf.output_dir"]) / "model").exists()
