"""Shared fixtures: tiny configs and small cohorts, the real servers of the `services` tests (tests/services.py);
`SHARED` points at ../shared/data (demo tables)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from promptehr.config import load_config

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
needs_shared = pytest.mark.skipif(not SHARED.exists(), reason="../shared/data (MIMIC demo tables) is absent")


@pytest.fixture(autouse=True)
def _quiet_logs(caplog):
    caplog.set_level(logging.WARNING)


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
