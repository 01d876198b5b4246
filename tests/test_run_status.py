"""How runs end and come back (promptehr.run_status, promptehr.resume): outcomes, stop signals, exact
mid-epoch resume, resume_from=auto after a clean stop or a kill -9, divergence, runs of their own.

Signals are real: sent by the test to a `promptehr.cli train` subprocess, or by the process to itself
(os.kill) from inside the model's forward pass, so that they land at a known step; either way they go
through the handlers train() installs.
"""

from __future__ import annotations

import math
import os
import re
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from services import clean_env

from promptehr.checkpoint import read_metadata
from promptehr.config import load_config
from promptehr.model import PromptBartWithDemographicPrediction
from promptehr.run_status import EXIT_RESUMABLE, RunInterrupted, StopSignals, TrainingDiverged, TrainingPruned, outcome_of
from promptehr.tracking import MLflowTracker, Tracker
from promptehr.train import train

ROOT = Path(__file__).resolve().parents[1]
FAST = (
    "data.synthetic.n_patients=150",
    "training.quality_report=false",
    "validation.jaccard_patients=0",
    "tracking.n_sample_patients=0",
)
LONG_EPOCH = ("data.synthetic.n_patients=400", "training.batch_size=4", "training.num_epochs=1")  # 80 short steps


class RunTracker(MLflowTracker):
    """MLflow tracking without the model upload at the end (as tuning's TrialTracker): faster."""

    def log_model(self, checkpoint_dir, score, tags, rescore=None):
        return None


def tiny(folder, *overrides):
    return load_config(ROOT / "experiments" / "tiny.yaml", [f"training.checkpoint_dir={folder}", *FAST, *overrides])


def client_of(uri):
    import mlflow

    return mlflow.MlflowClient(uri)


def signal_at(monkeypatch, sig, step: int, training: bool = True):
    """Send `sig` to this process from inside the `step`-th forward pass in training (or eval) mode."""
    original = PromptBartWithDemographicPrediction.forward
    calls = [0]

    def forward(self, *args, **kwargs):
        if self.training == training:
            calls[0] += 1
            if calls[0] == step:
                os.kill(os.getpid(), sig)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(PromptBartWithDemographicPrediction, "forward", forward)


def histories(client, run_id) -> dict:
    """Every metric's (step, value) history but throughput, which no resume can reproduce."""
    keys = [k for k in client.get_run(run_id).data.metrics if "rows_per_second" not in k]
    return {k: sorted((m.step, m.value) for m in client.get_metric_history(run_id, k)) for k in keys}


def same_weights(a: Path, b: Path) -> bool:
    wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


# ------------------------------------------------------------------ outcomes and handlers (no training)


def test_outcome_table():
    """One decision for train, evaluate and tuning: status, tags and exit code per way of ending."""
    cases = [
        (None, "FINISHED", "finished", 0),
        (TrainingPruned("pruned after epoch 2"), "KILLED", "pruned", 0),
        (RunInterrupted("SIGTERM", "at epoch 1", "/ck/run/last"), "KILLED", "interrupted", EXIT_RESUMABLE),
        (RunInterrupted("SIGUSR1"), "KILLED", "interrupted", 128 + signal.SIGUSR1),
        (KeyboardInterrupt(), "KILLED", "interrupted", 128 + signal.SIGINT),
        (TrainingDiverged({"loss": math.nan}, 1.0, "step 3"), "FAILED", "diverged", 1),
        (ValueError("boom"), "FAILED", "failed", 1),
    ]
    for exc, status, kind, code in cases:
        outcome = outcome_of(exc)
        assert (outcome.status, outcome.kind, outcome.exit_code) == (status, kind, code), exc
        assert outcome.tags["promptehr.outcome"] == kind
    assert outcome_of(cases[2][0]).tags["promptehr.interrupted"] == "resumable"
    assert outcome_of(cases[3][0]).tags["promptehr.interrupted"] == "not resumable"
    assert "step 3" in outcome_of(cases[5][0]).tags["failure_reason"]
    assert "boom" in outcome_of(cases[6][0]).tags["failure_reason"]


