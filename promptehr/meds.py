"""MEDS in and out: a MEDS dataset root <-> patients (Medical Event Data Standard, e.g. the MIMIC-IV MEDS ETL).

`load_meds_data(root)` reads diagnosis, sex and birth events from `data/**/*.parquet`, shard by shard and
only the columns and events it needs, into (patients, vocab, DataReport); `split_by_subject_splits` gives
(train, tuning) from `metadata/subject_splits.parquet`; `write_meds` writes patients as a MEDS dataset.
"""

from __future__ import annotations

import json
import logging
import math
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from promptehr import __version__
from promptehr.export import mimic3_tables, write_jsonl
from promptehr.schema import ICD_VERSIONS, MAX_AGE, SEXES, DataError, DataReport, Patient, build_vocab, summarize

logger = logging.getLogger(__name__)

BIRTH_CODE = "MEDS_BIRTH"  # the MEDS standard's birth event
GENDER_PREFIX = "GENDER//"  # GENDER//M, GENDER//F (MIMIC-IV MEDS ETL)
DIAGNOSIS_PREFIX = "DIAGNOSIS//ICD//"  # DIAGNOSIS//ICD//<version>//<code> (MIMIC-IV MEDS ETL)
TRAIN, TUNING, HELD_OUT = "train", "tuning", "held_out"
SPLITS_FILE = Path("metadata") / "subject_splits.parquet"
MEDS_VERSION = "0.4.1"  # the MEDS schema release the writer follows (tests validate with `meds`)
_BATCH_ROWS = 1 << 16  # rows read at a time from a shard before the event filter
_MICROS_PER_DAY = 86_400_000_000


# --------------------------------------------------------------------------------------------
# Reading
#
# Choices (documented here and in the README):
# - Events read: codes equal to MEDS_BIRTH, starting with GENDER// or with the diagnosis prefix
#   (data.meds_diagnosis_prefix); everything else is skipped while reading, so memory holds the
#   diagnosis, sex and birth events only. Subjects with none of these events are never seen.
# - A diagnosis code is <prefix><version>//<code>, kept as `ICD<version>:<code>` like the mimic4
#   loader; versions other than 9/10 (`diagnosis_events_unknown_icd_version`), codes not of that form
#   (`diagnosis_events_malformed_code`), events without a time (`diagnosis_events_without_time`) and,
#   by data.icd_versions, the other version (`diagnosis_events_excluded_icd_version`) are counted and
#   left out.
# - A visit is one admission (`hadm_id`) when the column exists and is set, else one timestamp
#   (`diagnosis_events_without_hadm_id` counts the events grouped by time). Visits are ordered by
#   their earliest event time, then hadm_id; codes keep their file order inside a visit and a repeat
#   is kept once (`duplicate_codes_in_visit`).
# - Sex: the GENDER//<M|F> event; none, another value or two different ones: `patients_unknown_gender`.
#   Birth: the earliest timed MEDS_BIRTH event; none: `patients_without_birth_info`. A patient with
#   both but no usable diagnosis: `patients_without_visits`. Each patient counts in the first of these
#   that applies; their diagnosis events are counted in `diagnosis_events_of_excluded_patients`.
# - Age: completed calendar years from birth to the first visit's time, capped at MAX_AGE
#   (`patients_age_capped`) and floored at 0 (`patients_age_negative`). With the ETL's birth event
#   (1 January of anchor_year - anchor_age) and diagnoses at discharge, this is the mimic4 loader's
#   age except when the first admission spans a new year (then one more: discharge year, not admission).
# - Patients come out ordered by subject_id.
# --------------------------------------------------------------------------------------------


def _is_text(t: pa.DataType) -> bool:
    if pa.types.is_dictionary(t):
        t = t.value_type
    return pa.types.is_string(t) or pa.types.is_large_string(t) or getattr(pa.types, "is_string_view", bool)(t)


