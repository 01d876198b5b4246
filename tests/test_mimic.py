"""MIMIC-III/IV loaders: exact figures on the MIMIC demos, bad input, orphan rows.

The demo tables live outside the repository (../shared/data); tests that need them are skipped
when that folder is absent. The hand-made folders below use fake ids only.
"""

from __future__ import annotations

import csv
import gzip
import logging
import math
from collections import Counter, defaultdict
from datetime import datetime
from pathlib import Path

import pytest

from promptehr.mimic import load_mimic4_data, load_mimic_data
from promptehr.schema import MAX_AGE, DataError

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
MIMIC3 = SHARED / "mimic3-demo"
MIMIC4 = SHARED / "mimic4-demo"
needs_shared = pytest.mark.skipif(not SHARED.exists(), reason="../shared/data (MIMIC demo tables) is absent")

ZERO_KEYS = (
    "patients_unknown_gender",
    "patients_without_birth_info",
    "admissions_unknown_patient",
    "diagnosis_rows_unknown_patient",
    "diagnosis_rows_unknown_admission",
    "diagnosis_rows_subject_mismatch",
    "diagnosis_rows_null_code",
    "admissions_of_excluded_patients",
    "admissions_without_admittime",
    "duplicate_codes_in_visit",
    "patients_age_negative",
)


def _read_csv(path: Path) -> list[dict[str, str]]:
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rt", newline="") as f:
        return list(csv.DictReader(f))


def _write_csv(path: Path, header: list[str], rows: list[list[object]]) -> None:
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "wt", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)


def _reference_mimic3(folder: Path) -> dict[str, tuple[float, str, list[list[str]]]]:
    """Independent, slow reading of the demo with the csv module: subject -> (age, sex, visits)."""
    ts = lambda s: datetime.strptime(s, "%Y-%m-%d %H:%M:%S")  # noqa: E731
    pats = {r["subject_id"]: r for r in _read_csv(folder / "PATIENTS.csv")}
    adms = defaultdict(list)
    for r in _read_csv(folder / "ADMISSIONS.csv"):
        adms[r["subject_id"]].append((ts(r["admittime"]), int(r["hadm_id"]), r["hadm_id"]))
    codes = defaultdict(list)
    for r in _read_csv(folder / "DIAGNOSES_ICD.csv"):
        codes[r["hadm_id"]].append((int(r["seq_num"]), r["icd9_code"]))
    out = {}
    for sid, rows in adms.items():
        rows.sort()
        visits = [[c for _, c in sorted(codes[h])] for _, _, h in rows]
        years = (rows[0][0] - ts(pats[sid]["dob"])).total_seconds() / (365.25 * 86400)
        out[sid] = (min(float(math.floor(years)), MAX_AGE), pats[sid]["gender"], visits)
    return out


# ---------------------------------------------------------------------------------------------
# MIMIC-III demo
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mimic3():
    return load_mimic_data(MIMIC3)


@needs_shared
def test_mimic3_demo_exact_figures(mimic3):
    patients, vocab, report = mimic3
    c = report.counts
    assert report.source == "mimic3"
    assert (c["patients"], c["visits"], c["distinct_codes"]) == (100, 129, 581)
    assert (len(patients), sum(len(p.visits) for p in patients), len(vocab)) == (100, 129, 581)
    assert c["diagnosis_rows"] == c["code_occurrences"] == 1761  # every row became a code occurrence
    assert c["patients_2plus_visits"] == 14
    assert c["admissions_without_codes"] == 0 and c["patients_without_visits"] == 0
    assert c["patients_age_capped"] == 8  # the 8 patients MIMIC shifted to ~300 years
    for key in ZERO_KEYS:
        assert c[key] == 0, key
    assert vocab == sorted(set(vocab))


