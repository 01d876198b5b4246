"""Utility: train on synthetic, test on real (TSTR) on a next-visit task over code groups.
Inputs: real training patients, as many generated ones, held-out real patients. Outputs: macro AUROC
of a per-group logistic regression trained on real vs on generated patients, tested on the held-out
ones, with patient-bootstrap intervals, and per-group AUROCs."""

from __future__ import annotations

import logging
import warnings
from collections import Counter

import numpy as np
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score

from promptehr.report.stats import bootstrap_weights, interval, multi_hot, weighted_auroc
from promptehr.schema import MAX_AGE, Patient

logger = logging.getLogger(__name__)

N_GROUPS = 50


def code_group(code: str) -> str:
    """The code's category: ICD-9 3 characters (E-codes 4: `E849`), ICD-10 3 characters; a version
    prefix stays part of the group (`ICD9:401`, `ICD10:I10`). Unprefixed codes are ICD-9 (MIMIC-III,
    the built-in cohort)."""
    prefix, sep, body = code.rpartition(":")
    width = 4 if prefix != "ICD10" and body.startswith("E") else 3
    return f"{prefix}{sep}{body[:width]}"


def label_groups(patients: list[Patient], n: int = N_GROUPS) -> list[str]:
    """The `n` groups held by the most visits of `patients` (ties by name)."""
    counts = Counter(g for p in patients for v in p.visits for g in {code_group(c) for c in v})
    return [g for g, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:n]]


def next_visit_examples(patients: list[Patient], feature_groups: list[str], label_groups: list[str]):
    """One example per (patient, k) with k >= 1. Features: multi-hot of the groups of visits 0..k-1
    (their union; groups outside `feature_groups` ignored), then age / 90 and sex (1: F). Labels:
    multi-hot of the groups of visit k over `label_groups`; nothing of visit k enters the features.
    Returns (X (m, F+2) float32, Y (m, L) int8, owner (m,): the index of each example's patient)."""
    f_index = {g: i for i, g in enumerate(feature_groups)}
    l_index = {g: i for i, g in enumerate(label_groups)}
    history, target, demo, owner = [], [], [], []
    for i, p in enumerate(patients):
        seen: set[str] = set()
        for k, visit in enumerate(p.visits):
            groups = {code_group(c) for c in visit}
            if k >= 1:
                history.append(set(seen))
                target.append(groups)
                demo.append((min(p.age, MAX_AGE) / MAX_AGE, float(p.sex == "F")))
                owner.append(i)
            seen |= groups
    x = np.concatenate([multi_hot(history, f_index), np.asarray(demo, dtype=np.float32).reshape(-1, 2)], axis=1)
    return x, multi_hot(target, l_index).astype(np.int8), np.asarray(owner, dtype=np.int64)


def fit_predict(x_train, y_train, x_test, seed: int = 0) -> tuple[np.ndarray, int]:
    """One L2 logistic regression (liblinear) per label column; returns the test scores (m, L) and the
    number of columns without both classes in training, whose predictor is the constant training label
    (AUROC 0.5 on any test set: a cohort missing a group cannot teach it)."""
    scores = np.zeros((len(x_test), y_train.shape[1]))
    constant = 0
    for j in range(y_train.shape[1]):
        y = y_train[:, j]
        if len(np.unique(y)) < 2:
            constant += 1
            scores[:, j] = float(y[0]) if len(y) else 0.0
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            clf = LogisticRegression(solver="liblinear", max_iter=1000, random_state=seed).fit(x_train, y)
        scores[:, j] = clf.predict_proba(x_test)[:, 1]
    return scores, constant


def macro_auroc(y, scores) -> tuple[float, np.ndarray]:
    """Mean ROC AUC over the label columns with a positive and a negative; and the per-column AUROCs
    (NaN where a column has one class only)."""
    per = np.array(
        [roc_auc_score(y[:, j], scores[:, j]) if 0 < y[:, j].sum() < len(y) else np.nan for j in range(y.shape[1])]
    )
    return (float(np.nanmean(per)) if np.isfinite(per).any() else float("nan")), per


def utility_metrics(
    real: list[Patient],
    synthetic: list[Patient],
    test: list[Patient],
    n_groups: int = N_GROUPS,
    n_boot: int = 200,
    seed: int = 0,
) -> tuple[dict, dict]:
    """TSTR on the next-visit task: a model trained on `real` and one on `synthetic`, both scored on
    `test` (macro AUROC over the label groups with a positive and a negative among the test examples).
    Feature and label groups come from `real` (the label groups: the `n_groups` most frequent by visits).
    95% intervals resample the test patients (all examples of a patient together), both models on the
    same resamples; `utility_ratio` = synthetic / real.

    Returns (metrics, per_group): per_group lists each label group's AUROC under both models and its
    number of test patients with a positive example."""
    features = sorted({code_group(c) for p in real for v in p.visits for c in v})
    labels = label_groups(real, n_groups)
    x_real, y_real, _ = next_visit_examples(real, features, labels)
    x_syn, y_syn, _ = next_visit_examples(synthetic, features, labels)
    x_test, y_test, owner = next_visit_examples(test, features, labels)
    metrics = {
        "utility_examples_real": len(x_real),
        "utility_examples_synthetic": len(x_syn),
        "utility_examples_test": len(x_test),
        "utility_groups": len(labels),
    }
    scored = {}
    for name, x, y in (("real", x_real, y_real), ("synthetic", x_syn, y_syn)):
        s, constant = fit_predict(x, y, x_test, seed) if len(x_test) else (np.zeros((0, len(labels))), 0)
        metrics[f"utility_auroc_{name}"], per = macro_auroc(y_test, s)
        metrics[f"utility_groups_constant_{name}"] = constant
        scored[name] = (s, per)
    metrics["utility_groups_scored"] = int(np.isfinite(scored["real"][1]).sum())
    real_auroc = metrics["utility_auroc_real"]
    metrics["utility_ratio"] = metrics["utility_auroc_synthetic"] / real_auroc if real_auroc > 0 else float("nan")

    if n_boot > 0 and len(x_test):
        patients, example_patient = np.unique(owner, return_inverse=True)
        w = bootstrap_weights(len(patients), n_boot, np.random.default_rng(seed))[:, example_patient]
        boot = {}
        for name, (s, _) in scored.items():
            per = np.stack([weighted_auroc(s[:, j], y_test[:, j], w) for j in range(len(labels))], axis=1)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # a resample where no group has both classes
                boot[name] = np.nanmean(per, axis=1)
        boot["ratio"] = boot["synthetic"] / boot["real"]
        for name, values in (("auroc_real", boot["real"]), ("auroc_synthetic", boot["synthetic"]), ("ratio", boot["ratio"])):
            metrics[f"utility_{name}_low"], metrics[f"utility_{name}_high"] = interval(values)

    positives = [len(set(owner[y_test[:, j] == 1].tolist())) for j in range(len(labels))]
    per_group = {
        "groups": labels,
        "test_patients_positive": positives,
        "auroc_real": scored["real"][1].tolist(),
        "auroc_synthetic": scored["synthetic"][1].tolist(),
    }
    return metrics, per_group
