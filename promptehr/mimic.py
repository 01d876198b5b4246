"""MIMIC-III and MIMIC-IV loaders: the CSV tables (PATIENTS, ADMISSIONS, DIAGNOSES_ICD; MIMIC-IV's hosp/)
-> (patients, vocab, DataReport). `load_mimic_data(folder)` reads MIMIC-III, `load_mimic4_data(folder)`
MIMIC-IV with `ICD9:`/`ICD10:`-prefixed codes; every row or record left out is counted in the report.
"""

from __future__ import annotations

import logging

import numpy as np

from promptehr.schema import ICD_VERSIONS, MAX_AGE, SEXES, DataError, DataReport, Patient, build_vocab, summarize

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------
# MIMIC loaders
#
# Both loaders share one vectorised pipeline (`_assemble`): classify every diagnosis row against
# the raw tables, drop the unusable ones with a count, then sort the remaining rows once by
# (patient, admittime, hadm_id, seq_num) and cut the sorted code array into visits and patients.
# Every row or record that is left out is counted in the DataReport (all keys are always present,
# 0 included); only counts are ever logged, never identifiers or records.
#
# Choices (documented here and in the docstrings):
# - Diagnosis rows are classified in this order, each row counted once, in the first class that
#   applies: `diagnosis_rows_unknown_patient` (subject_id not in PATIENTS),
#   `diagnosis_rows_unknown_admission` (hadm_id empty or not in ADMISSIONS),
#   `diagnosis_rows_subject_mismatch` (hadm_id belongs to another subject in ADMISSIONS),
#   `diagnosis_rows_null_code` (empty code). The first three are logged with logger.warning.
# - Patients whose gender is not M/F (`patients_unknown_gender`) or whose dob / anchor_age /
#   anchor_year is empty (`patients_without_birth_info`) are excluded with their admissions
#   (`admissions_of_excluded_patients`). Admissions whose subject is not in PATIENTS are counted
#   (`admissions_unknown_patient`, warning) and dropped; so are admissions with an empty admittime
#   (`admissions_without_admittime`).
# - A code repeated inside one admission is kept once, at its lowest seq_num
#   (`duplicate_codes_in_visit` counts the repeats removed).
# - An admission left with no code is not a visit: it is dropped and counted
#   (`admissions_without_codes`); a patient left with no visit is dropped and counted
#   (`patients_without_visits`).
# - Age is taken at the patient's first VISIT (the earliest admission that kept a code, i.e. the
#   first visit of `Patient.visits`), so that the age prompt describes the start of the sequence the
#   model sees. MIMIC-III: whole years, floor((admittime - dob) in days / 365.25), computed on
#   integer seconds (no timedelta overflow for the ~300-year shifted ages). MIMIC-IV:
#   anchor_age + (year(admittime) - anchor_year). Both are capped at MAX_AGE
#   (`patients_age_capped` counts them) and floored at 0 (`patients_age_negative`).
# - Patients come out ordered by subject_id (numerically when all ids are numeric).
# --------------------------------------------------------------------------------------------

_MIMIC3_TABLES = {
    "patients": ("PATIENTS", ("subject_id", "gender", "dob")),
    "admissions": ("ADMISSIONS", ("subject_id", "hadm_id", "admittime")),
    "diagnoses": ("DIAGNOSES_ICD", ("subject_id", "hadm_id", "seq_num", "icd9_code")),
}
_MIMIC4_TABLES = {
    "patients": ("patients", ("subject_id", "gender", "anchor_age", "anchor_year")),
    "admissions": ("admissions", ("subject_id", "hadm_id", "admittime")),
    "diagnoses": ("diagnoses_icd", ("subject_id", "hadm_id", "seq_num", "icd_code", "icd_version")),
}
_SECONDS_PER_YEAR = 365.25 * 86400.0


