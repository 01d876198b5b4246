"""Configuration: one typed dataclass tree, loaded from YAML with dotted overrides.

`load_config("experiments/base.yaml", ["training.learning_rate=3e-4"])` returns a `Config`;
unknown keys and values of the wrong type are rejected with a message naming the key and file.
`flatten(cfg)` gives `{"training.learning_rate": 3e-4, ...}` for MLflow params and Optuna.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A config file or override names an unknown key or holds a value of the wrong type."""


@dataclass
class SyntheticCohortConfig:
    n_patients: int = 5000  # built-in cohort size
    seed: int = 0  # cohort sampling seed (independent of the split seed)
    generator: str = "hmm"  # promptehr.cohorts.GENERATORS: hmm (MIMIC-scale, hidden states), transition
    # (MIMIC-scale, code-to-code), small (389 codes, smoke tests)


@dataclass
class DataConfig:
    source: str = "synthetic"  # synthetic | mimic3 | mimic4 | meds
    path: str | None = (
        None  # folder holding the MIMIC tables (mimic4: the folder with hosp/ or hosp/ itself; meds: the dataset root)
    )
    icd_versions: str = "both"  # mimic4 and meds: "9", "10" or "both" (codes are prefixed by version)
    meds_diagnosis_prefix: str = "DIAGNOSIS//ICD//"  # meds: diagnosis events are codes <prefix><ICD version>//<code>
    min_visits: int = 1  # patients with fewer visits are excluded (counted and reported)
    max_visits: int | None = None  # keep only the first N visits of a patient (truncations counted)
    max_patients: int | None = None  # take the first N patients after filtering (None = all)
    split: str = (
        "random"  # random: seeded val_fraction split; meds: the MEDS subject_splits (train / tuning; held_out never used)
    )
    val_fraction: float = 0.2  # seeded patient-level split: 80/20 by default
    split_seed: int = 42
    synthetic: SyntheticCohortConfig = field(default_factory=SyntheticCohortConfig)


@dataclass
class CollatorConfig:
    lambda_poisson: float = 3.0  # span length ~ Poisson(lambda_poisson) for span infilling
    mask_probability: float = 0.15  # per visit: chance that one span of the visit is infilled by <mask>
    del_probability: float = 0.15  # per code: chance of deletion
    rep_probability: float = 0.15  # per code: chance of replacement by a random code
    corruption_prob: float = 0.5  # per patient: chance that its reconstruction row is corrupted
    next_visit_rows: bool = True  # add one next-visit-prediction row per patient with 2+ visits
    first_visit_prob: float = (
        0.3  # per patient: chance of a first-visit row (placeholder only; teaches generation from scratch)
    )
    shuffle_codes: bool = True  # model.visit_order "random": shuffle a visit's codes per row (else their given order)
    max_length: int = 512  # encoder/decoder tokens per row (earliest visits dropped beyond it)


@dataclass
class ModelConfig:
    d_model: int = 768  # bart-base shape by default
    encoder_layers: int = 6
    decoder_layers: int = 6
    encoder_attention_heads: int = 12
    decoder_attention_heads: int = 12
    encoder_ffn_dim: int = 3072
    decoder_ffn_dim: int = 3072
    dropout: float = 0.1
    attention_dropout: float = 0.0
    activation_dropout: float = 0.0
    max_position_embeddings: int = 520  # collator.max_length plus the two prompt positions, rounded up
    prompt_hidden_size: int = 128  # reparameterisation width of the age and sex prompts
    age_loss_weight: float = 0.001
    sex_loss_weight: float = 0.001
    target_visit_loss_weight: float = (
        1.0  # LM loss weight of a next-/first-visit row's hidden visit (codes and </v>) vs other label tokens
    )
    tie_embeddings: bool = True  # the output layer shares the code embeddings (false: its own weights)
    scale_embedding: bool = False  # multiply token embeddings by sqrt(d_model) (BART's option)
    # at a hidden visit's positions the previous visit's codes get a learned logit bonus b + u.E_c + w.h_t
    # (a code recurs from the last visit: the repeat baseline's form inside the model; `model.RecurrenceBonus`)
    recurrence_bonus: bool = True
    output_bias: bool = True  # a learned per-token output bias, initialised at the log frequency of the training codes
    # a visit's codes in one order, most frequent first: exact set likelihoods ("random": shuffled per row)
    visit_order: str = "frequency"


