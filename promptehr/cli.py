"""Command line: `python -m promptehr.cli train|generate ...` (the MLproject entry points call these).

Entry points only parse arguments, build the tracker and call the package's functions. Exit status:
0 done, 1 failed (a diverged run too), 2 bad settings or data, 75 stopped by a signal with a checkpoint
to resume from (train.slurm requeues on it), 128+N stopped by signal N with nothing to resume.
"""

from __future__ import annotations

import argparse
import logging
import shlex
import sys

from promptehr.config import ConfigError, load_config
from promptehr.run_status import RunInterrupted, StopSignals, TrainingDiverged, end_run, outcome_of
from promptehr.schema import DataError


def setup_logging(level: str = "INFO") -> None:
    logging.basicConfig(level=getattr(logging, level.upper()), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("alembic", "mlflow.store", "urllib3", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _overrides(args) -> list[str]:
    out = []
    for text in args.overrides or []:
        out += shlex.split(text)
    epochs = getattr(args, "epochs", None)
    if epochs not in (None, ""):  # MLproject passes "" when -P epochs is not given
        out.append(f"training.num_epochs={int(epochs)}")
    return out


def cmd_train(args) -> int:
    from promptehr.tracking import MLflowTracker, Tracker
    from promptehr.train import train

    cfg = load_config(args.config, _overrides(args))
    tracker = Tracker() if args.no_tracking else MLflowTracker.from_config(cfg.tracking)
    result = train(cfg, tracker)
    best = result["best_metrics"]
    logging.getLogger("promptehr").info(
        "done: best val/%s %.4f at epoch %s (TPL %.2f, perplexity of unseen codes %.2f), checkpoint %s, run %s",
        result["selection_metric"], result["best_score"], best.get("epoch"), best.get("tpl", float("nan")),
        best.get("perplexity", float("nan")), result["best_checkpoint"], result["run_id"])
    return 0


def _checkpoint_folder(model: str, tmp: str) -> str:
    """A checkpoint folder as given, or the one inside a logged model (`models:/promptehr@champion`, `runs:/...`)."""
    if model.startswith(("models:/", "runs:/")) or "://" in model:
        from promptehr.registry import download_model_checkpoint
        from promptehr.tracking import resolve_tracking_uri

        return str(download_model_checkpoint(model, tmp, resolve_tracking_uri(None)))
    return model


def _sampling(args):
    from promptehr.generate import SamplingConfig

    return SamplingConfig(temperature=float(args.temperature), top_k=int(args.top_k), top_p=float(args.top_p),
                          max_visits=int(args.max_visits))


def cmd_generate(args) -> int:
    import os
    import tempfile
    from pathlib import Path

    from promptehr.checkpoint import load_checkpoint
    from promptehr.export import export_patients
    from promptehr.generate import generate_patients, sample_demographics
    from promptehr.train import resolve_device

    log = logging.getLogger("promptehr")
    sampling = _sampling(args)
    with tempfile.TemporaryDirectory() as tmp:
        model, tokenizer, _, metadata = load_checkpoint(_checkpoint_folder(args.model, tmp), resolve_device(args.device))
    if "demographics" not in metadata:
        raise FileNotFoundError(f"{args.model}: its checkpoint holds no demographics histogram (trained before it "
                                "was stored); generate through predict() with explicit ages and sexes instead")
    n = int(args.n_patients)
    ages, sexes = sample_demographics(metadata["demographics"], n, seed=int(args.seed))
    patients = generate_patients(model, tokenizer, ages, sexes, sampling, seed=int(args.seed),
                                 batch_size=int(args.batch_size), progress=True)
    if args.format == "meds":
        from promptehr.meds import export_meds

        paths = export_meds(patients, args.out, seed=int(args.seed), generating_model={
            "model": args.model, "run_id": metadata.get("run_id"), "data_source": metadata.get("data_source"),
            "seed": int(args.seed), "sampling": vars(sampling)})
    else:
        paths = export_patients(patients, args.out, seed=int(args.seed))
    n_visits = sum(len(p.visits) for p in patients)
    summary = {"gen/n_patients": n, "gen/visits_per_patient": n_visits / max(n, 1),
               "gen/codes_per_visit": sum(len(v) for p in patients for v in p.visits) / max(n_visits, 1)}
    log.info("generated %d patients, %d visits (%.2f per patient), %.2f codes per visit -> %s", n, n_visits,
             summary["gen/visits_per_patient"], summary["gen/codes_per_visit"], ", ".join(str(p) for p in paths.values()))
    if os.environ.get("MLFLOW_RUN_ID"):  # `mlflow run -e generate` made a run for this: it records the cohort's counts
        from promptehr.tracking import MLflowTracker

        tracker = MLflowTracker(register_model=False)
        tracker.start()
        tracker.set_tags({"task": "generate", "output": str(Path(args.out).resolve())})
        tracker.log_metrics(summary, step=0)
        tracker.end()
    return 0


def cmd_evaluate(args) -> int:
    import json
    import tempfile
    from pathlib import Path

    from promptehr.checkpoint import load_checkpoint
    from promptehr.config import to_yaml
    from promptehr.data import held_out_subject_ids, load_patients, split_for_training
    from promptehr.report import log_quality_report, plot_report, quality_report
    from promptehr.tracking import MLflowTracker, Tracker
    from promptehr.train import resolve_device, split_fingerprint
    from promptehr.validation import ValidationProtocol
    from promptehr.validation import protocol_id as validation_id

    def model_device(m):
        return next(m.parameters()).device

    log = logging.getLogger("promptehr")
    sampling = _sampling(args)
    with tempfile.TemporaryDirectory() as tmp:
        model, tokenizer, ckpt_cfg, metadata = load_checkpoint(_checkpoint_folder(args.model, tmp), resolve_device(args.device))
        if args.config:  # e.g. experiments/mimic3.yaml with data.path: the data the model was trained on
            cfg = load_config(args.config, _overrides(args))
        else:
            saved = Path(tmp) / "checkpoint_config.yaml"
            saved.write_text(to_yaml(ckpt_cfg))
            cfg = load_config(saved, _overrides(args))
    patients, _, _ = load_patients(cfg.data)
    train_patients, heldout = split_for_training(patients, cfg.data)
    same_split = split_fingerprint(train_patients, heldout, held_out_subject_ids(cfg.data)) == metadata.get("split_fingerprint")
    if not same_split:
        log.warning("the data split differs from the one the model was trained on: privacy figures compare with "
                    "patients that are not its training set")
    tracker = Tracker() if args.no_tracking else MLflowTracker(
        cfg.tracking.tracking_uri, cfg.tracking.experiment_name, run_name=args.run_name, register_model=False)
    tracker.start()
    error = None
    try:
        tracker.set_tags({"task": "quality_report", "evaluated_model": args.model, "same_split": same_split,
                          "model_run_id": metadata.get("run_id") or "unknown", "data.source": cfg.data.source})
        tracker.log_dataset(cfg.data, train_patients, heldout,
                            split_fingerprint(train_patients, heldout, held_out_subject_ids(cfg.data)), "evaluation")
        tracker.log_params({"n_patients": int(args.n_patients), "released_patients": int(args.released_patients),
                            "seed": int(args.seed), **{
            f"sampling.{k}": v for k, v in vars(sampling).items()}})
        metrics, report = quality_report(model, tokenizer, train_patients, heldout, n_patients=int(args.n_patients),
                                         seed=int(args.seed), sampling=sampling, prompt_prob=ckpt_cfg.validation.prompt_prob,
                                         max_length=ckpt_cfg.collator.max_length, progress=True,
                                         released_patients=int(args.released_patients))
        log_quality_report(tracker, metrics, report)
        validation = ValidationProtocol(cfg, tokenizer, train_patients, heldout).evaluate(model, model_device(model))
        tracker.set_tags({"protocol_id": validation_id(cfg, train_patients, heldout)})
        tracker.log_metrics({f"val/{k}": v for k, v in validation.items()}, step=0)
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "quality.json").write_text(json.dumps(report, indent=1))
        (out / "validation.json").write_text(json.dumps(
            {**validation, "protocol_id": validation_id(cfg, train_patients, heldout)}, indent=1))
        plot_report(report, out)
    except BaseException as exc:  # a stop signal included: the run ends KILLED
        error = exc
        raise
    finally:
        end_run(tracker, outcome_of(error))
    for key in sorted(metrics):
        log.info("gen/%s = %.4g", key, metrics[key])
    log.info("report written to %s", out)
    return 0


def _add_sampling_args(p) -> None:
    p.add_argument("--temperature", default=1.0, type=float, help="softmax temperature (default 1.0)")
    p.add_argument("--top-k", default=0, type=int, help="keep the k most likely tokens (0: off)")
    p.add_argument("--top-p", default=1.0, type=float, help="nucleus sampling mass (1.0: off)")
    p.add_argument("--max-visits", default=20, type=int, help="end a patient the model has not ended by then")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="promptehr", description=__doc__)
    parser.add_argument("--log-level", default="INFO")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train one model (tracked in MLflow)")
    p.add_argument("--config", default="experiments/base.yaml", help="YAML config (default: experiments/base.yaml)")
    p.add_argument("--epochs", default=None, help="training.num_epochs (empty: the config's)")
    p.add_argument("--overrides", action="append", default=[],
                   help='dotted overrides, e.g. "training.learning_rate=3e-4 data.source=mimic3" (repeatable)')
    p.add_argument("--no-tracking", action="store_true", help="do not log to MLflow")
    p.set_defaults(func=cmd_train)

    model_help = "checkpoint folder or logged model URI (models:/promptehr@champion, runs:/<id>/model)"
    p = sub.add_parser("generate", help="generate synthetic patients as MIMIC-III CSV tables or a MEDS dataset, and patients.jsonl")
    p.add_argument("--model", default="models:/promptehr@champion", help=model_help)
    p.add_argument("--n-patients", default=1000, type=int)
    p.add_argument("--seed", default=0, type=int, help="seeds demographics, sampling and the synthetic dates")
    p.add_argument("--out", default="outputs/synthetic", help="folder for PATIENTS.csv, ADMISSIONS.csv, DIAGNOSES_ICD.csv "
                   "(--format meds: data/, metadata/) and patients.jsonl")
    p.add_argument("--format", default="mimic3", choices=("mimic3", "meds"),
                   help="mimic3: MIMIC-III CSV tables (default); meds: a MEDS dataset that data.source=meds reads")
    p.add_argument("--batch-size", default=256, type=int, help="patients generated together")
    _add_sampling_args(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("evaluate", help="quality report: a generated cohort against held-out patients (tracked in MLflow)")
    p.add_argument("--model", default="models:/promptehr@champion", help=model_help)
    p.add_argument("--config", default=None, help="config naming the data (default: the checkpoint's own)")
    p.add_argument("--overrides", action="append", default=[], help='dotted overrides, e.g. "data.path=/data/mimic-iii"')
    p.add_argument("--n-patients", default=500, type=int, help="held-out patients (and as many generated)")
    p.add_argument("--released-patients", default=5000, type=int,
                   help="generated from the training demographics for utility and privacy attacks (and the cap of each utility split)")
    p.add_argument("--seed", default=0, type=int)
    p.add_argument("--out", default="outputs/quality", help="folder for quality.json and the plots")
    p.add_argument("--run-name", default="quality-report")
    p.add_argument("--no-tracking", action="store_true", help="do not log to MLflow")
    _add_sampling_args(p)
    p.set_defaults(func=cmd_evaluate)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging(args.log_level)
    try:
        with StopSignals(at_once=True):  # outside train()'s safe points a stop signal ends the command at once
            return args.func(args)
    except (ConfigError, DataError, FileNotFoundError) as exc:
        logging.getLogger("promptehr").error("%s", exc)
        return 2
    except (RunInterrupted, TrainingDiverged) as exc:  # one line, no traceback
        outcome = outcome_of(exc)
        logging.getLogger("promptehr").error("%s", outcome.reason)
        return outcome.exit_code


if __name__ == "__main__":
    sys.exit(main())
