"""Fidelity: how closely a generated cohort's code statistics match real patients'.
Inputs: two lists of patients. Outputs: R-squared (`sklearn.metrics.r2_score`, real as truth) and Pearson
r of code prevalences, within-visit and visit-to-next-visit pair frequencies, with bootstrap intervals
for the headline R-squared figures; top-100 overlap; distances of the count distributions."""

from __future__ import annotations

import numpy as np
from sklearn.metrics import r2_score

from promptehr.report.stats import bootstrap_weights, count_distances, multi_hot, normal_interval, pearson
from promptehr.schema import Patient

TOP_K = 100
HEADLINE = ("prevalence_r2_visit", "prevalence_r2_patient", "transition_r2")


def all_codes(*groups: list[Patient]) -> list[str]:
    return sorted({c for group in groups for p in group for v in p.visits for c in v})


def r2(real, generated) -> float:
    """R-squared of `generated` as a prediction of `real` (1: identical; 0: no better than the mean)."""
    real = np.asarray(real, dtype=float)
    return float(r2_score(real, generated)) if len(real) >= 2 else float("nan")


def _prevalence_tables(patients: list[Patient], codes: list[str]):
    """Per patient: which codes it holds (n, V), in how many of its visits (n, V), and its visit count."""
    index = {c: i for i, c in enumerate(codes)}
    held = multi_hot([{c for v in p.visits for c in v} for p in patients], index)
    in_visits = np.zeros_like(held)
    for r, p in enumerate(patients):
        for v in p.visits:
            in_visits[r, [index[c] for c in set(v)]] += 1
    return held, in_visits, np.array([len(p.visits) for p in patients], dtype=np.float64)


