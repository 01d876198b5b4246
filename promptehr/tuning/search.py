"""The steps of a search, as `promptehr tune` runs them (the command line parses the arguments).

`init` creates or resumes the study and its MLflow parent run; `worker` runs trials until the study's
trial budget is spent; `finalize` logs the best value and parameters, plots and the registered champion
to the parent run; `run` does all three, with `--n-workers` worker processes on this machine.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

from promptehr.config import ConfigError, check_config

logger = logging.getLogger(__name__)
DEFAULT_CONFIG = Path(__file__).resolve().parents[2] / "experiments" / "base.yaml"


def open_storage(args):
    from promptehr.tuning.storage import open_storage

    return open_storage(args.storage, args.heartbeat_interval, args.grace_period)


def init(args, cfg, explicit: set[str]):
    """Create (or resume) the study of base config `cfg`; `explicit`: the settings the user gave."""
    from promptehr.tuning.space import DEFAULT_SPACE, load_space
    from promptehr.tuning.storage import describe
    from promptehr.tuning.study import init_study, settings_from_config

    check_config(cfg)  # before the study exists: every trial would fail on a bad base value
    settings = settings_from_config(
        cfg,
        load_space(args.space or DEFAULT_SPACE),
        n_trials=args.n_trials,
        objective=args.objective,
        pruner=args.pruner,
        seed=args.seed,
    )
    return init_study(open_storage(args), args.study_name, settings, explicit, describe(args.storage))


def worker(args) -> int:
    from promptehr.tuning.objective import Objective
    from promptehr.tuning.study import open_study, run_worker

    worker_id = args.worker_id if args.worker_id is not None else int(os.environ.get("SLURM_ARRAY_TASK_ID", 0))
    study = open_study(open_storage(args), args.study_name, worker_id)
    run_worker(study, Objective(study))
    return 0


def finalize(args) -> int:
    import optuna

    from promptehr.tuning.finalize import finalize as finalize_study

    summary = finalize_study(optuna.load_study(study_name=args.study_name, storage=open_storage(args)))
    logger.info("study %s: %s", args.study_name, summary)
    return 0


def run(args, cfg, explicit: set[str]) -> int:
    """init, then the workers until the budget is spent, then finalize; 1 if a worker process failed."""
    from promptehr.tuning.finalize import finalize as finalize_study
    from promptehr.tuning.storage import supports_parallel_workers

    n_workers = args.n_workers or 1
    if n_workers > 1 and not supports_parallel_workers(args.storage):
        raise ConfigError(
            f"--n-workers {n_workers} needs a storage for parallel workers, not SQLite: "
            "--storage journal:./optuna_journal.log (one machine) or a PostgreSQL URL"
        )
    study = init(args, cfg, explicit)
    if n_workers == 1:
        worker(args)
        failed = 0
    else:
        failed = run_local_workers(args)
    finalize_study(study)
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
        cmd = [
            sys.executable,
            "-m",
            "promptehr.cli",
            "--log-level",
            args.log_level,
            "tune",
            "worker",
            "--storage",
            args.storage,
            "--study-name",
            args.study_name,
            "--worker-id",
            str(worker_id),
            "--heartbeat-interval",
            str(args.heartbeat_interval),
            "--grace-period",
            str(args.grace_period),
        ]
        logger.info("worker %d: %s", worker_id, f"GPU {env['CUDA_VISIBLE_DEVICES']}" if n_gpus else "CPU")
        procs.append(subprocess.Popen(cmd, env=env))
    codes = [p.wait() for p in procs]
    for worker_id, code in enumerate(codes):
        if code:
            logger.error("worker %d exited with status %d", worker_id, code)
    return sum(code != 0 for code in codes)
