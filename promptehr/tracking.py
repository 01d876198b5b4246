"""Tracking: a run's record in MLflow.

`Tracker` is the do-nothing interface the training loop calls; `MLflowTracker` sends params, tags,
metrics (asynchronously, flushed at checkpoints), artifacts, the dataset and, through `registry`, the
registered pyfunc model to MLflow. Only counts, aggregates and synthetic samples are logged: never
patient records or subject ids.
"""

from __future__ import annotations

import logging
import os
import warnings

from promptehr.registry import log_pyfunc_model, promote_champion

logger = logging.getLogger(__name__)

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"


class Tracker:
    """Do-nothing tracker: the loop calls these unconditionally (no `if tracking:` branches)."""

    run_id: str | None = None

    def start(self, run_id: str | None = None) -> str | None:
        return None

    def log_params(self, params: dict) -> None: ...
    def set_tags(self, tags: dict) -> None: ...
    def log_metrics(self, metrics: dict, step: int) -> None: ...
    def log_dict(self, data, artifact_file: str) -> None: ...
    def log_text(self, text: str, artifact_file: str) -> None: ...
    def log_artifact(self, path: str, artifact_path: str | None = None) -> None: ...
    def log_dataset(
        self, data_cfg, train_patients, val_patients, split_fingerprint: str, context: str = "training"
    ) -> None: ...
    def flush(self) -> None: ...
    def log_model(self, checkpoint_dir: str, score: float, tags: dict, rescore=None) -> dict | None:
        return None

    def end(self, status: str = "FINISHED") -> None: ...
    def run_status(self, run_id: str) -> str | None:
        """The status of run `run_id` (RUNNING, FINISHED, KILLED, FAILED), None if unknown."""
        return None


def resolve_tracking_uri(uri: str | None) -> str:
    return uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


def resolve_experiment_id(name: str | None, tracking_uri: str | None = None) -> str:
    """The experiment a new run goes to: `name` if given (created if new), else the one `mlflow run`
    puts its run in: $MLFLOW_EXPERIMENT_NAME (created if new) or $MLFLOW_EXPERIMENT_ID, else MLflow's
    `Default` experiment (id 0). So every entry point logs beside the main job unless told otherwise."""
    from mlflow import MlflowClient
    from mlflow.tracking.default_experiment import DEFAULT_EXPERIMENT_ID

    name = name or os.environ.get("MLFLOW_EXPERIMENT_NAME")
    if name:
        client = MlflowClient(resolve_tracking_uri(tracking_uri))
        experiment = client.get_experiment_by_name(name)
        return experiment.experiment_id if experiment else client.create_experiment(name)
    return os.environ.get("MLFLOW_EXPERIMENT_ID") or DEFAULT_EXPERIMENT_ID