def code_prevalence(patients: list[Patient], codes: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Share of patients and share of visits holding each code."""
    held, in_visits, n_visits = _prevalence_tables(patients, codes)
    return held.sum(0) / max(len(patients), 1), in_visits.sum(0) / max(n_visits.sum(), 1)


def pair_frequencies(patients: list[Patient], codes: list[str]) -> np.ndarray:
    """Share of visits holding both codes, for every pair of `codes` (upper triangle, flattened)."""
    index = {c: i for i, c in enumerate(codes)}
    x = multi_hot([v for p in patients for v in p.visits], index)
    co = (x.T @ x) / max(len(x), 1)
    return co[np.triu_indices(len(codes), k=1)]


def _transition_tables(patients: list[Patient], codes: list[str]):
    """Per patient: for every ordered pair (a, b) of `codes`, the number of its consecutive visit pairs
    (k, k+1) with a in visit k and b in visit k+1 (n, K*K), and its number of consecutive pairs."""
    index = {c: i for i, c in enumerate(codes)}
    counts = np.zeros((len(patients), len(codes) ** 2), dtype=np.float32)
    for r, p in enumerate(patients):
        x = multi_hot(p.visits, index)
        if len(x) >= 2:
            counts[r] = (x[:-1].T @ x[1:]).ravel()
    return counts, np.array([max(len(p.visits) - 1, 0) for p in patients], dtype=np.float64)


def transition_frequencies(patients: list[Patient], codes: list[str]) -> np.ndarray:
    """For every ordered pair (a, b) of `codes` (a == b included: a condition that persists), the share
    of consecutive visit pairs (visit k, visit k+1) of `patients` with a in visit k and b in visit k+1;
    flattened row-major (a, b)."""
    counts, n_pairs = _transition_tables(patients, codes)
    return counts.sum(0) / max(n_pairs.sum(), 1)


def top_codes(patients: list[Patient], k: int = TOP_K) -> list[str]:
    """The `k` codes held by the most visits of `patients` (ties by code)."""
    codes = all_codes(patients)
    _, per_visit = code_prevalence(patients, codes)
    return [codes[i] for i in np.argsort(-per_visit, kind="stable")[: min(k, int((per_visit > 0).sum()))]]


def fidelity_metrics(cohort: list[Patient], real: list[Patient], top_k: int = TOP_K) -> dict:
    """Prevalence, top-k, pair and count-distribution agreement of `cohort` with `real`. Prevalences run
    over every code of either group; pair frequencies over the `top_k` most frequent real codes."""
    codes = all_codes(cohort, real)
    gen_p, gen_v = code_prevalence(cohort, codes)
    real_p, real_v = code_prevalence(real, codes)
    top_real = top_codes(real, top_k)
    top_gen = set(top_codes(cohort, len(top_real)))
    gen_pairs, real_pairs = pair_frequencies(cohort, top_real), pair_frequencies(real, top_real)
    gen_next, real_next = transition_frequencies(cohort, top_real), transition_frequencies(real, top_real)
    vpp_tv, vpp_w1 = count_distances([len(p.visits) for p in cohort], [len(p.visits) for p in real])
    cpv_tv, cpv_w1 = count_distances([len(v) for p in cohort for v in p.visits], [len(v) for p in real for v in p.visits])
    return {
        "prevalence_r2_patient": r2(real_p, gen_p),
        "prevalence_r2_visit": r2(real_v, gen_v),
        "prevalence_pearson_patient": pearson(gen_p, real_p),
        "prevalence_pearson_visit": pearson(gen_v, real_v),
        "top100_overlap": len(top_gen & set(top_real)) / len(top_real) if top_real else float("nan"),
        "cooccurrence_r2": r2(real_pairs, gen_pairs),
        "cooccurrence_pearson": pearson(gen_pairs, real_pairs),
        "transition_r2": r2(real_next, gen_next),
        "transition_pearson": pearson(gen_next, real_next),
        "visits_per_patient_tv": vpp_tv,
        "visits_per_patient_wasserstein": vpp_w1,
        "codes_per_visit_tv": cpv_tv,
        "codes_per_visit_wasserstein": cpv_w1,
    }


def fidelity_intervals(
    cohort: list[Patient], real: list[Patient], n_boot: int = 200, seed: int = 0, top_k: int = TOP_K
) -> dict:
    """95% intervals (`<name>_low`, `<name>_high`) of the headline R-squared figures: the figure +- 1.96
    standard deviations of its bootstrap replicates (`stats.normal_interval`); both groups' patients
    resampled with replacement, independently, `n_boot` times; the code lists (all codes; the top-k
    real codes) stay those of the full samples."""
    if n_boot <= 0 or not cohort or not real:
        return {}
    rng = np.random.default_rng(seed)
    codes, top_real = all_codes(cohort, real), top_codes(real, top_k)
    replicates = {name: [] for name in HEADLINE}
    resampled = []
    for group in (cohort, real):
        held, in_visits, n_visits = _prevalence_tables(group, codes)
        moves, n_pairs = _transition_tables(group, top_real)
        w = bootstrap_weights(len(group), n_boot, rng)
        with np.errstate(invalid="ignore", divide="ignore"):
            resampled.append(
                (
                    w @ held / w.sum(1, keepdims=True),
                    w @ in_visits / (w @ n_visits)[:, None],
                    w @ moves / (w @ n_pairs)[:, None],
                )
            )
    (g_p, g_v, g_t), (r_p, r_v, r_t) = resampled
    for b in range(n_boot):
        replicates["prevalence_r2_patient"].append(r2(r_p[b], g_p[b]))
        replicates["prevalence_r2_visit"].append(r2(r_v[b], g_v[b]))
        # a resample without any consecutive visit pair has no transition frequencies: skipped
        ok = np.isfinite(r_t[b]).all() and np.isfinite(g_t[b]).all()
        replicates["transition_r2"].append(r2(r_t[b], g_t[b]) if ok else float("nan"))
    point = fidelity_metrics(cohort, real, top_k)
    out = {}
    for name, values in replicates.items():
        out[f"{name}_low"], out[f"{name}_high"] = normal_interval(point[name], values)
    return out
