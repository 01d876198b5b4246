"""train.slurm on a real single-node Slurm (tests/services.py): preempted by its early signal mid-epoch,
the job requeues itself, comes back, continues the same run and ends as an uninterrupted job does."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from services import wait_for

ROOT = Path(__file__).resolve().parents[1]
DONE = ("completed", "failed", "cancelled", "timeout", "node_fail", "out_of_memory")


def submit(slurm, tmp_path, name: str) -> str:
    overrides = " ".join(
        [
            f"training.checkpoint_dir={tmp_path / name}",
            "data.synthetic.n_patients=2000",
            "training.num_epochs=2",
            "training.quality_report=false",
            "validation.jaccard_patients=0",
            "tracking.n_sample_patients=0",
            "tracking.register_model=false",
        ]
    )
    env = {
        **slurm.env,
        "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / name}.db",
        "PYTHON": sys.executable,
        "CONFIG": str(ROOT / "experiments" / "tiny.yaml"),
        "OVERRIDES": overrides,
    }
    proc = subprocess.run(
        [
            slurm.tools["sbatch"],
            "--parsable",
            "--gres=none",
            "--mem=1G",
            "--cpus-per-task=1",
            f"--job-name={name}",
            str(ROOT / "train.slurm"),
        ],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip().split(";")[0]


def finished(slurm, job: str) -> str | None:
    states = slurm.job_states(job)
    return states[0] if states and states[0] in DONE else None


def run_of(uri: str):
    import mlflow

    client = mlflow.MlflowClient(uri)
    (run,) = client.search_runs(["0"])
    keys = [k for k in run.data.metrics if "rows_per_second" not in k]
    return client, run, {k: sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, k)) for k in keys}


@pytest.mark.slow
@pytest.mark.services
def test_train_slurm_requeues_itself_after_its_early_signal_and_finishes(tmp_path, slurm):
    """Two train.slurm jobs of one config: one runs through; the other is sent its early signal
    (`scancel --signal=USR1 --batch`, what `--signal=B:USR1@600` delivers) mid-epoch. That one stops
    after its step with exit 75, requeues itself, comes back with resume_from=auto and ends with the
    same weights and metrics (but throughput) in the same MLflow run."""
    (tmp_path / "logs").mkdir()  # Slurm opens --output before the script runs
    reference = submit(slurm, tmp_path, "reference")
    preempted = submit(slurm, tmp_path, "preempted")
    log = tmp_path / "logs" / f"train_{preempted}.out"
    wait_for(
        lambda: (
            log.exists() and re.search(r"epoch 1 step 10/100", log.read_text(errors="replace")) or finished(slurm, preempted)
        ),
        600,
        "the job to train",
        interval=0.5,
    )
    assert not finished(slurm, preempted), log.read_text(errors="replace")[-3000:]
    subprocess.run([slurm.tools["scancel"], "--signal=USR1", "--batch", preempted], env=slurm.env, check=True, timeout=30)
    states = wait_for(
        lambda: (lambda a, b: (a, b) if a and b else None)(finished(slurm, reference), finished(slurm, preempted)),
        900,
        "both jobs",
        interval=2,
    )
    text = log.read_text(errors="replace")
    assert states == ("completed", "completed"), text[-3000:]
    assert "restarts=1" in slurm.scontrol("show", "job", preempted)
    assert re.search(r"stopped by SIGUSR1 at epoch 1, batch \d+ of 100", text), text[-3000:]
    assert "requeueing job" in text and "continuing run" in text and "Traceback" not in text

    _, ref_run, expected = run_of(f"sqlite:///{tmp_path / 'reference'}.db")
    client, run, got = run_of(f"sqlite:///{tmp_path / 'preempted'}.db")
    assert run.info.status == "FINISHED" and run.data.tags["promptehr.interrupted"] == "resumed"
    assert got == expected and "val/next_visit_nll" in got
    a = load_file(str(tmp_path / "reference" / ref_run.info.run_id / "last" / "model.safetensors"))
    b = load_file(str(tmp_path / "preempted" / run.info.run_id / "last" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