@dataclass
class TrainingConfig:
    # patients per batch (each expands into 1-3 rows; length-bucketed batches hold that many patients' rows on average)
    batch_size: int = 8
    num_epochs: int = 30
    learning_rate: float = 1e-4
    weight_decay: float = 0.01
    warmup_steps: int = 1000
    max_grad_norm: float | None = 1.0  # gradient clipping norm (null: no clipping)
    # exponential moving average of the weights (0: off): validation scores it, best_model keeps it
    ema_decay: float = 0.999
    seed: int = 42  # model init, shuffling, corruption and dropout
    checkpoint_dir: str = "checkpoints"
    save_every_n_epochs: int = 10
    log_every_n_steps: int = 50
    validate_every_n_epochs: int = 1
    # stop when this many validations in a row did not improve the selection metric by more than
    # early_stopping_min_delta (0: off; num_epochs is then the most a run trains); best_model is kept either way
    early_stopping_patience: int = 0
    early_stopping_min_delta: float = 0.0
    num_workers: int = 0  # DataLoader workers for collation
    bucket_by_length: bool = True  # batch rows of similar length together (less padding); false: random patient batches
    precision: str = "fp32"  # fp32 | bf16 (autocast)
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    compile: bool = False  # torch.compile the model
    resume_from: str | None = (
        None  # checkpoint folder, or auto (newest unfinished run of this config and data): same MLflow run
    )
    max_steps: int | None = None  # stop after this many optimizer steps (benchmarks, smoke tests)
    quality_report: bool = (
        True  # at the end: generated vs held-out quality report on the best model (gen/ metrics, report/ artifacts)
    )
    quality_report_patients: int = 500  # held-out patients whose demographics the report's generated cohort gets
    quality_report_released_patients: int = (
        5000  # the report's released cohort (training demographics): utility and privacy attacks
    )


@dataclass
class ValidationConfig:
    """The evaluation protocol: which held-out rows are scored, how denoising rows are corrupted and
    which codes the reconstruction probe reveals. Fixed by these settings and the held-out patients,
    never by a training knob (collator.*, training.seed), so runs and trials sit the same exam."""

    seed: int = 0  # protocol seed: row kinds, code orders, corruptions, revealed codes
    corruption_prob: float = 0.5  # share of whole-patient rows that are denoising rows (the rest: clean reconstruction)
    lambda_poisson: float = 3.0  # corruption of the denoising rows, as collator.* describes
    mask_probability: float = 0.15
    del_probability: float = 0.15
    rep_probability: float = 0.15
    prompt_prob: float = 0.5  # share of each visit's codes revealed by the reconstruction probe
    jaccard_patients: int = 100  # held-out patients of the reconstruction probe (0: no probe)
    batch_size: int = 64  # rows per evaluation batch (does not change the numbers)


@dataclass
class TrackingConfig:
    tracking_uri: str | None = None  # None: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db
    experiment_name: str | None = (
        None  # None: $MLFLOW_EXPERIMENT_NAME / _ID, else MLflow's Default experiment (where `mlflow run` puts its run)
    )
    run_name: str | None = None
    register_model: bool = True  # log the best checkpoint as a pyfunc model and register it
    registered_model_name: str = "promptehr"
    n_sample_patients: int = 5  # synthetic patients decoded and logged at each validation
    log_system_metrics: bool = False


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    collator: CollatorConfig = field(default_factory=CollatorConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)


# --------------------------------------------------------------------------- loading


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check `value` against annotation `tp`; convert YAML ints to floats where a float is wanted."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if errors else f"{where}: invalid value {value!r}")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping of fields, got {type(value).__name__} {value!r}")
        return _build(tp, value, where)
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "3e-4" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, int) and not isinstance(value, bool):  # YAML reads `data.icd_versions=9` as a number
            return str(value)
    else:  # pragma: no cover - only the types above occur in the tree
        return value
    raise ConfigError(f"{where}: expected {tp.__name__}, got {type(value).__name__} {value!r}")


# keys of earlier versions: where they live now (None: removed); old checkpoints are migrated
MOVED_KEYS = {
    "training.prompt_prob": "validation.prompt_prob",
    "training.jaccard_patients": "validation.jaccard_patients",
    "training.eval_batch_size": "validation.batch_size",
    "training.compute_tpl": None,  # TPL is computed in the validation pass itself
    "training.compute_reconstruction_jaccard": None,  # validation.jaccard_patients=0 turns the probe off
}


# keys added with a default that differs from what earlier versions did: a saved config without the key
# means the old behaviour
ABSENT_MEANS = {
    "data.synthetic.generator": "small",  # the only built-in cohort before there was a choice
    "model.output_bias": False,  # models before the option had no output bias
    "model.recurrence_bonus": False,  # models before the option had no recurrence bonus
    "model.visit_order": "random",  # models before the option wrote a visit's codes in random order
}


