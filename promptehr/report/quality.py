"""The quality report: generated cohorts against real patients, every figure beside its reference.
Inputs: a model, its tokenizer, training and held-out patients. Outputs: `gen/<name>` metrics,
`report/quality.json` (aggregates only; per-code cells of fewer than MIN_CELL_PATIENTS real patients
dropped) and plots under `report/`."""

from __future__ import annotations

import logging
import math
import tempfile
import time
from collections import Counter
from contextlib import contextmanager

import numpy as np

from promptehr.generate import SamplingConfig, demographics_histogram, generate_patients, sample_demographics
from promptehr.metrics import compute_reconstruction_jaccard
from promptehr.report.fidelity import all_codes, code_prevalence, fidelity_intervals, fidelity_metrics
from promptehr.report.plots import plot_report
from promptehr.report.privacy import (
    attribute_inference,
    distance_membership_inference,
    exact_copy_share,
    membership_inference_auc,
    nearest_neighbour_distances,
)
from promptehr.report.utility import utility_metrics
from promptehr.report.validity import validity_metrics
from promptehr.schema import Patient

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


def cohort_figures(
    cohort: list[Patient], real: list[Patient], reference: list[Patient], n_boot: int = 200, seed: int = 0
) -> dict:
    """Fidelity (with `_reference` and intervals), count means and validity of `cohort` against `real`."""
    metrics = fidelity_metrics(cohort, real)
    metrics.update({f"{k}_reference": v for k, v in fidelity_metrics(reference, real).items()})
    metrics.update(fidelity_intervals(cohort, real, n_boot, seed))
    for suffix, group in (("", cohort), ("_real", real)):
        metrics[f"visits_per_patient_mean{suffix}"] = float(np.mean([len(p.visits) for p in group]))
        metrics[f"codes_per_visit_mean{suffix}"] = float(np.mean([len(v) for p in group for v in p.visits]))
    metrics.update(validity_metrics(cohort))
    metrics.update({f"{k}_real": v for k, v in validity_metrics(real).items()})
    return metrics


def copy_figures(cohort: list[Patient], real: list[Patient], train: list[Patient]) -> tuple[dict, dict]:
    """Exact copies and nearest-training-patient distances of `cohort`, beside the held-out `real`."""
    nn_gen, nn_real = nearest_neighbour_distances(cohort, train), nearest_neighbour_distances(real, train)
    metrics = {
        "exact_copy_share": exact_copy_share(cohort, train),
        "exact_copy_share_heldout": exact_copy_share(real, train),
        "nn_distance_mean": float(nn_gen.mean()),
        "nn_distance_heldout_mean": float(nn_real.mean()),
        "nn_distance_ratio": float(nn_gen.mean() / nn_real.mean()) if nn_real.mean() > 0 else float("nan"),
    }
    return metrics, {"generated": nn_gen, "heldout": nn_real}


def released_figures(
    released: list[Patient],
    train: list[Patient],
    heldout: list[Patient],
    members: list[Patient],
    nonmembers: list[Patient],
    rng: np.random.Generator,
    seconds: dict,
    n_boot: int = 200,
    seed: int = 0,
) -> tuple[dict, dict]:
    """Utility (TSTR: as many real training patients as `released`, tested on up to as many held-out
    ones) and the attacks on the released cohort; returns (metrics, details for the report)."""
    metrics = {"exact_copy_share_released": exact_copy_share(released, train)}
    with _timed(seconds, "utility"):
        utility, per_group = utility_metrics(
            _sample(train, len(released), rng), released, _sample(heldout, len(released), rng), n_boot=n_boot, seed=seed
        )
        metrics.update(utility)
    with _timed(seconds, "privacy"):
        mia, distances = distance_membership_inference(members, nonmembers, released, n_boot, seed)
        attribute, per_k = attribute_inference(members, released, heldout, train, seed)
        metrics.update(mia | attribute)
    return metrics, {"per_group": per_group, "distances": distances, "per_k": per_k}


