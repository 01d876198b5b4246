"""A study: created once (`init`), worked on by any number of worker processes, then finalized.

Everything a worker needs (base config, search space, objective, pruner, trial budget, MLflow parent
run) is stored in the study's user attrs at creation, so a worker needs only the storage URL and the
study name, and every worker of a Slurm array runs the same study.
"""

from __future__ import annotations

import dataclasses
import logging
import time
import warnings

import optuna
from optuna.trial import TrialState

from promptehr.config import ConfigError, config_from_dict, flatten, migrate_legacy_keys, to_dict
from promptehr.run_status import RunInterrupted, StopSignals
from promptehr.tracking import resolve_tracking_uri
from promptehr.tuning import runs
from promptehr.tuning.space import check_space, default_params

logger = logging.getLogger(__name__)

# option -> key of train()'s metrics; the default selects what the best checkpoint and champion are chosen by
OBJECTIVES = {"val_next_visit_nll": "next_visit_nll", "val_loss": "loss", "val_perplexity": "perplexity"}
PRUNERS = ("median", "hyperband", "none")
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)


@dataclasses.dataclass
class StudySettings:
    """What the study's creator decided; stored in `study.user_attrs` for every worker."""

    base_config: dict
    space: dict
    n_trials: int = 20
    objective: str = "val_next_visit_nll"
    pruner: str = "median"
    seed: int | None = None

    def __post_init__(self):
        if self.objective not in OBJECTIVES:
            raise ConfigError(f"--objective must be one of {', '.join(OBJECTIVES)}, got {self.objective!r}")
        if self.pruner not in PRUNERS:
            raise ConfigError(f"--pruner must be one of {', '.join(PRUNERS)}, got {self.pruner!r}")
        if self.n_trials < 1:
            raise ConfigError(f"--n-trials must be at least 1, got {self.n_trials}")
        check_space(self.space)

    @property
    def config(self):
        return config_from_dict(migrate_legacy_keys(self.base_config), "the study's base config")

    @property
    def tracking_uri(self) -> str:
        return self.base_config["tracking"]["tracking_uri"]

    @classmethod
    def from_study(cls, study: optuna.Study) -> StudySettings:
        attrs = study.user_attrs
        return cls(**{f.name: attrs[f.name] for f in dataclasses.fields(cls) if f.name in attrs})


# ------------------------------------------------------------------ the trial budget


class TrialBudget:
    """At most `n_trials` trials per study, counted across all workers.

    Optuna's MaxTrialsCallback counts finished trials after each trial, so K workers that are still
    running trials overshoot by up to K-1. Here a trial holds a slot from its creation: every trial
    counts (waiting, running or finished, pruned and failed included: a failing configuration is an
    outcome, not retried for ever) except a heartbeat-stale trial that was re-queued (its retry takes
    the slot) and a trial that found the budget already spent by other workers (`over_budget`).
    A worker checks `has_work` before asking for a trial and `admits` once it holds one (numbers are
    handed out atomically by the storage, so the first `n_trials` counted numbers win).
    """

    def __init__(self, n_trials: int):
        self.n_trials = n_trials

    @staticmethod
    def counted(trials) -> list:
        retried = {n for t in trials for n in t.system_attrs.get("retry_history", [])}
        return [t for t in trials if t.number not in retried and not t.user_attrs.get("over_budget")]

    def has_work(self, study: optuna.Study) -> bool:
        counted = self.counted(study.get_trials(deepcopy=False))
        return len(counted) < self.n_trials or any(t.state == TrialState.WAITING for t in counted)

    def admits(self, study: optuna.Study, number: int) -> bool:
        counted = self.counted(study.get_trials(deepcopy=False))
        return sum(t.number < number for t in counted) < self.n_trials

    def finished(self, study: optuna.Study) -> list:
        return [t for t in self.counted(study.get_trials(deepcopy=False)) if t.state in FINISHED]


# ------------------------------------------------------------------ creating and opening a study


def make_pruner(name: str, num_epochs: int) -> optuna.pruners.BasePruner:
    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=5)  # prune below the median once 5 trials ran
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=max(num_epochs, 1), reduction_factor=3)
    return optuna.pruners.NopPruner()


def open_study(storage, study_name: str, worker_id: int = 0) -> optuna.Study:
    """Load an initialized study with this worker's sampler (seeded per worker, so that workers
    started together do not draw the same random start-up trials) and the study's pruner."""
    study = optuna.load_study(study_name=study_name, storage=storage)
    if "mlflow_parent_run_id" not in study.user_attrs:
        raise ConfigError(f"study {study_name!r} has no MLflow parent run: run `promptehr tune init` first")
    settings = StudySettings.from_study(study)
    seed = None if settings.seed is None else settings.seed + worker_id
    return optuna.load_study(
        study_name=study_name,
        storage=storage,
        sampler=optuna.samplers.TPESampler(seed=seed),
        pruner=make_pruner(settings.pruner, settings.config.training.num_epochs),
    )


