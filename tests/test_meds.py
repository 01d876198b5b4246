"""MEDS in and out: the MIMIC-IV demo through MEDS equals the mimic4 loader, what is dropped is counted,
malformed datasets name file and column, data.split=meds keeps held_out out of training and validation,
and `generate --format meds` writes a valid MEDS dataset that reads back to the generated patients.

The demo-based MEDS dataset is built inside the tests the way the MIMIC-IV MEDS ETL builds one (codes
GENDER//<g>, MEDS_BIRTH on 1 January of anchor_year - anchor_age, DIAGNOSIS//ICD//<v>//<code> at the
admission's discharge time with hadm_id); the hand-made datasets use fake ids only.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import SHARED, needs_shared

from promptehr.checkpoint import read_metadata, save_checkpoint
from promptehr.cli import main
from promptehr.config import load_config
from promptehr.data import held_out_subject_ids, load_patients, split_fingerprint, split_for_training
from promptehr.export import read_jsonl
from promptehr.generate import demographics_histogram
from promptehr.meds import load_meds_data, meds_events, write_meds
from promptehr.mimic import load_mimic4_data
from promptehr.model import PromptBartWithDemographicPrediction
from promptehr.schema import MAX_AGE, DataError, DataReport, Patient
from promptehr.tokenizer import DiagnosisCodeTokenizer
from promptehr.tracking import Tracker
from promptehr.train import train

ROOT = Path(__file__).resolve().parents[1]
HOSP = SHARED / "mimic4-demo" / "hosp"
SPLIT_OF = {0: "train", 1: "train", 2: "train", 3: "tuning", 4: "held_out"}  # by position in sorted subject ids


def meds_cfg(root, *overrides):
    return load_config(None, ["data.source=meds", f"data.path={root}", *overrides]).data


def as_tuples(patients):
    return [(p.subject_id, p.age, p.sex, p.visits) for p in patients]


# ---------------------------------------------------------------------------------------------
# Building MEDS datasets
# ---------------------------------------------------------------------------------------------


def write_events(path: Path, df: pd.DataFrame, hadm_id: bool = True) -> None:
    """Events (subject_id, time, code[, hadm_id]) as a MEDS shard, sorted by subject then time (static first)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    df = df.sort_values(["subject_id", "time"], na_position="first", kind="stable")
    columns = {
        "subject_id": pa.array(df["subject_id"].to_numpy(dtype=np.int64), pa.int64()),
        "time": pa.array(pd.to_datetime(df["time"]).to_numpy().astype("datetime64[us]"), pa.timestamp("us")),
        "code": pa.array(df["code"].tolist(), pa.string()),
        "numeric_value": pa.nulls(len(df), pa.float32()),
    }
    if hadm_id:
        columns["hadm_id"] = pa.array(df["hadm_id"].astype("Int64"), pa.int64())
    pq.write_table(pa.table(columns), path)


