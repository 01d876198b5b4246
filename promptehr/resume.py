"""Resuming: the checkpoint a run continues from, and the lock that keeps two processes off one run.

`training.resume_from` is a checkpoint folder (a crash-damaged one falls back to the newest complete
checkpoint of its run, with a warning) or `auto`: the newest unfinished run of the same config and data
in `training.checkpoint_dir`, None when there is none.
"""

from __future__ import annotations

import fcntl
import logging
import os
import socket
from pathlib import Path

from promptehr.checkpoint import load_config_from_checkpoint, newest_complete, position, read_metadata, resolve_checkpoint
from promptehr.config import ConfigError, flatten

logger = logging.getLogger(__name__)

# A run is unfinished when its newest checkpoint says one of these (`running`: a kill -9 or a lost node
# stopped it before it could say anything else), no live process holds its lock, and its MLflow run, if
# any, was not ended FINISHED or FAILED by someone else.
UNFINISHED = ("running", "interrupted")
# keys that change neither what a run computes nor where it logs, so a resume may differ in them
NOT_COMPARED = (
    "training.resume_from",
    "training.checkpoint_dir",
    "training.num_workers",
    "tracking.register_model",
    "tracking.registered_model_name",
    "tracking.log_system_metrics",
)


def config_differences(cfg, checkpoint) -> list[str]:
    """Keys whose value in `cfg` differs from the checkpoint's config (NOT_COMPARED aside)."""
    saved, now = flatten(load_config_from_checkpoint(checkpoint)), flatten(cfg)
    return [k for k in sorted(set(saved) | set(now)) if k not in NOT_COMPARED and saved.get(k) != now.get(k)]


def resume_checkpoint(cfg, split_fingerprint: str, run_status=lambda run_id: None) -> Path | None:
    """The checkpoint `cfg.training.resume_from` names, or for `auto` the newest unfinished run's
    (None: start a new run). `run_status(run_id)`: the tracker's status of a run (None if unknown)."""
    value = cfg.training.resume_from
    if not value:
        return None
    if value != "auto":
        return resolve_checkpoint(value)
    root = Path(cfg.training.checkpoint_dir)
    found = find_unfinished_run(root, cfg, split_fingerprint, run_status)
    if found is None:
        logger.info("training.resume_from=auto: no unfinished run of this config and data in %s; starting a new run", root)
        return None
    meta = read_metadata(found)
    epoch, batch = position(meta)
    logger.info(
        "training.resume_from=auto: continuing run %s from %s (epoch %d, after batch %d; it was %s)",
        meta.get("run_id") or found.parent.name,
        found,
        epoch + 1,
        batch,
        meta.get("run_state"),
    )
    return found


def find_unfinished_run(root: Path, cfg, split_fingerprint: str, run_status) -> Path | None:
    """The newest complete checkpoint of the newest unfinished run under `root` whose config and data
    are `cfg`'s; a run of this Slurm job (a requeued job) comes first."""
    candidates = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []:
        checkpoint = newest_complete(folder)
        if checkpoint is None:
            continue
        meta = read_metadata(checkpoint)
        if meta.get("run_state") not in UNFINISHED:
            continue
        why = _why_not(folder, checkpoint, meta, cfg, split_fingerprint, run_status)
        if why:
            logger.info("training.resume_from=auto: not continuing %s: %s", folder, why)
            continue
        same_job = bool(os.environ.get("SLURM_JOB_ID")) and meta.get("slurm_job_id") == os.environ["SLURM_JOB_ID"]
        candidates.append((same_job, (checkpoint / "metadata.json").stat().st_mtime_ns, checkpoint))
    return max(candidates)[2] if candidates else None


def _why_not(folder, checkpoint, meta, cfg, split_fingerprint, run_status) -> str:
    if meta.get("split_fingerprint") != split_fingerprint:
        return "its data split differs"
    changed = config_differences(cfg, checkpoint)
    if changed:
        return f"its config differs ({', '.join(changed[:5])})"
    if RunLock.held(folder):
        return "another process is training it"
    status = run_status(meta["run_id"]) if meta.get("run_id") else None
    if status in ("FINISHED", "FAILED"):
        return f"its MLflow run was ended {status}"
    return ""


class RunLock:
    """An exclusive lock on a run's checkpoint folder while a process trains it (`flock`: the kernel
    drops it when the process dies, kill -9 included), so `auto` never picks a live run."""

    def __init__(self, folder):
        self.path = Path(folder) / ".lock"
        self.fd: int | None = None

    def acquire(self) -> RunLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 200).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise ConfigError(
                f"{self.path.parent} is being trained by another process ({holder}); wait for it, or start a new run"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{socket.gethostname()} pid {os.getpid()}".encode())
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the descriptor drops the flock
            self.fd = None

    @staticmethod
    def held(folder) -> bool:
        path = Path(folder) / ".lock"
        if not path.exists():
            return False
        fd = os.open(path, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            return False
        except BlockingIOError:
            return True
        finally:
            os.close(fd)