def init_study(
    storage,
    study_name: str,
    settings: StudySettings,
    explicit: set[str] = frozenset(),
    storage_label: str = "",
    wait_s: float = 120.0,
) -> optuna.Study:
    """Create the study with its settings, the default trial and its MLflow parent run, or load it.

    Race-safe: only the process whose `create_study` succeeds writes the settings and creates the
    parent run; others wait for `mlflow_parent_run_id` (written last). Loading an existing study,
    the options named in `explicit` must match the stored ones, except `n_trials`, which is updated
    (a finished study can be given more trials).
    """
    settings.base_config["tracking"]["tracking_uri"] = resolve_tracking_uri(settings.base_config["tracking"]["tracking_uri"])
    try:
        study = optuna.create_study(study_name=study_name, storage=storage, direction="minimize")
    except optuna.exceptions.DuplicatedStudyError:
        study = optuna.load_study(study_name=study_name, storage=storage)
        _wait_for_parent(study, wait_s)
        if "mlflow_parent_run_id" in study.user_attrs:
            return _reuse_study(study, settings, explicit)
        logger.warning("study %s has no MLflow parent run (its creator died?): creating it", study_name)
    else:
        logger.info("created study %s in %s", study_name, storage_label)

    for key, value in dataclasses.asdict(settings).items():
        study.set_user_attr(key, value)
    study.set_user_attr("mlflow_tracking_uri", settings.tracking_uri)
    defaults = default_params(settings.config, settings.space)
    study.enqueue_trial(defaults, user_attrs={"default_config": True}, skip_if_exists=True)
    cfg = settings.config
    parent_run_id, experiment_id = runs.create_parent_run(
        settings.tracking_uri,
        cfg.tracking.experiment_name,
        study_name,
        {
            "optuna.storage": storage_label,
            "optuna.objective": settings.objective,
            "optuna.direction": "minimize",
            "optuna.pruner": settings.pruner,
            "optuna.n_trials": settings.n_trials,
            "optuna.seed": settings.seed,
            **{f"optuna.space.{k}": _range(v) for k, v in settings.space.items()},
        },
    )
    study.set_user_attr("mlflow_experiment_id", experiment_id)
    study.set_user_attr("mlflow_parent_run_id", parent_run_id)  # last: marks the study as initialized
    return study


def _range(spec: dict) -> str:
    if spec.get("type") == "categorical":
        return str(list(spec["choices"]))
    return f"[{spec['low']}, {spec['high']}]" + (" log" if spec.get("log") else "")


def _wait_for_parent(study: optuna.Study, wait_s: float) -> None:
    deadline = time.monotonic() + wait_s
    while "mlflow_parent_run_id" not in study.user_attrs and time.monotonic() < deadline:
        time.sleep(1.0)


def _reuse_study(study: optuna.Study, requested: StudySettings, explicit: set[str]) -> optuna.Study:
    stored = StudySettings.from_study(study)
    for name in sorted(explicit - {"n_trials"}):
        mine, theirs = getattr(requested, name), getattr(stored, name)
        if name == "base_config":
            mine, theirs = _comparable(mine), _comparable(theirs)
        if mine != theirs:
            differing = (
                sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k)) if isinstance(mine, dict) else []
            )
            raise ConfigError(
                f"study {study.study_name!r} was created with another {name}"
                f"{' (' + ', '.join(differing[:5]) + ')' if differing else ''}: resume it without "
                f"that option, or start a new study with another --study-name"
            )
    if "n_trials" in explicit and requested.n_trials != stored.n_trials:
        logger.info("study %s: trial budget %d -> %d", study.study_name, stored.n_trials, requested.n_trials)
        study.set_user_attr("n_trials", requested.n_trials)
    n_trials = study.user_attrs["n_trials"]
    parent = study.user_attrs["mlflow_parent_run_id"]
    runs.point_wrapper_run_at(stored.tracking_uri, parent)
    if len(TrialBudget(n_trials).finished(study)) < n_trials:
        runs.reopen_run(stored.tracking_uri, parent)
    logger.info(
        "resuming study %s (%d of %d trials finished)",
        study.study_name,
        len(TrialBudget(n_trials).finished(study)),
        n_trials,
    )
    return study


def _comparable(base_config: dict) -> dict:
    flat = flatten(config_from_dict(base_config))
    flat.pop("tracking.tracking_uri", None)  # resolved per process ($MLFLOW_TRACKING_URI)
    return flat


# ------------------------------------------------------------------ a worker


def run_worker(study: optuna.Study, objective) -> int:
    """Run trials until the study's budget is spent; returns how many this worker ran. A failing
    trial is recorded (FAIL, with its reason) and the worker goes on with the next one. A stop signal
    (SIGTERM, SIGINT, SIGUSR1) ends the worker with `RunInterrupted`: during a trial once the trial is
    saved and re-queued (objective.py), between trials before the next one starts."""
    ran = 0
    with StopSignals() as stop:
        while True:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                optuna.storages.fail_stale_trials(study)  # before counting: a dead worker's trial frees its slot
            budget = TrialBudget(study.user_attrs["n_trials"])
            if not budget.has_work(study):
                break
            if stop.requested:
                raise RunInterrupted(stop.name, f"between trials (this worker ran {ran})")
            study.optimize(objective, n_trials=1, catch=(Exception,))  # a RunInterrupted passes through
            ran += 1
    logger.info(
        "worker done: ran %d trials; %d of %d finished in the study", ran, len(budget.finished(study)), budget.n_trials
    )
    return ran


def settings_from_config(cfg, space: dict, **options) -> StudySettings:
    return StudySettings(base_config=to_dict(cfg), space=space, **{k: v for k, v in options.items() if v is not None})
