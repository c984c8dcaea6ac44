"""The run configuration, the lowest layer of ekd (it imports no other ekd package but errors).

- :mod:`ekd.config.schema`: one dataclass per YAML section (types, defaults, one comment per key);
- :mod:`ekd.config.convert`: plain YAML data to those dataclasses, unknown keys as errors;
- :mod:`ekd.config.loading`: YAML files, ``--set a.b=c`` overrides, :func:`load_config`;
- :mod:`ekd.config.checks`: the checks that need only the config (:func:`validate`);
- :mod:`ekd.config.reference`: ``docs/config.md`` generated from the schema.

The checks against the registries (backbones, distillers, evaluation FPRs) run in
:mod:`ekd.engine.preflight`, before any heavy work.
"""

from ekd.config.checks import _CHOICES, VAL_KINDS, val_sets, validate
from ekd.config.convert import _valid_keys, from_dict, to_dict
from ekd.config.loading import load_config, parse_overrides, read_yaml, save_config
from ekd.config.schema import (Config, DataConfig, DistillerConfig, EvalConfig, GuardConfig, HeadConfig,
                               ModelConfig, OptimConfig, SamplerConfig, SyntheticConfig, TeacherConfig,
                               TrainConfig, ValConfig, ValSetConfig)

__all__ = ["_CHOICES", "VAL_KINDS", "Config", "DataConfig", "DistillerConfig", "EvalConfig", "GuardConfig",
           "HeadConfig", "ModelConfig", "OptimConfig", "SamplerConfig", "SyntheticConfig", "TeacherConfig",
           "TrainConfig", "ValConfig", "ValSetConfig", "_valid_keys", "from_dict", "load_config",
           "parse_overrides", "read_yaml", "save_config", "to_dict", "val_sets", "validate"]
