"""Optuna study over PromptEHR's hyperparameters (tuning/space.yaml), every trial a child MLflow run.

    python tuning/search.py --config experiments/base.yaml --n-trials 20            # sqlite:///optuna.db
    python tuning/search.py --n-workers 4 --storage journal:./optuna_journal.log     # one worker per GPU
    python tuning/search.py init|worker|finalize --storage postgresql+psycopg2://... # Slurm: tuning/slurm/

Without a subcommand: `init` (create or resume the study and its MLflow parent run), workers until
the study's trial budget is spent (`--n-workers` processes, or this one), then `finalize` (best
value and parameters, plots and the registered champion in the parent run).
"""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import subprocess
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `tuning` and `promptehr` importable from the repo
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from promptehr.cli import setup_logging
from promptehr.config import ConfigError, check_config, load_config
from promptehr.run_status import EXIT_RESUMABLE, RunInterrupted
from promptehr.schema import DataError

logger = logging.getLogger("tuning.search")
COMMANDS = ("run", "init", "worker", "finalize")
DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "experiments" / "base.yaml"


def open_storage(args):
    from tuning.storage import open_storage

    return open_storage(args.storage, args.heartbeat_interval, args.grace_period)


def cmd_init(args):
    from tuning.space import DEFAULT_SPACE, load_space
    from tuning.storage import describe
    from tuning.study import init_study, settings_from_config

    overrides = [o for text in args.overrides for o in shlex.split(text)]
    explicit = {name for name, given in {"base_config": args.config or overrides, "space": args.space,
                                         "objective": args.objective, "pruner": args.pruner, "seed": args.seed is not None,
                                         "n_trials": args.n_trials}.items() if given}
    cfg = load_config(args.config or DEFAULT_CONFIG, overrides)
    check_config(cfg)  # before the study exists: every trial would fail on a bad base value
    settings = settings_from_config(cfg, load_space(args.space or DEFAULT_SPACE), n_trials=args.n_trials,
                                    objective=args.objective, pruner=args.pruner, seed=args.seed)
    return init_study(open_storage(args), args.study_name, settings, explicit, describe(args.storage))


def cmd_worker(args) -> int:
    from tuning.objective import Objective
    from tuning.study import open_study, run_worker

    study = open_study(open_storage(args), args.study_name, getattr(args, "worker_id", 0))
    run_worker(study, Objective(study))
    return 0


def cmd_finalize(args) -> int:
    import optuna

    from tuning.finalize import finalize

    summary = finalize(optuna.load_study(study_name=args.study_name, storage=open_storage(args)))
    logger.info("study %s: %s", args.study_name, summary)
    return 0


def cmd_run(args) -> int:
    from tuning.finalize import finalize
    from tuning.storage import supports_parallel_workers

    if args.n_workers > 1 and not supports_parallel_workers(args.storage):
        raise ConfigError(f"--n-workers {args.n_workers} needs a storage for parallel workers, not SQLite: "
                          "--storage journal:./optuna_journal.log (one machine) or a PostgreSQL URL")
    study = cmd_init(args)
    if args.n_workers == 1:
        cmd_worker(args)
        failed = 0
    else:
        failed = run_local_workers(args)
    finalize(study)
    return 1 if failed else 0


def run_local_workers(args) -> int:
    """`--n-workers K` processes against the shared storage, each pinned to one GPU (round robin)
    when there are GPUs, else sharing the CPU cores. Returns how many exited with an error."""
    import torch

    n_gpus = torch.cuda.device_count()
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")  # this process may itself see only some GPUs
    gpu_ids = visible.split(",")[:n_gpus] if visible else [str(i) for i in range(n_gpus)]
    procs = []
    for worker_id in range(args.n_workers):
        env = {k: v for k, v in os.environ.items() if k != "MLFLOW_RUN_ID"}
        if n_gpus:
            env["CUDA_VISIBLE_DEVICES"] = gpu_ids[worker_id % n_gpus]
        else:
            env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // args.n_workers)))
        cmd = [sys.executable, str(Path(__file__).resolve()), "worker", "--storage", args.storage,
               "--study-name", args.study_name, "--worker-id", str(worker_id), "--log-level", args.log_level,
               "--heartbeat-interval", str(args.heartbeat_interval), "--grace-period", str(args.grace_period)]
        logger.info("worker %d: %s", worker_id, f"GPU {env['CUDA_VISIBLE_DEVICES']}" if n_gpus else "CPU")
        procs.append(subprocess.Popen(cmd, env=env))
    codes = [p.wait() for p in procs]
    for worker_id, code in enumerate(codes):
        if code:
            logger.error("worker %d exited with status %d", worker_id, code)
    return sum(code != 0 for code in codes)


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--storage", default="sqlite:///optuna.db",
                        help="sqlite:///optuna.db (one worker), journal:./optuna_journal.log (one machine), "
                             "postgresql+psycopg2://user@host/db (a cluster)")
    common.add_argument("--study-name", default="promptehr")
    common.add_argument("--heartbeat-interval", type=int, default=60, help="seconds between a running trial's heartbeats (RDB storages)")
    common.add_argument("--grace-period", type=int, default=180, help="seconds without heartbeat before a trial is re-queued")
    common.add_argument("--log-level", default="INFO")

    study = argparse.ArgumentParser(add_help=False)
    study.add_argument("--config", default=None, help="base config (default: experiments/base.yaml)")
    study.add_argument("--overrides", action="append", default=[], help='dotted overrides of the base config, "a=b c=d"')
    study.add_argument("--space", default=None, help="search space YAML (default: tuning/space.yaml)")
    study.add_argument("--n-trials", type=int, default=None, help="trial budget of the study, across all workers (default 20)")
    study.add_argument("--objective", choices=("val_next_visit_nll", "val_loss", "val_perplexity"), default=None,
                       help="minimised; default val_next_visit_nll (what the best checkpoint and champion are chosen by)")
    study.add_argument("--pruner", choices=("median", "hyperband", "none"), default=None, help="default median")
    study.add_argument("--seed", type=int, default=None, help="sampler seed (worker i uses seed + i)")

    parser = argparse.ArgumentParser(prog="tuning/search.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("run", parents=[common, study], help="init + workers + finalize (the default)")
    p.add_argument("--n-workers", type=int, default=1, help="worker processes on this machine (one per GPU)")
    sub.add_parser("init", parents=[common, study], help="create (or resume) the study and its MLflow parent run")
    p = sub.add_parser("worker", parents=[common], help="run trials of an initialized study until its budget is spent")
    p.add_argument("--worker-id", type=int, default=int(os.environ.get("SLURM_ARRAY_TASK_ID", 0)),
                   help="seeds this worker's sampler (default: $SLURM_ARRAY_TASK_ID or 0)")
    sub.add_parser("finalize", parents=[common], help="log best value, plots and champion to the parent run")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS and argv[0] not in ("-h", "--help"):
        argv = ["run", *argv]
    args = build_parser().parse_args(argv)
    setup_logging(args.log_level)
    try:
        if args.command == "init":
            cmd_init(args)
            return 0
        return {"run": cmd_run, "worker": cmd_worker, "finalize": cmd_finalize}[args.command](args)
    except (ConfigError, DataError, FileNotFoundError) as exc:
        logger.error("%s", exc)
        return 2
    except RunInterrupted as exc:  # the study goes on: the trial was re-queued; search.sbatch requeues on this status
        logger.error("worker %s; the study continues when a worker starts again", exc)
        return EXIT_RESUMABLE


if __name__ == "__main__":
    sys.exit(main())
