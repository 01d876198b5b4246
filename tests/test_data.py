"""Data: `load_patients` (dispatch and filters), the patient-level split and `apply_filters`' counts."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from conftest import SHARED, needs_shared

from promptehr.data import apply_filters, load_patients, split_patients
from promptehr.schema import DataError, DataReport, Patient

MIMIC3 = SHARED / "mimic3-demo"


@needs_shared
def test_load_patients_mimic3_with_filters():
    cfg = SimpleNamespace(
        source="mimic3", path=str(MIMIC3), icd_versions="both", min_visits=2, max_visits=3, max_patients=None
    )
    patients, vocab, report = load_patients(cfg)
    assert len(patients) == 14
    assert report.counts["patients_excluded_min_visits"] == 86
    # visits per multi-visit patient: 11 x 2, 2 x 3, 1 x 15 -> the 15 is truncated to 3
    assert report.counts["visits_truncated_max_visits"] == 12
    assert report.counts["visits"] == 11 * 2 + 2 * 3 + 3
    assert report.counts["patients"] == 14 and len(vocab) == report.counts["distinct_codes"]


# ---------------------------------------------------------------------------------------------
# split_patients and apply_filters
# ---------------------------------------------------------------------------------------------


def _cohort(n: int) -> list[Patient]:
    return [Patient(str(i), 50.0, "MF"[i % 2], [["A"]] * (1 + i % 4)) for i in range(n)]


def test_split_patients_deterministic_disjoint_80_20():
    patients = _cohort(100)
    train, val = split_patients(patients, 0.2, seed=42)
    again_train, again_val = split_patients(patients, 0.2, seed=42)
    assert [p.subject_id for p in train] == [p.subject_id for p in again_train]
    assert [p.subject_id for p in val] == [p.subject_id for p in again_val]
    assert (len(train), len(val)) == (80, 20)
    ids_train, ids_val = {p.subject_id for p in train}, {p.subject_id for p in val}
    assert not ids_train & ids_val and ids_train | ids_val == {p.subject_id for p in patients}
    _, other_val = split_patients(patients, 0.2, seed=7)
    assert {p.subject_id for p in other_val} != ids_val


def test_split_patients_rejects_bad_fraction_and_tiny_cohorts():
    with pytest.raises(ValueError, match="val_fraction"):
        split_patients(_cohort(10), 1.0, seed=0)
    with pytest.raises(DataError, match="too few"):
        split_patients(_cohort(1), 0.2, seed=0)


def test_apply_filters_counts():
    patients = _cohort(12)  # visits: 1, 2, 3, 4, 1, 2, 3, 4, ...
    report = DataReport("test")
    cfg = SimpleNamespace(min_visits=2, max_visits=3, max_patients=5)
    kept = apply_filters(patients, cfg, report)
    assert report.counts["patients_excluded_min_visits"] == 3  # the three 1-visit patients
    assert report.counts["visits_truncated_max_visits"] == 3  # the three 4-visit patients, one visit each
    assert report.counts["patients_excluded_max_patients"] == 9 - 5
    assert [len(p.visits) for p in kept] == [2, 3, 3, 2, 3]
    assert len(patients[3].visits) == 4  # the input is not modified

    report = DataReport("test")
    kept = apply_filters(patients, SimpleNamespace(min_visits=1, max_visits=None, max_patients=None), report)
    assert kept == patients and report.counts == {}
