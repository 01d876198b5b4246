"""The quality report: generated cohorts against real patients, every figure beside its reference.

Inputs: a trained model, its tokenizer, the training and the held-out patients. Outputs: flat metrics
(logged as `gen/<name>`), `report/quality.json` (aggregates only; per-code cells of fewer than
MIN_CELL_PATIENTS real patients dropped) and plots under `report/`. Two cohorts are generated: one
with the demographics of `n_patients` held-out patients (fidelity, validity, copies), and the released
cohort, `released_patients` patients drawn from the training demographics (utility, privacy attacks).
"""

from __future__ import annotations

import logging
import math
import tempfile
import time
from collections import Counter
from contextlib import contextmanager

import numpy as np

from promptehr.data import Patient
from promptehr.generate import SamplingConfig, demographics_histogram, generate_patients, sample_demographics
from promptehr.metrics import compute_reconstruction_jaccard
from promptehr.report.fidelity import all_codes, code_prevalence, fidelity_intervals, fidelity_metrics
from promptehr.report.plots import plot_report
from promptehr.report.privacy import (attribute_inference, distance_membership_inference, exact_copy_share,
                                      membership_inference_auc, nearest_neighbour_distances)
from promptehr.report.utility import utility_metrics
from promptehr.report.validity import validity_metrics

logger = logging.getLogger(__name__)

MIN_CELL_PATIENTS = 10  # per-code figures need at least this many real patients holding the code
DISTANCE_BINS = np.linspace(0.0, 1.0, 21)


@contextmanager
def _timed(seconds: dict, stage: str):
    start = time.perf_counter()
    yield
    seconds[stage] = seconds.get(stage, 0.0) + time.perf_counter() - start


def _sample(patients: list[Patient], n: int, rng: np.random.Generator) -> list[Patient]:
    return [patients[i] for i in sorted(rng.choice(len(patients), min(n, len(patients)), replace=False))]


def _histogram(values) -> dict[str, int]:
    return {str(k): int(v) for k, v in sorted(Counter(values).items())}


def suppress_small_cells(codes: list[str], patients_per_code, *columns, min_patients: int = MIN_CELL_PATIENTS):
    """Keep the entries of `codes` (and of each parallel column) held by at least `min_patients` real
    patients; returns (codes, *columns, number dropped)."""
    keep = [i for i, n in enumerate(patients_per_code) if n >= min_patients]
    return ([codes[i] for i in keep], *[[col[i] for i in keep] for col in columns], len(codes) - len(keep))