def _find_table(folder, name: str):
    """`folder/<name>.csv` or `.csv.gz`, file name compared without regard to case."""
    from pathlib import Path

    wanted = {f"{name.lower()}.csv", f"{name.lower()}.csv.gz"}
    found = sorted(p for p in Path(folder).iterdir() if p.is_file() and p.name.lower() in wanted)
    if not found:
        looked = ", ".join(dict.fromkeys(f"{n}{ext}" for n in (name, name.lower()) for ext in (".csv", ".csv.gz")))
        raise DataError(f"{folder}: table {name} is missing (looked for {looked}, file names in any case)")
    if len(found) > 1:
        raise DataError(f"{folder}: table {name} is present twice ({', '.join(p.name for p in found)}); keep one")
    return found[0]


_CHUNK_ROWS = 500_000
_ID_COLUMNS = ("subject_id", "hadm_id")


def _read_table(path, required: tuple[str, ...]):
    """Read the `required` columns (headers compared without regard to case) as strings.

    Only an empty field is missing (keep_default_na=False), so no code such as "NA" turns into NaN,
    and codes keep their leading zeros. Columns come back lowercase. Every column is parsed (in chunks,
    keeping only the required ones), so that a row with more fields than the header (an unquoted comma:
    `40,19`) stops the load with its line number instead of shifting or cutting a value. Ids written
    as floats (`10006.0`, a spreadsheet's doing) are read as the integers they are.
    """
    import warnings
    import zlib

    import pandas as pd

    unreadable = (OSError, EOFError, UnicodeDecodeError, zlib.error)  # zlib.error: corrupt .gz data
    try:
        header = pd.read_csv(path, nrows=0)
    except pd.errors.EmptyDataError:
        raise DataError(f"{path}: the file is empty (no header line)") from None
    except (*unreadable, pd.errors.ParserError) as exc:
        raise DataError(f"{path}: cannot read the table: {type(exc).__name__}: {exc}") from None
    by_lower: dict[str, str] = {}
    for col in header.columns:
        by_lower.setdefault(str(col).strip().lower(), col)
    missing = [c for c in required if c not in by_lower]
    if missing:
        raise DataError(
            f"{path}: required column(s) {', '.join(missing)} missing; columns found: {', '.join(map(str, header.columns))}"
        )
    usecols = [by_lower[c] for c in required]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", pd.errors.ParserWarning)  # pandas' only sign of a long first row
            chunks = [
                chunk[usecols]
                for chunk in pd.read_csv(
                    path, dtype=str, keep_default_na=False, na_values=[""], index_col=False, chunksize=_CHUNK_ROWS
                )
            ]
    except pd.errors.ParserWarning:
        raise DataError(
            f"{path}: line 2 has more fields than the header's {len(header.columns)} (an unquoted comma inside a value?)"
        ) from None
    except pd.errors.ParserError as exc:
        import re

        found = re.search(r"Expected (\d+) fields in line (\d+), saw (\d+)", str(exc))
        if found:
            raise DataError(
                f"{path}: line {found[2]} has {found[3]} fields, the header {found[1]} (an unquoted comma inside a value?)"
            ) from None
        raise DataError(f"{path}: cannot read the table: {exc}") from None
    except (*unreadable, ValueError) as exc:
        raise DataError(f"{path}: cannot read the table: {type(exc).__name__}: {exc}") from None
    df = pd.concat(chunks, ignore_index=True) if chunks else pd.DataFrame(columns=usecols)
    if len(df) == 0:
        raise DataError(f"{path}: the table is empty (a header but no data rows)")
    df = df.rename(columns={by_lower[c]: c for c in required})[list(required)]
    for col in required:  # surrounding blanks are never meaningful; a blank field is missing
        s = df[col].str.strip()
        if col in _ID_COLUMNS:
            s = _integer_ids(s, path, col)
        # plain object columns: hashing (isin, merge, duplicated) is much faster than on arrow strings
        df[col] = s.where(s != "").astype(object)
    return df


