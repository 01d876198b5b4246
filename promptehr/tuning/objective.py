"""The objective: trial -> config -> `train()` in a child MLflow run -> the best held-out next-visit NLL
(or, with --objective, validation loss or perplexity) over the trial's validations.

Every validation is reported to Optuna (`trial.report(value, epoch)`); when the pruner says so the
`on_validate` callback raises `TrainingPruned`, the child run ends KILLED and Optuna records the
trial as PRUNED. A divergence fails the trial at once (its reason in `failure_reason`). On a stop
signal the trial is recorded FAIL with `resumable` and re-queued under a new number (storage.py
`requeue`), and the worker stops; a retry (also of a trial whose worker died) resumes the first
attempt's newest checkpoint (`training.resume_from=auto` in its folder) and reopens its MLflow run.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import optuna

from promptehr.run_status import RunInterrupted, outcome_of
from promptehr.train import TrainingPruned, train
from promptehr.tuning import runs
from promptehr.tuning.space import suggest, trial_config
from promptehr.tuning.storage import requeue
from promptehr.tuning.study import OBJECTIVES, StudySettings, TrialBudget

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
        frozen = next(t for t in trial.study.get_trials(deepcopy=False) if t.number == trial.number)
        retry_of = frozen.system_attrs.get("failed_trial")  # set by `requeue`: the first attempt's number
        overrides = {
            **values,
            "training.checkpoint_dir": str(self.checkpoint_dir(retry_of if retry_of is not None else trial.number)),
        }
        tags = {"optuna.study_name": self.study_name, "optuna.trial_number": trial.number}
        resume_run_id = None
        if retry_of is not None:  # continue the first attempt: its checkpoint folder, its MLflow run
            overrides["training.resume_from"] = "auto"
            tags["optuna.retry_of"] = retry_of
            resume_run_id = frozen.user_attrs.get("mlflow_run_id")  # copied from the attempt it retries
        cfg = trial_config(self.settings.base_config, overrides)
        tracking = cfg.tracking
        tracker = runs.TrialTracker(
            tracking.tracking_uri,
            tracking.experiment_name,
            registered_model_name=tracking.registered_model_name,
            register_model=False,
            log_system_metrics=tracking.log_system_metrics,
        )
        run_id = runs.start_trial_run(
            tracker.tracking_uri, self.parent_run_id, self.experiment_id, trial.number, tags, resume_run_id
        )
        trial.set_user_attr("mlflow_run_id", run_id)
        logger.info(
            "trial %d (run %s)%s: %s",
            trial.number,
            run_id,
            f", retrying trial {retry_of}" if retry_of is not None else "",
            values,
        )

        best = min(frozen.intermediate_values.values(), default=math.inf)  # a retry inherits the reports so far

        def report(epoch: int, metrics: dict) -> None:
            nonlocal best
            value = metrics[self.metric]
            best = min(best, value)
            trial.report(value, metrics["epoch"])  # step = epochs trained (Hyperband's resource)
            if trial.should_prune():
                raise TrainingPruned(
                    f"trial {trial.number} pruned after epoch {metrics['epoch']}: {self.settings.objective} {value:.4f}"
                )

        error = None
        try:
            result = train(cfg, tracker, on_validate=report)
            if not math.isfinite(best):
                raise FloatingPointError(f"{self.settings.objective} is {best}")
            trial.set_user_attr("best_score", result["best_score"])
            trial.set_user_attr("protocol_id", result["protocol_id"])
            trial.set_user_attr("best_checkpoint", result["best_checkpoint"])
            return best
        except TrainingPruned as exc:
            error = exc
            raise optuna.TrialPruned(str(exc)) from None
        except RunInterrupted as exc:
            error = exc
            self.hand_back(trial, exc)
            raise
        except BaseException as exc:
            error = exc
            trial.set_user_attr("failure_reason", outcome_of(exc).reason[:1000])
            raise
        finally:
            runs.end_trial_run(outcome_of(error))

    def checkpoint_dir(self, number: int) -> Path:
        base_dir = Path(self.settings.base_config["training"]["checkpoint_dir"])
        return (base_dir / "trials" / self.study_name / str(number)).resolve()

    @staticmethod
    def hand_back(trial: optuna.Trial, exc: RunInterrupted) -> None:
        """A stop signal: re-queue the trial (a new number resumes its checkpoint) and say why this one failed."""
        outcome = outcome_of(exc)
        if outcome.resumable:
            requeue(trial.study, next(t for t in trial.study.get_trials(deepcopy=False) if t.number == trial.number))
            logger.warning(
                "trial %d stopped by %s; re-queued to resume from %s", trial.number, exc.signal_name, exc.checkpoint
            )
        trial.set_user_attr("resumable", outcome.resumable)  # after requeue: the retry copies the user attrs
        trial.set_user_attr("failure_reason", outcome.reason[:1000])