@needs_shared
def test_mimic3_demo_fields(mimic3):
    patients, vocab, _ = mimic3
    assert all(0.0 <= p.age <= MAX_AGE for p in patients)
    assert sum(p.age == MAX_AGE for p in patients) == 8
    assert Counter(p.sex for p in patients) == {"F": 55, "M": 45}
    assert all(isinstance(c, str) for p in patients for v in p.visits for c in v)
    assert all(len(v) == len(set(v)) > 0 for p in patients for v in p.visits)
    # leading zeros and V/E codes are kept as written
    assert {"0389", "00845", "V5861", "4019"} <= set(vocab)
    assert "389" not in vocab and "845" not in vocab
    assert [p.subject_id for p in patients] == sorted((p.subject_id for p in patients), key=int)


@needs_shared
def test_mimic3_demo_matches_independent_reading(mimic3):
    """Visits in admittime order, codes in seq_num order, ages at first admission: all 100 patients."""
    patients, _, _ = mimic3
    ref = _reference_mimic3(MIMIC3)
    got = {p.subject_id: (p.age, p.sex, p.visits) for p in patients}
    assert got == ref
    p = next(p for p in patients if p.subject_id == "41976")  # the one patient with 15 admissions
    assert len(p.visits) == 15
    assert p.visits[0][:3] == ["0389", "5070", "51881"]


@needs_shared
@pytest.mark.parametrize("upper_names", [True, False])
def test_mimic3_case_insensitive_gzip(tmp_path, mimic3, upper_names):
    """Full MIMIC-III style (UPPERCASE headers, .csv.gz) loads identically to the plain demo."""
    for name in ("PATIENTS", "ADMISSIONS", "DIAGNOSES_ICD"):
        rows = _read_csv(MIMIC3 / f"{name}.csv")
        header = [h.upper() for h in rows[0]]
        target = tmp_path / (f"{name}.csv.gz" if upper_names else f"{name.lower()}.csv.gz")
        _write_csv(target, header, [list(r.values()) for r in rows])
    patients, vocab, report = load_mimic_data(tmp_path)
    assert patients == mimic3[0]
    assert vocab == mimic3[1]
    assert report.counts == mimic3[2].counts


# ---------------------------------------------------------------------------------------------
# MIMIC-IV demo
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mimic4():
    return {v: load_mimic4_data(MIMIC4, icd_versions=v) for v in ("both", "9", "10")}


@needs_shared
@pytest.mark.parametrize(
    "versions, patients, visits, codes, rows_excluded, adm_without, pat_without, two_plus",
    [
        ("both", 100, 275, 1474, 0, 0, 0, 48),
        ("9", 76, 152, 740, 2313, 123, 24, 28),
        ("10", 44, 123, 734, 2193, 152, 56, 25),
    ],
)
def test_mimic4_demo_exact_figures(
    mimic4, versions, patients, visits, codes, rows_excluded, adm_without, pat_without, two_plus
):
    pats, vocab, report = mimic4[versions]
    c = report.counts
    assert report.source == "mimic4"
    assert (c["patients"], c["visits"], c["distinct_codes"], len(vocab)) == (patients, visits, codes, codes)
    assert c["diagnosis_rows"] == 4506
    assert c["diagnosis_rows_excluded_icd_version"] == rows_excluded
    assert c["code_occurrences"] == 4506 - rows_excluded
    assert c["admissions_without_codes"] == c["admissions_only_excluded_icd_version"] == adm_without
    assert c["patients_without_visits"] == pat_without
    assert c["patients_2plus_visits"] == two_plus
    assert visits + adm_without == 275 and patients + pat_without == 100
    for key in ZERO_KEYS + ("diagnosis_rows_unknown_icd_version",):
        assert c[key] == 0, key
    assert all(0.0 <= p.age <= MAX_AGE for p in pats)
    assert set(p.sex for p in pats) <= {"M", "F"}
    prefix = {"both": ("ICD9:", "ICD10:"), "9": ("ICD9:",), "10": ("ICD10:",)}[versions]
    assert all(code.startswith(prefix) for code in vocab)