class MLflowTracker(Tracker):
    """MLflow backend. Attaches to `run_id` (a resume), or to the run `mlflow run` / a tuning worker
    started (MLFLOW_RUN_ID / an active run), else starts a new run in `experiment_name` (None: the
    experiment `mlflow run` would use, see `resolve_experiment_id`)."""

    def __init__(
        self,
        tracking_uri: str | None = None,
        experiment_name: str | None = None,
        run_name: str | None = None,
        registered_model_name: str = "promptehr",
        register_model: bool = True,
        log_system_metrics: bool = False,
        parent_run_id: str | None = None,
    ):
        import mlflow

        self.mlflow = mlflow
        self.tracking_uri = resolve_tracking_uri(tracking_uri)
        mlflow.set_tracking_uri(self.tracking_uri)
        self.experiment_name = experiment_name
        self.run_name = run_name
        self.registered_model_name = registered_model_name
        self.register_model = register_model
        self.log_system_metrics = log_system_metrics
        self.parent_run_id = parent_run_id
        self.run_id = None
        self._owns_run = False
        self._existing_params: dict[str, str] = {}

    @classmethod
    def from_config(cls, tcfg, **kwargs) -> MLflowTracker:
        return cls(
            tcfg.tracking_uri,
            tcfg.experiment_name,
            tcfg.run_name,
            tcfg.registered_model_name,
            tcfg.register_model,
            tcfg.log_system_metrics,
            **kwargs,
        )

    def start(self, run_id: str | None = None) -> str:
        mlflow = self.mlflow
        active = mlflow.active_run()
        if active is not None and run_id in (None, active.info.run_id):
            self.run_id = active.info.run_id  # a tuning worker's child run (a retry resumes it): it ends the run itself
        else:
            wrapper = os.environ.get("MLFLOW_RUN_ID")
            experiment_id = None
            if run_id is None and not wrapper:
                experiment_id = resolve_experiment_id(self.experiment_name, self.tracking_uri)
            if run_id is None and wrapper and self.experiment_name:
                self._warn_if_elsewhere(wrapper)
            if run_id is not None and wrapper and wrapper != run_id:
                # `mlflow run` made a new run for this command, but a resume continues the original one
                mlflow.MlflowClient().set_tag(wrapper, "promptehr.resumed_run_id", run_id)
                logger.warning(
                    "resuming into MLflow run %s; the run %s that `mlflow run` created stays empty", run_id, wrapper
                )
            run = mlflow.start_run(
                run_id=run_id,
                experiment_id=experiment_id,
                run_name=None if run_id else self.run_name,
                parent_run_id=self.parent_run_id,
                log_system_metrics=self.log_system_metrics or None,
            )
            self.run_id = run.info.run_id
            self._owns_run = True
        self._existing_params = dict(mlflow.get_run(self.run_id).data.params)
        logger.info("MLflow run %s at %s", self.run_id, self.tracking_uri)
        return self.run_id

    def _warn_if_elsewhere(self, wrapper_run_id: str) -> None:
        """`mlflow run` chose the experiment before the config was read, and a run cannot move."""
        client = self.mlflow.MlflowClient()
        experiment = client.get_experiment(client.get_run(wrapper_run_id).info.experiment_id)
        if experiment.name != self.experiment_name:
            logger.warning(
                "tracking.experiment_name=%s, but `mlflow run` put this run in experiment %r: name the "
                "experiment with `mlflow run --experiment-name %s` or $MLFLOW_EXPERIMENT_NAME instead",
                self.experiment_name,
                experiment.name,
                self.experiment_name,
            )

    def log_params(self, params: dict) -> None:
        """Log params not already on the run (`mlflow run` logs its own; a resume logs again).
        A key already logged with another value is kept as it was, with a warning."""
        fresh = {}
        for key, value in params.items():
            text = "None" if value is None else str(value)
            if key in self._existing_params:
                if self._existing_params[key] != text and key != "training.resume_from":
                    logger.warning("param %s already logged as %r; not re-logging %r", key, self._existing_params[key], text)
                continue
            fresh[key] = text
        items = list(fresh.items())
        for i in range(0, len(items), 100):  # MLflow's per-call param limit
            self.mlflow.log_params(dict(items[i : i + 100]))
        self._existing_params.update(fresh)

    def set_tags(self, tags: dict) -> None:
        self.mlflow.set_tags({k: str(v) for k, v in tags.items()})

    def log_metrics(self, metrics: dict, step: int) -> None:
        clean = {k: float(v) for k, v in metrics.items() if v is not None}
        self.mlflow.log_metrics(clean, step=step, synchronous=False)

    def log_dict(self, data, artifact_file: str) -> None:
        self.mlflow.log_dict(data, artifact_file)

    def log_text(self, text: str, artifact_file: str) -> None:
        self.mlflow.log_text(text, artifact_file)

    def log_artifact(self, path: str, artifact_path: str | None = None) -> None:
        self.mlflow.log_artifact(path, artifact_path)

    def log_dataset(self, data_cfg, train_patients, val_patients, split_fingerprint: str, context: str = "training") -> None:
        """The data as an MLflow dataset input (the UI's Dataset column): see `dataset_description`."""
        from mlflow.data.code_dataset_source import CodeDatasetSource

        name, source_tags, table, digest = dataset_description(data_cfg, train_patients, val_patients, split_fingerprint)
        with warnings.catch_warnings():  # "integer columns cannot hold missing values": counts never miss
            warnings.filterwarnings("ignore", message=".*integer column", category=UserWarning)
            dataset = self.mlflow.data.from_pandas(table, source=CodeDatasetSource(source_tags), name=name, digest=digest)
            self.mlflow.log_input(dataset, context=context)  # where MLflow infers the schema, and warns

    def flush(self) -> None:
        self.mlflow.flush_async_logging()

    def log_model(self, checkpoint_dir: str, score: float, tags: dict, rescore=None) -> dict | None:
        """Log the checkpoint as a pyfunc model (models-from-code) and register it; the new version
        takes alias `champion` by `promote_champion` (`score`: its selection metric, lower is better)."""
        self.flush()
        info = log_pyfunc_model(checkpoint_dir, self.registered_model_name if self.register_model else None)
        result = {"model_uri": info.model_uri}
        if self.register_model:
            version = str(info.registered_model_version)
            result["version"] = version
            result["champion"] = promote_champion(self.registered_model_name, version, score, tags, rescore)
        return result

    def end(self, status: str = "FINISHED") -> None:
        try:
            self.flush()
        finally:
            if self._owns_run and self.mlflow.active_run() is not None:
                self.mlflow.end_run(status=status)

    def run_status(self, run_id: str) -> str | None:
        from mlflow.exceptions import MlflowException

        try:
            return self.mlflow.MlflowClient().get_run(run_id).info.status
        except MlflowException:  # deleted, or logged to another tracking server
            return None


