"""Command line: `promptehr train | generate | evaluate | tune | bench ...` (also `python -m promptehr.cli`;
the MLproject entry points, train.slurm and tuning/search.py call it).

Entry points only parse arguments, build the tracker and call the package's functions. Every command
reads a config the same way (`--config` plus dotted `--overrides`, `add_config_arguments`), logs the
same way (`setup_logging`) and ends the same way: exit status 0 done, 1 failed (a diverged run too),
2 bad settings or data, 75 stopped by a signal with a checkpoint to resume from (train.slurm
requeues on it), 128+N stopped by signal N with nothing to resume.
"""

from __future__ import annotations

import argparse
import ast
import logging
import os
import shlex
import subprocess
import sys
from pathlib import Path

from promptehr.config import Config, ConfigError, check_config, load_config
from promptehr.run_status import EXIT_RESUMABLE, RunInterrupted, StopSignals, TrainingDiverged, end_run, outcome_of
from promptehr.schema import DataError

log = logging.getLogger("promptehr")
BENCH_DIR = Path(__file__).resolve().parents[1] / "bench"  # the benchmarks of a source checkout


def setup_logging(level: str = "INFO") -> None:
    """The one logging setup of every command and benchmark: `time LEVEL logger: message` on stderr."""
    logging.basicConfig(
        level=getattr(logging, level.upper()),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    for noisy in ("alembic", "mlflow.store", "urllib3", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


# ------------------------------------------------------------------ the config of a command


def _epochs(text: str) -> int | None:
    return None if text == "" else int(text)  # MLproject passes "" when -P epochs is not given


def add_config_arguments(
    parser, default_config: str | None = None, *, config_help: str | None = None, config: bool = True, epochs: bool = False
) -> None:
    """`--config` (YAML, default `default_config`), repeatable `--overrides "a.b=1 c.d=x"` and, with
    `epochs`, `--epochs N` (training.num_epochs): how every command and benchmark names its config."""
    if config:
        parser.add_argument(
            "--config", default=default_config, help=config_help or f"YAML config (default: {default_config})"
        )
    parser.add_argument(
        "--overrides",
        action="append",
        default=[],
        help='dotted overrides, e.g. "training.learning_rate=3e-4 data.source=mimic3" (repeatable)',
    )
    if epochs:
        parser.add_argument(
            "--epochs", dest="num_epochs", default=None, type=_epochs, help="training.num_epochs (default: the config's)"
        )


def overrides_of(args) -> list[str]:
    """The dotted overrides of `add_config_arguments`' options, `--epochs` last."""
    out = [override for text in args.overrides or [] for override in shlex.split(text)]
    if getattr(args, "num_epochs", None) is not None:
        out.append(f"training.num_epochs={args.num_epochs}")
    return out


def config_of(args, default: str | Path | None = None) -> Config:
    """The config `--config` (else `default`) names, with the overrides applied; a bad key or value
    raises ConfigError naming it (the command exits 2 with that one line)."""
    return load_config(args.config or default, overrides_of(args))


# ------------------------------------------------------------------ train, generate, evaluate


def cmd_train(args) -> int:
    cfg = config_of(args)
    check_config(cfg)  # train() checks again; here a bad value stops before torch is even imported

    from promptehr.tracking import MLflowTracker, Tracker
    from promptehr.train import train

    tracker = Tracker() if args.no_tracking else MLflowTracker.from_config(cfg.tracking)
    result = train(cfg, tracker)
    best = result["best_metrics"]
    log.info(
        "done: best val/%s %.4f at epoch %s (TPL %.2f, perplexity of unseen codes %.2f), checkpoint %s, run %s",
        result["selection_metric"],
        result["best_score"],
        best.get("epoch"),
        best.get("tpl", float("nan")),
        best.get("perplexity", float("nan")),
        result["best_checkpoint"],
        result["run_id"],
    )
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

    return SamplingConfig(
        temperature=float(args.temperature), top_k=int(args.top_k), top_p=float(args.top_p), max_visits=int(args.max_visits)
    )


def cmd_generate(args) -> int:
    import tempfile

    from promptehr.checkpoint import load_checkpoint
    from promptehr.engine import resolve_device
    from promptehr.export import export_patients
    from promptehr.generate import generate_patients, sample_demographics

    sampling = _sampling(args)
    with tempfile.TemporaryDirectory() as tmp:
        model, tokenizer, _, metadata = load_checkpoint(_checkpoint_folder(args.model, tmp), resolve_device(args.device))
    if "demographics" not in metadata:
        raise FileNotFoundError(
            f"{args.model}: its checkpoint holds no demographics histogram (trained before it "
            "was stored); generate through predict() with explicit ages and sexes instead"
        )
    n = int(args.n_patients)
    ages, sexes = sample_demographics(metadata["demographics"], n, seed=int(args.seed))
    patients = generate_patients(
        model, tokenizer, ages, sexes, sampling, seed=int(args.seed), batch_size=int(args.batch_size), progress=True
    )
    if args.format == "meds":
        from promptehr.meds import export_meds

        paths = export_meds(
            patients,
            args.out,
            seed=int(args.seed),
            generating_model={
                "model": args.model,
                "run_id": metadata.get("run_id"),
                "data_source": metadata.get("data_source"),
                "seed": int(args.seed),
                "sampling": vars(sampling),
            },
        )
    else:
        paths = export_patients(patients, args.out, seed=int(args.seed))
    n_visits = sum(len(p.visits) for p in patients)
    summary = {
        "gen/n_patients": n,
        "gen/visits_per_patient": n_visits / max(n, 1),
        "gen/codes_per_visit": sum(len(v) for p in patients for v in p.visits) / max(n_visits, 1),
    }
    log.info(
        "generated %d patients, %d visits (%.2f per patient), %.2f codes per visit -> %s",
        n,
        n_visits,
        summary["gen/visits_per_patient"],
        summary["gen/codes_per_visit"],
        ", ".join(str(p) for p in paths.values()),
    )
    if os.environ.get("MLFLOW_RUN_ID"):  # `mlflow run -e generate` made a run for this: it records the cohort's counts
        from promptehr.tracking import MLflowTracker

        tracker = MLflowTracker(register_model=False)
        tracker.start()
        tracker.set_tags({"task": "generate", "output": str(Path(args.out).resolve())})
        tracker.log_metrics(summary, step=0)
        tracker.end()
    return 0


def cmd_evaluate(args) -> int:
    from promptehr.tracking import MLflowTracker, Tracker

    _sampling(args)  # bad sampling settings fail before anything is loaded
    model, tokenizer, ckpt_cfg, metadata, cfg = _evaluated_model(args)
    split = _evaluation_split(cfg, metadata)
    tracker = (
        Tracker()
        if args.no_tracking
        else MLflowTracker(
            cfg.tracking.tracking_uri, cfg.tracking.experiment_name, run_name=args.run_name, register_model=False
        )
    )
    tracker.start()
    error = None
    try:
        metrics = _evaluate(args, tracker, model, tokenizer, ckpt_cfg, metadata, cfg, split)
    except BaseException as exc:  # a stop signal included: the run ends KILLED
        error = exc
        raise
    finally:
        end_run(tracker, outcome_of(error))
    for key in sorted(metrics):
        log.info("gen/%s = %.4g", key, metrics[key])
    log.info("report written to %s", args.out)
    return 0


def _evaluated_model(args):
    """The checkpoint (a folder or models:/ URI) and the config to evaluate it with: --config, or the
    checkpoint's own config with --overrides applied."""
    import tempfile

    from promptehr.checkpoint import load_checkpoint
    from promptehr.config import to_yaml
    from promptehr.engine import resolve_device

    with tempfile.TemporaryDirectory() as tmp:
        model, tokenizer, ckpt_cfg, metadata = load_checkpoint(
            _checkpoint_folder(args.model, tmp), resolve_device(args.device)
        )
        if args.config:  # e.g. experiments/mimic3.yaml with data.path: the data the model was trained on
            cfg = config_of(args)
        else:
            saved = Path(tmp) / "checkpoint_config.yaml"
            saved.write_text(to_yaml(ckpt_cfg))
            cfg = config_of(args, default=saved)
    return model, tokenizer, ckpt_cfg, metadata, cfg


def _evaluation_split(cfg, metadata) -> dict:
    """The (train, held-out) patients of `cfg`, their fingerprint, and whether they are the split the
    model was trained on (privacy figures mean little otherwise: said in the log and the run's tags)."""
    from promptehr.data import held_out_subject_ids, load_patients, split_fingerprint, split_for_training

    patients, _, _ = load_patients(cfg.data)
    train_patients, heldout = split_for_training(patients, cfg.data)
    fingerprint = split_fingerprint(train_patients, heldout, held_out_subject_ids(cfg.data))
    same_split = fingerprint == metadata.get("split_fingerprint")
    if not same_split:
        log.warning(
            "the data split differs from the one the model was trained on: privacy figures compare with "
            "patients that are not its training set"
        )
    return {"train": train_patients, "heldout": heldout, "fingerprint": fingerprint, "same_split": same_split}


def _evaluate(args, tracker, model, tokenizer, ckpt_cfg, metadata, cfg, split) -> dict:
    """The quality report and the validation protocol's metrics of `model`, logged to `tracker` and
    written to --out (quality.json, validation.json, plots); returns the report's metrics."""
    import json

    from promptehr.report import log_quality_report, plot_report, quality_report
    from promptehr.validation import ValidationProtocol
    from promptehr.validation import protocol_id as validation_id

    train_patients, heldout = split["train"], split["heldout"]
    sampling = _sampling(args)
    tracker.set_tags(
        {
            "task": "quality_report",
            "evaluated_model": args.model,
            "same_split": split["same_split"],
            "model_run_id": metadata.get("run_id") or "unknown",
            "data.source": cfg.data.source,
        }
    )
    tracker.log_dataset(cfg.data, train_patients, heldout, split["fingerprint"], "evaluation")
    tracker.log_params(
        {
            "n_patients": int(args.n_patients),
            "released_patients": int(args.released_patients),
            "seed": int(args.seed),
            **{f"sampling.{k}": v for k, v in vars(sampling).items()},
        }
    )
    metrics, report = quality_report(
        model,
        tokenizer,
        train_patients,
        heldout,
        n_patients=int(args.n_patients),
        seed=int(args.seed),
        sampling=sampling,
        prompt_prob=ckpt_cfg.validation.prompt_prob,
        max_length=ckpt_cfg.collator.max_length,
        progress=True,
        released_patients=int(args.released_patients),
    )
    log_quality_report(tracker, metrics, report)
    protocol = validation_id(cfg, train_patients, heldout)
    validation = ValidationProtocol(cfg, tokenizer, train_patients, heldout).evaluate(model, next(model.parameters()).device)
    tracker.set_tags({"protocol_id": protocol})
    tracker.log_metrics({f"val/{k}": v for k, v in validation.items()}, step=0)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "quality.json").write_text(json.dumps(report, indent=1))
    (out / "validation.json").write_text(json.dumps({**validation, "protocol_id": protocol}, indent=1))
    plot_report(report, out)
    return metrics


# ------------------------------------------------------------------ tune


TUNE_STUDY_OPTIONS = ("config", "overrides", "space", "n_trials", "objective", "pruner", "seed")
TUNE_OPTIONS = {
    "run": (*TUNE_STUDY_OPTIONS, "n_workers"),
    "init": TUNE_STUDY_OPTIONS,
    "worker": ("worker_id",),
    "finalize": (),
}


def cmd_tune(args) -> int:
    from promptehr.tuning import search

    given = {
        name: overrides_of(args) if name == "overrides" else getattr(args, name)
        for name in ("n_workers", "worker_id", *TUNE_STUDY_OPTIONS)
    }
    misplaced = [name for name, value in given.items() if name not in TUNE_OPTIONS[args.step] and value not in (None, [])]
    if misplaced:
        options = ", ".join("--" + name.replace("_", "-") for name in misplaced)
        raise ConfigError(
            f"promptehr tune {args.step} does not take {options} "
            "(the study's settings go to run or init, --worker-id to worker)"
        )
    try:
        if args.step in ("worker", "finalize"):
            return search.worker(args) if args.step == "worker" else search.finalize(args)
        cfg = config_of(args, default=search.DEFAULT_CONFIG)
        settings = {
            "base_config": args.config or given["overrides"],
            "space": args.space,
            "objective": args.objective,
            "pruner": args.pruner,
            "seed": args.seed is not None,
            "n_trials": args.n_trials,
        }
        explicit = {name for name, value in settings.items() if value}
        if args.step == "init":
            search.init(args, cfg, explicit)
            return 0
        return search.run(args, cfg, explicit)
    except RunInterrupted as exc:
        if args.step not in ("run", "worker"):
            raise
        # the study goes on: the trial was re-queued; search.sbatch requeues on this status
        log.error("worker %s; the study continues when a worker starts again", exc)
        return EXIT_RESUMABLE


def add_tune_parser(sub, log_level) -> None:
    p = sub.add_parser(
        "tune",
        parents=[log_level],
        help="Optuna study over promptehr/tuning/space.yaml, every trial a child MLflow run",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="""\
Optuna study over promptehr/tuning/space.yaml, every trial a train() in a child MLflow run.

    promptehr tune --config experiments/base.yaml --n-trials 20            # sqlite:///optuna.db
    promptehr tune --n-workers 4 --storage journal:./optuna_journal.log     # one worker per GPU
    promptehr tune init|worker|finalize --storage postgresql+psycopg2://... # Slurm: tuning/slurm/

Without a step: `init` (create or resume the study and its MLflow parent run), workers until the
study's trial budget is spent (`--n-workers` processes, or this one), then `finalize` (best value
and parameters, plots and the registered champion in the parent run).""",
    )
    p.add_argument(
        "step",
        nargs="?",
        choices=("run", "init", "worker", "finalize"),
        default="run",
        help="run (default): init + workers + finalize",
    )
    g = p.add_argument_group("storage (every step)")
    g.add_argument(
        "--storage",
        default="sqlite:///optuna.db",
        help="sqlite:///optuna.db (one worker), journal:./optuna_journal.log (one machine), "
        "postgresql+psycopg2://user@host/db (a cluster)",
    )
    g.add_argument("--study-name", default="promptehr")
    g.add_argument(
        "--heartbeat-interval", type=int, default=60, help="seconds between a running trial's heartbeats (RDB storages)"
    )
    g.add_argument("--grace-period", type=int, default=180, help="seconds without heartbeat before a trial is re-queued")
    g = p.add_argument_group("the study's settings (run, init)")
    add_config_arguments(g, config_help="base config (default: experiments/base.yaml)")
    g.add_argument("--space", default=None, help="search space YAML (default: promptehr/tuning/space.yaml)")
    g.add_argument("--n-trials", type=int, default=None, help="trial budget of the study, across all workers (default 20)")
    g.add_argument(
        "--objective",
        choices=("val_next_visit_nll", "val_loss", "val_perplexity"),
        default=None,
        help="minimised; default val_next_visit_nll (what the best checkpoint and champion are chosen by)",
    )
    g.add_argument("--pruner", choices=("median", "hyperband", "none"), default=None, help="default median")
    g.add_argument("--seed", type=int, default=None, help="sampler seed (worker i uses seed + i)")
    g = p.add_argument_group("run")
    g.add_argument("--n-workers", type=int, default=None, help="worker processes on this machine (one per GPU; default 1)")
    g = p.add_argument_group("worker")
    g.add_argument(
        "--worker-id", type=int, default=None, help="seeds this worker's sampler (default: $SLURM_ARRAY_TASK_ID or 0)"
    )
    p.set_defaults(func=cmd_tune)


# ------------------------------------------------------------------ bench


def bench_scripts() -> dict[str, str]:
    """name -> the first paragraph of its docstring, for every bench/NAME.py of the source checkout."""

    def summary(path: Path) -> str:
        first = (ast.get_docstring(ast.parse(path.read_text())) or "").split("\n\n")[0]
        return " ".join(first.split()).replace(" (a benchmark that prints figures)", "")

    return {path.stem: summary(path) for path in sorted(BENCH_DIR.glob("*.py"))} if BENCH_DIR.is_dir() else {}


def bench_description() -> str:
    scripts = bench_scripts()
    if not scripts:
        return f"Run a benchmark of a source checkout's bench/ folder ({BENCH_DIR} does not exist here)."
    width = max(map(len, scripts))
    return "Run bench/NAME.py with the arguments that follow NAME. Benchmarks:\n\n" + "\n".join(
        f"  {name:<{width}}  {line}" for name, line in scripts.items()
    )


def cmd_bench(args) -> int:
    """`python bench/NAME.py ARGS` with this interpreter and this checkout's promptehr; its exit status."""
    scripts = bench_scripts()
    if args.name not in scripts:
        raise ConfigError(
            f"promptehr bench {args.name}: no {BENCH_DIR / (args.name + '.py')}; "
            f"benchmarks: {', '.join(scripts) or f'none ({BENCH_DIR} does not exist)'}"
        )
    # a script's own folder comes first on its path, not the checkout: name the checkout, so the
    # benchmark imports this very promptehr even where it is not installed
    root = str(BENCH_DIR.parent)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, (root, os.environ.get("PYTHONPATH"))))}
    return subprocess.run([sys.executable, str(BENCH_DIR / f"{args.name}.py"), *args.args], env=env).returncode