def build_meds_from_mimic4(hosp: Path, root: Path, diagnosis_time: str = "dischtime") -> dict[str, str]:
    """A MEDS dataset from the MIMIC-IV hosp tables as the MIMIC-IV MEDS ETL writes one (plus admission,
    discharge and death events that the loader must skip), sharded by split like the ETL's output
    (data/train/0-1, data/tuning/0, data/held_out/0). Returns subject_id -> split."""
    pat = pd.read_csv(hosp / "patients.csv.gz")
    adm = pd.read_csv(hosp / "admissions.csv.gz")
    diag = pd.read_csv(hosp / "diagnoses_icd.csv.gz", dtype={"icd_code": str})
    static = pd.concat(
        [
            pd.DataFrame({"subject_id": pat["subject_id"], "time": pd.NaT, "code": "GENDER//" + pat["gender"]}),
            pd.DataFrame(
                {
                    "subject_id": pat["subject_id"],
                    "code": "MEDS_BIRTH",
                    "time": pd.to_datetime((pat["anchor_year"] - pat["anchor_age"]).astype(str), format="%Y"),
                }
            ),
            pd.DataFrame(
                {"subject_id": pat["subject_id"], "time": pd.to_datetime(pat["dod"]), "code": "MEDS_DEATH"}
            ).dropna(),
        ]
    )
    stays = pd.concat(
        [
            pd.DataFrame(
                {
                    "subject_id": adm["subject_id"],
                    "hadm_id": adm["hadm_id"],
                    "time": pd.to_datetime(adm["admittime"]),
                    "code": "HOSPITAL_ADMISSION//" + adm["admission_type"] + "//" + adm["admission_location"].fillna("UNK"),
                }
            ),
            pd.DataFrame(
                {
                    "subject_id": adm["subject_id"],
                    "hadm_id": adm["hadm_id"],
                    "time": pd.to_datetime(adm["dischtime"]),
                    "code": "HOSPITAL_DISCHARGE//" + adm["discharge_location"].fillna("UNK"),
                }
            ),
        ]
    )
    diag = diag.sort_values(["subject_id", "hadm_id", "seq_num"]).merge(adm[["hadm_id", diagnosis_time]], on="hadm_id")
    diagnoses = pd.DataFrame(
        {
            "subject_id": diag["subject_id"],
            "hadm_id": diag["hadm_id"],
            "time": pd.to_datetime(diag[diagnosis_time]),
            "code": "DIAGNOSIS//ICD//" + diag["icd_version"].astype(str) + "//" + diag["icd_code"],
        }
    )
    events = pd.concat([static, stays, diagnoses], ignore_index=True)

    subjects = sorted(pat["subject_id"].tolist())
    split = {s: SPLIT_OF[i % 5] for i, s in enumerate(subjects)}
    shard = {s: (f"{split[s]}/{i % 2}" if split[s] == "train" else f"{split[s]}/0") for i, s in enumerate(subjects)}
    for name, rows in events.groupby(events["subject_id"].map(shard)):
        write_events(root / "data" / f"{name}.parquet", rows)
    (root / "metadata").mkdir(parents=True, exist_ok=True)
    (root / "metadata" / "dataset.json").write_text(
        json.dumps({"dataset_name": "MIMIC-IV demo", "etl_name": "test build after MIMIC_IV_MEDS", "meds_version": "0.4.1"})
    )
    codes = sorted(events["code"].unique())
    pq.write_table(
        pa.table(
            {
                "code": pa.array(codes, pa.string()),
                "description": pa.nulls(len(codes), pa.string()),
                "parent_codes": pa.nulls(len(codes), pa.list_(pa.string())),
            }
        ),
        root / "metadata" / "codes.parquet",
    )
    write_splits(root, split)
    return {str(s): v for s, v in split.items()}


def write_splits(root: Path, split: dict) -> None:
    ids = list(split)
    pq.write_table(
        pa.table(
            {
                "subject_id": pa.array([int(s) for s in ids], pa.int64()),
                "split": pa.array([split[s] for s in ids], pa.string()),
            }
        ),
        root / "metadata" / "subject_splits.parquet",
    )


@pytest.fixture(scope="module")
def demo_meds(tmp_path_factory):
    if not HOSP.exists():
        pytest.skip("../shared/data/mimic4-demo (MIMIC-IV demo tables) is absent")
    root = tmp_path_factory.mktemp("meds") / "mimic4-demo-meds"
    split = build_meds_from_mimic4(HOSP, root)
    return root, split


# ---------------------------------------------------------------------------------------------
# The MIMIC-IV demo through MEDS
# ---------------------------------------------------------------------------------------------


def first_admissions(versions: str) -> dict[str, tuple[int, int, int]]:
    """subject_id -> (admit year, discharge year, birth year) of the first admission holding a code of `versions`."""
    pat = pd.read_csv(HOSP / "patients.csv.gz").set_index("subject_id")
    adm = pd.read_csv(HOSP / "admissions.csv.gz", parse_dates=["admittime", "dischtime"])
    diag = pd.read_csv(HOSP / "diagnoses_icd.csv.gz", dtype={"icd_version": str})
    coded = diag.loc[diag["icd_version"].isin(["9", "10"] if versions == "both" else [versions]), "hadm_id"].unique()
    first = adm[adm["hadm_id"].isin(coded)].sort_values("admittime").groupby("subject_id").first()
    birth = pat["anchor_year"] - pat["anchor_age"]
    return {str(s): (r.admittime.year, r.dischtime.year, int(birth[s])) for s, r in first.iterrows()}


@needs_shared
def test_meds_build_is_valid_meds(demo_meds):
    meds = pytest.importorskip("meds")
    root, _ = demo_meds
    for shard in sorted((root / "data").rglob("*.parquet")):
        meds.DataSchema.validate(pq.read_table(shard))
    meds.SubjectSplitSchema.validate(pq.read_table(root / "metadata" / "subject_splits.parquet"))
    meds.CodeMetadataSchema.validate(pq.read_table(root / "metadata" / "codes.parquet"))