_COLUMN_TYPES = {  # column -> (check, what MEDS asks for)
    "subject_id": (pa.types.is_integer, "int64"),
    "time": (pa.types.is_timestamp, "timestamp[us]"),
    "code": (_is_text, "string"),
}


_EVENTS = pa.schema(
    [("subject_id", pa.int64()), ("time", pa.timestamp("us")), ("code", pa.string()), ("hadm_id", pa.string())]
)


def _check_columns(path: Path, schema: pa.Schema, types: dict) -> None:
    missing = [c for c in types if c not in schema.names]
    if missing:
        raise DataError(f"{path}: required column(s) {', '.join(missing)} missing; columns found: {', '.join(schema.names)}")
    for column, (check, wanted) in types.items():
        found = schema.field(column).type
        if not check(found):
            raise DataError(f"{path}: column {column} has type {found}; MEDS wants {wanted}")


def _open_parquet(path: Path) -> pq.ParquetFile:
    try:
        return pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as exc:
        raise DataError(f"{path}: cannot read the parquet file: {exc}") from None


def _read_shard(path: Path, diagnosis_prefix: str) -> tuple[pd.DataFrame, bool]:
    """The birth, sex and diagnosis events of one shard (subject_id, time_us, time_missing, code,
    hadm_id) and whether the shard has a hadm_id column."""
    shard = _open_parquet(path)
    schema = shard.schema_arrow
    _check_columns(path, schema, _COLUMN_TYPES)
    has_hadm = "hadm_id" in schema.names
    if has_hadm and not (pa.types.is_integer(schema.field("hadm_id").type) or _is_text(schema.field("hadm_id").type)):
        raise DataError(f"{path}: column hadm_id has type {schema.field('hadm_id').type}; expected an integer or string")
    columns = ["subject_id", "time", "code"] + (["hadm_id"] if has_hadm else [])
    kept = []
    try:
        for batch in shard.iter_batches(batch_size=_BATCH_ROWS, columns=columns):
            code = batch.column("code").cast(pa.string())
            wanted = pc.or_(
                pc.or_(pc.starts_with(code, diagnosis_prefix), pc.starts_with(code, GENDER_PREFIX)),
                pc.equal(code, BIRTH_CODE),
            )
            if pc.any(wanted).as_py():
                kept.append(
                    pa.table(
                        [
                            batch.column("subject_id").cast(pa.int64()),
                            batch.column("time").cast(pa.timestamp("us"), safe=False),  # any unit; sub-microseconds dropped
                            code,
                            batch.column("hadm_id").cast(pa.string()) if has_hadm else pa.nulls(len(batch), pa.string()),
                        ],
                        schema=_EVENTS,
                    ).filter(wanted)
                )
    except (pa.ArrowException, OSError) as exc:
        raise DataError(f"{path}: cannot read the parquet file: {exc}") from None
    table = pa.concat_tables(kept) if kept else _EVENTS.empty_table()
    time = table.column("time")
    return pd.DataFrame(
        {
            "subject_id": table.column("subject_id").to_pandas(types_mapper={pa.int64(): pd.Int64Dtype()}.get),
            "time_us": pc.cast(time, pa.int64()).fill_null(0).to_numpy(),
            "time_missing": time.is_null().to_numpy(zero_copy_only=False),
            "code": table.column("code").to_numpy(zero_copy_only=False),
            "hadm_id": table.column("hadm_id").to_numpy(zero_copy_only=False),
        }
    ), has_hadm


def _shards(root: Path) -> list[Path]:
    if not root.exists():
        raise DataError(f"{root}: MEDS dataset folder does not exist")
    data = root / "data"
    if not data.is_dir():
        raise DataError(f"{root}: not a MEDS dataset root (no data/ folder with data/**/*.parquet)")
    shards = sorted(p for p in data.rglob("*.parquet") if p.is_file())
    if not shards:
        raise DataError(f"{data}: no parquet shards (MEDS keeps its events in data/**/*.parquet)")
    return shards


