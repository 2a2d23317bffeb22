"""The run's configuration: its typed schema (schema.py), the Hydra registrations (store.py), and
validation (validation.py). The names most code needs are importable from here."""

from rlhf.config.schema import (
    CHAT_TEMPLATE_MODES,
    DTYPES,
    SCHEDULERS,
    BaseStageConfig,
    CheckpointConfig,
    DataConfig,
    LoraConfig,
    ModelConfig,
    RolloutConfig,
    RunConfig,
    SourceConfig,
    StageConfig,
    TrackingConfig,
)
from rlhf.config.store import register_configs, register_sweeps, stage_schemas
from rlhf.config.validation import describe_compose_error, to_container, validate

__all__ = [
    "CHAT_TEMPLATE_MODES",
    "DTYPES",
    "SCHEDULERS",
    "BaseStageConfig",
    "CheckpointConfig",
    "DataConfig",
    "LoraConfig",
    "ModelConfig",
    "RolloutConfig",
    "RunConfig",
    "SourceConfig",
    "StageConfig",
    "TrackingConfig",
    "describe_compose_error",
    "register_configs",
    "register_sweeps",
    "stage_schemas",
    "to_container",
    "validate",
]