@needs_shared
@pytest.mark.parametrize("versions", ["both", "9", "10"])
def test_mimic4_demo_through_meds_equals_the_mimic4_loader(demo_meds, versions):
    """Same patients (ids, order), sexes, visits (order and codes), vocabulary and totals. Age: completed
    years from MEDS_BIRTH to the first visit, the visit being at discharge as the ETL writes it; the
    mimic4 loader counts to the admission's year, so exactly the patients whose first admission spans
    a new year are one year older through MEDS."""
    root, _ = demo_meds
    got, got_vocab, got_report = load_patients(meds_cfg(root, f"data.icd_versions='{versions}'"))
    ref, ref_vocab, ref_report = load_mimic4_data(SHARED / "mimic4-demo", icd_versions=versions)
    assert [(p.subject_id, p.sex, p.visits) for p in got] == [(p.subject_id, p.sex, p.visits) for p in ref]
    assert got_vocab == ref_vocab
    for key in (
        "patients",
        "visits",
        "code_occurrences",
        "distinct_codes",
        "patients_2plus_visits",
        "patients_without_visits",
        "patients_age_capped",
    ):
        assert got_report.counts[key] == ref_report.counts[key], key
    assert got_report.counts["diagnosis_events"] == ref_report.counts["diagnosis_rows"] == 4506
    assert (
        got_report.counts["diagnosis_events_excluded_icd_version"]
        == ref_report.counts["diagnosis_rows_excluded_icd_version"]
    )

    first = first_admissions(versions)
    assert sorted(first) == sorted(p.subject_id for p in got)
    for p, r in zip(got, ref):
        admit, disch, birth = first[p.subject_id]
        assert p.age == min(disch - birth, MAX_AGE)
        assert r.age == min(admit - birth, MAX_AGE)  # so they differ only where the first admission spans a new year
    if versions == "both":
        assert sum(p.age != r.age for p, r in zip(got, ref)) == 3  # and that happens in the demo


@needs_shared
def test_diagnoses_at_admission_time_give_the_mimic4_ages_exactly(tmp_path):
    build_meds_from_mimic4(HOSP, tmp_path / "meds", diagnosis_time="admittime")
    got = load_meds_data(tmp_path / "meds", progress=False)[0]
    assert as_tuples(got) == as_tuples(load_mimic4_data(SHARED / "mimic4-demo")[0])


# ---------------------------------------------------------------------------------------------
# data.split=meds
# ---------------------------------------------------------------------------------------------


@needs_shared
def test_meds_split_uses_train_and_tuning_never_held_out(demo_meds, tmp_path):
    root, split = demo_meds
    cfg = meds_cfg(root, "data.split=meds")
    patients, _, report = load_patients(cfg)
    train_p, val_p = split_for_training(patients, cfg, report)
    assert [p.subject_id for p in train_p] == [p.subject_id for p in patients if split[p.subject_id] == "train"]
    assert [p.subject_id for p in val_p] == [p.subject_id for p in patients if split[p.subject_id] == "tuning"]
    held_out = {s for s, v in split.items() if v == "held_out"}
    assert held_out and not held_out & {p.subject_id for p in train_p + val_p}
    c = report.counts
    assert (c["patients_split_train"], c["patients_split_tuning"], c["patients_split_held_out"]) == (60, 20, 20)
    assert c["patients_not_in_subject_splits"] == c["patients_other_split"] == 0

    # subjects missing from subject_splits (or in another split) are counted and used for neither
    copy = tmp_path / "copy"
    build_meds_from_mimic4(HOSP, copy)
    some_train = [s for s, v in split.items() if v == "train"][:3]
    write_splits(copy, {**{s: v for s, v in split.items() if s not in some_train[:2]}, some_train[2]: "extra"})
    report2 = DataReport("meds")
    train2, val2 = split_for_training(patients, meds_cfg(copy, "data.split=meds"), report2)
    assert report2.counts["patients_not_in_subject_splits"] == 2 and report2.counts["patients_other_split"] == 1
    assert {p.subject_id for p in train2} == {p.subject_id for p in train_p} - set(some_train)
    assert val2 == val_p


