"""The objective: trial -> config -> `train()` in a child MLflow run -> the best held-out next-visit NLL
(or, with --objective, validation loss or perplexity) over the trial's validations.

Every validation is reported to Optuna (`trial.report(value, epoch)`); when the pruner says so the
`on_validate` callback raises `TrainingPruned`, the child run ends KILLED and Optuna records the
trial as PRUNED. The trial's MLflow run id is kept in its user attrs (`mlflow_run_id`), so that a
trial whose worker died can have its run closed by whoever notices (tuning/storage.py).
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import optuna

from promptehr.train import TrainingPruned, train
from tuning import runs
from tuning.space import suggest, trial_config
from tuning.study import OBJECTIVES, StudySettings, TrialBudget

logger = logging.getLogger(__name__)


class BudgetSpent(Exception):
    """This worker's new trial came after the study's last slot was taken by another worker."""


class Objective:
    """Callable for `study.optimize`: trains one configuration and returns the value to minimise."""

    def __init__(self, study: optuna.Study):
        self.study_name = study.study_name
        self.settings = StudySettings.from_study(study)
        self.parent_run_id = study.user_attrs["mlflow_parent_run_id"]
        self.experiment_id = study.user_attrs["mlflow_experiment_id"]
        self.metric = OBJECTIVES[self.settings.objective]

    def __call__(self, trial: optuna.Trial) -> float:
        budget = TrialBudget(trial.study.user_attrs["n_trials"])  # re-read: a resumed study may get more
        if not budget.admits(trial.study, trial.number):
            trial.set_user_attr("over_budget", True)
            raise BudgetSpent(f"the study's {budget.n_trials} trials were all taken by other workers")
        values = suggest(trial, self.settings.space)
        base_dir = Path(self.settings.base_config["training"]["checkpoint_dir"])
        checkpoint_dir = (base_dir / "trials" / self.study_name / str(trial.number)).resolve()
        cfg = trial_config(self.settings.base_config, {**values, "training.checkpoint_dir": str(checkpoint_dir)})
        tracking = cfg.tracking
        tracker = runs.TrialTracker(tracking.tracking_uri, tracking.experiment_name,
                                    registered_model_name=tracking.registered_model_name, register_model=False,
                                    log_system_metrics=tracking.log_system_metrics)
        tags = {"optuna.study_name": self.study_name, "optuna.trial_number": trial.number}
        frozen = next(t for t in trial.study.get_trials(deepcopy=False) if t.number == trial.number)
        retry_of = frozen.system_attrs.get("failed_trial")  # set by RetryHeartbeatStaleTrialCallback
        if retry_of is not None:
            tags["optuna.retry_of"] = retry_of
        run_id = runs.start_trial_run(tracker.tracking_uri, self.parent_run_id, self.experiment_id, trial.number, tags)
        trial.set_user_attr("mlflow_run_id", run_id)
        logger.info("trial %d (run %s): %s", trial.number, run_id, values)

        best = math.inf

        def report(epoch: int, metrics: dict) -> None:
            nonlocal best
            value = metrics[self.metric]
            best = min(best, value)
            trial.report(value, metrics["epoch"])  # step = epochs trained (Hyperband's resource)
            if trial.should_prune():
                raise TrainingPruned(f"trial {trial.number} pruned after epoch {metrics['epoch']}: "
                                     f"{self.settings.objective} {value:.4f}")

        status, reason = "FAILED", None
        try:
            result = train(cfg, tracker, on_validate=report)
            if not math.isfinite(best):
                raise FloatingPointError(f"{self.settings.objective} is {best}")
            trial.set_user_attr("best_score", result["best_score"])
            trial.set_user_attr("protocol_id", result["protocol_id"])
            trial.set_user_attr("best_checkpoint", result["best_checkpoint"])
            status = "FINISHED"
            return best
        except TrainingPruned as exc:
            status = "KILLED"
            raise optuna.TrialPruned(str(exc)) from None
        except KeyboardInterrupt:
            status, reason = "KILLED", "interrupted"
            raise
        except Exception as exc:
            reason = f"{type(exc).__name__}: {exc}"
            trial.set_user_attr("failure_reason", reason[:1000])
            raise
        finally:
            runs.end_trial_run(status, reason)
