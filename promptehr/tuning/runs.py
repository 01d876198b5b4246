"""The MLflow side of a study: one parent run per study, one child run per trial.

The parent run is created once, by whoever creates the study (its id is kept in the study's user
attrs); each trial opens a child run (`parent_run_id`, `run_name=trial-N`) that `train()` attaches
to, and ends it itself with the trial's outcome (`promptehr.run_status`): FINISHED, KILLED (pruned,
interrupted, or its worker died) or FAILED (with a `failure_reason` tag). A retry reopens the run.
Optuna's MLflowCallback is not used: it is deprecated, logs only after a trial ends and cannot nest runs across processes.
"""

from __future__ import annotations

import logging
import os

import mlflow
from mlflow import MlflowClient

from promptehr.registry import log_pyfunc_model, promote_champion
from promptehr.run_status import Outcome
from promptehr.tracking import MLflowTracker, resolve_experiment_id, resolve_tracking_uri

logger = logging.getLogger(__name__)


class TrialTracker(MLflowTracker):
    """The tracker of one trial: attaches to the trial's child run and logs no model (the study
    logs and registers only the best trial's checkpoint, when it ends)."""

    def log_model(self, checkpoint_dir: str, score: float, tags: dict, rescore=None) -> dict | None:
        return None


def create_parent_run(tracking_uri: str | None, experiment_name: str | None, study_name: str, tags: dict) -> tuple[str, str]:
    """Start the study's parent run (left RUNNING until the study is finalized) in `experiment_name`
    (None: where `mlflow run` would put it, see `resolve_experiment_id`); under `mlflow run` the run
    it created ($MLFLOW_RUN_ID) becomes the parent. Returns (run id, experiment id)."""
    client = MlflowClient(resolve_tracking_uri(tracking_uri))
    wrapper = os.environ.get("MLFLOW_RUN_ID")
    if wrapper:
        run = client.get_run(wrapper)
    else:
        run = client.create_run(resolve_experiment_id(experiment_name, tracking_uri), run_name=f"study-{study_name}")
    for key, value in {"optuna.study_name": study_name, "optuna.role": "study", **tags}.items():
        client.set_tag(run.info.run_id, key, str(value))
    logger.info("MLflow parent run %s for study %s", run.info.run_id, study_name)
    return run.info.run_id, run.info.experiment_id


def point_wrapper_run_at(tracking_uri: str | None, parent_run_id: str) -> None:
    """Under `mlflow run` with a study that already has a parent: tag the new, empty wrapper run."""
    wrapper = os.environ.get("MLFLOW_RUN_ID")
    if wrapper and wrapper != parent_run_id:
        MlflowClient(resolve_tracking_uri(tracking_uri)).set_tag(wrapper, "promptehr.study_parent_run_id", parent_run_id)
        logger.warning(
            "the study's parent run is %s; the run %s that `mlflow run` created stays empty", parent_run_id, wrapper
        )


def reopen_run(tracking_uri: str | None, run_id: str) -> None:
    """A finished study that gets more trials: its parent run is RUNNING again until the next finalize."""
    client = MlflowClient(resolve_tracking_uri(tracking_uri))
    if client.get_run(run_id).info.status != "RUNNING":
        client.update_run(run_id, status="RUNNING")


def start_trial_run(
    tracking_uri: str,
    parent_run_id: str,
    experiment_id: str,
    trial_number: int,
    tags: dict,
    resume_run_id: str | None = None,
) -> str:
    """Open the trial's child run as the active run (train()'s tracker attaches to it); a retry reopens
    the run of the attempt it resumes (`resume_run_id`), renamed after the retry's trial number."""
    os.environ.pop("MLFLOW_RUN_ID", None)  # else start_run would resume `mlflow run`'s run, not make a child
    mlflow.set_tracking_uri(tracking_uri)
    if resume_run_id:
        run = mlflow.start_run(run_id=resume_run_id)
        mlflow.set_tags({k: str(v) for k, v in tags.items()})
        MlflowClient(tracking_uri).update_run(resume_run_id, name=f"trial-{trial_number}")
        return run.info.run_id
    run = mlflow.start_run(
        experiment_id=experiment_id,
        run_name=f"trial-{trial_number}",
        parent_run_id=parent_run_id,
        tags={k: str(v) for k, v in tags.items()},
    )
    return run.info.run_id


def end_trial_run(outcome: Outcome) -> None:
    """End the active trial run with `outcome`'s status and tags."""
    mlflow.set_tags(outcome.tags)
    mlflow.flush_async_logging()
    mlflow.end_run(status=outcome.status)


def close_run(tracking_uri: str, run_id: str, outcome: Outcome) -> None:
    """End a run whose process is gone (a heartbeat-stale trial) with `outcome`: else it stays RUNNING."""
    client = MlflowClient(tracking_uri)
    if client.get_run(run_id).info.status == "RUNNING":
        for key, value in outcome.tags.items():
            client.set_tag(run_id, key, value)
        client.set_terminated(run_id, outcome.status)
        logger.info("closed MLflow run %s as %s: %s", run_id, outcome.status, outcome.reason)


def log_study_summary(
    tracking_uri: str, run_id: str, metrics: dict, tags: dict, artifacts: dict[str, str], step: int
) -> None:
    """Best value, counts (metrics at step = finished trials, so a resumed study adds points), best
    params (tags: they change when a resumed study finds a better trial) and files."""
    client = MlflowClient(tracking_uri)
    for key, value in metrics.items():
        client.log_metric(run_id, key, float(value), step=step)
    for key, value in tags.items():
        client.set_tag(run_id, key, str(value))
    for path, artifact_dir in artifacts.items():
        client.log_artifact(run_id, path, artifact_dir)


def log_champion(
    tracking_uri: str, run_id: str, checkpoint: str, model_name: str, score: float, tags: dict, rescore=None
) -> dict:
    """Log the checkpoint as a pyfunc model in the parent run, register it as a version of
    `model_name` and let it take alias `champion` if it beats the champion on the same data and
    validation protocol (`promptehr.registry.promote_champion`)."""
    mlflow.set_tracking_uri(tracking_uri)
    os.environ.pop("MLFLOW_RUN_ID", None)
    with mlflow.start_run(run_id=run_id):
        info = log_pyfunc_model(checkpoint, model_name)
    version = str(info.registered_model_version)
    champion = promote_champion(model_name, version, score, tags, rescore)
    return {"model_uri": info.model_uri, "version": version, "champion": champion}


def finish_run(tracking_uri: str, run_id: str) -> None:
    client = MlflowClient(tracking_uri)
    client.set_terminated(run_id, "FINISHED")
