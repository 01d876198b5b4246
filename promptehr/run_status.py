"""How a run ends, decided in one place for training, evaluation and tuning.

`outcome_of(exc)` maps what stopped a run (nothing, a stop signal, pruning, divergence, an error) to an
`Outcome`: MLflow status, tags and the process exit code. `StopSignals` turns SIGTERM, SIGINT and
SIGUSR1 into a stop request that the training loop honours at its next safe point.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
from dataclasses import dataclass

logger = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
EXIT_RESUMABLE = 75  # sysexits EX_TEMPFAIL: "try again"; train.slurm and search.sbatch requeue on it


class TrainingPruned(Exception):
    """Raised by an `on_validate` callback to stop a run early (a pruned tuning trial). `train()` sets
    `.result` (its checkpoints and metrics so far) before passing it on."""

    result: dict | None = None


class RunInterrupted(KeyboardInterrupt):
    """A stop signal ended the run. `checkpoint` is the complete checkpoint it can resume from (None:
    nothing to resume). A KeyboardInterrupt, so that `except Exception` (Optuna's `catch`, library code)
    never swallows it."""

    result: dict | None = None

    def __init__(self, signal_name: str, where: str = "", checkpoint: str | None = None):
        super().__init__(signal_name)
        self.signal_name, self.where, self.checkpoint = signal_name, where, checkpoint

    def __str__(self) -> str:
        text = f"stopped by {self.signal_name}" + (f" {self.where}" if self.where else "")
        if self.checkpoint:
            return f"{text}; resume from {self.checkpoint} (training.resume_from=auto finds it)"
        return f"{text}; no checkpoint to resume from"

    def __repr__(self) -> str:
        return f"RunInterrupted({str(self)!r})"


class TrainingDiverged(FloatingPointError):
    """A non-finite loss or gradient norm: training stops before the optimizer applies it, so no
    checkpoint ever holds non-finite weights. `where` (step, epoch, learning rate) is filled in by the loop."""

    result: dict | None = None

    def __init__(self, losses: dict[str, float], grad_norm: float, where: str = ""):
        super().__init__()
        self.losses, self.grad_norm, self.where = losses, grad_norm, where

    def __str__(self) -> str:
        bad = [k for k, v in {**self.losses, "gradient norm": self.grad_norm}.items() if not _finite(v)]
        values = ", ".join(f"{k} {v:.4g}" for k, v in {**self.losses, "gradient norm": self.grad_norm}.items())
        return f"training diverged{' at ' + self.where if self.where else ''}: non-finite {', '.join(bad)} ({values})"

    def __repr__(self) -> str:  # what Optuna's log of a failed trial shows
        return f"TrainingDiverged({str(self)!r})"


def _finite(x: float) -> bool:
    return x == x and abs(x) != float("inf")


# ------------------------------------------------------------------ outcomes


@dataclass(frozen=True)
class Outcome:
    """How a run ended: `status` is the MLflow run status, `kind` says why."""

    status: str  # FINISHED | KILLED | FAILED
    kind: str  # finished | interrupted | pruned | diverged | failed
    reason: str = ""
    resumable: bool = False
    signal_number: int | None = None

    @property
    def tags(self) -> dict[str, str]:
        tags = {"promptehr.outcome": self.kind}
        if self.kind == "interrupted":
            tags["promptehr.interrupted"] = "resumable" if self.resumable else "not resumable"
        if self.reason:
            tags["failure_reason" if self.status == "FAILED" else "promptehr.stop_reason"] = self.reason[:4000]
        return tags

    @property
    def exit_code(self) -> int:
        if self.kind == "interrupted":
            return EXIT_RESUMABLE if self.resumable else 128 + (self.signal_number or signal.SIGINT)
        return 1 if self.status == "FAILED" else 0


FINISHED = Outcome("FINISHED", "finished")


def outcome_of(exc: BaseException | None) -> Outcome:
    """The outcome of a run that ended by raising `exc` (None: it returned)."""
    if exc is None:
        return FINISHED
    if isinstance(exc, TrainingPruned):
        return Outcome("KILLED", "pruned", str(exc))
    if isinstance(exc, RunInterrupted):
        number = getattr(signal, exc.signal_name, None) if exc.signal_name.startswith("SIG") else None
        return Outcome(
            "KILLED",
            "interrupted",
            str(exc),
            resumable=exc.checkpoint is not None,
            signal_number=int(number) if number is not None else None,
        )
    if isinstance(exc, KeyboardInterrupt):
        return Outcome("KILLED", "interrupted", "interrupted (KeyboardInterrupt)", signal_number=int(signal.SIGINT))
    if isinstance(exc, TrainingDiverged):
        return Outcome("FAILED", "diverged", str(exc))
    return Outcome("FAILED", "failed", f"{type(exc).__name__}: {exc}")


def end_run(tracker, outcome: Outcome) -> None:
    """Tag the tracker's run with the outcome and end it with its status."""
    try:
        tracker.set_tags(outcome.tags)
    finally:
        tracker.end(outcome.status)


# ------------------------------------------------------------------ stop signals


class StopSignals:
    """While installed (`with StopSignals() as stop:`, main thread only), SIGTERM, SIGINT and SIGUSR1
    request a stop: `stop.requested` turns true and the caller stops at its next safe point. Inside
    `stop.at_once()` (work that is cheaper to redo than to finish) a signal raises `RunInterrupted`
    there and then; so does a second SIGINT (Ctrl-C twice). Repeated SIGTERM/SIGUSR1 (Slurm may send
    both) change nothing. The handlers found on entry are restored on exit; a request seen by an
    enclosing `StopSignals` is passed in and out."""

    def __init__(self, at_once: bool = False):
        self.signum: int | None = None
        self._at_once = at_once
        self._previous: dict = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is not threading.main_thread():
            logger.debug("not the main thread: stop signals keep their handlers")
            return self
        for sig in STOP_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
            outer = getattr(self._previous[sig], "__self__", None)
            if isinstance(outer, StopSignals) and outer.requested and self.signum is None:
                self.signum = outer.signum
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
            outer = getattr(handler, "__self__", None)
            if isinstance(outer, StopSignals) and self.requested and not outer.requested:
                outer.signum = self.signum
        self._previous.clear()

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum is not None else ""

    def _handle(self, signum, frame) -> None:
        repeated = self.signum is not None
        if not repeated:
            self.signum = signum
        if self._at_once or (repeated and signum == signal.SIGINT):
            raise RunInterrupted(signal.Signals(signum).name)
        if not repeated:
            logger.warning(
                "%s received: stopping at the next safe point (after this step); SIGINT again stops at once",
                signal.Signals(signum).name,
            )

    @contextlib.contextmanager
    def at_once(self):
        """A block in which a stop signal (or one already received) raises `RunInterrupted` at once."""
        if self.requested:
            raise RunInterrupted(self.name)
        self._at_once = True
        try:
            yield
        finally:
            self._at_once = False


def ignore_stop_signals(_worker_id: int | None = None) -> None:
    """DataLoader `worker_init_fn`: workers leave stop signals to the main process (Ctrl-C or Slurm
    signal the whole process group; a worker that dies of it would crash the loop instead of letting it
    save and stop)."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