def read_dataset_metadata(root) -> dict:
    """`metadata/dataset.json` ({} when absent, with a warning); a file that is not JSON raises DataError."""
    path = Path(root) / "metadata" / "dataset.json"
    if not path.is_file():
        logger.warning("%s is missing (MEDS datasets describe themselves there); reading the data anyway", path)
        return {}
    try:
        meta = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: not valid JSON: {exc}") from None
    if not isinstance(meta, dict):
        raise DataError(f"{path}: expected a JSON object, got {type(meta).__name__}")
    return meta


def _whole_years(birth_us: np.ndarray, at_us: np.ndarray) -> np.ndarray:
    """Completed calendar years from birth to `at` (one fewer when `at` falls before that year's birthday)."""
    birth, at = birth_us.astype("datetime64[us]"), at_us.astype("datetime64[us]")

    def year_and_offset(t):  # offset: (month, day, time of day) as one comparable number
        year, month, day = (t.astype(f"datetime64[{u}]") for u in ("Y", "M", "D"))
        months = (month - year).astype(np.int64)
        days = (day - month).astype(np.int64)
        return year.astype(np.int64), (months * 32 + days) * _MICROS_PER_DAY + (t - day).astype(np.int64)

    b_year, b_offset = year_and_offset(birth)
    a_year, a_offset = year_and_offset(at)
    return (a_year - b_year - (a_offset < b_offset)).astype(float)


def _parse_diagnoses(diag: pd.DataFrame, prefix: str, versions: str, report: DataReport) -> pd.DataFrame:
    """Diagnosis events -> rows with code `ICD<version>:<code>`, the unusable ones counted and dropped."""
    rest = diag["code"].str.slice(len(prefix))
    parts = rest.str.split("//", n=1, expand=True).reindex(columns=[0, 1])
    version, icd = parts[0].str.strip(), parts[1].str.strip()
    malformed = icd.isna() | (icd == "") | (version == "")
    unknown_version = ~malformed & ~version.isin(["9", "10"])
    usable = ~malformed & ~unknown_version
    keep = usable if versions == "both" else usable & (version == versions)
    no_time = keep & diag["time_missing"]
    report.left_out(
        "diagnosis_events_malformed_code",
        int(malformed.sum()),
        f"diagnosis events are not of the form {prefix}<version>//<code>",
    )
    report.left_out(
        "diagnosis_events_unknown_icd_version",
        int(unknown_version.sum()),
        "diagnosis events have an ICD version other than 9 or 10",
    )
    report.add("diagnosis_events_excluded_icd_version", int((usable & ~keep).sum()))
    report.left_out("diagnosis_events_without_time", int(no_time.sum()), "diagnosis events have no time")
    keep &= ~no_time
    return diag[keep].assign(code="ICD" + version[keep] + ":" + icd[keep])


def _demographics(events: pd.DataFrame, subjects: np.ndarray, report: DataReport) -> pd.DataFrame:
    """Per subject: sex (M, F or missing) and birth time in microseconds (or missing), conflicts counted."""
    gender = events[events["code"].str.startswith(GENDER_PREFIX)]
    values = gender.assign(sex=gender["code"].str.slice(len(GENDER_PREFIX)).str.strip().str.upper())
    per_subject = values.groupby("subject_id")["sex"].agg(lambda s: s.iloc[0] if s.nunique() == 1 else "several")
    report.add("patients_conflicting_gender", int((per_subject == "several").sum()))
    births = events[(events["code"] == BIRTH_CODE) & ~events["time_missing"]]
    birth_times = births.groupby("subject_id")["time_us"]
    report.add("patients_several_birth_times", int((birth_times.nunique() > 1).sum()))
    out = pd.DataFrame(index=pd.Index(subjects, name="subject_id"))
    out["sex"] = per_subject.reindex(subjects).where(lambda s: s.isin(SEXES))
    out["birth_us"] = birth_times.min().astype("Int64").reindex(subjects)  # the earliest birth event when several disagree
    return out