@needs_shared
def test_split_fingerprint_covers_held_out(demo_meds, tmp_path):
    root, split = demo_meds
    copy = tmp_path / "copy"
    build_meds_from_mimic4(HOSP, copy)
    last_held_out = max((s for s, v in split.items() if v == "held_out"), key=int)
    write_splits(copy, {s: v for s, v in split.items() if s != last_held_out})
    splits = []
    for folder in (root, copy):
        cfg = meds_cfg(folder, "data.split=meds")
        train_p, val_p = split_for_training(load_patients(cfg)[0], cfg)
        splits.append((train_p, val_p, split_fingerprint(train_p, val_p, held_out_subject_ids(cfg))))
    (t1, v1, f1), (t2, v2, f2) = splits
    assert (t1, v1) == (t2, v2) and f1 != f2  # the same train and tuning, another held_out: another split
    assert split_fingerprint(t1, v1, ()) == split_fingerprint(t1, v1)  # random splits keep their fingerprints


def test_split_meds_needs_the_splits_file_and_a_meds_source(tmp_path):
    root = tiny_dataset(tmp_path)
    cfg = meds_cfg(root, "data.split=meds")
    patients, _, _ = load_patients(cfg)
    with pytest.raises(DataError, match=r"subject_splits\.parquet is missing"):
        split_for_training(patients, cfg)
    with pytest.raises(DataError, match="data.source=meds"):
        split_for_training(patients, load_config(None, ["data.split=meds"]).data)
    with pytest.raises(DataError, match="data.split must be one of random, meds"):
        split_for_training(patients, meds_cfg(root, "data.split=tuning"))
    write_splits(root, {"1": "train", "2": "held_out"})
    with pytest.raises(DataError, match="no loaded patient is in split 'tuning'"):
        split_for_training(patients, cfg)
    pq.write_table(pa.table({"subject_id": ["1"], "split": ["train"]}), root / "metadata" / "subject_splits.parquet")
    with pytest.raises(DataError, match=r"subject_splits\.parquet: column subject_id has type string"):
        split_for_training(patients, cfg)


@needs_shared
def test_train_on_meds_with_meds_split(demo_meds, tmp_path, monkeypatch):
    """train() on the MEDS demo with data.split=meds: the patients it trains and validates on are exactly
    the loaded train and tuning subjects, and the checkpoint's split fingerprint covers held_out."""
    import promptehr.train as train_module

    root, split = demo_meds
    seen = {}
    build_loader, protocol = train_module.build_loader, train_module.ValidationProtocol

    def spy_loader(cfg, tokenizer, train_patients):
        seen["train"] = [p.subject_id for p in train_patients]
        return build_loader(cfg, tokenizer, train_patients)

    def spy_protocol(cfg, tokenizer, train_patients, val_patients):
        seen["val"], seen["protocol_train"] = [p.subject_id for p in val_patients], [p.subject_id for p in train_patients]
        return protocol(cfg, tokenizer, train_patients, val_patients)

    monkeypatch.setattr(train_module, "build_loader", spy_loader)
    monkeypatch.setattr(train_module, "ValidationProtocol", spy_protocol)
    cfg = load_config(
        ROOT / "experiments" / "tiny.yaml",
        [
            "data.source=meds",
            f"data.path={root}",
            "data.split=meds",
            "training.num_epochs=1",
            f"training.checkpoint_dir={tmp_path / 'ck'}",
            "training.quality_report=false",
            "validation.jaccard_patients=5",
        ],
    )
    result = train(cfg, Tracker())
    assert math.isfinite(result["final_metrics"]["loss"]) and seen["protocol_train"] == seen["train"]
    loaded = {p.subject_id for p in load_patients(cfg.data)[0]}
    assert sorted(seen["train"]) == sorted(s for s in loaded if split[s] == "train")
    assert sorted(seen["val"]) == sorted(s for s in loaded if split[s] == "tuning")
    assert not {s for s, v in split.items() if v == "held_out"} & set(seen["train"] + seen["val"])
    held_out = sorted((s for s, v in split.items() if v == "held_out"), key=int)
    by_id = {p.subject_id: p for p in load_patients(cfg.data)[0]}
    expected = split_fingerprint([by_id[s] for s in seen["train"]], [by_id[s] for s in seen["val"]], held_out)
    assert read_metadata(result["best_checkpoint"])["split_fingerprint"] == expected


