"""Export: MIMIC-III tables that our own loader reads back unchanged, patients.jsonl, and the
`generate` entry point (checkpoint folder or registered model)."""

import math
from pathlib import Path

import pandas as pd
import pytest
import torch

from promptehr.checkpoint import save_checkpoint
from promptehr.cli import main
from promptehr.config import load_config
from promptehr.export import export_patients, read_jsonl, write_mimic3
from promptehr.generate import AGE_BIN_EDGES, demographics_histogram
from promptehr.mimic import load_mimic_data
from promptehr.model import PromptBartWithDemographicPrediction
from promptehr.schema import MAX_AGE, Patient
from promptehr.tokenizer import DiagnosisCodeTokenizer

ROOT = Path(__file__).resolve().parents[1]


def whole_years(patients):
    return [Patient(p.subject_id, float(math.floor(p.age)), p.sex, [list(v) for v in p.visits]) for p in patients]


def as_tuples(patients):
    return [(p.age, p.sex, p.visits) for p in patients]


def test_mimic3_tables_read_back_unchanged(cohort, tmp_path):
    patients = whole_years(cohort) + [
        Patient("a", 95.0, "F", [["0414", "V3000"], ["ICD9:4019", "ICD10:I10"]]),  # over 89: MIMIC's shifted DOB
        Patient("b", 0.0, "M", [["V3001", "7742"]] * 3),
        Patient("c", 67.6, "M", [["E8798", "NA", "4019"]]),  # whole years in MIMIC-III; "NA" is a code, not a gap
    ]
    paths = write_mimic3(patients, tmp_path, seed=5)
    assert sorted(p.name for p in paths.values()) == ["ADMISSIONS.csv", "DIAGNOSES_ICD.csv", "PATIENTS.csv"]
    back, vocab, report = load_mimic_data(tmp_path)
    expected = [(min(math.floor(p.age), MAX_AGE), p.sex, p.visits) for p in patients]
    assert as_tuples(back) == expected
    assert [p.subject_id for p in back] == [str(i) for i in range(1, len(patients) + 1)]
    skipped = {
        k: v
        for k, v in report.counts.items()
        if v
        and k.startswith(
            ("diagnosis_rows_", "admissions_", "duplicate_", "patients_unknown", "patients_without", "patients_age_negative")
        )
    }
    assert skipped == {}  # nothing was skipped or repaired on the way back
    assert report.counts["patients_age_capped"] == sum(p.age >= MAX_AGE for p in patients)  # ~300-year DOB shift


def test_dates_are_plausible_and_increasing(cohort, tmp_path):
    patients = whole_years(cohort[:200]) + [Patient("old", 90.0, "M", [["4019"]])]
    write_mimic3(patients, tmp_path, seed=1)
    adm = pd.read_csv(tmp_path / "ADMISSIONS.csv", parse_dates=["ADMITTIME", "DISCHTIME"])
    pat = pd.read_csv(tmp_path / "PATIENTS.csv", dtype=str)
    diag = pd.read_csv(tmp_path / "DIAGNOSES_ICD.csv", dtype=str)
    assert adm["HADM_ID"].is_unique and adm["ROW_ID"].is_unique and diag["ROW_ID"].is_unique
    assert (adm["DISCHTIME"] > adm["ADMITTIME"]).all()
    assert adm["ADMITTIME"].dt.year.between(2100, 2200).all() and adm["DISCHTIME"].dt.year.between(2100, 2200).all()
    for _, rows in adm.groupby("SUBJECT_ID"):
        start, end = rows["ADMITTIME"].to_numpy(), rows["DISCHTIME"].to_numpy()
        assert (start[1:] > end[:-1]).all()  # the next admission starts after the last discharge
    assert (diag.groupby("HADM_ID")["SEQ_NUM"].apply(lambda s: list(map(int, s)) == list(range(1, len(s) + 1)))).all()
    dob_year = pd.to_datetime(pat["DOB"]).dt.year
    assert dob_year.iloc[-1] < 1900  # over 89: ~300 years before the first admission, as MIMIC-III shifts it
    assert set(pat["GENDER"]) <= {"M", "F"}
    assert (pd.to_datetime(pat["DOB"]).dt.strftime("%H:%M:%S") == "00:00:00").all()