def _integer_ids(ids, path, column: str):
    """`10006.0` -> `10006` (ids that went through a float column); other values as they are."""
    if not ids.str.contains(".", regex=False).any():
        return ids
    as_float = ids.str.fullmatch(r"\d+\.0*").fillna(False)
    if as_float.any():
        logger.info(
            "%s: %d %s values written as floats (e.g. %s) are read as integers", path, int(as_float.sum()), column, "10006.0"
        )
        ids = ids.where(~as_float, ids.str.split(".", n=1).str[0])
    return ids


def _parse_seconds(series, path, column: str):
    """Timestamps -> (int64 seconds since 1970, missing mask); a bad value raises DataError.

    Works on whole seconds, so differences of ~300 years (MIMIC-III's shifted ages) never overflow.
    """
    import pandas as pd

    missing = series.isna().to_numpy()
    parsed = pd.to_datetime(series, format="ISO8601", errors="coerce")
    bad = parsed.isna().to_numpy() & ~missing
    if bad.any():
        first = series[bad].iloc[0]
        raise DataError(
            f"{path}: column {column}: cannot parse date value {first!r} "
            f"({int(bad.sum())} unparseable value(s); expected YYYY-MM-DD HH:MM:SS)"
        )
    secs = np.zeros(len(series), dtype=np.int64)
    if (~missing).any():
        secs[~missing] = parsed[~missing].to_numpy().astype("datetime64[s]").astype(np.int64)
    return secs, missing


def _parse_int(series, path, column: str):
    """Integer column -> (float array with NaN for missing); a bad value raises DataError."""
    import pandas as pd

    values = pd.to_numeric(series, errors="coerce")
    bad = values.isna().to_numpy() & series.notna().to_numpy()
    if bad.any():
        first = series[bad].iloc[0]
        raise DataError(f"{path}: column {column}: {first!r} is not a number ({int(bad.sum())} bad value(s))")
    return values.to_numpy(dtype=float)


def _sort_key(ids):
    """Numeric key for identifiers when they are all numeric, else the strings themselves."""
    import pandas as pd

    as_num = pd.to_numeric(ids, errors="coerce")
    if as_num.notna().all():
        return as_num.to_numpy(dtype=float)
    return ids.astype(str).to_numpy()


def _check_unique(df, column: str, path) -> None:
    dup = df[column].duplicated(keep=False) & df[column].notna()
    if dup.any():
        raise DataError(f"{path}: column {column} must be unique; {int(dup.sum())} rows share a value")


def _classify_diagnoses(pat, adm, diag, report: DataReport, code_col: str):
    """Drop diagnosis rows that cannot be placed, counting each class; returns the usable rows."""
    known_subjects = pat["subject_id"].dropna().unique()
    with_id = adm["hadm_id"].notna()
    adm_subject = dict(zip(adm.loc[with_id, "hadm_id"], adm.loc[with_id, "subject_id"]))

    unknown_patient = ~diag["subject_id"].isin(known_subjects)
    unknown_adm = ~unknown_patient & (diag["hadm_id"].isna() | ~diag["hadm_id"].isin(adm_subject.keys()))
    placed = ~unknown_patient & ~unknown_adm
    owner = diag["hadm_id"].map(adm_subject)
    mismatch = placed & (owner != diag["subject_id"])
    null_code = placed & ~mismatch & diag[code_col].isna()

    report.left_out(
        "diagnosis_rows_unknown_patient",
        int(unknown_patient.sum()),
        "diagnosis rows name a subject_id that is not in the patients table",
    )
    report.left_out(
        "diagnosis_rows_unknown_admission",
        int(unknown_adm.sum()),
        "diagnosis rows name a hadm_id that is empty or not in the admissions table",
    )
    report.left_out(
        "diagnosis_rows_subject_mismatch",
        int(mismatch.sum()),
        "diagnosis rows name an admission that belongs to another subject",
    )
    report.add("diagnosis_rows_null_code", int(null_code.sum()))
    if null_code.any():
        logger.info("data[%s] %d diagnosis rows have no code; they are left out", report.source, int(null_code.sum()))
    return diag[placed & ~mismatch & ~null_code]