# ---------------------------------------------------------------------------------------------
# Hand-made datasets: what is dropped is counted; malformed input names file and column
# ---------------------------------------------------------------------------------------------


def ev(subject, time, code, hadm=None):
    return {"subject_id": subject, "time": pd.Timestamp(time) if time else pd.NaT, "code": code, "hadm_id": hadm}


def tiny_dataset(tmp_path, rows=None, hadm_id=True) -> Path:
    rows = (
        rows
        if rows is not None
        else [
            ev(1, None, "GENDER//F"),
            ev(1, "2100-01-01", "MEDS_BIRTH"),
            ev(1, "2140-05-01", "DIAGNOSIS//ICD//9//4019", 11),
            ev(1, "2140-05-01", "DIAGNOSIS//ICD//10//I10", 11),
            ev(2, None, "GENDER//M"),
            ev(2, "2050-03-01", "MEDS_BIRTH"),
            ev(2, "2140-02-01", "DIAGNOSIS//ICD//9//0389", 21),
        ]
    )
    root = tmp_path / "meds"
    write_events(root / "data" / "0.parquet", pd.DataFrame(rows), hadm_id=hadm_id)
    (root / "metadata").mkdir(parents=True, exist_ok=True)
    (root / "metadata" / "dataset.json").write_text(json.dumps({"dataset_name": "hand-made"}))
    return root


def test_hand_made_visits_ages_and_every_drop_counted(tmp_path):
    rows = [
        # 1: two admissions given out of time order, a repeated code, a lab event, age before its birthday
        ev(1, None, "GENDER//F"),
        ev(1, "2100-06-15", "MEDS_BIRTH"),
        ev(1, "2150-06-14 23:00", "DIAGNOSIS//ICD//9//4019", 12),
        ev(1, "2150-06-14 23:00", "LAB//50912//mg/dL"),
        ev(1, "2150-06-14 23:00", "DIAGNOSIS//ICD//9//4019", 12),
        ev(1, "2150-06-14 23:00", "DIAGNOSIS//ICD//10//E8809", 12),
        ev(1, "2140-01-02", "DIAGNOSIS//ICD//9//E8809", 11),
        ev(1, "2140-01-02", "DIAGNOSIS//ICD//11//X1", 11),  # unknown version
        ev(1, "2140-01-02", "DIAGNOSIS//ICD//9", 11),  # malformed
        # 2: no hadm_id: events grouped by time; over 90 at the first visit: capped
        ev(2, None, "GENDER//M"),
        ev(2, "2000-01-01", "MEDS_BIRTH"),
        ev(2, "2101-03-01", "DIAGNOSIS//ICD//10//I10"),
        ev(2, "2101-03-01", "DIAGNOSIS//ICD//10//J45"),
        ev(2, "2102-03-01", "DIAGNOSIS//ICD//10//I10"),
        ev(2, None, "DIAGNOSIS//ICD//10//K21"),  # no time
        ev(3, None, "GENDER//U"),
        ev(3, "2090-01-01", "MEDS_BIRTH"),
        ev(3, "2140-01-01", "DIAGNOSIS//ICD//9//1", 31),
        ev(4, "2090-01-01", "MEDS_BIRTH"),
        ev(4, "2140-01-01", "DIAGNOSIS//ICD//9//2", 41),  # no sex
        ev(5, None, "GENDER//F"),
        ev(5, None, "GENDER//M"),
        ev(5, "2090-01-01", "MEDS_BIRTH"),
        ev(5, "2140-01-01", "DIAGNOSIS//ICD//9//3", 51),  # two sexes
        ev(6, None, "GENDER//M"),
        ev(6, "2140-01-01", "DIAGNOSIS//ICD//9//4", 61),  # no birth
        ev(7, None, "GENDER//M"),
        ev(7, "2090-01-01", "MEDS_BIRTH"),
        ev(7, "2140-01-01", "LAB//1"),  # no diagnosis
        # 8: born 29 February; two birth events (the earliest counts)
        ev(8, None, "GENDER//F"),
        ev(8, "2096-02-29", "MEDS_BIRTH"),
        ev(8, "2097-01-01", "MEDS_BIRTH"),
        ev(8, "2141-02-28 12:00", "DIAGNOSIS//ICD//9//V3000", 81),
        # 9: one admission's codes at two times are one visit; two admissions at one time are two
        ev(9, None, "GENDER//M"),
        ev(9, "2100-01-01", "MEDS_BIRTH"),
        ev(9, "2140-01-01", "DIAGNOSIS//ICD//9//1", 92),
        ev(9, "2140-01-01", "DIAGNOSIS//ICD//9//2", 91),
        ev(9, "2140-01-03", "DIAGNOSIS//ICD//9//3", 91),
    ]
    root = tiny_dataset(tmp_path, rows)
    patients, vocab, report = load_meds_data(root, progress=False)
    assert as_tuples(patients) == [
        ("1", 39.0, "F", [["ICD9:E8809"], ["ICD9:4019", "ICD10:E8809"]]),
        ("2", 90.0, "M", [["ICD10:I10", "ICD10:J45"], ["ICD10:I10"]]),
        ("8", 44.0, "F", [["ICD9:V3000"]]),
        ("9", 40.0, "M", [["ICD9:2", "ICD9:3"], ["ICD9:1"]]),  # same time: hadm_id order
    ]
    c = report.counts
    expected = {
        "diagnosis_events": 18,
        "diagnosis_events_unknown_icd_version": 1,
        "diagnosis_events_malformed_code": 1,
        "diagnosis_events_without_time": 1,
        "duplicate_codes_in_visit": 1,
        "diagnosis_events_without_hadm_id": 3,
        "patients_unknown_gender": 3,
        "patients_conflicting_gender": 1,
        "patients_without_birth_info": 1,
        "patients_without_visits": 1,
        "diagnosis_events_of_excluded_patients": 4,
        "patients_age_capped": 1,
        "patients_several_birth_times": 1,
        "patients": 4,
        "visits": 7,
    }
    assert {k: c[k] for k in expected} == expected
    only10, _, report10 = load_meds_data(root, icd_versions="10", progress=False)
    assert as_tuples(only10) == [
        ("1", 49.0, "F", [["ICD10:E8809"]]),
        ("2", 90.0, "M", [["ICD10:I10", "ICD10:J45"], ["ICD10:I10"]]),
    ]
    assert report10.counts["diagnosis_events_excluded_icd_version"] == 11  # ICD-9 events of every subject