def _assemble(diag: pd.DataFrame, people: pd.DataFrame, report: DataReport) -> list[Patient]:
    """Usable diagnosis rows of valid subjects -> Patients (visits by hadm_id or time, age at the first)."""
    hadm = diag["hadm_id"]
    report.add("diagnosis_events_without_hadm_id", int(hadm.isna().sum()))
    visit_key = hadm.where(hadm.notna(), "@" + diag["time_us"].astype(str))
    d = diag.assign(visit=visit_key.to_numpy(), row=np.arange(len(diag)))
    numeric = pd.to_numeric(hadm, errors="coerce")
    hadm_key = (
        numeric.to_numpy(dtype=float) if (numeric.notna() | hadm.isna()).all() else hadm.fillna("").astype(str).to_numpy()
    )
    d = d.assign(visit_time=d.groupby(["subject_id", "visit"])["time_us"].transform("min").to_numpy(), hadm_key=hadm_key)
    d = d.sort_values(["subject_id", "visit_time", "hadm_key", "visit", "row"], kind="stable")
    dup = d.duplicated(["subject_id", "visit", "code"], keep="first")
    report.add("duplicate_codes_in_visit", int(dup.sum()))
    d = d[~dup]
    if len(d) == 0:
        return []

    subject = d["subject_id"].to_numpy()
    visit = d["visit"].to_numpy(dtype=object)
    codes = d["code"].tolist()
    n = len(d)
    v_start = np.flatnonzero(np.r_[True, (subject[1:] != subject[:-1]) | (visit[1:] != visit[:-1])])
    v_end = np.r_[v_start[1:], n]
    visits = [codes[a:b] for a, b in zip(v_start.tolist(), v_end.tolist())]
    v_subject = subject[v_start]
    p_start = np.flatnonzero(np.r_[True, v_subject[1:] != v_subject[:-1]])
    p_end = np.r_[p_start[1:], len(v_start)]
    subjects = v_subject[p_start]

    rows = people.loc[subjects]
    first_visit_us = d["visit_time"].to_numpy()[v_start[p_start]]
    ages = _whole_years(rows["birth_us"].to_numpy(dtype=np.int64), first_visit_us.astype(np.int64))
    report.add("patients_age_capped", int((ages > MAX_AGE).sum()))
    report.add("patients_age_negative", int((ages < 0).sum()))
    ages = np.clip(ages, 0.0, MAX_AGE)
    return [
        Patient(str(int(s)), float(age), sex, visits[a:b])
        for s, age, sex, a, b in zip(
            subjects.tolist(), ages.tolist(), rows["sex"].tolist(), p_start.tolist(), p_end.tolist()
        )
    ]