def quality_report(
    model,
    tokenizer,
    train: list[Patient],
    heldout: list[Patient],
    n_patients: int = 500,
    seed: int = 0,
    sampling: SamplingConfig | None = None,
    prompt_prob: float = 0.5,
    max_length: int = 512,
    batch_size: int = 256,
    progress: bool = False,
    released_patients: int = 5000,
    n_boot: int = 200,
) -> tuple[dict, dict]:
    """Generate two cohorts and compare; returns (metrics, report): flat metrics (no prefix) and a
    JSON-able report that adds the aggregates the plots are drawn from. One cohort gets the
    demographics of `n_patients` held-out patients and is compared with them (fidelity, validity,
    copies); the released cohort, `released_patients` patients with demographics drawn from the
    training histogram as a user would publish it, is scored by utility and attacked.

    `*_reference` is a figure for as many real training patients in place of the generated ones,
    `*_real` / `*_heldout` for the held-out patients themselves, `*_low` / `*_high` a 95% bootstrap
    interval. `released_patients` 0 turns the released cohort's figures off."""
    seconds: dict[str, float] = {}
    start = time.perf_counter()
    rng = np.random.default_rng(seed)
    real, reference = _sample(heldout, n_patients, rng), _sample(train, n_patients, rng)
    with _timed(seconds, "generation"):
        cohort = generate_patients(
            model,
            tokenizer,
            [p.age for p in real],
            [p.sex for p in real],
            sampling,
            seed=seed,
            batch_size=batch_size,
            progress=progress,
        )
    metrics: dict[str, float] = {"n_patients": len(real)}
    with _timed(seconds, "reconstruction"):
        metrics.update(
            compute_reconstruction_jaccard(
                model, tokenizer, heldout, train, prompt_prob=prompt_prob, n_patients=len(real), seed=seed, sampling=sampling
            )
        )
    with _timed(seconds, "fidelity"):
        metrics.update(cohort_figures(cohort, real, reference, n_boot, seed))
    with _timed(seconds, "privacy"):
        copies, nn = copy_figures(cohort, real, train)
        metrics.update(copies)
        metrics["membership_auc"] = membership_inference_auc(model, tokenizer, train, heldout, len(real), seed, max_length)

    # the released cohort: as a user would publish it, demographics drawn from the training histogram
    metrics["released_patients"] = n_released = min(released_patients, len(train))
    details = {
        "per_group": {"groups": [], "test_patients_positive": [], "auroc_real": [], "auroc_synthetic": []},
        "distances": {},
        "per_k": {},
    }
    if n_released > 0:
        with _timed(seconds, "generation"):
            ages, sexes = sample_demographics(demographics_histogram(train), n_released, seed + 1)
            released = generate_patients(
                model, tokenizer, ages, sexes, sampling, seed=seed + 1, batch_size=batch_size, progress=progress
            )
        released_metrics, details = released_figures(released, train, heldout, reference, real, rng, seconds, n_boot, seed)
        metrics.update(released_metrics)
    seconds["total"] = time.perf_counter() - start
    metrics.update({f"seconds_{k}": v for k, v in seconds.items()})
    return metrics, build_report(metrics, sampling, cohort, real, nn, details)


