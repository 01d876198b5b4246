"""Shared fixtures: tiny configs and small cohorts, the real servers of the `services` tests (tests/services.py);
`SHARED` points at ../shared/data (demo tables)."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import pytest

from promptehr.config import load_config

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
needs_shared = pytest.mark.skipif(not SHARED.exists(), reason="../shared/data (MIMIC demo tables) is absent")


@pytest.fixture(autouse=True)
def _quiet_logs(caplog):
    caplog.set_level(logging.WARNING)


@pytest.fixture(autouse=True)
def _no_mlflow_experiment_left_active():
    """A test that calls mlflow.set_experiment leaves that experiment active in the process (and in
    MLFLOW_EXPERIMENT_ID), and MLflow then refuses to resume a run of another experiment in a later
    test: put both back as they were."""
    before = {k: os.environ.get(k) for k in ("MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME")}
    yield
    fluent = sys.modules.get("mlflow.tracking.fluent")
    if fluent is not None:
        fluent._active_experiment_id = None
    for key, value in before.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture
def tiny_cfg(tmp_path):
    """experiments/tiny.yaml with checkpoints under tmp_path."""
    return load_config(ROOT / "experiments" / "tiny.yaml", [f"training.checkpoint_dir={tmp_path / 'checkpoints'}"])


@pytest.fixture(scope="session")
def cohort():
    from promptehr.cohorts import sample_cohort

    return sample_cohort(600, seed=3, generator="small")


# ------------------------------------------------------------------ real servers (slow, services tests)


@pytest.fixture(scope="session")
def postgres():
    from services import Postgres

    server = Postgres()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def mlflow_server(postgres):
    from services import start_mlflow_server

    uri, stop = start_mlflow_server(postgres)
    yield uri
    stop()


@pytest.fixture(scope="session")
def slurm():
    from services import Slurm

    cluster = Slurm()
    yield cluster
    cluster.stop()