# ------------------------------------------------------------------ datasets


def dataset_description(data_cfg, train_patients, val_patients, split_fingerprint: str):
    """(name, source tags, table, digest) describing a run's data without a record: the source is the
    synthetic cohort's settings or the MIMIC folder's name (not its path), the table one row of
    aggregates per split, the digest a hash of the name, the split fingerprint and the table."""
    import hashlib
    from dataclasses import asdict
    from pathlib import PurePath

    import pandas as pd

    tags = {
        "data.source": data_cfg.source,
        "split_fingerprint": split_fingerprint,
        **{f"data.{k}": v for k, v in asdict(data_cfg).items() if k not in ("source", "path", "synthetic")},
    }
    if data_cfg.source == "synthetic":
        settings = asdict(data_cfg.synthetic)
        tags.update({f"synthetic.{k}": v for k, v in settings.items()}, generator="promptehr.cohort.sample_cohort")
        name = "synthetic " + " ".join(f"{k}={v}" for k, v in settings.items())
    else:
        folder = PurePath(str(data_cfg.path).rstrip("/")).name
        tags["folder"] = folder
        name = f"{data_cfg.source} {folder}"
    rows = []
    for split, patients in (("train", train_patients), ("validation", val_patients)):
        n_visits = sum(len(p.visits) for p in patients)
        n_codes = sum(p.n_codes for p in patients)
        rows.append(
            {
                "split": split,
                "patients": len(patients),
                "visits": n_visits,
                "codes": n_codes,
                "distinct_codes": len({c for p in patients for v in p.visits for c in v}),
                "visits_per_patient": n_visits / max(len(patients), 1),
                "codes_per_visit": n_codes / max(n_visits, 1),
                "female_share": sum(p.sex == "F" for p in patients) / max(len(patients), 1),
                "age_mean": sum(p.age for p in patients) / max(len(patients), 1),
            }
        )
    table = pd.DataFrame(rows)
    digest = hashlib.sha256(f"{name}|{split_fingerprint}|{table.to_json()}".encode()).hexdigest()[:8]
    return name, {k: str(v) for k, v in tags.items()}, table, digest
