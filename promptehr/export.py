"""Export: synthetic patients -> MIMIC-III-format tables and JSON lines.

`write_mimic3(patients, folder)` writes `PATIENTS.csv`, `ADMISSIONS.csv` and `DIAGNOSES_ICD.csv` that
`promptehr.mimic.load_mimic_data(folder)` reads back unchanged (ages, sexes, visits, codes in order);
`write_jsonl` writes `patients.jsonl`, one patient per line. Identifiers and dates are synthetic.
"""

from __future__ import annotations

import json
import math
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np

from promptehr.schema import MAX_AGE, Patient

# Dates follow MIMIC-III's de-identification: first admissions fall in 2100-2150 and a patient older
# than 89 has a date of birth about 300 years before it (the loader caps that age at 90 again).
FIRST_ADMIT_YEARS = (2100, 2150)
SHIFTED_AGE_YEARS = 300
HADM_ID_START = 100001
_DAY = 86400.0
_YEAR = 365.25 * _DAY


def _fmt(t: datetime) -> str:
    return t.strftime("%Y-%m-%d %H:%M:%S")


def mimic3_tables(patients: list[Patient], seed: int = 0):
    """(PATIENTS, ADMISSIONS, DIAGNOSES_ICD) as pandas DataFrames with MIMIC-III's UPPERCASE headers.

    subject_id = 1..N in the order given; hadm_id from 100001; ROW_ID per table from 1. Per patient:
    a first admission in 2100-2150, lengths of stay of 1-30 days, gaps between a discharge and the
    next admission of 1 day to about 1.5 years, so admission times increase. DOB (at midnight) is
    placed so that the whole years from DOB to the first admission are the patient's age (MIMIC-III
    ages are whole years: a generated 67.3 is written, and read back, as 67). Codes are written as
    they are, in the visit's order (SEQ_NUM 1, 2, ...): ICD-9 strings for a MIMIC-III-trained model;
    a MIMIC-IV-trained model's codes keep their `ICD9:`/`ICD10:` prefixes in the ICD9_CODE column.
    Other MIMIC-III columns (DOD, admission type, ...) are not generated.
    """
    import pandas as pd

    rng = np.random.default_rng(seed)
    start = datetime(FIRST_ADMIT_YEARS[0], 1, 1)
    span = (datetime(FIRST_ADMIT_YEARS[1], 1, 1) - start).total_seconds()
    pat_rows, adm_rows, diag_rows = [], [], []
    hadm_id = HADM_ID_START
    for subject_id, p in enumerate(patients, start=1):
        if p.sex not in ("M", "F"):
            raise ValueError(f"patient {subject_id}: sex must be M or F, got {p.sex!r}")
        if not p.visits or any(not v for v in p.visits):
            raise ValueError(f"patient {subject_id}: every patient needs visits and every visit a code")
        admit = start + timedelta(seconds=int(rng.uniform(0, span)))
        age = int(math.floor(min(max(p.age, 0.0), MAX_AGE)))
        years = SHIFTED_AGE_YEARS if age >= MAX_AGE else age
        # a fraction in [0.1, 0.9) of a year on top of the whole years, then rounded down to midnight
        # (at most one day earlier), keeps floor(years between DOB and admission) == age
        dob = admit - timedelta(seconds=(years + rng.uniform(0.1, 0.9)) * _YEAR)
        dob = datetime(dob.year, dob.month, dob.day)
        pat_rows.append((subject_id, subject_id, p.sex, _fmt(dob)))
        for visit in p.visits:
            stay = timedelta(seconds=int(_DAY * min(30.0, 1.0 + rng.lognormal(1.0, 0.8))))
            adm_rows.append((len(adm_rows) + 1, subject_id, hadm_id, _fmt(admit), _fmt(admit + stay)))
            for seq_num, code in enumerate(visit, start=1):
                diag_rows.append((len(diag_rows) + 1, subject_id, hadm_id, seq_num, code))
            gap = _DAY * min(540.0, 1.0 + rng.exponential(180.0))
            admit = admit + stay + timedelta(seconds=int(gap))
            hadm_id += 1
    return (
        pd.DataFrame(pat_rows, columns=["ROW_ID", "SUBJECT_ID", "GENDER", "DOB"]),
        pd.DataFrame(adm_rows, columns=["ROW_ID", "SUBJECT_ID", "HADM_ID", "ADMITTIME", "DISCHTIME"]),
        pd.DataFrame(diag_rows, columns=["ROW_ID", "SUBJECT_ID", "HADM_ID", "SEQ_NUM", "ICD9_CODE"]),
    )


def write_mimic3(patients: list[Patient], folder, seed: int = 0) -> dict[str, Path]:
    """Write PATIENTS.csv, ADMISSIONS.csv, DIAGNOSES_ICD.csv into `folder` (see `mimic3_tables`)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, table in zip(("PATIENTS", "ADMISSIONS", "DIAGNOSES_ICD"), mimic3_tables(patients, seed)):
        paths[name] = folder / f"{name}.csv"
        table.to_csv(paths[name], index=False)
    return paths


def write_jsonl(patients: list[Patient], path) -> Path:
    """One JSON object per line: subject_id (the same 1..N as the CSV tables), age, sex, visits."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for subject_id, p in enumerate(patients, start=1):
            f.write(json.dumps({"subject_id": subject_id, "age": p.age, "sex": p.sex, "visits": p.visits}) + "\n")
    return path


def read_jsonl(path) -> list[Patient]:
    """Patients back from `write_jsonl`."""
    with Path(path).open() as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return [Patient(str(r["subject_id"]), float(r["age"]), r["sex"], r["visits"]) for r in rows]


def export_patients(patients: list[Patient], folder, seed: int = 0) -> dict[str, Path]:
    """The MIMIC-III tables and `patients.jsonl` in `folder`; returns their paths."""
    paths = write_mimic3(patients, folder, seed)
    paths["patients.jsonl"] = write_jsonl(patients, Path(folder) / "patients.jsonl")
    return paths