def test_without_hadm_id_visits_are_timestamps(tmp_path):
    root = tiny_dataset(tmp_path, hadm_id=False)
    patients, _, report = load_meds_data(root, progress=False)
    assert as_tuples(patients) == [("1", 40.0, "F", [["ICD9:4019", "ICD10:I10"]]), ("2", 89.0, "M", [["ICD9:0389"]])]
    assert report.counts["diagnosis_events_without_hadm_id"] == 3


def test_other_integer_time_and_string_encodings_are_read(tmp_path):
    """int32 ids, nanosecond UTC times and dictionary-encoded codes (as other writers make them) read
    like the MEDS types; an event without subject_id is counted and left out."""
    root = tiny_dataset(tmp_path)
    shard = root / "data" / "0.parquet"
    table = pq.read_table(shard)
    pq.write_table(
        pa.table(
            {
                "subject_id": pa.array(table.column("subject_id").to_pylist()[:-1] + [None], pa.int32()),
                "time": table.column("time").cast(pa.timestamp("ns", tz="UTC")),
                "code": table.column("code").dictionary_encode(),
                "hadm_id": table.column("hadm_id").cast(pa.string()),
            }
        ),
        shard,
    )
    patients, _, report = load_meds_data(root, progress=False)
    assert as_tuples(patients) == [("1", 40.0, "F", [["ICD9:4019", "ICD10:I10"]])]
    assert report.counts["events_without_subject_id"] == 1 and report.counts["patients_without_visits"] == 1


def test_custom_diagnosis_prefix(tmp_path):
    rows = [ev(1, None, "GENDER//F"), ev(1, "2100-01-01", "MEDS_BIRTH"), ev(1, "2140-05-01", "DX//10//I10", 11)]
    cfg = meds_cfg(tiny_dataset(tmp_path, rows), "data.meds_diagnosis_prefix=DX//")
    assert as_tuples(load_patients(cfg)[0]) == [("1", 40.0, "F", [["ICD10:I10"]])]


def _rewrite(root: Path, **columns) -> Path:
    path = root / "data" / "0.parquet"
    table = pq.read_table(path)
    for name, value in columns.items():
        table = (
            table.drop_columns([name])
            if value is None
            else table.set_column(table.schema.get_field_index(name), name, value)
        )
    pq.write_table(table, path)
    return path


