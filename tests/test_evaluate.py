"""Quality report: each metric on cohorts whose answer is known, the likelihood it scores is the training
rows', the report and plots logged through the Tracker (aggregates only), the end-of-training hook and
the `evaluate` entry point."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import promptehr.evaluate as ev
from promptehr.cli import main
from promptehr.collator import EHRDataCollator, EHRPatientDataset
from promptehr.config import load_config
from promptehr.data import Patient, load_patients, split_patients
from promptehr.generate import demographics_histogram
from promptehr.model import PromptBartWithDemographicPrediction
from promptehr.tokenizer import DiagnosisCodeTokenizer
from promptehr.tracking import Tracker

ROOT = Path(__file__).resolve().parents[1]


class RecordingTracker(Tracker):
    def __init__(self):
        self.metrics, self.dicts, self.artifacts = [], {}, []

    def log_metrics(self, metrics, step):
        self.metrics.append((step, dict(metrics)))

    def log_dict(self, data, artifact_file):
        self.dicts[artifact_file] = json.loads(json.dumps(data))

    def log_artifact(self, path, artifact_path=None):
        self.artifacts.append((f"{artifact_path}/{Path(path).name}", Path(path).read_bytes()[:8]))


def rename(patients, suffix):
    return [Patient(p.subject_id, p.age, p.sex, [[c + suffix for c in v] for v in p.visits]) for p in patients]


# ------------------------------------------------------------------ the metrics


def test_fidelity_is_perfect_on_the_same_cohort_and_poor_on_unrelated_codes(cohort):
    same = ev.fidelity_metrics(cohort, cohort)
    assert same["prevalence_pearson_patient"] == pytest.approx(1) and same["prevalence_pearson_visit"] == pytest.approx(1)
    assert same["top100_overlap"] == 1 and same["cooccurrence_pearson"] == pytest.approx(1)
    assert same["visits_per_patient_tv"] == 0 and same["codes_per_visit_wasserstein"] == 0
    # other code names, same shapes: no prevalence agreement, same count distributions
    other = ev.fidelity_metrics(rename(cohort[:300], "x"), cohort[300:])
    assert other["prevalence_pearson_visit"] < 0 and other["top100_overlap"] == 0
    assert other["visits_per_patient_tv"] < 0.15
    # a half/half split of one cohort agrees well (what the reference figure measures)
    half = ev.fidelity_metrics(cohort[:300], cohort[300:])
    assert half["prevalence_pearson_visit"] > 0.9 and half["top100_overlap"] > 0.6 and half["cooccurrence_pearson"] > 0.7
    assert ev.count_distances([1, 1], [2, 2]) == (1.0, 1.0)
    assert ev.count_distances([1, 2, 3, 4], [1, 2, 3, 4]) == (0.0, 0.0)
    assert ev.count_distances([1, 1], [1, 4]) == pytest.approx((0.5, 1.5))


def test_validity_flags_age_and_sex_inappropriate_codes_and_duplicates():
    patients = [
        Patient("1", 40.0, "F", [["1850", "4019"]]),        # prostate cancer in a woman
        Patient("2", 30.0, "M", [["65421"], ["4019"]]),     # pregnancy code in a man
        Patient("3", 70.0, "F", [["V3000", "4019", "4019"]]),  # newborn code at 70, and a duplicate
        Patient("4", 60.0, "M", [["ICD9:1742", "ICD10:O80"]]),  # MIMIC-IV prefixes: female breast code in a man; ICD-10 is not checked
        Patient("5", 0.0, "M", [["V3000", "7742"]]),         # a newborn with newborn codes: fine
    ]
    v = ev.validity_metrics(patients)
    assert v["invalid_code_rate"] == pytest.approx(4 / 11)
    assert v["invalid_patient_rate"] == pytest.approx(4 / 5)
    assert v["duplicate_code_rate"] == pytest.approx(1 / 11)
    assert ev.validity_metrics(patients[4:]) == {"invalid_code_rate": 0.0, "invalid_patient_rate": 0.0, "duplicate_code_rate": 0.0}


def test_privacy_copies_and_nearest_neighbours(cohort):
    train, other = cohort[:400], cohort[400:]
    copies = [Patient("s", p.age, p.sex, [list(reversed(v)) for v in p.visits]) for p in train[:50]]  # code order is irrelevant
    assert ev.exact_copy_share(copies, train) == 1.0
    assert ev.exact_copy_share(rename(other, "x"), train) == 0.0
    assert np.all(ev.nearest_neighbour_distances(copies, train, chunk=16) == 0)
    assert np.all(ev.nearest_neighbour_distances(rename(other[:20], "x"), train) == 1)
    d = ev.nearest_neighbour_distances(other, train)
    assert 0 < d.mean() < 1
    # brute force on a few
    for p, got in zip(other[:5], d[:5]):
        a = {c for v in p.visits for c in v}
        best = min(1 - len(a & b) / len(a | b) for b in ({c for v in q.visits for c in v} for q in train))
        assert got == pytest.approx(best, abs=1e-6)


@pytest.fixture(scope="module")
def tiny(cohort):
    cfg = load_config(ROOT / "experiments" / "tiny.yaml")
    tok = DiagnosisCodeTokenizer.from_patients(cohort[:400])
    torch.manual_seed(0)
    model = PromptBartWithDemographicPrediction(tok, cfg).eval()
    with torch.no_grad():  # an untrained model closes a visit only at 40 codes: make it ~8, as a trained one
        model.bart.final_logits_bias[0, tok.visit_close_id] = 4.0
    return model, tok


def test_patient_nll_scores_the_training_rows_of_generation(tiny, cohort):
    """The membership score is the mean NLL of exactly the codes the collator's first-visit and
    next-visit rows score (visit k given visits before it)."""
    model, tok = tiny
    patient = next(p for p in cohort if len(p.visits) == 2)
    ds = EHRPatientDataset([patient], tok)
    collator = EHRDataCollator(tok, corruption_prob=0.0, first_visit_prob=1.0, shuffle_codes=False)
    batch = collator([ds[0]])  # reconstruction, next visit (k=1), first visit (k=0)
    with torch.no_grad():
        logits = model(**batch)["logits"]
    nll = F.cross_entropy(logits.transpose(1, 2), batch["labels"].clamp(min=0), reduction="none")
    expected = float(nll[batch["target_mask"]].mean())
    assert ev.patient_nll(model, tok, [patient])[0] == pytest.approx(expected, rel=1e-5)
    unknown = Patient("u", 50.0, "M", [["NOT-A-CODE"]])
    assert np.isnan(ev.patient_nll(model, tok, [unknown])[0])  # unknown codes are not scored


def test_membership_auc_labels_training_patients_as_members(cohort, monkeypatch):
    train, heldout = cohort[:300], cohort[300:]
    members = {id(p) for p in train}
    monkeypatch.setattr(ev, "patient_nll", lambda m, t, ps, max_length=512: np.array([0.5 if id(p) in members else 1.0 for p in ps]))
    assert ev.membership_inference_auc(None, None, train, heldout, 50) == 1.0
    monkeypatch.setattr(ev, "patient_nll", lambda m, t, ps, max_length=512: np.arange(len(ps), dtype=float) % 2)
    assert ev.membership_inference_auc(None, None, train, heldout, 50) == pytest.approx(0.5)


# ------------------------------------------------------------------ the report


def test_quality_report_logs_metrics_report_and_plots_without_records(tiny, cohort):
    model, tok = tiny
    train, heldout = cohort[:400], cohort[400:]
    tracker = RecordingTracker()
    metrics = ev.run_quality_report(model, tok, train, heldout, tracker, step=7, n_patients=40, seed=1)
    expected = {"reconstruction_jaccard", "reconstruction_jaccard_ranked", "reconstruction_jaccard_baseline", "prevalence_pearson_visit",
                "prevalence_pearson_patient", "top100_overlap", "cooccurrence_pearson", "visits_per_patient_tv",
                "codes_per_visit_wasserstein", "invalid_code_rate", "invalid_code_rate_real", "duplicate_code_rate",
                "exact_copy_share", "exact_copy_share_heldout", "nn_distance_ratio", "membership_auc",
                "prevalence_pearson_visit_reference"}
    assert expected <= set(metrics)
    [(step, logged)] = tracker.metrics
    assert step == 7 and set(logged) == {f"gen/{k}" for k, v in metrics.items() if math.isfinite(v)}
    assert metrics["n_patients"] == 40 and metrics["duplicate_code_rate"] == 0
    # an untrained model is far from the real data; real-vs-real (the reference) is close
    assert metrics["prevalence_pearson_visit"] < 0.5 < metrics["prevalence_pearson_visit_reference"]
    assert metrics["invalid_code_rate_real"] == 0 and 0.3 < metrics["membership_auc"] < 0.7
    report = tracker.dicts["report/quality.json"]
    assert report["metrics"]["n_patients"] == 40
    assert {"report/prevalence.png", "report/counts.png"} == {name for name, _ in tracker.artifacts}
    assert all(head.startswith(b"\x89PNG") for _, head in tracker.artifacts)
    text = json.dumps(report)
    assert "subject" not in text and not any(f'"{p.subject_id}"' in text for p in cohort)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """train() of a tiny model (one epoch) with a recording tracker."""
    from promptehr.train import train

    tmp = tmp_path_factory.mktemp("train")
    cfg = load_config(ROOT / "experiments" / "tiny.yaml", [f"training.checkpoint_dir={tmp / 'ck'}", "data.synthetic.n_patients=200",
                                                            "training.num_epochs=1", "training.quality_report_patients=30"])
    tracker = RecordingTracker()
    return cfg, tracker, train(cfg, tracker)


def test_training_ends_with_a_quality_report_on_the_validation_split(trained):
    cfg, tracker, result = trained
    gen_logs = [(step, m) for step, m in tracker.metrics if any(k.startswith("gen/") for k in m)]
    assert len(gen_logs) == 1 and gen_logs[0][0] == result["global_step"]
    assert gen_logs[0][1]["gen/n_patients"] == 30 and result["quality"]["n_patients"] == 30
    assert "report/quality.json" in tracker.dicts and len(tracker.artifacts) == 2
    # the checkpoint stores the training split's demographics histogram (an aggregate)
    meta = json.loads((Path(result["best_checkpoint"]) / "metadata.json").read_text())
    patients, _, _ = load_patients(cfg.data)
    train_patients, _ = split_patients(patients, cfg.data.val_fraction, cfg.data.split_seed)
    assert meta["demographics"] == demographics_histogram(train_patients)


def test_evaluate_entry_point(trained, tmp_path):
    _, _, result = trained
    out = tmp_path / "quality"
    assert main(["evaluate", "--model", result["best_checkpoint"], "--n-patients", "25", "--out", str(out),
                 "--no-tracking", "--top-p", "0.9"]) == 0
    report = json.loads((out / "quality.json").read_text())
    assert report["metrics"]["n_patients"] == 25 and report["sampling"]["top_p"] == 0.9
    assert (out / "prevalence.png").exists() and (out / "counts.png").exists()


@pytest.mark.slow
def test_evaluate_entry_point_logs_to_mlflow(trained, tmp_path, monkeypatch):
    import mlflow

    _, _, result = trained
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    for name in ("MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME"):  # mlflow.set_experiment in another test sets them
        monkeypatch.delenv(name, raising=False)
    assert main(["evaluate", "--model", result["best_checkpoint"], "--n-patients", "20", "--out", str(tmp_path / "q")]) == 0
    client = mlflow.MlflowClient(uri)
    [run] = client.search_runs(["0"])  # no experiment named: MLflow's Default, as `mlflow run` uses
    assert run.info.status == "FINISHED" and run.data.tags["task"] == "quality_report"
    assert run.data.metrics["gen/n_patients"] == 20 and "gen/membership_auc" in run.data.metrics
    assert {"report/quality.json", "report/prevalence.png", "report/counts.png"} <= {
        a.path for a in client.list_artifacts(run.info.run_id, "report")}


@pytest.mark.slow
def test_mlflow_run_evaluate_entry_point(trained, tmp_path):
    """`mlflow run . -e evaluate` for real, on a checkpoint folder."""
    import os
    import subprocess
    import sys

    import mlflow

    _, _, result = trained
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env["MLFLOW_TRACKING_URI"] = uri
    cmd = [sys.executable, "-m", "mlflow", "run", str(ROOT), "-e", "evaluate", "--env-manager", "local", "--experiment-name", "q",
           "-P", f"model={Path(result['best_checkpoint']).resolve()}", "-P", "n_patients=20", "-P", f"out={tmp_path / 'q'}"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    client = mlflow.MlflowClient(uri)
    [run] = client.search_runs([client.get_experiment_by_name("q").experiment_id])
    assert run.info.status == "FINISHED" and run.data.metrics["gen/n_patients"] == 20
    assert (tmp_path / "q" / "quality.json").exists()
