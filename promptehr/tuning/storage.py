"""Optuna storages: where a study lives, and what happens to a trial whose worker died.

- `sqlite:///optuna.db` (default): one worker process at a time, never on NFS.
- `journal:./optuna_journal.log` (or any path ending in .log): a journal file, several worker
  processes on one machine (file locks). No heartbeats: a killed worker's trial stays RUNNING.
- `postgresql+psycopg2://user:pass@host/db`: many workers on many nodes (a Slurm array). Heartbeats:
  a trial whose worker stopped beating for `grace_period` seconds is failed, its MLflow run is
  closed (KILLED), and it is re-queued with the same parameters (`RetryHeartbeatStaleTrialCallback`).
A worker stopped by a signal re-queues its trial itself (`requeue`), on any storage. A retry resumes
the first attempt's newest checkpoint and MLflow run (objective.py).
"""

from __future__ import annotations

import importlib.util
import logging
import warnings

import optuna
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.storages.journal import JournalFileBackend, JournalStorage

from promptehr.run_status import Outcome
from promptehr.tuning import runs

logger = logging.getLogger(__name__)

MAX_RETRY = 3  # a trial that keeps killing its worker (out of memory) is not re-queued forever


def requeue(study: optuna.Study, trial: optuna.trial.FrozenTrial, max_retry: int | None = None) -> None:
    """Queue a retry of `trial`: a new trial number with the same parameters, its reports so far and
    `failed_trial` (the first attempt's number, whose checkpoint folder and MLflow run the retry resumes)
    and `retry_history` in its system attrs, as Optuna's RetryHeartbeatStaleTrialCallback writes them."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        RetryHeartbeatStaleTrialCallback(max_retry=max_retry, inherit_intermediate_values=True)(study, trial)


class CloseRunAndRetry:
    """Heartbeat-stale trial callback: end the dead trial's MLflow run as KILLED, then re-queue the
    trial (`requeue`); the retry resumes its newest checkpoint and reopens its run."""

    def __init__(self, max_retry: int | None = MAX_RETRY):
        self.max_retry = max_retry

    def __call__(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        run_id = trial.user_attrs.get("mlflow_run_id")
        tracking_uri = study.user_attrs.get("mlflow_tracking_uri")
        if run_id and tracking_uri:
            try:
                runs.close_run(
                    tracking_uri,
                    run_id,
                    Outcome(
                        "KILLED",
                        "interrupted",
                        resumable=True,
                        reason=(
                            f"worker stopped sending heartbeats during trial {trial.number}; "
                            "a retry resumes its newest checkpoint"
                        ),
                    ),
                )
            except Exception as exc:  # the retry matters more than the run's status
                logger.warning("could not close MLflow run %s of stale trial %d: %s", run_id, trial.number, exc)
        logger.warning("trial %d lost its worker (no heartbeat); re-queued to resume from its last checkpoint", trial.number)
        requeue(study, trial, self.max_retry)


def normalize_url(url: str) -> str:
    """`postgresql://` means psycopg 3 to SQLAlchemy 2.1; use psycopg2 when only it is installed."""
    if (
        url.startswith("postgresql://")
        and importlib.util.find_spec("psycopg") is None
        and importlib.util.find_spec("psycopg2") is not None
    ):
        return "postgresql+psycopg2://" + url[len("postgresql://") :]
    return url


def journal_path(url: str) -> str | None:
    if url.startswith("journal:"):
        return url[len("journal:") :]
    if "://" not in url and url.endswith(".log"):
        return url
    return None


def describe(url: str) -> str:
    """The URL without its password, for logs and tags."""
    if journal_path(url) is not None:
        return url
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


def open_storage(url: str, heartbeat_interval: int = 60, grace_period: int = 180) -> optuna.storages.BaseStorage:
    """Open the study storage named by `url` (see the module docstring)."""
    path = journal_path(url)
    if path is not None:
        return JournalStorage(JournalFileBackend(path))
    url = normalize_url(url)
    if url.startswith("sqlite"):
        engine_kwargs = {"connect_args": {"timeout": 30}}  # wait for a lock instead of failing at once
    else:
        engine_kwargs = {"pool_pre_ping": True}  # psycopg2 rejects a `timeout` connect arg
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # heartbeats: experimental since 2.9
        return RDBStorage(
            url,
            engine_kwargs=engine_kwargs,
            heartbeat_interval=heartbeat_interval,
            grace_period=grace_period,
            heartbeat_stale_trial_callback=CloseRunAndRetry(),
        )


def supports_parallel_workers(url: str) -> bool:
    return not normalize_url(url).startswith("sqlite")