# ------------------------------------------------------------------ the parser


def _add_sampling_args(p) -> None:
    p.add_argument("--temperature", default=1.0, type=float, help="softmax temperature (default 1.0)")
    p.add_argument("--top-k", default=0, type=int, help="keep the k most likely tokens (0: off)")
    p.add_argument("--top-p", default=1.0, type=float, help="nucleus sampling mass (1.0: off)")
    p.add_argument("--max-visits", default=20, type=int, help="end a patient the model has not ended by then")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="promptehr", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--log-level", default="INFO")
    # also after the command (`promptehr tune worker --log-level DEBUG`); SUPPRESS keeps the one given before it
    log_level = argparse.ArgumentParser(add_help=False)
    log_level.add_argument("--log-level", default=argparse.SUPPRESS, help="DEBUG, INFO (default), WARNING, ...")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", parents=[log_level], help="train one model (tracked in MLflow)")
    add_config_arguments(p, "experiments/base.yaml", epochs=True)
    p.add_argument("--no-tracking", action="store_true", help="do not log to MLflow")
    p.set_defaults(func=cmd_train)

    model_help = "checkpoint folder or logged model URI (models:/promptehr@champion, runs:/<id>/model)"
    p = sub.add_parser(
        "generate",
        parents=[log_level],
        help="generate synthetic patients as MIMIC-III CSV tables or a MEDS dataset, and patients.jsonl",
    )
    p.add_argument("--model", default="models:/promptehr@champion", help=model_help)
    p.add_argument("--n-patients", default=1000, type=int)
    p.add_argument("--seed", default=0, type=int, help="seeds demographics, sampling and the synthetic dates")
    p.add_argument(
        "--out",
        default="outputs/synthetic",
        help="folder for PATIENTS.csv, ADMISSIONS.csv, DIAGNOSES_ICD.csv "
        "(--format meds: data/, metadata/) and patients.jsonl",
    )
    p.add_argument(
        "--format",
        default="mimic3",
        choices=("mimic3", "meds"),
        help="mimic3: MIMIC-III CSV tables (default); meds: a MEDS dataset that data.source=meds reads",
    )
    p.add_argument("--batch-size", default=256, type=int, help="patients generated together")
    _add_sampling_args(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser(
        "evaluate",
        parents=[log_level],
        help="quality report: a generated cohort against held-out patients (tracked in MLflow)",
    )
    p.add_argument("--model", default="models:/promptehr@champion", help=model_help)
    add_config_arguments(p, config_help="config naming the data (default: the checkpoint's own)")
    p.add_argument("--n-patients", default=500, type=int, help="held-out patients (and as many generated)")
    p.add_argument(
        "--released-patients",
        default=5000,
        type=int,
        help="generated from the training demographics for utility and privacy attacks (and the cap of each utility split)",
    )
    p.add_argument("--seed", default=0, type=int)
    p.add_argument("--out", default="outputs/quality", help="folder for quality.json and the plots")
    p.add_argument("--run-name", default="quality-report")
    p.add_argument("--no-tracking", action="store_true", help="do not log to MLflow")
    _add_sampling_args(p)
    p.set_defaults(func=cmd_evaluate)

    add_tune_parser(sub, log_level)
    p = sub.add_parser(
        "bench",
        help="run a benchmark of bench/ (it prints figures)",
        description=bench_description(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("name", help="the benchmark: bench/NAME.py")
    p.add_argument("args", nargs=argparse.REMAINDER, help="its arguments (`promptehr bench NAME --help` lists them)")
    p.set_defaults(func=cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging(args.log_level)
    try:
        with StopSignals(at_once=True):  # outside train()'s safe points a stop signal ends the command at once
            return args.func(args)
    except (ConfigError, DataError, FileNotFoundError) as exc:
        log.error("%s", exc)
        return 2
    except (RunInterrupted, TrainingDiverged) as exc:  # one line, no traceback
        outcome = outcome_of(exc)
        log.error("%s", outcome.reason)
        return outcome.exit_code


if __name__ == "__main__":
    sys.exit(main())