@needs_shared
def test_mimic4_demo_fields(mimic4):
    pats, vocab, _ = mimic4["both"]
    assert Counter(p.sex for p in pats) == {"M": 57, "F": 43}
    assert {"ICD9:4019", "ICD10:I10"} <= set(vocab)
    # E8809 / E8881 exist in both ICD-9 (E-codes) and ICD-10: the prefixes keep them apart
    assert {"ICD9:E8809", "ICD10:E8809", "ICD9:E8881", "ICD10:E8881"} <= set(vocab)
    assert any(c.startswith("ICD9:0") for c in vocab)  # leading zeros kept
    big = next(p for p in pats if p.subject_id == "10014354")  # 20 admissions
    assert len(big.visits) == 20
    assert Counter(len(p.visits) for p in pats) == {
        1: 52,
        2: 20,
        3: 9,
        4: 2,
        5: 2,
        6: 3,
        7: 4,
        8: 1,
        9: 1,
        10: 3,
        12: 1,
        13: 1,
        20: 1,
    }


@needs_shared
def test_mimic4_demo_matches_independent_reading(mimic4):
    """Visits chronological, codes by seq_num, age = anchor_age + year(first admit) - anchor_year."""
    hosp = MIMIC4 / "hosp"
    pats = {r["subject_id"]: r for r in _read_csv(hosp / "patients.csv.gz")}
    adms = defaultdict(list)
    for r in _read_csv(hosp / "admissions.csv.gz"):
        adms[r["subject_id"]].append((r["admittime"], int(r["hadm_id"]), r["hadm_id"]))
    codes = defaultdict(list)
    for r in _read_csv(hosp / "diagnoses_icd.csv.gz"):
        codes[r["hadm_id"]].append((int(r["seq_num"]), f"ICD{r['icd_version']}:{r['icd_code']}"))
    ref = {}
    for sid, rows in adms.items():
        rows.sort()
        p = pats[sid]
        age = int(p["anchor_age"]) + int(rows[0][0][:4]) - int(p["anchor_year"])
        ref[sid] = (float(min(age, 90)), p["gender"], [[c for _, c in sorted(codes[h])] for _, _, h in rows])
    got = {p.subject_id: (p.age, p.sex, p.visits) for p in mimic4["both"][0]}
    assert got == ref


@needs_shared
def test_mimic4_root_or_hosp_folder(mimic4):
    pats, vocab, report = load_mimic4_data(MIMIC4 / "hosp", icd_versions="9")
    assert pats == mimic4["9"][0] and vocab == mimic4["9"][1] and report.counts == mimic4["9"][2].counts


@pytest.mark.parametrize("bad", ["11", "icd9", "", "all"])
def test_mimic4_bad_icd_versions(tmp_path, bad):
    with pytest.raises(DataError, match="icd_versions") as exc:
        load_mimic4_data(tmp_path, icd_versions=bad)
    assert repr(bad) in str(exc.value)


def test_mimic4_hand_made(tmp_path):
    """Age formula and cap, versions kept apart, unknown version counted."""
    hosp = tmp_path / "hosp"
    hosp.mkdir()
    _write_csv(
        hosp / "patients.csv",
        ["subject_id", "gender", "anchor_age", "anchor_year", "dod"],
        [[900001, "F", 40, 2150, ""], [900002, "M", 91, 2170, ""]],
    )
    _write_csv(
        hosp / "admissions.csv",
        ["subject_id", "hadm_id", "admittime"],
        [
            [900001, 800012, "2157-03-01 08:00:00"],
            [900001, 800011, "2155-12-31 23:00:00"],
            [900002, 800021, "2171-01-01 00:00:00"],
        ],
    )
    _write_csv(
        hosp / "diagnoses_icd.csv",
        ["subject_id", "hadm_id", "seq_num", "icd_code", "icd_version"],
        [
            [900001, 800011, 1, "0389", 9],
            [900001, 800012, 1, "I10", 10],
            [900001, 800012, 2, "E8809", 10],
            [900002, 800021, 2, "E8809", 9],
            [900002, 800021, 1, "X1", 11],
        ],
    )
    pats, vocab, report = load_mimic4_data(tmp_path)
    assert [(p.subject_id, p.age, p.sex, p.visits) for p in pats] == [
        ("900001", 45.0, "F", [["ICD9:0389"], ["ICD10:I10", "ICD10:E8809"]]),
        ("900002", 90.0, "M", [["ICD9:E8809"]]),
    ]
    assert vocab == ["ICD10:E8809", "ICD10:I10", "ICD9:0389", "ICD9:E8809"]
    assert report.counts["diagnosis_rows_unknown_icd_version"] == 1
    assert report.counts["patients_age_capped"] == 1
    pats10, _, rep10 = load_mimic4_data(hosp, icd_versions="10")
    assert [(p.subject_id, p.age, p.visits) for p in pats10] == [("900001", 47.0, [["ICD10:I10", "ICD10:E8809"]])]
    assert rep10.counts["diagnosis_rows_excluded_icd_version"] == 2
    assert rep10.counts["admissions_without_codes"] == 2
    assert rep10.counts["patients_without_visits"] == 1