def load_meds_data(
    root, icd_versions: str = "both", diagnosis_prefix: str = DIAGNOSIS_PREFIX, progress: bool = True
) -> tuple[list[Patient], list[str], DataReport]:
    """Patients from the MEDS dataset at `root` (the folder holding data/ and metadata/).

    Diagnoses are the events whose code starts with `diagnosis_prefix` followed by `<version>//<code>`,
    kept as `ICD9:<code>` / `ICD10:<code>` (`icd_versions`: "9", "10" or "both"); sex from GENDER//M|F,
    age from MEDS_BIRTH (see the notes under Reading above). Returns (patients, vocab, report).
    """
    versions = str(icd_versions).strip().lower()
    if versions not in ICD_VERSIONS:
        raise DataError(f"data.icd_versions must be one of 9, 10, both; got {icd_versions!r}")
    if not diagnosis_prefix:
        raise DataError("data.meds_diagnosis_prefix is empty: it must select the diagnosis codes, e.g. DIAGNOSIS//ICD//")
    root = Path(root)
    shards = _shards(root)
    meta = read_dataset_metadata(root)
    logger.info(
        "MEDS dataset %s (%s): %d shard(s)",
        meta.get("dataset_name", root.name),
        meta.get("etl_name", "ETL unknown"),
        len(shards),
    )
    report = DataReport("meds")
    frames, any_hadm = [], False
    for path in tqdm(shards, desc="MEDS shards", unit="shard", disable=not progress or len(shards) < 2, leave=False):
        frame, has_hadm = _read_shard(path, diagnosis_prefix)
        frames.append(frame)
        any_hadm |= has_hadm
    report.add("shards", len(shards))
    events = pd.concat(frames, ignore_index=True)
    no_subject = events["subject_id"].isna()
    report.left_out("events_without_subject_id", int(no_subject.sum()), "birth, sex or diagnosis events have no subject_id")
    events = events[~no_subject].astype({"subject_id": np.int64})
    if not any_hadm:
        logger.info("data[meds]: no hadm_id column: diagnosis events at the same time form one visit")

    is_diag = events["code"].str.startswith(diagnosis_prefix).to_numpy()
    report.add("diagnosis_events", int(is_diag.sum()))
    if not is_diag.any():
        raise DataError(
            f"{root}: no diagnosis events: no value of column code in data/**/*.parquet starts with "
            f"{diagnosis_prefix!r} (data.meds_diagnosis_prefix)"
        )
    diag = _parse_diagnoses(events[is_diag], diagnosis_prefix, versions, report)
    people = _demographics(events[~is_diag], np.sort(events["subject_id"].unique()), report)

    no_sex = people["sex"].isna()
    no_birth = ~no_sex & people["birth_us"].isna()
    valid = ~no_sex & ~no_birth
    with_diag = people.index.isin(diag["subject_id"].unique())
    report.add("patients_unknown_gender", int(no_sex.sum()))
    report.add("patients_without_birth_info", int(no_birth.sum()))
    report.add("patients_without_visits", int((valid & ~with_diag).sum()))
    of_excluded = ~diag["subject_id"].isin(people.index[valid])
    report.add("diagnosis_events_of_excluded_patients", int(of_excluded.sum()))
    patients = _assemble(diag[~of_excluded], people, report)
    if not patients:
        raise DataError(
            f"{root}: no patient has sex, birth and a usable diagnosis event: "
            + ", ".join(f"{k} {v}" for k, v in report.counts.items() if v)
        )
    summarize(patients, report)
    return patients, build_vocab(patients), report


# --------------------------------------------------------------------------------------------
# Splits: metadata/subject_splits.parquet (subject_id int64, split string)
# --------------------------------------------------------------------------------------------


def read_subject_splits(root) -> dict[str, str]:
    """subject_id (as the Patient's string) -> split name, from `metadata/subject_splits.parquet`."""
    path = Path(root) / SPLITS_FILE
    if not path.is_file():
        raise DataError(
            f"{path} is missing: data.split=meds uses the dataset's own train/tuning/held_out subjects "
            "(use data.split=random for a seeded split instead)"
        )
    f = _open_parquet(path)
    _check_columns(path, f.schema_arrow, {"subject_id": _COLUMN_TYPES["subject_id"], "split": (_is_text, "string")})
    try:
        table = f.read(columns=["subject_id", "split"])
    except (pa.ArrowException, OSError) as exc:
        raise DataError(f"{path}: cannot read the parquet file: {exc}") from None
    df = pd.DataFrame(
        {"subject_id": table.column("subject_id").to_pandas(), "split": table.column("split").cast(pa.string()).to_pandas()}
    )
    if df.isna().any().any():
        raise DataError(
            f"{path}: columns subject_id and split must not be null ({int(df.isna().any(axis=1).sum())} rows are)"
        )
    if df["subject_id"].duplicated().any():
        raise DataError(f"{path}: column subject_id must be unique; {int(df['subject_id'].duplicated().sum())} repeats")
    return dict(zip(df["subject_id"].astype(np.int64).astype(str), df["split"]))