def migrate_legacy_keys(values: dict) -> dict:
    """A config tree of an earlier version (a checkpoint's config.yaml) with moved keys moved."""
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in (values or {}).items()}
    for old, new in MOVED_KEYS.items():
        section, name = old.split(".")
        if name not in out.get(section, {}):
            continue
        value = out[section].pop(name)
        if new is not None:
            new_section, new_name = new.split(".")
            out.setdefault(new_section, {}).setdefault(new_name, value)
        elif name == "compute_reconstruction_jaccard" and value is False:
            out.setdefault("validation", {})["jaccard_patients"] = 0
    for key, value in ABSENT_MEANS.items():  # saved before the key existed: what the code did then
        *parents, name = key.split(".")
        node = out
        for parent in parents:
            if not isinstance(node.get(parent), dict):
                break
            node[parent] = node = dict(node[parent])
        else:
            node.setdefault(name, value)
    return out


def _build(cls: type, values: dict, where: str) -> Any:
    types_ = _field_types(cls)
    unknown = sorted(set(values) - set(types_))
    if unknown:
        prefix = f"{where}." if where else ""
        moved = f"{prefix}{unknown[0]}"
        if moved in MOVED_KEYS:
            raise ConfigError(
                f"config key {moved} "
                + (f"is now {MOVED_KEYS[moved]}" if MOVED_KEYS[moved] else "was removed (see experiments/base.yaml)")
            )
        raise ConfigError(
            f"unknown config key {prefix}{unknown[0]!s}; valid keys under "
            f"{where or 'the top level'}: {', '.join(sorted(types_))}"
        )
    kwargs = {}
    for name, value in values.items():
        key = f"{where}.{name}" if where else name
        kwargs[name] = _coerce(value, types_[name], key)
    return cls(**kwargs)


def _merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form section.key=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override {text!r} has an empty key")
    value = yaml.safe_load(raw) if raw.strip() else None
    return key.split("."), value


def config_from_dict(values: dict, source: str = "<dict>") -> Config:
    try:
        return _build(Config, values or {}, "")
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Load defaults, then the YAML file at `path` (if given), then `key.sub=value` overrides."""
    values: dict = {}
    source = "defaults"
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        with path.open() as fh:
            try:
                loaded = yaml.safe_load(fh)
            except yaml.YAMLError as exc:
                raise ConfigError(f"{path}: not valid YAML: {exc}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections")
        values = loaded or {}
        source = str(path)
    cfg = config_from_dict(values, source)
    for text in overrides:
        keys, value = _parse_override(text)
        nested: Any = value
        for key in reversed(keys):
            nested = {key: nested}
        values = _merge(values, nested)
        try:
            cfg = _build(Config, values, "")
        except ConfigError as exc:
            raise ConfigError(f"override {text!r}: {exc}") from None
    return cfg


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def flatten(cfg: Any, prefix: str = "") -> dict[str, Any]:
    """`{"training.learning_rate": 1e-4, ...}` for every leaf of the tree."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            out.update(flatten(value, key + "."))
        else:
            out[key] = value
    return out


# --------------------------------------------------------------------------- checking values

PROMPT_POSITIONS = 2  # the age and sex prompts ahead of every row (promptehr.model.N_PROMPTS)
SOURCES = ("synthetic", "mimic3", "mimic4", "meds")


def _at_least(n):
    return lambda v: v >= n, f">= {n}"


def _optional_at_least(n):
    return lambda v: v is None or v >= n, f"null or >= {n}"


def _probability():
    return lambda v: 0.0 <= v <= 1.0, "0 <= value <= 1"


def _one_of(*choices):
    return lambda v: v in choices, "one of " + ", ".join(map(str, choices))