def test_missing_column_names_file_and_column(tmp_path):
    path = _rewrite(tiny_dataset(tmp_path), code=None)
    with pytest.raises(DataError) as exc:
        load_meds_data(path.parents[1])
    assert str(path) in str(exc.value) and "column(s) code missing" in str(exc.value)


@pytest.mark.parametrize(
    "column, array, found",
    [
        ("subject_id", pa.array(["1"] * 7), "string"),
        ("time", pa.array(["2100-01-01"] * 7), "string"),
        ("code", pa.array([1] * 7, pa.int64()), "int64"),
        ("hadm_id", pa.array([1.5] * 7, pa.float64()), "double"),
    ],
)
def test_wrong_type_names_file_column_and_type(tmp_path, column, array, found):
    path = _rewrite(tiny_dataset(tmp_path), **{column: array})
    with pytest.raises(DataError) as exc:
        load_meds_data(path.parents[1])
    assert f"{path}: column {column} has type {found}" in str(exc.value)


def test_no_diagnosis_events_names_the_prefix(tmp_path):
    rows = [ev(1, None, "GENDER//F"), ev(1, "2100-01-01", "MEDS_BIRTH"), ev(1, "2140-01-01", "DX//9//4019", 1)]
    root = tiny_dataset(tmp_path, rows)
    with pytest.raises(DataError, match=r"no diagnosis events: no value of column code .* 'DIAGNOSIS//ICD//'") as exc:
        load_meds_data(root)
    assert str(root) in str(exc.value)


def test_corrupt_parquet_and_bad_layout_are_named(tmp_path):
    root = tiny_dataset(tmp_path)
    shard = root / "data" / "0.parquet"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    with pytest.raises(DataError, match=f"{shard}: cannot read the parquet file"):
        load_meds_data(root)
    shard.unlink()
    with pytest.raises(DataError, match="no parquet shards"):
        load_meds_data(root)
    with pytest.raises(DataError, match="no data/ folder"):
        load_meds_data(root / "metadata")
    with pytest.raises(DataError, match="does not exist"):
        load_meds_data(tmp_path / "nowhere")
    root = tiny_dataset(tmp_path / "other")
    (root / "metadata" / "dataset.json").write_text("{not json")
    with pytest.raises(DataError, match=r"dataset\.json: not valid JSON"):
        load_meds_data(root)


def test_no_usable_patient_says_why(tmp_path):
    rows = [ev(1, None, "GENDER//U"), ev(1, "2100-01-01", "MEDS_BIRTH"), ev(1, "2140-01-01", "DIAGNOSIS//ICD//9//1", 1)]
    with pytest.raises(DataError, match="patients_unknown_gender 1"):
        load_meds_data(tiny_dataset(tmp_path, rows))


def test_train_cli_reports_a_malformed_dataset(tmp_path, caplog):
    path = _rewrite(tiny_dataset(tmp_path), time=pa.array(["2100-01-01"] * 7))
    rc = main(
        [
            "train",
            "--config",
            str(ROOT / "experiments" / "tiny.yaml"),
            "--no-tracking",
            "--overrides",
            f"data.source=meds data.path={path.parents[1]} training.checkpoint_dir={tmp_path / 'ck'}",
        ]
    )
    assert rc == 2
    assert f"{path}: column time has type string" in caplog.text


# ---------------------------------------------------------------------------------------------
# Writing: a valid MEDS dataset that reads back to the same patients
# ---------------------------------------------------------------------------------------------


def read_back_expected(patients):
    """What data.source=meds gives for written patients: ids 1..N, whole-year ages capped at 90, and
    unprefixed (ICD-9) codes with their ICD9: prefix."""
    return [
        (
            str(i),
            float(min(math.floor(max(p.age, 0.0)), MAX_AGE)),
            p.sex,
            [[c if c.startswith(("ICD9:", "ICD10:")) else f"ICD9:{c}" for c in v] for v in p.visits],
        )
        for i, p in enumerate(patients, start=1)
    ]