def build_report(metrics: dict, sampling, cohort: list[Patient], real: list[Patient], nn: dict, details: dict) -> dict:
    """The JSON-able report: metrics, and the aggregates the plots are drawn from; per-code cells only
    for codes (groups) that at least MIN_CELL_PATIENTS real patients hold."""
    codes = all_codes(cohort, real)
    real_p, real_v = code_prevalence(real, codes)
    _, gen_v = code_prevalence(cohort, codes)
    kept, gen_kept, real_kept, codes_dropped = suppress_small_cells(
        codes, np.rint(real_p * len(real)), gen_v.round(6).tolist(), real_v.round(6).tolist()
    )
    per_group = details["per_group"]
    groups, positives, auroc_real, auroc_syn, groups_dropped = suppress_small_cells(
        per_group["groups"],
        per_group["test_patients_positive"],
        per_group["test_patients_positive"],
        per_group["auroc_real"],
        per_group["auroc_synthetic"],
    )
    return {
        "metrics": metrics,
        "sampling": vars(sampling or SamplingConfig()),
        "suppression": {"min_patients": MIN_CELL_PATIENTS, "codes_dropped": codes_dropped, "groups_dropped": groups_dropped},
        "visit_prevalence": {"codes": kept, "generated": gen_kept, "real": real_kept},
        "visits_per_patient": {
            "generated": _histogram([len(p.visits) for p in cohort]),
            "real": _histogram([len(p.visits) for p in real]),
        },
        "codes_per_visit": {
            "generated": _histogram([len(v) for p in cohort for v in p.visits]),
            "real": _histogram([len(v) for p in real for v in p.visits]),
        },
        "utility": {
            "groups": groups,
            "test_patients_positive": positives,
            "auroc_real": auroc_real,
            "auroc_synthetic": auroc_syn,
        },
        "privacy": {
            "distance_bins": DISTANCE_BINS.round(6).tolist(),
            "released_distance": {
                name: np.histogram(d, DISTANCE_BINS)[0].tolist() for name, d in details["distances"].items()
            },
            "training_distance": {name: np.histogram(d, DISTANCE_BINS)[0].tolist() for name, d in nn.items()},
            "attribute_inference": details["per_k"],
        },
    }


def log_quality_report(tracker, metrics: dict, report: dict, step: int = 0, prefix: str = "gen/") -> None:
    """Metrics as `gen/<name>`, the report as `report/quality.json` and the plots under `report/`."""
    tracker.log_metrics({f"{prefix}{k}": v for k, v in metrics.items() if v is not None and math.isfinite(v)}, step=step)
    tracker.log_dict(report, "report/quality.json")
    with tempfile.TemporaryDirectory() as tmp:
        for path in plot_report(report, tmp):
            tracker.log_artifact(str(path), "report")


def run_quality_report(
    model, tokenizer, train: list[Patient], heldout: list[Patient], tracker, step: int = 0, **kwargs
) -> dict:
    """`quality_report` and `log_quality_report` in one call; returns the metrics."""
    metrics, report = quality_report(model, tokenizer, train, heldout, **kwargs)
    log_quality_report(tracker, metrics, report, step)
    m = {
        "utility_auroc_synthetic": math.nan,
        "utility_auroc_real": math.nan,
        "utility_ratio": math.nan,
        "membership_distance_auc": math.nan,
        "attribute_inference_f1": math.nan,
        "attribute_inference_f1_heldout": math.nan,
        **metrics,
    }
    logger.info(
        "quality report (%d patients, %d released, %.1f s): prevalence R2 %.3f (reference %.3f), transition R2 "
        "%.3f (reference %.3f), invalid codes %.4f (real %.4f), utility AUROC %.3f synthetic vs %.3f real "
        "(ratio %.3f), exact copies %.3f (held-out %.3f), NN distance ratio %.3f, membership AUC %.3f by "
        "distance, %.3f by likelihood, attribute F1 %.3f (held-out %.3f)",
        m["n_patients"],
        m["released_patients"],
        m["seconds_total"],
        m["prevalence_r2_visit"],
        m["prevalence_r2_visit_reference"],
        m["transition_r2"],
        m["transition_r2_reference"],
        m["invalid_code_rate"],
        m["invalid_code_rate_real"],
        m["utility_auroc_synthetic"],
        m["utility_auroc_real"],
        m["utility_ratio"],
        m["exact_copy_share"],
        m["exact_copy_share_heldout"],
        m["nn_distance_ratio"],
        m["membership_distance_auc"],
        m["membership_auc"],
        m["attribute_inference_f1"],
        m["attribute_inference_f1_heldout"],
    )
    return metrics