def split_by_subject_splits(patients: list[Patient], root, report: DataReport | None = None):
    """(train, tuning) patients by the dataset's subject_splits; held_out and other splits are left out.

    Counts go to `report`: patients per split, `patients_not_in_subject_splits`, `patients_other_split`.
    """
    splits = read_subject_splits(root)
    groups: dict[str, list[Patient]] = {TRAIN: [], TUNING: [], HELD_OUT: []}
    missing = other = 0
    for p in patients:
        name = splits.get(p.subject_id)
        if name is None:
            missing += 1
        elif name in groups:
            groups[name].append(p)
        else:
            other += 1
    report = report if report is not None else DataReport("meds")
    for name, group in groups.items():
        report.counts[f"patients_split_{name}"] = len(group)
    report.counts["patients_other_split"] = other
    report.counts["patients_not_in_subject_splits"] = missing
    if missing:
        logger.warning(
            "data[meds] %d patients are not in %s; they are used for neither training nor validation", missing, SPLITS_FILE
        )
    for name in (TRAIN, TUNING):
        if not groups[name]:
            raise DataError(
                f"{Path(root) / SPLITS_FILE}: no loaded patient is in split {name!r} "
                f"({sum(v == name for v in splits.values())} subjects listed there)"
            )
    return groups[TRAIN], groups[TUNING]


def held_out_subject_ids(root) -> list[str]:
    """The subjects of split held_out (sorted), for the split fingerprint."""
    return sorted((s for s, name in read_subject_splits(root).items() if name == HELD_OUT), key=int)


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------


def meds_code(code: str) -> str:
    """A model's code as a MEDS diagnosis code: `ICD10:I10` -> DIAGNOSIS//ICD//10//I10; an unprefixed
    code (MIMIC-III and the built-in cohort speak ICD-9) -> DIAGNOSIS//ICD//9//<code>."""
    for version in ("9", "10"):
        if code.startswith(f"ICD{version}:"):
            return f"{DIAGNOSIS_PREFIX}{version}//{code[len(version) + 4 :]}"
    return f"{DIAGNOSIS_PREFIX}9//{code}"


def meds_events(patients: list[Patient], seed: int = 0) -> pa.Table:
    """All events of `patients` as one MEDS data table, subjects 1..N, sorted by subject then time.

    Per patient: GENDER//<sex> (no time), MEDS_BIRTH, then per visit one event per code at the
    visit's discharge time with its `hadm_id`. Admissions and dates are those `export.mimic3_tables`
    draws for the same seed (so both formats describe the same stays); birth is 1 January of the first
    discharge's year minus the whole-years age, as the MIMIC-IV ETL writes it (age capped at MAX_AGE).
    """
    pat, adm, diag = mimic3_tables(patients, seed)
    disch = pd.to_datetime(adm["DISCHTIME"]).to_numpy().astype("datetime64[us]")
    disch_by_hadm = pd.Series(disch, index=adm["HADM_ID"].to_numpy())
    first_disch = pd.Series(disch, index=adm["SUBJECT_ID"].to_numpy()).groupby(level=0).min()
    subject_ids = pat["SUBJECT_ID"].to_numpy(dtype=np.int64)
    ages = np.array([math.floor(min(max(p.age, 0.0), MAX_AGE)) for p in patients], dtype=np.int64)
    first_year = first_disch.loc[subject_ids].to_numpy().astype("datetime64[Y]").astype(np.int64) + 1970
    birth = (first_year - ages - 1970).astype("datetime64[Y]").astype("datetime64[us]")

    n = len(subject_ids)
    static = pd.DataFrame(
        {
            "subject_id": np.repeat(subject_ids, 2),
            "order": np.tile([0, 1], n),
            "time": np.stack([np.full(n, np.datetime64("NaT"), dtype="datetime64[us]"), birth], axis=1).ravel(),
            "code": np.stack(
                [(GENDER_PREFIX + pat["GENDER"]).to_numpy(), np.full(n, BIRTH_CODE, dtype=object)], axis=1
            ).ravel(),
            "hadm_id": pd.array([pd.NA] * (2 * n), dtype="Int64"),
        }
    )
    events = pd.DataFrame(
        {
            "subject_id": diag["SUBJECT_ID"].to_numpy(dtype=np.int64),
            "order": 2,
            "time": disch_by_hadm.loc[diag["HADM_ID"].to_numpy()].to_numpy(),
            "code": [meds_code(c) for c in diag["ICD9_CODE"]],
            "hadm_id": pd.array(diag["HADM_ID"].to_numpy(dtype=np.int64), dtype="Int64"),
        }
    )
    table = pd.concat([static, events], ignore_index=True).sort_values(["subject_id", "order"], kind="stable")
    return pa.table(
        {
            "subject_id": pa.array(table["subject_id"].to_numpy(), pa.int64()),
            "time": pa.array(table["time"].to_numpy(), pa.timestamp("us")),
            "code": pa.array(table["code"].tolist(), pa.string()),
            "numeric_value": pa.nulls(len(table), pa.float32()),
            "hadm_id": pa.array(table["hadm_id"], pa.int64()),
        }
    )