def check_meds_layout(root: Path) -> None:
    """Valid under the `meds` package's schemas (when installed); events sorted as MEDS requires."""
    shards = sorted((root / "data").glob("*.parquet"))
    assert shards
    meds = pytest.importorskip("meds")
    for shard in shards:
        table = pq.read_table(shard)
        meds.DataSchema.validate(table)
        df = table.to_pandas()
        assert df["subject_id"].is_monotonic_increasing
        for _, rows in df.groupby("subject_id"):
            assert rows["time"].iloc[0] is pd.NaT and rows["time"].iloc[1:].notna().all()
            assert rows["time"].iloc[1:].is_monotonic_increasing
    meds.CodeMetadataSchema.validate(pq.read_table(root / "metadata" / "codes.parquet"))
    meds.DatasetMetadataSchema.validate(json.loads((root / "metadata" / "dataset.json").read_text()))
    codes = set(pq.read_table(root / "metadata" / "codes.parquet").column("code").to_pylist())
    assert codes == {c for s in shards for c in pq.read_table(s).column("code").to_pylist()}


def test_write_meds_reads_back(cohort, tmp_path):
    patients = cohort[:250] + [
        Patient("a", 95.2, "F", [["ICD9:4019", "ICD10:I10"], ["ICD10:E8809", "ICD9:E8809"]]),  # over 89: 90
        Patient("b", 0.4, "M", [["V3000"], ["V3000", "7742"]]),
        Patient("c", 67.9, "M", [["NA", "4019"]]),  # "NA" is a code, not a gap
    ]
    paths = write_meds(patients, tmp_path / "out", seed=5, generating_model={"model": "test"}, subjects_per_shard=100)
    assert sorted(p.name for p in (tmp_path / "out" / "data").iterdir()) == ["0.parquet", "1.parquet", "2.parquet"]
    check_meds_layout(tmp_path / "out")
    back, _, report = load_meds_data(tmp_path / "out", progress=False)
    assert as_tuples(back) == read_back_expected(patients)
    skipped = {
        k: v
        for k, v in report.counts.items()
        if v
        and k
        not in (
            "shards",
            "diagnosis_events",
            "patients",
            "visits",
            "code_occurrences",
            "distinct_codes",
            "patients_2plus_visits",
        )
    }
    assert skipped == {}
    events = meds_events(patients, seed=5).to_pandas()
    diag = events[events["code"].str.startswith("DIAGNOSIS//")]
    assert diag["hadm_id"].notna().all() and diag.groupby("hadm_id")["time"].nunique().eq(1).all()
    assert json.loads(paths["dataset.json"].read_text())["generating_model"] == {"model": "test"}


@pytest.fixture
def checkpoint_folder(tmp_path, cohort):
    """A random-init tiny model saved as a checkpoint with the cohort's demographics histogram."""
    cfg = load_config(ROOT / "experiments" / "tiny.yaml")
    tok = DiagnosisCodeTokenizer.from_patients(cohort, cfg.model.visit_order)
    torch.manual_seed(0)
    model = PromptBartWithDemographicPrediction(tok, cfg)
    with torch.no_grad():  # an untrained model closes a visit only at 40 codes: make it ~8, as a trained one
        model.bart.final_logits_bias[0, tok.visit_close_id] = 4.0
    folder = tmp_path / "best_model"
    save_checkpoint(folder, model, None, None, cfg, tok, {"demographics": demographics_histogram(cohort), "run_id": "r1"})
    return folder


def test_generate_format_meds_round_trip(checkpoint_folder, tmp_path):
    def generate(out):
        return main(
            [
                "generate",
                "--model",
                str(checkpoint_folder),
                "--n-patients",
                "30",
                "--seed",
                "3",
                "--out",
                str(out),
                "--max-visits",
                "3",
                "--top-k",
                "20",
                "--batch-size",
                "16",
                "--format",
                "meds",
            ]
        )

    out = tmp_path / "synthetic"
    assert generate(out) == 0
    assert not (out / "PATIENTS.csv").exists()
    check_meds_layout(out)
    generated = read_jsonl(out / "patients.jsonl")
    assert len(generated) == 30
    back = load_patients(meds_cfg(out))[0]
    assert as_tuples(back) == read_back_expected(generated)
    meta = json.loads((out / "metadata" / "dataset.json").read_text())
    assert meta["generating_model"]["model"] == str(checkpoint_folder) and meta["generating_model"]["run_id"] == "r1"
    assert generate(tmp_path / "again") == 0  # the same seed: the same events
    assert pq.read_table(out / "data" / "0.parquet").equals(pq.read_table(tmp_path / "again" / "data" / "0.parquet"))
