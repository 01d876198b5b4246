"""Search space: `space.yaml` (beside this module) -> Optuna suggestions -> a `Config` for one trial.

Each entry names a dotted config key (`training.learning_rate`) and its range; a trial's values are
written over the study's base config, so a trial differs from the base only by these keys.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path

import yaml

from promptehr.config import Config, ConfigError, config_from_dict, flatten

logger = logging.getLogger(__name__)

DEFAULT_SPACE = Path(__file__).with_name("space.yaml")
TYPES = ("float", "int", "categorical")


def load_space(path: str | Path = DEFAULT_SPACE) -> dict[str, dict]:
    """Read and check a space file: every key must be a config field, every range well formed."""
    with open(path) as fh:
        space = yaml.safe_load(fh) or {}
    if not isinstance(space, dict):
        raise ConfigError(f"{path}: expected a mapping of config keys to ranges")
    check_space(space, str(path))
    return space


def check_space(space: dict, where: str = "search space") -> None:
    fields = flatten(Config())
    for key, spec in space.items():
        if key not in fields:
            raise ConfigError(f"{where}: {key} is not a config key (see experiments/base.yaml)")
        if key.startswith("validation."):
            raise ConfigError(
                f"{where}: {key} is part of the validation protocol, which every trial must share: it cannot be searched"
            )
        if not isinstance(spec, dict):
            raise ConfigError(f"{where}: {key} needs a mapping like {{low: 0.1, high: 0.5}}")
        kind = spec.get("type", "float")
        if kind not in TYPES:
            raise ConfigError(f"{where}: {key}: type must be one of {', '.join(TYPES)}, got {kind!r}")
        if kind == "categorical":
            if not spec.get("choices"):
                raise ConfigError(f"{where}: {key}: a categorical parameter needs `choices`")
            continue
        unknown = set(spec) - {"type", "low", "high", "log", "step"}
        if unknown or "low" not in spec or "high" not in spec:
            raise ConfigError(f"{where}: {key}: expected low, high and optionally log/step, got {sorted(spec)}")
        low, high = float(spec["low"]), float(spec["high"])
        if not low < high or (spec.get("log") and low <= 0):
            raise ConfigError(f"{where}: {key}: need 0 < low < high on a log scale, low < high otherwise")


def suggest(trial, space: dict) -> dict:
    """One value per key from `trial.suggest_*` (a retried or enqueued trial returns its fixed values)."""
    values = {}
    for key, spec in space.items():
        kind = spec.get("type", "float")
        if kind == "categorical":
            values[key] = trial.suggest_categorical(key, spec["choices"])
        elif kind == "int":
            values[key] = trial.suggest_int(
                key, int(spec["low"]), int(spec["high"]), step=int(spec.get("step", 1)), log=bool(spec.get("log", False))
            )
        else:
            values[key] = trial.suggest_float(
                key, float(spec["low"]), float(spec["high"]), step=spec.get("step"), log=bool(spec.get("log", False))
            )
    return values


def default_params(cfg: Config, space: dict) -> dict:
    """The base config's values of the searched keys, for the first (enqueued) trial. A value outside
    its range is left out (that key is sampled), with a warning: Optuna would run it, but a trial
    outside the space confuses the sampler and the importance plot."""
    flat, params = flatten(cfg), {}
    for key, spec in space.items():
        value = flat[key]
        if spec.get("type") == "categorical":
            inside = value in spec["choices"]
        else:
            inside = value is not None and float(spec["low"]) <= value <= float(spec["high"])
        if inside:
            params[key] = value
        else:
            logger.warning(
                "the base config's %s=%r is outside the search range %s; the default trial samples it",
                key,
                value,
                spec.get("choices") or [spec["low"], spec["high"]],
            )
    return params


def trial_config(base: dict, values: dict) -> Config:
    """The study's base config (a plain dict, as stored in the study) with `values` written over it."""
    tree = copy.deepcopy(base)
    for key, value in values.items():
        *parents, leaf = key.split(".")
        node = tree
        for name in parents:
            node = node.setdefault(name, {})
        node[leaf] = value
    return config_from_dict(tree, "trial config")