_DESCRIPTIONS = {BIRTH_CODE: "birth", f"{GENDER_PREFIX}M": "male", f"{GENDER_PREFIX}F": "female"}


def write_meds(
    patients: list[Patient], root, seed: int = 0, generating_model: dict | None = None, subjects_per_shard: int = 100_000
) -> dict[str, Path]:
    """Write `patients` as a MEDS dataset at `root`: data/<i>.parquet (see `meds_events`),
    metadata/dataset.json (naming `generating_model`) and metadata/codes.parquet. No subject_splits:
    a generated cohort has none of its own. Returns the written paths."""
    root = Path(root)
    (root / "data").mkdir(parents=True, exist_ok=True)
    (root / "metadata").mkdir(parents=True, exist_ok=True)
    table = meds_events(patients, seed)
    paths: dict[str, Path] = {}
    subjects = table.column("subject_id").to_numpy()
    bounds = np.searchsorted(subjects, np.arange(1, len(patients) + 1, subjects_per_shard).tolist() + [len(patients) + 1])
    for i, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
        paths[f"data/{i}.parquet"] = root / "data" / f"{i}.parquet"
        pq.write_table(table.slice(a, b - a), paths[f"data/{i}.parquet"])
    codes = sorted(set(table.column("code").to_pylist()))
    paths["codes.parquet"] = root / "metadata" / "codes.parquet"
    pq.write_table(
        pa.table(
            {
                "code": pa.array(codes, pa.string()),
                "description": pa.array([_DESCRIPTIONS.get(c) for c in codes], pa.string()),
                "parent_codes": pa.nulls(len(codes), pa.list_(pa.string())),
            }
        ),
        paths["codes.parquet"],
    )
    paths["dataset.json"] = root / "metadata" / "dataset.json"
    paths["dataset.json"].write_text(
        json.dumps(
            {
                "dataset_name": "promptehr-synthetic",
                "dataset_version": f"seed-{seed}",
                "etl_name": "promptehr generate",
                "etl_version": __version__,
                "meds_version": MEDS_VERSION,
                "created_at": datetime.now(timezone.utc).isoformat(),
                "raw_source_id_columns": ["hadm_id"],
                "generating_model": generating_model or {},
            },
            indent=1,
        )
    )
    return paths


def export_meds(patients: list[Patient], root, seed: int = 0, generating_model: dict | None = None) -> dict[str, Path]:
    """The MEDS dataset and `patients.jsonl` (the exact generated ages) in `root`; returns their paths."""
    paths = write_meds(patients, root, seed, generating_model)
    paths["patients.jsonl"] = write_jsonl(patients, Path(root) / "patients.jsonl")
    return paths