def _value_rules() -> dict[str, tuple]:
    """Key -> (test, allowed range as the message says it), for values that are wrong on their own."""
    from promptehr.cohorts import GENERATORS

    return {
        "data.source": _one_of(*SOURCES),
        "data.icd_versions": _one_of("9", "10", "both"),
        "data.min_visits": _at_least(1),
        "data.max_visits": _optional_at_least(1),
        "data.max_patients": _optional_at_least(2),
        "data.split": _one_of("random", "meds"),
        "data.val_fraction": (lambda v: 0.0 < v < 1.0, "0 < value < 1"),
        "data.synthetic.n_patients": _at_least(2),
        "data.synthetic.generator": _one_of(*GENERATORS),
        "collator.lambda_poisson": (lambda v: v > 0, "> 0"),
        **{
            f"collator.{k}": _probability()
            for k in ("mask_probability", "del_probability", "rep_probability", "corruption_prob", "first_visit_prob")
        },
        "collator.max_length": _at_least(8),
        **{
            f"model.{k}": _at_least(1)
            for k in (
                "d_model",
                "encoder_layers",
                "decoder_layers",
                "encoder_attention_heads",
                "decoder_attention_heads",
                "encoder_ffn_dim",
                "decoder_ffn_dim",
                "prompt_hidden_size",
            )
        },
        **{
            f"model.{k}": (lambda v: 0.0 <= v < 1.0, "0 <= value < 1")
            for k in ("dropout", "attention_dropout", "activation_dropout")
        },
        **{f"model.{k}": _at_least(0) for k in ("age_loss_weight", "sex_loss_weight")},
        "model.target_visit_loss_weight": (lambda v: v > 0, "> 0"),
        "model.visit_order": _one_of("frequency", "random"),
        **{
            f"training.{k}": _at_least(1)
            for k in ("batch_size", "num_epochs", "save_every_n_epochs", "log_every_n_steps", "validate_every_n_epochs")
        },
        "training.early_stopping_patience": _at_least(0),
        "training.early_stopping_min_delta": _at_least(0),
        "training.learning_rate": (lambda v: 0.0 < v < float("inf"), "> 0"),
        "training.weight_decay": _at_least(0),
        "training.ema_decay": (lambda v: 0.0 <= v < 1.0, "0 <= value < 1 (0: off)"),
        "training.warmup_steps": _at_least(0),
        "training.max_grad_norm": (lambda v: v is None or 0.0 < v < float("inf"), "> 0, or null for no clipping"),
        "training.num_workers": _at_least(0),
        "training.precision": _one_of("fp32", "bf16"),
        "training.device": (
            lambda v: v in ("auto", "cpu", "cuda") or (v.startswith("cuda:") and v[5:].isdigit()),
            "auto, cpu, cuda or cuda:N",
        ),
        "training.max_steps": _optional_at_least(1),
        "training.quality_report_patients": _at_least(0),
        "training.quality_report_released_patients": _at_least(0),
        "validation.corruption_prob": _probability(),
        "validation.lambda_poisson": (lambda v: v > 0, "> 0"),
        **{
            f"validation.{k}": _probability()
            for k in ("mask_probability", "del_probability", "rep_probability", "prompt_prob")
        },
        "validation.jaccard_patients": _at_least(0),
        "validation.batch_size": _at_least(1),
        "tracking.experiment_name": (
            lambda v: v is None or bool(v.strip()),
            "a non-empty name, or null for MLflow's default",
        ),
        "tracking.registered_model_name": (lambda v: bool(v.strip()), "a non-empty name"),
        "tracking.n_sample_patients": _at_least(0),
    }


def _relation_errors(cfg: Config) -> list[str]:
    """Values that are wrong together (or depend on the file system)."""
    errors, m = [], cfg.model
    for side in ("encoder", "decoder"):
        heads = getattr(m, f"{side}_attention_heads")
        if heads >= 1 and m.d_model % heads:
            errors.append(f"model.{side}_attention_heads={heads}: must divide model.d_model={m.d_model}")
    needed = cfg.collator.max_length + PROMPT_POSITIONS
    if m.max_position_embeddings < needed:
        errors.append(
            f"model.max_position_embeddings={m.max_position_embeddings}: must be >= collator.max_length + "
            f"{PROMPT_POSITIONS} prompt positions = {needed}"
        )
    if cfg.data.source != "synthetic" and not cfg.data.path:
        errors.append(f"data.path=null: data.source={cfg.data.source} needs the folder of its tables")
    if cfg.data.split == "meds" and cfg.data.source != "meds":
        errors.append(f"data.split=meds: needs data.source=meds (got {cfg.data.source})")
    resume = cfg.training.resume_from
    if resume not in (None, "auto") and not Path(resume).parent.is_dir():  # `last` itself may be mid-swap
        errors.append(f"training.resume_from={resume}: no such run folder (give a checkpoint folder, auto or null)")
    return errors


def check_config(cfg: Config) -> None:
    """Raise ConfigError naming every key whose value is out of range (key=value: the allowed range),
    before any data is read or a run is opened."""
    flat = flatten(cfg)
    errors = []
    for key, (test, allowed) in _value_rules().items():
        value = flat[key]
        try:
            ok = test(value)
        except (TypeError, AttributeError):  # a number where text is wanted, or the reverse
            ok = False
        if not ok:
            errors.append(f"{key}={'null' if value is None else value}: must be {allowed}")
    errors += _relation_errors(cfg)
    if errors:
        raise ConfigError("invalid settings: " + "; ".join(errors))