def _assemble(pat, adm, diag, report: DataReport, age_fn) -> list[Patient]:
    """Turn cleaned tables into Patients.

    pat: subject_id, sex, valid (bool: sex and birth info usable) plus what `age_fn` reads;
    adm: subject_id, hadm_id, admit_s (int64 seconds), admit_missing (bool), admit_year;
    diag: subject_id, hadm_id, seq_num, code (placed, non-null rows only).
    `age_fn(pat_rows, first_visit_adm_rows) -> float array` of uncapped ages.
    """
    import pandas as pd

    valid_subjects = pat.loc[pat["valid"], "subject_id"]
    adm_valid_patient = adm["subject_id"].isin(valid_subjects.unique())
    report.add("admissions_of_excluded_patients", int((~adm_valid_patient).sum()))
    report.add("admissions_without_admittime", int((adm_valid_patient & adm["admit_missing"]).sum()))
    adm = adm[adm_valid_patient & ~adm["admit_missing"]]

    diag = diag[diag["hadm_id"].isin(adm["hadm_id"].unique())]
    # one order for everything: admittime, then hadm_id, then seq_num, then file order
    adm = adm.assign(hadm_key=_sort_key(adm["hadm_id"]))
    subj_key = pd.Series(_sort_key(pat["subject_id"]), index=pat["subject_id"].to_numpy())
    adm = adm.assign(subj_key=adm["subject_id"].map(subj_key).to_numpy())
    d = diag.assign(
        seq=pd.to_numeric(diag["seq_num"], errors="coerce").to_numpy(dtype=float),
        row=np.arange(len(diag)),
    ).merge(adm[["hadm_id", "admit_s", "hadm_key", "subj_key"]], on="hadm_id", how="left", validate="many_to_one")
    d = d.sort_values(["subj_key", "admit_s", "hadm_key", "seq", "row"], kind="stable", na_position="last")
    dup = d.duplicated(["hadm_id", "code"], keep="first")
    report.add("duplicate_codes_in_visit", int(dup.sum()))
    d = d[~dup]

    hadm_with_codes = d["hadm_id"].unique()
    report.add("admissions_without_codes", int((~adm["hadm_id"].isin(hadm_with_codes)).sum()))
    subjects_with_visits = d["subject_id"].unique()
    report.add("patients_without_visits", int((~valid_subjects.isin(subjects_with_visits)).sum()))

    if len(d) == 0:
        return []
    hadm = d["hadm_id"].to_numpy(dtype=object)
    codes = d["code"].to_numpy(dtype=object).tolist()
    n = len(hadm)
    v_start = np.flatnonzero(np.r_[True, hadm[1:] != hadm[:-1]])  # rows sorted: one run per admission
    v_end = np.r_[v_start[1:], n]
    visits = [codes[a:b] for a, b in zip(v_start.tolist(), v_end.tolist())]
    v_subject = d["subject_id"].to_numpy(dtype=object)[v_start]
    p_start = np.flatnonzero(np.r_[True, v_subject[1:] != v_subject[:-1]])
    p_end = np.r_[p_start[1:], len(v_start)]
    subjects = v_subject[p_start]

    first_hadm = hadm[v_start[p_start]]
    pat_rows = pat.set_index("subject_id").loc[list(subjects)]
    adm_rows = adm.set_index("hadm_id").loc[list(first_hadm)]
    ages = np.floor(np.asarray(age_fn(pat_rows, adm_rows), dtype=float))
    report.add("patients_age_capped", int((ages > MAX_AGE).sum()))
    report.add("patients_age_negative", int((ages < 0).sum()))
    ages = np.clip(ages, 0.0, MAX_AGE)
    sexes = pat_rows["sex"].tolist()

    return [
        Patient(str(s), float(age), sex, visits[a:b])
        for s, age, sex, a, b in zip(subjects.tolist(), ages.tolist(), sexes, p_start.tolist(), p_end.tolist())
    ]