# ---------------------------------------------------------------------------------------------
# Hand-made MIMIC-III folders: orphans, exclusions, bad input
# ---------------------------------------------------------------------------------------------

P_HEADER = ["row_id", "subject_id", "gender", "dob"]
A_HEADER = ["row_id", "subject_id", "hadm_id", "admittime"]
D_HEADER = ["row_id", "subject_id", "hadm_id", "seq_num", "icd9_code"]


def _mimic3_folder(folder: Path, patients=None, admissions=None, diagnoses=None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    patients = (
        patients
        if patients is not None
        else [
            [1, 700001, "F", "2050-06-15 00:00:00"],
            [2, 700002, "M", "1850-01-01 00:00:00"],  # ~300 years at admission: capped at 90
            [3, 700003, "F", "2060-01-01 00:00:00"],  # its only admission has no code
            [4, 700004, "U", "2060-01-01 00:00:00"],  # unknown gender: excluded
        ]
    )
    admissions = (
        admissions
        if admissions is not None
        else [
            [1, 700001, 600012, "2101-06-01 10:00:00"],  # file order is not time order
            [2, 700001, 600011, "2100-01-01 09:00:00"],
            [3, 700002, 600022, "2150-03-03 12:00:00"],  # same admittime as 600021: hadm_id breaks the tie
            [4, 700002, 600021, "2150-03-03 12:00:00"],
            [5, 700003, 600031, "2120-01-01 00:00:00"],
            [6, 700004, 600041, "2120-01-01 00:00:00"],
            [7, 700009, 600091, "2120-01-01 00:00:00"],  # subject not in PATIENTS
        ]
    )
    diagnoses = (
        diagnoses
        if diagnoses is not None
        else [
            [1, 700001, 600012, 1, "25000"],
            [2, 700001, 600011, 2, "0389"],
            [3, 700001, 600011, 1, "V5861"],
            [4, 700001, 600011, 3, "0389"],  # duplicate within the visit
            [5, 700002, 600021, 1, "4019"],
            [6, 700002, 600022, 1, "E8809"],
            [7, 700002, 600021, 2, ""],  # null code
            [8, 700001, 600077, 1, "4280"],  # hadm_id not in ADMISSIONS
            [9, 700009, 600091, 1, "486"],  # subject not in PATIENTS
            [10, 700008, 600011, 1, "5849"],  # subject not in PATIENTS
            [11, 700002, 600011, 4, "51881"],  # admission of another subject
            [12, 700004, 600041, 1, "99592"],  # patient excluded (gender)
        ]
    )
    _write_csv(folder / "PATIENTS.csv", P_HEADER, patients)
    _write_csv(folder / "ADMISSIONS.csv", A_HEADER, admissions)
    _write_csv(folder / "DIAGNOSES_ICD.csv", D_HEADER, diagnoses)
    return folder


def test_orphans_and_exclusions_are_counted(tmp_path, caplog):
    folder = _mimic3_folder(tmp_path / "m3")
    with caplog.at_level(logging.DEBUG, logger="promptehr"):
        patients, vocab, report = load_mimic_data(folder)
    assert [(p.subject_id, p.age, p.sex, p.visits) for p in patients] == [
        ("700001", 49.0, "F", [["V5861", "0389"], ["25000"]]),
        ("700002", 90.0, "M", [["4019"], ["E8809"]]),
    ]
    assert vocab == ["0389", "25000", "4019", "E8809", "V5861"]
    c = report.counts
    assert c["diagnosis_rows"] == 12
    assert c["diagnosis_rows_unknown_admission"] == 1
    assert c["diagnosis_rows_unknown_patient"] == 2
    assert c["diagnosis_rows_subject_mismatch"] == 1
    assert c["diagnosis_rows_null_code"] == 1
    assert c["duplicate_codes_in_visit"] == 1
    assert c["admissions_unknown_patient"] == 1
    assert c["patients_unknown_gender"] == 1
    assert c["admissions_of_excluded_patients"] == 1
    assert c["admissions_without_codes"] == 1
    assert c["patients_without_visits"] == 1
    assert c["patients_age_capped"] == 1
    assert (c["patients"], c["visits"], c["distinct_codes"], c["code_occurrences"]) == (2, 4, 5, 5)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("1 diagnosis rows" in m and "hadm_id" in m for m in warnings)
    assert any("2 diagnosis rows" in m and "subject_id" in m for m in warnings)
    assert any("1 admissions" in m for m in warnings)
    text = " ".join(r.getMessage() for r in caplog.records)
    assert "7000" not in text and "6000" not in text  # counts only: no subject or admission ids


def test_clean_hand_made_folder_logs_no_warning(tmp_path, caplog):
    folder = _mimic3_folder(
        tmp_path / "m3",
        patients=[[1, 700001, "M", "2070-01-01 00:00:00"]],
        admissions=[[1, 700001, 600011, "2100-06-01 00:00:00"]],
        diagnoses=[[1, 700001, 600011, 1, "0010"]],
    )
    with caplog.at_level(logging.WARNING, logger="promptehr"):
        patients, vocab, report = load_mimic_data(folder)
    assert not caplog.records
    assert [(p.age, p.visits) for p in patients] == [(30.0, [["0010"]])] and vocab == ["0010"]


def test_missing_folder(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(DataError, match="does not exist") as exc:
        load_mimic_data(missing)
    assert str(missing) in str(exc.value)
    with pytest.raises(DataError, match="does not exist"):
        load_mimic4_data(missing)


def test_missing_table(tmp_path):
    folder = _mimic3_folder(tmp_path / "m3")
    (folder / "DIAGNOSES_ICD.csv").unlink()
    with pytest.raises(DataError) as exc:
        load_mimic_data(folder)
    msg = str(exc.value)
    assert str(folder) in msg and "DIAGNOSES_ICD.csv" in msg and "DIAGNOSES_ICD.csv.gz" in msg
    assert "missing" in msg


def test_table_present_twice(tmp_path):
    folder = _mimic3_folder(tmp_path / "m3")
    (folder / "patients.csv").write_text((folder / "PATIENTS.csv").read_text())
    with pytest.raises(DataError, match="twice"):
        load_mimic_data(folder)


def test_missing_column(tmp_path):
    folder = _mimic3_folder(tmp_path / "m3")
    _write_csv(
        folder / "ADMISSIONS.csv",
        ["row_id", "subject_id", "hadm_id", "dischtime"],
        [[1, 700001, 600011, "2100-01-01 00:00:00"]],
    )
    with pytest.raises(DataError) as exc:
        load_mimic_data(folder)
    msg = str(exc.value)
    assert str(folder / "ADMISSIONS.csv") in msg
    assert "admittime" in msg and "dischtime" in msg  # the missing column and the columns found


def test_unparseable_date(tmp_path):
    folder = _mimic3_folder(tmp_path / "m3")
    _write_csv(folder / "PATIENTS.csv", P_HEADER, [[1, 700001, "F", "2050-06-15 00:00:00"], [2, 700002, "M", "15/06/2050"]])
    with pytest.raises(DataError) as exc:
        load_mimic_data(folder)
    msg = str(exc.value)
    assert str(folder / "PATIENTS.csv") in msg and "dob" in msg and "15/06/2050" in msg
    assert "700002" not in msg  # no subject id in the message


@pytest.mark.parametrize("content", ["", "row_id,subject_id,hadm_id,seq_num,icd9_code\n"])
def test_empty_table(tmp_path, content):
    folder = _mimic3_folder(tmp_path / "m3")
    (folder / "DIAGNOSES_ICD.csv").write_text(content)
    with pytest.raises(DataError, match="empty") as exc:
        load_mimic_data(folder)
    assert str(folder / "DIAGNOSES_ICD.csv") in str(exc.value)


def test_no_usable_patient(tmp_path):
    folder = _mimic3_folder(tmp_path / "m3", diagnoses=[[1, 700009, 600091, 1, "486"]])
    with pytest.raises(DataError, match="no patient"):
        load_mimic_data(folder)


def test_no_usable_patient_says_why(tmp_path):
    """Every patient of unknown gender: the message gives the rows read and what was left out."""
    folder = _mimic3_folder(tmp_path / "m3", patients=[[i, 700000 + i, "U", "2050-06-15 00:00:00"] for i in range(1, 5)])
    with pytest.raises(DataError) as exc:
        load_mimic_data(folder)
    msg = str(exc.value)
    assert "no patient has an admission with a diagnosis code" in msg
    assert "read 4 PATIENTS.csv rows, 7 ADMISSIONS.csv rows, 12 DIAGNOSES_ICD.csv rows" in msg
    assert "patients_unknown_gender 4" in msg and "admissions_of_excluded_patients" in msg
    assert "70000" not in msg  # counts, not ids


@pytest.mark.parametrize("damage", ["flipped byte", "truncated"])
def test_corrupt_gzip_names_the_file(tmp_path, damage):
    import gzip

    folder = _mimic3_folder(tmp_path / "m3")
    plain = folder / "DIAGNOSES_ICD.csv"
    data = gzip.compress(plain.read_bytes() * 200)
    plain.unlink()
    if damage == "flipped byte":
        data = data[:40] + bytes([data[40] ^ 0xFF]) + data[41:]  # inside the deflate stream: zlib.error
    else:
        data = data[: len(data) // 2]
    (folder / "DIAGNOSES_ICD.csv.gz").write_bytes(data)
    with pytest.raises(DataError) as exc:
        load_mimic_data(folder)
    assert str(folder / "DIAGNOSES_ICD.csv.gz") in str(exc.value) and "cannot read the table" in str(exc.value)


@pytest.mark.parametrize("row", [0, 2])
def test_row_with_more_fields_than_the_header_names_its_line(tmp_path, row):
    """An unquoted comma (`40,19`) must not turn into code 40 (or shift the columns): the load stops
    with the file and line."""
    folder = _mimic3_folder(tmp_path / "m3")
    lines = (folder / "DIAGNOSES_ICD.csv").read_text().splitlines()
    lines[row + 1] += ",19"  # data row `row` is file line row + 2
    (folder / "DIAGNOSES_ICD.csv").write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError) as exc:
        load_mimic_data(folder)
    msg = str(exc.value)
    assert str(folder / "DIAGNOSES_ICD.csv") in msg and f"line {row + 2} has" in msg and "unquoted comma" in msg, msg


def test_integer_ids_written_as_floats_are_read_as_integers(tmp_path):
    """`10006.0` (a table that went through a float column) is patient 10006, not an unknown one."""
    clean, _, clean_report = load_mimic_data(_mimic3_folder(tmp_path / "clean"))
    folder = _mimic3_folder(tmp_path / "floats")
    for name, id_columns in (("PATIENTS.csv", [1]), ("ADMISSIONS.csv", [1, 2]), ("DIAGNOSES_ICD.csv", [1, 2])):
        rows = _read_csv(folder / name)
        header = list(rows[0])
        _write_csv(
            folder / name,
            header,
            [[f"{v}.0" if i in id_columns and v else v for i, v in enumerate(r.values())] for r in rows],
        )
    patients, _, report = load_mimic_data(folder)
    assert [(p.subject_id, p.visits) for p in patients] == [(p.subject_id, p.visits) for p in clean]
    assert report.counts == clean_report.counts
