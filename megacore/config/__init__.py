"""The run configuration: the schema (schema.py) and the generic YAML-to-dataclass loader (loader.py)."""

from megacore.config.health import HealthConfig
from megacore.config.loader import load_dataclass, parse_override
from megacore.config.schema import (
                                    CheckpointConfig,
                                    Config,
                                    DataConfig,
                                    LoggingConfig,
                                    ModelConfig,
                                    OptimConfig,
                                    ParallelConfig,
                                    TrainConfig,
                                    load_config,
                                    save_config,
                                    with_overrides,
)
from megacore.errors import ConfigError

__all__ = ["CheckpointConfig", "Config", "ConfigError", "DataConfig", "HealthConfig", "LoggingConfig", "ModelConfig",
           "OptimConfig", "ParallelConfig", "TrainConfig", "load_config", "load_dataclass", "parse_override",
           "save_config", "with_overrides"]
