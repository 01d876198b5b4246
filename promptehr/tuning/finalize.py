"""The end of a study: best value and parameters, Optuna's plots and the champion, in the parent run.

The best trial's best checkpoint is logged as a pyfunc model in the parent run and registered as a
version of the registered model; it takes alias `champion` only if it beats the current champion on
the same data (`promptehr.registry.promote_champion`). Running it again (a resumed study) adds
points to the counts and registers a new version only if the best trial changed.
"""

from __future__ import annotations

import json
import logging
import tempfile
import warnings
from pathlib import Path

import optuna
from optuna.trial import TrialState

from promptehr.checkpoint import read_metadata
from promptehr.tuning import runs
from promptehr.tuning.study import StudySettings, TrialBudget

logger = logging.getLogger(__name__)

PLOTS = {
    "optimization_history": "plot_optimization_history",
    "param_importances": "plot_param_importances",
    "parallel_coordinate": "plot_parallel_coordinate",
    "intermediate_values": "plot_intermediate_values",
}


def save_plots(study: optuna.Study, folder: Path) -> list[Path]:
    """Optuna's matplotlib plots as PNGs; a plot that needs more trials than there are is skipped."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as optuna_plots

    saved = []
    for name, function in PLOTS.items():
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the matplotlib backend is experimental
                ax = getattr(optuna_plots, function)(study)
            figure = (ax.flat[0] if hasattr(ax, "flat") else ax).figure
            path = folder / f"{name}.png"
            figure.savefig(path, dpi=110, bbox_inches="tight")
            plt.close(figure)
            saved.append(path)
        except Exception as exc:  # e.g. importances need 2+ complete trials with varying parameters
            logger.warning("no %s plot: %s", name, exc)
    return saved


def finalize(study: optuna.Study) -> dict:
    """Log the study's outcome to its parent run, register the best checkpoint, end the parent run."""
    settings = StudySettings.from_study(study)
    uri = study.user_attrs["mlflow_tracking_uri"]
    parent = study.user_attrs["mlflow_parent_run_id"]
    trials = study.get_trials(deepcopy=False)
    finished = TrialBudget(study.user_attrs["n_trials"]).finished(study)
    counts = {
        state: sum(t.state == getattr(TrialState, state.upper()) for t in finished)
        for state in ("complete", "pruned", "fail")
    }
    summary = {
        "study_name": study.study_name,
        "n_trials": study.user_attrs["n_trials"],
        "n_finished": len(finished),
        **{f"n_{k}": v for k, v in counts.items()},
    }
    if len(finished) < summary["n_trials"]:
        logger.warning(
            "study %s: only %d of %d trials finished (%d running or waiting)",
            study.study_name,
            len(finished),
            summary["n_trials"],
            sum(t.state in (TrialState.RUNNING, TrialState.WAITING) for t in trials),
        )
    metrics = {f"trials/{k}": v for k, v in counts.items()}
    tags: dict = {"optuna.n_trials": summary["n_trials"]}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        artifacts = {str(p): "plots" for p in save_plots(study, tmp)}
        study.trials_dataframe().to_csv(tmp / "trials.csv", index=False)
        artifacts[str(tmp / "trials.csv")] = "study"
        if counts["complete"]:
            best = study.best_trial
            summary.update(best_trial=best.number, best_value=best.value, best_params=best.params)
            metrics[f"best/{settings.objective}"] = best.value
            tags.update(
                {
                    "best_trial": best.number,
                    "best_trial_run_id": best.user_attrs.get("mlflow_run_id", ""),
                    **{f"best_params.{k}": v for k, v in best.params.items()},
                }
            )
            (tmp / "best_params.json").write_text(
                json.dumps({"trial": best.number, settings.objective: best.value, "params": best.params}, indent=2)
            )
            artifacts[str(tmp / "best_params.json")] = "study"
            logger.info(
                "study %s: best trial %d, %s %.4f, %s",
                study.study_name,
                best.number,
                settings.objective,
                best.value,
                best.params,
            )
        else:
            logger.warning("study %s has no complete trial: no best value, no model", study.study_name)
        runs.log_study_summary(uri, parent, metrics, tags, artifacts, step=len(finished))
    if counts["complete"]:
        summary["model"] = register_best(study, settings, uri, parent)
    runs.finish_run(uri, parent)
    return summary


def lazy_scorer(checkpoint: str, metric: str):
    """score(folder): a checkpoint's `metric` on the validation protocol of `checkpoint`'s own config
    and data; the data are loaded only if the champion gate needs to re-score (rarely)."""

    def score(folder) -> float:
        from promptehr.checkpoint import load_checkpoint, load_config_from_checkpoint
        from promptehr.data import load_patients, split_patients
        from promptehr.tokenizer import DiagnosisCodeTokenizer
        from promptehr.validation import ValidationProtocol

        cfg = load_config_from_checkpoint(checkpoint)
        patients, _, _ = load_patients(cfg.data)
        train, val = split_patients(patients, cfg.data.val_fraction, cfg.data.split_seed)
        tokenizer = DiagnosisCodeTokenizer.load(Path(checkpoint) / "vocab.json")
        model = load_checkpoint(folder)[0]
        return ValidationProtocol(cfg, tokenizer, train, val).evaluate(model, "cpu", jaccard=False)[metric]

    return score


def register_best(study: optuna.Study, settings: StudySettings, uri: str, parent: str) -> dict | None:
    best = study.best_trial
    tracking = settings.config.tracking
    checkpoint = best.user_attrs.get("best_checkpoint")
    if not tracking.register_model:
        return None
    if not checkpoint or not Path(checkpoint).exists():
        logger.warning("best trial %d has no checkpoint at %s: nothing to register", best.number, checkpoint)
        return None
    done = study.user_attrs.get("registered_trial")
    if done is not None and done.get("trial") == best.number:
        logger.info("best trial %d was registered already (version %s)", best.number, done.get("version"))
        return done
    meta = read_metadata(checkpoint)
    model = runs.log_champion(
        uri,
        parent,
        checkpoint,
        tracking.registered_model_name,
        float(meta["best_score"]),
        {
            "data_source": meta["data_source"],
            "data_fingerprint": meta["data_fingerprint"],
            "protocol_id": meta["protocol_id"],
            "selection_metric": meta["selection_metric"],
            "val_loss": meta.get("best_metrics", {}).get("loss"),
            "run_id": best.user_attrs.get("mlflow_run_id", ""),
            "optuna.study_name": study.study_name,
            "optuna.trial_number": best.number,
        },
        rescore=lazy_scorer(checkpoint, meta["selection_metric"]),
    )
    study.set_user_attr("registered_trial", {"trial": best.number, **model})
    runs.log_study_summary(uri, parent, {}, {"registered_version": model["version"], "champion": model["champion"]}, {}, 0)
    return model