def test_jsonl_matches_the_tables(cohort, tmp_path):
    patients = whole_years(cohort[:50])
    paths = export_patients(patients, tmp_path, seed=2)
    lines = paths["patients.jsonl"].read_text().splitlines()
    assert len(lines) == 50
    assert as_tuples(read_jsonl(paths["patients.jsonl"])) == as_tuples(patients) == as_tuples(load_mimic_data(tmp_path)[0])
    with pytest.raises(ValueError):
        write_mimic3([Patient("x", 40.0, "F", [[]])], tmp_path / "bad")


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
    save_checkpoint(folder, model, None, None, cfg, tok, {"demographics": demographics_histogram(cohort)})
    return folder


def test_generate_entry_point_writes_loadable_tables(checkpoint_folder, cohort, tmp_path):
    def args(out):
        return [
            "generate",
            "--model",
            str(checkpoint_folder),
            "--n-patients",
            "40",
            "--seed",
            "3",
            "--out",
            str(out),
            "--max-visits",
            "3",
            "--top-k",
            "20",
            "--temperature",
            "0.9",
            "--top-p",
            "0.95",
            "--batch-size",
            "16",
        ]

    out = tmp_path / "synthetic"
    assert main(args(out)) == 0
    generated = read_jsonl(out / "patients.jsonl")
    assert len(generated) == 40
    assert as_tuples(load_mimic_data(out)[0]) == as_tuples(generated)
    assert all(1 <= len(p.visits) <= 3 and all(len(v) == len(set(v)) for v in p.visits) for p in generated)
    # demographics come from the stored histogram: only (sex, age bin) cells that hold training patients
    hist = demographics_histogram(cohort)
    for p in generated:
        b = max(i for i, e in enumerate(AGE_BIN_EDGES[:-1]) if p.age >= e)
        assert hist["counts"][("M", "F").index(p.sex)][b] > 0
    assert len({p.sex for p in generated}) == 2
    # the same seed gives the same files
    assert main(args(tmp_path / "again")) == 0
    for name in ("PATIENTS.csv", "ADMISSIONS.csv", "DIAGNOSES_ICD.csv", "patients.jsonl"):
        assert (out / name).read_text() == (tmp_path / "again" / name).read_text()


def test_generate_refuses_a_checkpoint_without_demographics(checkpoint_folder, tmp_path, caplog):
    meta = checkpoint_folder / "metadata.json"
    meta.write_text(meta.read_text().replace('"demographics"', '"other"'))
    assert main(["generate", "--model", str(checkpoint_folder), "--out", str(tmp_path / "x")]) == 2
    assert "demographics" in caplog.text
    assert main(["generate", "--model", str(tmp_path / "missing"), "--out", str(tmp_path / "x")]) == 2


@pytest.mark.slow
def test_generate_from_the_registry(checkpoint_folder, tmp_path, monkeypatch):
    import mlflow

    from promptehr.registry import log_pyfunc_model

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment("registry-test")  # not an experiment id another test's database left active
    with mlflow.start_run():
        info = log_pyfunc_model(str(checkpoint_folder), "promptehr")
    mlflow.MlflowClient().set_registered_model_alias("promptehr", "champion", info.registered_model_version)
    out = tmp_path / "synthetic"
    assert (
        main(
            [
                "generate",
                "--model",
                "models:/promptehr@champion",
                "--n-patients",
                "12",
                "--out",
                str(out),
                "--max-visits",
                "2",
            ]
        )
        == 0
    )
    assert as_tuples(load_mimic_data(out)[0]) == as_tuples(read_jsonl(out / "patients.jsonl"))


@pytest.mark.slow
def test_mlflow_run_generate_entry_point(checkpoint_folder, tmp_path):
    """`mlflow run . -e generate` for real, on a checkpoint folder."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp_path / 'mlflow.db'}"
    out = tmp_path / "synthetic"
    cmd = [
        sys.executable,
        "-m",
        "mlflow",
        "run",
        str(ROOT),
        "-e",
        "generate",
        "--env-manager",
        "local",
        "-P",
        f"model={checkpoint_folder}",
        "-P",
        "n_patients=15",
        "-P",
        f"out={out}",
        "-P",
        "top_k=10",
        "-P",
        "seed=4",
    ]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert as_tuples(load_mimic_data(out)[0]) == as_tuples(read_jsonl(out / "patients.jsonl"))
    assert len(read_jsonl(out / "patients.jsonl")) == 15
