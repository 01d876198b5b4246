"""Data: the patients a config names, filtered and split. `load_patients(cfg.data)` dispatches to the
MIMIC-III/IV loaders (`mimic`), a MEDS dataset (`meds`) or the built-in synthetic cohort (`cohorts`) and
returns the records (`schema.Patient`), the code vocabulary and a `DataReport` of counts;
`split_for_training` gives the (train, validation) patients.
"""

from __future__ import annotations

import hashlib

import numpy as np

from promptehr.mimic import load_mimic4_data, load_mimic_data
from promptehr.schema import DataError, DataReport, Patient, build_vocab, summarize


def apply_filters(patients: list[Patient], cfg, report: DataReport) -> list[Patient]:
    """Apply `data.min_visits`, `data.max_visits` and `data.max_patients`, counting each effect."""
    kept = []
    for p in patients:
        if len(p.visits) < cfg.min_visits:
            report.add("patients_excluded_min_visits", 1)
            continue
        if cfg.max_visits is not None and len(p.visits) > cfg.max_visits:
            report.add("visits_truncated_max_visits", len(p.visits) - cfg.max_visits)
            p = Patient(p.subject_id, p.age, p.sex, p.visits[: cfg.max_visits])
        kept.append(p)
    if cfg.max_patients is not None and len(kept) > cfg.max_patients:
        report.add("patients_excluded_max_patients", len(kept) - cfg.max_patients)
        kept = kept[: cfg.max_patients]
    return kept


def split_patients(patients: list[Patient], val_fraction: float, seed: int) -> tuple[list[Patient], list[Patient]]:
    """Seeded patient-level split (no patient in both); returns (train, val)."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"data.val_fraction must lie in (0, 1), got {val_fraction}")
    order = np.random.default_rng(seed).permutation(len(patients))
    n_val = max(1, int(round(len(patients) * val_fraction)))
    if n_val >= len(patients):
        raise DataError(f"{len(patients)} patients are too few to split with val_fraction={val_fraction}")
    val_idx = set(order[:n_val].tolist())
    train = [p for i, p in enumerate(patients) if i not in val_idx]
    val = [p for i, p in enumerate(patients) if i in val_idx]
    return train, val


SPLITS = ("random", "meds")


def split_for_training(
    patients: list[Patient], cfg, report: DataReport | None = None
) -> tuple[list[Patient], list[Patient]]:
    """(train, val) by `data.split` (cfg: a DataConfig): `random` is the seeded `split_patients`;
    `meds` takes the MEDS dataset's train and tuning subjects (held_out never), counting into `report`."""
    if cfg.split == "random":
        return split_patients(patients, cfg.val_fraction, cfg.split_seed)
    if cfg.split != "meds":
        raise DataError(f"data.split must be one of {', '.join(SPLITS)}; got {cfg.split!r}")
    if cfg.source != "meds":
        raise DataError(
            f"data.split=meds needs data.source=meds (the dataset's subject_splits), got data.source={cfg.source}"
        )
    from promptehr.meds import split_by_subject_splits

    return split_by_subject_splits(patients, cfg.path, report)


def split_fingerprint(train_patients, val_patients, held_out_ids=()) -> str:
    """Hash of the split (for checks on resume), with the subjects kept for a final test when there are
    such (MEDS held_out); reveals nothing about the patients."""
    h = hashlib.sha256()
    for group in (train_patients, val_patients):
        for p in group:
            h.update(p.subject_id.encode())
        h.update(b"|")
    if held_out_ids:  # only then, so a random split keeps the fingerprint its checkpoints hold
        h.update(b"held_out|" + "|".join(held_out_ids).encode())
    return h.hexdigest()[:16]


def held_out_subject_ids(cfg) -> list[str]:
    """Subjects `data.split` keeps for a final test, never training or validation (MEDS held_out); [] for random."""
    if cfg.split != "meds":
        return []
    from promptehr.meds import held_out_subject_ids as meds_held_out

    return meds_held_out(cfg.path)


def load_patients(cfg) -> tuple[list[Patient], list[str], DataReport]:
    """Load the patients `cfg` (a DataConfig) names, filtered; returns (patients, vocab, report)."""
    if cfg.source == "synthetic":
        from promptehr.cohorts import sample_cohort

        patients = sample_cohort(cfg.synthetic.n_patients, seed=cfg.synthetic.seed, generator=cfg.synthetic.generator)
        report = DataReport(f"synthetic:{cfg.synthetic.generator}")
    elif cfg.source == "mimic3":
        if not cfg.path:
            raise DataError("data.source=mimic3 needs data.path (the folder with PATIENTS, ADMISSIONS, DIAGNOSES_ICD)")
        patients, _, report = load_mimic_data(cfg.path)
    elif cfg.source == "mimic4":
        if not cfg.path:
            raise DataError("data.source=mimic4 needs data.path (the MIMIC-IV folder holding hosp/)")
        patients, _, report = load_mimic4_data(cfg.path, icd_versions=cfg.icd_versions)
    elif cfg.source == "meds":
        if not cfg.path:
            raise DataError("data.source=meds needs data.path (the MEDS dataset root holding data/ and metadata/)")
        from promptehr.meds import load_meds_data

        patients, _, report = load_meds_data(
            cfg.path, icd_versions=cfg.icd_versions, diagnosis_prefix=cfg.meds_diagnosis_prefix
        )
    else:
        raise DataError(f"data.source must be synthetic, mimic3, mimic4 or meds, got {cfg.source!r}")
    n_loaded = len(patients)
    patients = apply_filters(patients, cfg, report)
    if not patients:
        excluded = ", ".join(f"{k} {v}" for k, v in report.counts.items() if k.startswith("patients_excluded") and v)
        raise DataError(
            f"no patients left from data.source={cfg.source} after filtering: {n_loaded} loaded, {excluded} "
            f"(data.min_visits={cfg.min_visits}, data.max_patients={cfg.max_patients})"
        )
    summarize(patients, report)
    return patients, build_vocab(patients), report