def _what_was_dropped(report: DataReport, tables: dict) -> str:
    """The counts that explain an empty result: the rows read, and every non-zero count of what was left out."""
    read = ", ".join(f"{len(df)} {path.name} rows" for path, df in tables.values())
    dropped = ", ".join(f"{k} {v}" for k, v in report.counts.items() if v and k != "diagnosis_rows")
    return f"read {read}; left out: {dropped or 'nothing'}"


def _read_tables(folder, spec: dict):
    from pathlib import Path

    folder = Path(folder)
    if not folder.exists():
        raise DataError(f"{folder}: data folder does not exist")
    if not folder.is_dir():
        raise DataError(f"{folder}: data path is not a folder")
    out = {}
    for key, (name, cols) in spec.items():
        path = _find_table(folder, name)
        out[key] = (path, _read_table(path, cols))
    return out


def _sex_column(pat):
    g = pat["gender"].str.upper()
    return g.where(g.isin(SEXES))


def load_mimic_data(path) -> tuple[list[Patient], list[str], DataReport]:
    """Load MIMIC-III PATIENTS, ADMISSIONS, DIAGNOSES_ICD from folder `path`.

    Each table may be `.csv` or `.csv.gz`, file names and headers in any case (full MIMIC-III:
    `PATIENTS.csv.gz`, UPPERCASE headers; the demo: `PATIENTS.csv`, lowercase headers). Codes are
    kept as strings exactly as written (leading zeros, V/E codes). A visit is one admission's
    distinct codes in seq_num order, visits in admittime order (ties by hadm_id). Age is the whole
    number of years from dob to the first visit, floor(days / 365.25), capped at MAX_AGE. What is
    left out, and why, is counted in the returned DataReport (see the notes above `_MIMIC3_TABLES`).
    Returns (patients, vocab, report) with vocab = sorted distinct codes.
    """
    report = DataReport("mimic3")
    tables = _read_tables(path, _MIMIC3_TABLES)
    p_path, pat = tables["patients"]
    a_path, adm = tables["admissions"]
    _, diag = tables["diagnoses"]
    _check_unique(pat, "subject_id", p_path)
    _check_unique(adm, "hadm_id", a_path)

    dob_s, dob_missing = _parse_seconds(pat["dob"], p_path, "dob")
    sex = _sex_column(pat)
    pat = pat.assign(sex=sex, dob_s=dob_s, valid=sex.notna().to_numpy() & ~dob_missing)
    report.add("patients_unknown_gender", int(sex.isna().sum()))
    report.add("patients_without_birth_info", int((sex.notna().to_numpy() & dob_missing).sum()))

    admit_s, admit_missing = _parse_seconds(adm["admittime"], a_path, "admittime")
    adm = adm.assign(admit_s=admit_s, admit_missing=admit_missing)
    unknown = ~adm["subject_id"].isin(pat["subject_id"].dropna().unique())
    report.left_out(
        "admissions_unknown_patient", int(unknown.sum()), "admissions name a subject_id that is not in the patients table"
    )
    adm = adm[~unknown]

    report.add("diagnosis_rows", len(diag))
    diag = _classify_diagnoses(pat, adm, diag, report, "icd9_code").rename(columns={"icd9_code": "code"})

    def age_fn(pat_rows, adm_rows):
        return (adm_rows["admit_s"].to_numpy() - pat_rows["dob_s"].to_numpy()) / _SECONDS_PER_YEAR

    patients = _assemble(pat, adm, diag, report, age_fn)
    if not patients:
        raise DataError(f"{path}: no patient has an admission with a diagnosis code; {_what_was_dropped(report, tables)}")
    summarize(patients, report)
    return patients, build_vocab(patients), report


def _mimic4_hosp(path):
    from pathlib import Path

    root = Path(path)
    if not root.exists():
        raise DataError(f"{root}: data folder does not exist")
    hosp = root / "hosp"
    return hosp if hosp.is_dir() else root


