"""Quality report as a whole: the likelihood attack scores the training rows, the report and its plots
are logged through the Tracker (aggregates only, small cells dropped), samples never copy a training
patient, the end-of-training hook and the `evaluate` entry point. The metrics themselves:
test_report_fidelity.py, test_report_privacy.py, test_report_utility.py."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import promptehr.report.privacy as privacy
from promptehr.cli import main
from promptehr.collator import EHRDataCollator, EHRPatientDataset
from promptehr.config import load_config
from promptehr.data import load_patients, split_patients
from promptehr.generate import SamplingConfig, demographics_histogram, generate_patients, sample_demographics
from promptehr.model import PromptBartWithDemographicPrediction
from promptehr.report import run_quality_report
from promptehr.report.privacy import patient_signature
from promptehr.report.quality import MIN_CELL_PATIENTS, suppress_small_cells
from promptehr.schema import Patient
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


@pytest.fixture(scope="module")
def tiny(cohort):
    cfg = load_config(ROOT / "experiments" / "tiny.yaml")
    tok = DiagnosisCodeTokenizer.from_patients(cohort[:400], cfg.model.visit_order)
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
    assert privacy.patient_nll(model, tok, [patient])[0] == pytest.approx(expected, rel=1e-5)
    unknown = Patient("u", 50.0, "M", [["NOT-A-CODE"]])
    assert np.isnan(privacy.patient_nll(model, tok, [unknown])[0])  # unknown codes are not scored


def test_membership_auc_labels_training_patients_as_members(cohort, monkeypatch):
    train, heldout = cohort[:300], cohort[300:]
    members = {id(p) for p in train}
    monkeypatch.setattr(
        privacy, "patient_nll", lambda m, t, ps, max_length=512: np.array([0.5 if id(p) in members else 1.0 for p in ps])
    )
    assert privacy.membership_inference_auc(None, None, train, heldout, 50) == 1.0
    monkeypatch.setattr(privacy, "patient_nll", lambda m, t, ps, max_length=512: np.arange(len(ps), dtype=float) % 2)
    assert privacy.membership_inference_auc(None, None, train, heldout, 50) == pytest.approx(0.5)


# ------------------------------------------------------------------ the report


NEW_METRICS = {  # issue 19: each beside its reference, the headline ones with a 95% interval
    "prevalence_r2_visit",
    "prevalence_r2_visit_reference",
    "prevalence_r2_visit_low",
    "prevalence_r2_visit_high",
    "prevalence_r2_patient",
    "prevalence_r2_patient_reference",
    "prevalence_r2_patient_low",
    "prevalence_r2_patient_high",
    "transition_r2",
    "transition_r2_reference",
    "transition_r2_low",
    "transition_r2_high",
    "cooccurrence_r2",
    "utility_auroc_real",
    "utility_auroc_synthetic",
    "utility_ratio",
    "utility_auroc_real_low",
    "utility_auroc_synthetic_high",
    "utility_ratio_low",
    "utility_ratio_high",
    "utility_examples_test",
    "utility_groups_constant_synthetic",
    "membership_distance_auc",
    "membership_distance_auc_low",
    "membership_distance_auc_high",
    "membership_distance_accuracy",
    "attribute_inference_f1",
    "attribute_inference_f1_heldout",
    "attribute_inference_f1_k1",
    "attribute_inference_f1_heldout_k5",
    "seconds_total",
    "seconds_utility",
    "seconds_generation",
}


def test_quality_report_logs_metrics_report_and_plots_without_records(tiny, cohort):
    model, tok = tiny
    train, heldout = cohort[:400], cohort[400:440]
    tracker = RecordingTracker()
    metrics = run_quality_report(model, tok, train, heldout, tracker, step=7, n_patients=40, seed=1, released_patients=60)
    expected = {
        "reconstruction_jaccard",
        "reconstruction_jaccard_ranked",
        "reconstruction_jaccard_baseline",
        "prevalence_pearson_visit",
        "prevalence_pearson_patient",
        "top100_overlap",
        "cooccurrence_pearson",
        "visits_per_patient_tv",
        "codes_per_visit_wasserstein",
        "invalid_code_rate",
        "invalid_code_rate_real",
        "duplicate_code_rate",
        "exact_copy_share",
        "exact_copy_share_heldout",
        "nn_distance_ratio",
        "membership_auc",
        "prevalence_pearson_visit_reference",
    }
    assert expected | NEW_METRICS <= set(metrics)
    [(step, logged)] = tracker.metrics
    assert step == 7 and set(logged) == {f"gen/{k}" for k, v in metrics.items() if math.isfinite(v)}
    assert NEW_METRICS <= {k[4:] for k in logged}
    assert metrics["n_patients"] == 40 and metrics["duplicate_code_rate"] == 0 and metrics["released_patients"] == 60
    # utility is tested on the held-out patients (all 40 here): one example per visit after the first
    assert metrics["utility_examples_test"] == sum(len(p.visits) - 1 for p in heldout)
    # an untrained model is far from the real data; real-vs-real (the reference) is close
    assert metrics["prevalence_pearson_visit"] < 0.5 < metrics["prevalence_pearson_visit_reference"]
    assert metrics["prevalence_r2_visit"] < metrics["prevalence_r2_visit_reference"]
    assert metrics["prevalence_r2_visit_low"] <= metrics["prevalence_r2_visit"] <= metrics["prevalence_r2_visit_high"]
    assert metrics["invalid_code_rate_real"] == 0 and 0.3 < metrics["membership_auc"] < 0.7
    report = tracker.dicts["report/quality.json"]
    assert report["metrics"]["n_patients"] == 40
    # per-code cells: exactly the codes that >= 10 of the 40 held-out patients hold (all of them are used here)
    held = {}
    for p in heldout:
        for c in {c for v in p.visits for c in v}:
            held[c] = held.get(c, 0) + 1
    assert report["visit_prevalence"]["codes"] == sorted(c for c, n in held.items() if n >= MIN_CELL_PATIENTS)
    assert report["suppression"]["codes_dropped"] > 0
    assert all(n >= MIN_CELL_PATIENTS for n in report["utility"]["test_patients_positive"])
    assert {"report/prevalence.png", "report/counts.png", "report/utility.png", "report/privacy.png"} == {
        name for name, _ in tracker.artifacts
    }
    assert all(head.startswith(b"\x89PNG") for _, head in tracker.artifacts)
    text = json.dumps(report)
    assert "subject" not in text and not any(f'"{p.subject_id}"' in text for p in cohort)


def test_small_cells_are_dropped():
    codes, gen, real, dropped = suppress_small_cells(
        ["a", "b", "c", "d"], [9, 10, 0, 25], [0.1, 0.2, 0.3, 0.4], [1, 2, 3, 4]
    )
    assert (codes, gen, real, dropped) == (["b", "d"], [0.2, 0.4], [2, 4], 2)


def test_samples_never_include_a_copy_of_a_training_patient(tiny, cohort, caplog):
    """The first draw of sample_patients is made the training set: all of it is dropped and counted,
    and more are drawn; nothing returned equals a training patient."""
    from promptehr.train import sample_patients

    model, tok = tiny
    hist = demographics_histogram(cohort[:400])
    ages, sexes = sample_demographics(hist, 4, seed=5)
    first = generate_patients(model, tok, ages, sexes, SamplingConfig(max_visits=8), seed=5)
    caplog.set_level("INFO", logger="promptehr.train")
    samples, dropped = sample_patients(model, tok, hist, 4, 5, first + cohort[:10])
    assert dropped == 4 and len(samples) == 4
    assert not {patient_signature(Patient("s", s["age"], s["sex"], s["visits"])) for s in samples} & {
        patient_signature(p) for p in first
    }
    assert "4 generated patients equal to a training patient were dropped" in caplog.text
    # without copies nothing is dropped, and the first draw is what is logged (unchanged behaviour)
    samples, dropped = sample_patients(model, tok, hist, 4, 5, cohort[:10])
    assert dropped == 0 and [s["visits"] for s in samples] == [p.visits for p in first]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """train() of a tiny model (one epoch) with a recording tracker."""
    from promptehr.train import train

    tmp = tmp_path_factory.mktemp("train")
    cfg = load_config(
        ROOT / "experiments" / "tiny.yaml",
        [
            f"training.checkpoint_dir={tmp / 'ck'}",
            "data.synthetic.n_patients=200",
            "training.num_epochs=1",
            "training.quality_report_patients=30",
            "training.quality_report_released_patients=50",
        ],
    )
    tracker = RecordingTracker()
    return cfg, tracker, train(cfg, tracker)


def test_training_ends_with_a_quality_report_on_the_validation_split(trained):
    cfg, tracker, result = trained
    gen_logs = [(step, m) for step, m in tracker.metrics if any(k.startswith("gen/") for k in m)]
    assert len(gen_logs) == 1 and gen_logs[0][0] == result["global_step"]
    assert gen_logs[0][1]["gen/n_patients"] == 30 and result["quality"]["n_patients"] == 30
    assert {f"gen/{k}" for k in NEW_METRICS} <= set(gen_logs[0][1])  # every issue-19 figure, with its reference
    assert "report/quality.json" in tracker.dicts and len(tracker.artifacts) == 4
    quality = result["quality"]
    assert quality["released_patients"] == 50 and quality["utility_examples_test"] > 0
    [samples] = [v for k, v in tracker.dicts.items() if k.startswith("samples/")]
    assert samples["dropped_training_copies"] >= 0 and len(samples["synthetic_patients"]) == 2
    # the checkpoint stores the training split's demographics histogram (an aggregate)
    meta = json.loads((Path(result["best_checkpoint"]) / "metadata.json").read_text())
    patients, _, _ = load_patients(cfg.data)
    train_patients, _ = split_patients(patients, cfg.data.val_fraction, cfg.data.split_seed)
    assert meta["demographics"] == demographics_histogram(train_patients)


def test_evaluate_entry_point(trained, tmp_path):
    _, _, result = trained
    out = tmp_path / "quality"
    assert (
        main(
            [
                "evaluate",
                "--model",
                result["best_checkpoint"],
                "--n-patients",
                "25",
                "--out",
                str(out),
                "--no-tracking",
                "--top-p",
                "0.9",
                "--released-patients",
                "40",
            ]
        )
        == 0
    )
    report = json.loads((out / "quality.json").read_text())
    assert report["metrics"]["n_patients"] == 25 and report["sampling"]["top_p"] == 0.9
    assert report["metrics"]["released_patients"] == 40
    assert all((out / f"{name}.png").exists() for name in ("prevalence", "counts", "utility", "privacy"))


@pytest.mark.slow
def test_evaluate_entry_point_logs_to_mlflow(trained, tmp_path, monkeypatch):
    import mlflow

    _, _, result = trained
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    for name in ("MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME"):  # mlflow.set_experiment in another test sets them
        monkeypatch.delenv(name, raising=False)
    assert (
        main(
            [
                "evaluate",
                "--model",
                result["best_checkpoint"],
                "--n-patients",
                "20",
                "--out",
                str(tmp_path / "q"),
                "--released-patients",
                "30",
            ]
        )
        == 0
    )
    client = mlflow.MlflowClient(uri)
    [run] = client.search_runs(["0"])  # no experiment named: MLflow's Default, as `mlflow run` uses
    assert run.info.status == "FINISHED" and run.data.tags["task"] == "quality_report"
    assert run.data.metrics["gen/n_patients"] == 20 and "gen/membership_auc" in run.data.metrics
    assert run.data.params["released_patients"] == "30" and run.data.metrics["gen/released_patients"] == 30
    assert "gen/utility_auroc_synthetic" in run.data.metrics and "gen/membership_distance_auc" in run.data.metrics
    assert {
        "report/quality.json",
        "report/prevalence.png",
        "report/counts.png",
        "report/utility.png",
        "report/privacy.png",
    } <= {a.path for a in client.list_artifacts(run.info.run_id, "report")}


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
    cmd = [
        sys.executable,
        "-m",
        "mlflow",
        "run",
        str(ROOT),
        "-e",
        "evaluate",
        "--env-manager",
        "local",
        "--experiment-name",
        "q",
        "-P",
        f"model={Path(result['best_checkpoint']).resolve()}",
        "-P",
        "n_patients=20",
        "-P",
        "released_patients=30",
        "-P",
        f"out={tmp_path / 'q'}",
    ]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    client = mlflow.MlflowClient(uri)
    [run] = client.search_runs([client.get_experiment_by_name("q").experiment_id])
    assert run.info.status == "FINISHED" and run.data.metrics["gen/n_patients"] == 20
    assert run.data.metrics["gen/released_patients"] == 30 and "gen/utility_ratio" in run.data.metrics
    assert (tmp_path / "q" / "quality.json").exists()


def test_released_cohort_figures_can_be_turned_off(tiny, cohort, tmp_path):
    from promptehr.report import plot_report, quality_report

    model, tok = tiny
    metrics, report = quality_report(model, tok, cohort[:400], cohort[400:], n_patients=10, released_patients=0)
    assert (
        metrics["released_patients"] == 0 and "utility_auroc_synthetic" not in metrics and "prevalence_r2_visit" in metrics
    )
    assert [p.name for p in plot_report(report, tmp_path)] == ["prevalence.png", "counts.png"]