def test_stop_signals_request_then_restore_the_handlers():
    def mine(signum, frame):
        raise AssertionError("the handler of the caller must not run while StopSignals is installed")

    before = signal.signal(signal.SIGUSR1, mine)
    try:
        with StopSignals() as stop:
            os.kill(os.getpid(), signal.SIGUSR1)
            os.kill(os.getpid(), signal.SIGTERM)  # a repeat (Slurm may send both): nothing more
            assert stop.requested and stop.name == "SIGUSR1"
            with pytest.raises(RunInterrupted, match="SIGUSR1"):
                with stop.at_once():  # a request already made stops such a block before it starts
                    pass
            with pytest.raises(RunInterrupted, match="SIGINT"):
                os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C twice: at once
        assert signal.getsignal(signal.SIGUSR1) is mine
        with StopSignals() as outer:
            with StopSignals(at_once=True):
                with pytest.raises(RunInterrupted, match="SIGTERM"):
                    os.kill(os.getpid(), signal.SIGTERM)
            assert outer.requested  # the inner request is handed out
    finally:
        signal.signal(signal.SIGUSR1, before)


# ------------------------------------------------------------------ exact resume after a signal


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted tiny run (8 steps per epoch, 3 epochs, logged every 3 steps), tracked."""
    folder = tmp_path_factory.mktemp("reference")
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    cfg = tiny(folder / "ck", "training.num_epochs=3", "training.log_every_n_steps=3")
    result = train(cfg, RunTracker(uri, "reference"))
    return uri, result


@pytest.mark.parametrize("where", ["step", pytest.param("validation", marks=pytest.mark.slow)])
def test_signal_mid_epoch_then_resume_is_bit_identical(where, reference, tmp_path, monkeypatch, caplog):
    """SIGUSR1 during step 11 (epoch 2, batch 3 of 8; the log window holds steps 10-11) stops the run
    after that step with `last` at that place, KILLED and tagged resumable; `resume_from=auto` ends
    it with the uninterrupted run's weights and every metric (but throughput) at the same steps.
    SIGTERM during epoch 1's validation stops it after the epoch's checkpoints instead."""
    uri, full = reference
    client = client_of(uri)
    cfg = tiny(tmp_path / "ck", "training.num_epochs=3", "training.log_every_n_steps=3")
    tracker = RunTracker(f"sqlite:///{tmp_path / 'mlflow.db'}", "interrupted")
    handler = signal.getsignal(signal.SIGUSR1)
    if where == "step":
        signal_at(monkeypatch, signal.SIGUSR1, step=11)
    else:
        signal_at(monkeypatch, signal.SIGTERM, step=2, training=False)
    with pytest.raises(RunInterrupted) as stopped:
        train(cfg, tracker)
    monkeypatch.undo()
    assert signal.getsignal(signal.SIGUSR1) is handler  # restored once train() is over
    mine = client_of(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run = mine.get_run(stopped.value.result["run_id"])
    assert run.info.status == "KILLED"
    assert run.data.tags["promptehr.interrupted"] == "resumable" and run.data.tags["promptehr.outcome"] == "interrupted"
    last = Path(stopped.value.checkpoint)
    meta = read_metadata(last)
    assert meta["run_state"] == "interrupted" and outcome_of(stopped.value).exit_code == EXIT_RESUMABLE
    if where == "step":
        assert "at epoch 2, batch 3 of 8 (step 11)" in str(stopped.value)
        assert (meta["epoch"], meta["batches_done"], meta["epoch_complete"], meta["global_step"]) == (1, 3, False, 11)
    else:
        assert "after epoch 1 (step 8)" in str(stopped.value)
        assert (meta["epoch"], meta["epoch_complete"], meta["global_step"]) == (0, True, 8)

    caplog.set_level("INFO", logger="promptehr.resume")
    resumed = train(
        tiny(tmp_path / "ck", "training.num_epochs=3", "training.log_every_n_steps=3", "training.resume_from=auto"),
        RunTracker(f"sqlite:///{tmp_path / 'mlflow.db'}", "interrupted"),
    )
    assert f"continuing run {run.info.run_id}" in caplog.text
    assert resumed["run_id"] == run.info.run_id and mine.get_run(run.info.run_id).info.status == "FINISHED"
    assert mine.get_run(run.info.run_id).data.tags["promptehr.interrupted"] == "resumed"
    assert same_weights(Path(full["checkpoint_dir"]) / "last", Path(resumed["checkpoint_dir"]) / "last")
    expected, got = histories(client, full["run_id"]), histories(mine, run.info.run_id)
    assert "train/loss" in expected and "val/next_visit_nll" in expected
    assert got == expected


def wait_for_output(proc, pattern: str, timeout: float = 300) -> str:
    """stderr of `proc` until `pattern` appears in it (the process goes on)."""
    text, deadline = "", time.monotonic() + timeout
    while time.monotonic() < deadline and not re.search(pattern, text):
        if select.select([proc.stderr], [], [], 1.0)[0]:
            chunk = os.read(proc.stderr.fileno(), 65536)
            if not chunk:
                break
            text += chunk.decode(errors="replace")
    assert re.search(pattern, text), f"no {pattern!r} in the output:\n{text[-3000:]}"
    return text


def cli_train(tmp_path, *overrides) -> subprocess.Popen:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cmd = [
        sys.executable,
        "-m",
        "promptehr.cli",
        "train",
        "--config",
        str(ROOT / "experiments" / "tiny.yaml"),
        "--overrides",
        " ".join([f"training.checkpoint_dir={tmp_path / 'ck'}", *FAST, *overrides]),
    ]
    return subprocess.Popen(
        cmd,
        cwd=tmp_path,
        env=clean_env(MLFLOW_TRACKING_URI=uri),
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        start_new_session=True,
    )  # its own process group


@pytest.mark.parametrize(
    "sig",
    [
        signal.SIGTERM,
        pytest.param(signal.SIGINT, marks=pytest.mark.slow),
        pytest.param(signal.SIGUSR1, marks=pytest.mark.slow),
    ],
)
def test_cli_stops_on_a_signal_with_one_line_and_resumes_by_itself(sig, tmp_path, monkeypatch):
    """`promptehr.cli train` (collating in a worker process) has SIGTERM (Slurm's preemption), SIGINT
    (Ctrl-C) or SIGUSR1 sent to its whole process group mid-epoch: exit 75, one line that says where
    it stopped and how to resume, no traceback, the MLflow run KILLED and tagged resumable (the worker
    survives the signal and is shut down, not left to hang the exit); `training.resume_from=auto`
    continues that run to FINISHED."""
    proc = cli_train(tmp_path, *LONG_EPOCH, "training.num_workers=1", "tracking.register_model=false")
    try:
        head = wait_for_output(proc, r"epoch 1 step 5/80")
        os.killpg(proc.pid, sig)
        _, tail = proc.communicate(timeout=300)
    finally:
        proc.kill()
    err = head + tail.decode(errors="replace")
    assert proc.returncode == EXIT_RESUMABLE, err[-3000:]
    assert "Traceback" not in err
    last_line = [line for line in err.splitlines() if line.strip()][-1]
    assert re.search(
        rf"ERROR promptehr: stopped by {signal.Signals(sig).name} at epoch 1, batch \d+ of 80 \(step \d+\); "
        r"resume from .*/last \(training.resume_from=auto finds it\)$",
        last_line,
    ), last_line
    client = client_of(f"sqlite:///{tmp_path / 'mlflow.db'}")
    (run,) = client.search_runs(["0"])
    assert run.info.status == "KILLED" and run.data.tags["promptehr.interrupted"] == "resumable"
    meta = read_metadata(tmp_path / "ck" / run.info.run_id / "last")
    assert 5 <= meta["batches_done"] < 80 and not meta["epoch_complete"]

    from promptehr.cli import main

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    code = main(
        [
            "train",
            "--config",
            str(ROOT / "experiments" / "tiny.yaml"),
            "--overrides",
            " ".join(
                [
                    f"training.checkpoint_dir={tmp_path / 'ck'}",
                    *FAST,
                    *LONG_EPOCH,
                    "training.resume_from=auto",
                    "tracking.register_model=false",
                ]
            ),
        ]
    )
    assert code == 0
    assert client.get_run(run.info.run_id).info.status == "FINISHED"
    assert len(client.search_runs([run.info.experiment_id])) == 1  # the same run, no new one


def test_auto_resume_continues_a_run_left_running_by_kill_9(tmp_path, caplog):
    """kill -9 after epoch 1: the MLflow run stays RUNNING and `last` says running; `auto` picks that
    run (a finished run of the same config beside it, and an unfinished one of another config, are
    left alone) and ends it FINISHED."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    finished = train(tiny(tmp_path / "ck", "training.num_epochs=1"), RunTracker(uri, "promptehr"))
    proc = cli_train(tmp_path, "data.synthetic.n_patients=1000", "training.num_epochs=2")
    try:
        run_id = re.search(r"MLflow run (\w+)", wait_for_output(proc, r"MLflow run \w+")).group(1)
        last = tmp_path / "ck" / run_id / "last"
        deadline = time.monotonic() + 300
        while not (last / "metadata.json").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    client = client_of(uri)
    assert client.get_run(run_id).info.status == "RUNNING"
    other = train(tiny(tmp_path / "ck", "training.num_epochs=1", "training.learning_rate=3e-3"), Tracker())
    import shutil

    from promptehr.checkpoint import mark_run_state

    mark_run_state(Path(other["checkpoint_dir"]) / "last", "running")  # unfinished, but another config

    caplog.set_level("INFO", logger="promptehr.resume")
    resumed = train(
        tiny(tmp_path / "ck", "data.synthetic.n_patients=1000", "training.num_epochs=2", "training.resume_from=auto"),
        RunTracker(uri, "promptehr"),
    )
    assert resumed["run_id"] == run_id and client.get_run(run_id).info.status == "FINISHED"
    assert f"continuing run {run_id}" in caplog.text
    assert "config differs (data.synthetic.n_patients" in caplog.text or "data split differs" in caplog.text
    assert client.get_run(finished["run_id"]).info.status == "FINISHED"
    # nothing unfinished is left of this config: a new run starts, and the log says so
    caplog.clear()
    fresh = train(tiny(tmp_path / "ck", "training.num_epochs=1", "training.resume_from=auto"), Tracker())
    assert "starting a new run" in caplog.text and fresh["checkpoint_dir"] != finished["checkpoint_dir"]
    shutil.rmtree(fresh["checkpoint_dir"])


def test_auto_never_picks_a_run_another_process_holds(tmp_path, caplog):
    """A live run holds a lock on its folder: `auto` passes it by (and says why), an explicit resume of
    it is refused with one line; once the lock is gone (the process ended, even by kill -9) it is found."""
    from promptehr.checkpoint import save_checkpoint
    from promptehr.config import ConfigError
    from promptehr.data import load_patients, split_fingerprint, split_patients
    from promptehr.resume import RunLock, resume_checkpoint
    from promptehr.tokenizer import DiagnosisCodeTokenizer

    cfg = tiny(tmp_path / "ck", "training.resume_from=auto")
    train_p, val_p = split_patients(load_patients(cfg.data)[0], cfg.data.val_fraction, cfg.data.split_seed)
    tokenizer = DiagnosisCodeTokenizer.from_patients(train_p, cfg.model.visit_order)
    fingerprint = split_fingerprint(train_p, val_p)
    run = tmp_path / "ck" / "untracked-live"
    save_checkpoint(
        run / "last",
        PromptBartWithDemographicPrediction(tokenizer, cfg),
        None,
        None,
        cfg,
        tokenizer,
        {"epoch": 0, "run_state": "running", "split_fingerprint": fingerprint, "run_id": None},
    )
    lock = RunLock(run).acquire()
    caplog.set_level("INFO", logger="promptehr.resume")
    try:
        assert resume_checkpoint(cfg, fingerprint) is None
        assert "another process is training it" in caplog.text
        with pytest.raises(ConfigError, match="is being trained by another process"):
            RunLock(run).acquire()
    finally:
        lock.release()
    assert resume_checkpoint(cfg, fingerprint) == run / "last"


# ------------------------------------------------------------------ divergence, runs of their own


def test_divergence_stops_at_the_first_non_finite_loss_and_keeps_last(tmp_path, monkeypatch):
    """A NaN loss at step 12 (epoch 2) stops the run before the optimizer applies it: TrainingDiverged
    names the step, learning rate and loss part; `last` and `best_model` keep epoch 1's finite weights;
    the run ends FAILED with outcome diverged; its checkpoint says so (auto will not resume it)."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    original = PromptBartWithDemographicPrediction.forward
    calls = [0]

    def forward(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        if self.training:
            calls[0] += 1
            if calls[0] == 12:
                out["lm_loss"] = out["lm_loss"] * math.nan
                out["loss"] = out["loss"] * math.nan
        return out

    monkeypatch.setattr(PromptBartWithDemographicPrediction, "forward", forward)
    with pytest.raises(TrainingDiverged) as diverged:
        train(tiny(tmp_path / "ck", "training.num_epochs=3"), RunTracker(uri, "diverge"))
    message = str(diverged.value)
    assert re.search(
        r"at step 12 \(epoch 2, batch 4 of 8\), learning rate \S+: non-finite loss, lm_loss, gradient norm "
        r"\(loss nan, lm_loss nan, age_loss \S+, sex_loss \S+, gradient norm nan\)",
        message,
    ), message
    result = diverged.value.result
    folder = Path(result["checkpoint_dir"])
    for name in ("last", "best_model"):
        meta = read_metadata(folder / name)
        assert meta["epoch"] == 0 and meta["global_step"] == 8, name
        assert all(torch.isfinite(t).all() for t in load_file(str(folder / name / "model.safetensors")).values())
    assert read_metadata(folder / "last")["run_state"] == "diverged"
    run = client_of(uri).get_run(result["run_id"])
    assert run.info.status == "FAILED" and run.data.tags["promptehr.outcome"] == "diverged"
    assert "step 12" in run.data.tags["failure_reason"]
    assert max(m.step for m in client_of(uri).get_metric_history(run.info.run_id, "train/loss")) == 10


def test_untracked_runs_keep_to_their_own_folders(tmp_path, caplog):
    """`--no-tracking`: each run in a folder of its own under checkpoint_dir; a run that diverged
    (learning rate 1e4, through the CLI: exit 1, one line) reports no best_model of another run and
    touches none of its files."""
    from promptehr.cli import main

    first = train(tiny(tmp_path / "ck", "training.num_epochs=1"), Tracker())
    before = {p: p.stat().st_mtime_ns for p in Path(first["checkpoint_dir"]).rglob("*")}
    code = main(
        [
            "train",
            "--no-tracking",
            "--config",
            str(ROOT / "experiments" / "tiny.yaml"),
            "--overrides",
            " ".join([f"training.checkpoint_dir={tmp_path / 'ck'}", *FAST, "training.learning_rate=1e4"]),
        ]
    )
    assert code == 1
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and re.search(
        r"training diverged at step \d+ \(epoch 1, batch \d+ of 8\), learning rate "
        r"\S+: non-finite",
        errors[0],
    ), errors
    folders = sorted(p for p in (tmp_path / "ck").iterdir())
    assert len(folders) == 2 and all(p.name.startswith("untracked-") for p in folders)
    assert {p: p.stat().st_mtime_ns for p in Path(first["checkpoint_dir"]).rglob("*")} == before
    (diverged,) = [p for p in folders if str(p) != first["checkpoint_dir"]]
    assert not (diverged / "best_model").exists()
    assert Path(first["best_checkpoint"]).parent == Path(first["checkpoint_dir"])


def test_pruned_run_reports_its_checkpoints(tmp_path):
    """bench/quality.py's time budget prunes the run: it scores that run's best_model (from the
    exception), never another run's in the same checkpoint_dir."""
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import quality
    finally:
        sys.path.remove(str(ROOT / "bench"))
    other = tmp_path / "ck" / "untracked-older" / "best_model"
    other.mkdir(parents=True)
    folder, _ = quality.train_and_load(tiny(tmp_path / "ck", "training.num_epochs=3"), minutes=0.0)
    assert folder.name == "best_model" and folder != other and read_metadata(folder)["epoch"] == 0