def load_mimic4_data(path, icd_versions: str = "both") -> tuple[list[Patient], list[str], DataReport]:
    """Load MIMIC-IV hosp/patients, admissions, diagnoses_icd (`path` = the root holding hosp/, or hosp/).

    Codes are prefixed by version so that ICD-9 and ICD-10 never collide: `ICD9:4019`,
    `ICD10:I10`. `icd_versions` is "9", "10" or "both"; rows of the other version are counted
    (`diagnosis_rows_excluded_icd_version`) and admissions / patients left without a code are
    counted as in `load_mimic_data` (`admissions_only_excluded_icd_version` says how many of the
    dropped admissions held codes of the excluded version only). Age at the first visit =
    anchor_age + (year(admittime) - anchor_year), capped at MAX_AGE.
    """
    versions = str(icd_versions).strip().lower()
    if versions not in ICD_VERSIONS:
        raise DataError(f"data.icd_versions must be one of 9, 10, both; got {icd_versions!r}")
    report = DataReport("mimic4")
    tables = _read_tables(_mimic4_hosp(path), _MIMIC4_TABLES)
    p_path, pat = tables["patients"]
    a_path, adm = tables["admissions"]
    _, diag = tables["diagnoses"]
    _check_unique(pat, "subject_id", p_path)
    _check_unique(adm, "hadm_id", a_path)

    anchor_age = _parse_int(pat["anchor_age"], p_path, "anchor_age")
    anchor_year = _parse_int(pat["anchor_year"], p_path, "anchor_year")
    sex = _sex_column(pat)
    birth_missing = np.isnan(anchor_age) | np.isnan(anchor_year)
    pat = pat.assign(
        sex=sex, anchor_age_f=anchor_age, anchor_year_f=anchor_year, valid=sex.notna().to_numpy() & ~birth_missing
    )
    report.add("patients_unknown_gender", int(sex.isna().sum()))
    report.add("patients_without_birth_info", int((sex.notna().to_numpy() & birth_missing).sum()))

    admit_s, admit_missing = _parse_seconds(adm["admittime"], a_path, "admittime")
    admit_year = (admit_s.astype("datetime64[s]").astype("datetime64[Y]").astype(np.int64) + 1970).astype(float)
    adm = adm.assign(admit_s=admit_s, admit_missing=admit_missing, admit_year=admit_year)
    unknown = ~adm["subject_id"].isin(pat["subject_id"].dropna().unique())
    report.left_out(
        "admissions_unknown_patient", int(unknown.sum()), "admissions name a subject_id that is not in the patients table"
    )
    adm = adm[~unknown]

    report.add("diagnosis_rows", len(diag))
    diag = _classify_diagnoses(pat, adm, diag, report, "icd_code")
    version = diag["icd_version"].str.strip()
    unknown_version = ~version.isin(["9", "10"])
    report.left_out(
        "diagnosis_rows_unknown_icd_version",
        int(unknown_version.sum()),
        "diagnosis rows have an icd_version other than 9 or 10",
    )
    keep = ~unknown_version if versions == "both" else (version == versions)
    excluded = ~unknown_version & ~keep
    report.add("diagnosis_rows_excluded_icd_version", int(excluded.sum()))
    hadm_kept = set(diag.loc[keep, "hadm_id"].unique())
    report.add("admissions_only_excluded_icd_version", len(set(diag.loc[excluded, "hadm_id"].unique()) - hadm_kept))
    diag = diag[keep]
    diag = diag.assign(code="ICD" + version[keep] + ":" + diag["icd_code"])[["subject_id", "hadm_id", "seq_num", "code"]]

    def age_fn(pat_rows, adm_rows):
        return pat_rows["anchor_age_f"].to_numpy() + (
            adm_rows["admit_year"].to_numpy() - pat_rows["anchor_year_f"].to_numpy()
        )

    patients = _assemble(pat, adm, diag, report, age_fn)
    if not patients:
        raise DataError(
            f"{path}: no patient has an admission with a diagnosis code (icd_versions={versions}); "
            f"{_what_was_dropped(report, tables)}"
        )
    summarize(patients, report)
    return patients, build_vocab(patients), report