def quality_report(model, tokenizer, train: list[Patient], heldout: list[Patient], n_patients: int = 500,
                   seed: int = 0, sampling: SamplingConfig | None = None, prompt_prob: float = 0.5,
                   max_length: int = 512, batch_size: int = 256, progress: bool = False,
                   released_patients: int = 5000, n_boot: int = 200) -> tuple[dict, dict]:
    """Generate the two cohorts and compare; returns (metrics, report): flat metrics (no prefix) and a
    JSON-able report that adds the aggregates the plots are drawn from.

    `*_reference` is a figure for as many real training patients in place of the generated ones,
    `*_real` / `*_heldout` for the held-out patients themselves, `*_low` / `*_high` a 95% bootstrap
    interval."""
    seconds: dict[str, float] = {}
    start = time.perf_counter()
    rng = np.random.default_rng(seed)
    real, reference = _sample(heldout, n_patients, rng), _sample(train, n_patients, rng)
    n = len(real)
    with _timed(seconds, "generation"):
        cohort = generate_patients(model, tokenizer, [p.age for p in real], [p.sex for p in real], sampling,
                                   seed=seed, batch_size=batch_size, progress=progress)
    metrics: dict[str, float] = {"n_patients": n}

    with _timed(seconds, "reconstruction"):
        metrics.update(compute_reconstruction_jaccard(model, tokenizer, heldout, train, prompt_prob=prompt_prob,
                                                      n_patients=n, seed=seed, sampling=sampling))
    with _timed(seconds, "fidelity"):
        metrics.update(fidelity_metrics(cohort, real))
        metrics.update({f"{k}_reference": v for k, v in fidelity_metrics(reference, real).items()})
        metrics.update(fidelity_intervals(cohort, real, n_boot, seed))
        metrics["visits_per_patient_mean"] = float(np.mean([len(p.visits) for p in cohort]))
        metrics["visits_per_patient_mean_real"] = float(np.mean([len(p.visits) for p in real]))
        metrics["codes_per_visit_mean"] = float(np.mean([len(v) for p in cohort for v in p.visits]))
        metrics["codes_per_visit_mean_real"] = float(np.mean([len(v) for p in real for v in p.visits]))
        metrics.update(validity_metrics(cohort))
        metrics.update({f"{k}_real": v for k, v in validity_metrics(real).items()})

    with _timed(seconds, "privacy"):
        metrics["exact_copy_share"] = exact_copy_share(cohort, train)
        metrics["exact_copy_share_heldout"] = exact_copy_share(real, train)
        nn_gen, nn_real = nearest_neighbour_distances(cohort, train), nearest_neighbour_distances(real, train)
        metrics["nn_distance_mean"] = float(nn_gen.mean())
        metrics["nn_distance_heldout_mean"] = float(nn_real.mean())
        metrics["nn_distance_ratio"] = float(nn_gen.mean() / nn_real.mean()) if nn_real.mean() > 0 else float("nan")
        metrics["membership_auc"] = membership_inference_auc(model, tokenizer, train, heldout, n, seed, max_length)

    # the released cohort: as a user would publish it, demographics drawn from the training histogram
    n_released = min(released_patients, len(train))
    metrics["released_patients"] = n_released
    per_group = {"groups": [], "test_patients_positive": [], "auroc_real": [], "auroc_synthetic": []}
    distances, per_k = {}, {}
    if n_released > 0:  # 0: the released-cohort figures (utility, attacks) are turned off
        with _timed(seconds, "generation"):
            ages, sexes = sample_demographics(demographics_histogram(train), n_released, seed + 1)
            released = generate_patients(model, tokenizer, ages, sexes, sampling, seed=seed + 1, batch_size=batch_size,
                                         progress=progress)
        metrics["exact_copy_share_released"] = exact_copy_share(released, train)
        with _timed(seconds, "utility"):
            utility, per_group = utility_metrics(_sample(train, n_released, rng), released,
                                                 _sample(heldout, released_patients, rng), n_boot=n_boot, seed=seed)
            metrics.update(utility)
        with _timed(seconds, "privacy"):
            mia, distances = distance_membership_inference(reference, real, released, n_boot, seed)
            metrics.update(mia)
            attribute, per_k = attribute_inference(reference, released, heldout, train, seed)
            metrics.update(attribute)
    seconds["total"] = time.perf_counter() - start
    metrics.update({f"seconds_{k}": v for k, v in seconds.items()})

    # per-code figures: only codes (groups) that enough real patients hold
    codes = all_codes(cohort, real)
    real_p, real_v = code_prevalence(real, codes)
    _, gen_v = code_prevalence(cohort, codes)
    kept, gen_kept, real_kept, codes_dropped = suppress_small_cells(
        codes, np.rint(real_p * len(real)), gen_v.round(6).tolist(), real_v.round(6).tolist())
    groups, positives, auroc_real, auroc_syn, groups_dropped = suppress_small_cells(
        per_group["groups"], per_group["test_patients_positive"], per_group["test_patients_positive"],
        per_group["auroc_real"], per_group["auroc_synthetic"])
    report = {
        "metrics": metrics,
        "sampling": vars(sampling or SamplingConfig()),
        "suppression": {"min_patients": MIN_CELL_PATIENTS, "codes_dropped": codes_dropped, "groups_dropped": groups_dropped},
        "visit_prevalence": {"codes": kept, "generated": gen_kept, "real": real_kept},
        "visits_per_patient": {"generated": _histogram([len(p.visits) for p in cohort]),
                               "real": _histogram([len(p.visits) for p in real])},
        "codes_per_visit": {"generated": _histogram([len(v) for p in cohort for v in p.visits]),
                            "real": _histogram([len(v) for p in real for v in p.visits])},
        "utility": {"groups": groups, "test_patients_positive": positives, "auroc_real": auroc_real,
                    "auroc_synthetic": auroc_syn},
        "privacy": {
            "distance_bins": DISTANCE_BINS.round(6).tolist(),
            "released_distance": {name: np.histogram(d, DISTANCE_BINS)[0].tolist() for name, d in distances.items()},
            "training_distance": {"generated": np.histogram(nn_gen, DISTANCE_BINS)[0].tolist(),
                                  "heldout": np.histogram(nn_real, DISTANCE_BINS)[0].tolist()},
            "attribute_inference": per_k,
        },
    }
    return metrics, report


def log_quality_report(tracker, metrics: dict, report: dict, step: int = 0, prefix: str = "gen/") -> None:
    """Metrics as `gen/<name>`, the report as `report/quality.json` and the plots under `report/`."""
    tracker.log_metrics({f"{prefix}{k}": v for k, v in metrics.items() if v is not None and math.isfinite(v)}, step=step)
    tracker.log_dict(report, "report/quality.json")
    with tempfile.TemporaryDirectory() as tmp:
        for path in plot_report(report, tmp):
            tracker.log_artifact(str(path), "report")


def run_quality_report(model, tokenizer, train: list[Patient], heldout: list[Patient], tracker, step: int = 0,
                       **kwargs) -> dict:
    """`quality_report` and `log_quality_report` in one call; returns the metrics."""
    metrics, report = quality_report(model, tokenizer, train, heldout, **kwargs)
    log_quality_report(tracker, metrics, report, step)
    m = {"utility_auroc_synthetic": math.nan, "utility_auroc_real": math.nan, "utility_ratio": math.nan,
         "membership_distance_auc": math.nan, "attribute_inference_f1": math.nan, "attribute_inference_f1_heldout": math.nan,
         **metrics}
    logger.info("quality report (%d patients, %d released, %.1f s): prevalence R2 %.3f (reference %.3f), transition R2 "
                "%.3f (reference %.3f), invalid codes %.4f (real %.4f), utility AUROC %.3f synthetic vs %.3f real "
                "(ratio %.3f), exact copies %.3f (held-out %.3f), NN distance ratio %.3f, membership AUC %.3f by "
                "distance, %.3f by likelihood, attribute F1 %.3f (held-out %.3f)",
                m["n_patients"], m["released_patients"], m["seconds_total"], m["prevalence_r2_visit"],
                m["prevalence_r2_visit_reference"], m["transition_r2"], m["transition_r2_reference"],
                m["invalid_code_rate"], m["invalid_code_rate_real"], m["utility_auroc_synthetic"], m["utility_auroc_real"],
                m["utility_ratio"], m["exact_copy_share"], m["exact_copy_share_heldout"], m["nn_distance_ratio"],
                m["membership_distance_auc"], m["membership_auc"], m["attribute_inference_f1"],
                m["attribute_inference_f1_heldout"])
    return metrics
