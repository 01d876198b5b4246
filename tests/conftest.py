"""Shared fixtures: tiny configs and small cohorts; `SHARED` points at ../shared/data (demo tables)."""

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
