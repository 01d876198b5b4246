"""Utility (train on synthetic, test on real) on hand-made cohorts with known answers: code groups, the
next-visit examples (labels never taken from the features), AUROC near 0.5 when the next visit is
independent of the history and near 1 when it is determined by it, constant predictors for groups a
cohort lacks, and bootstrap AUROCs equal to scikit-learn's."""

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from promptehr.report import utility as ut
from promptehr.report.stats import bootstrap_weights, interval, weighted_auroc
from promptehr.schema import Patient


def test_code_groups():
    cases = {
        "4019": "401",
        "40190": "401",
        "V3000": "V30",
        "E8497": "E849",
        "ICD9:4019": "ICD9:401",
        "ICD9:E8497": "ICD9:E849",
        "ICD10:E119": "ICD10:E11",
        "ICD10:I10": "ICD10:I10",
        "ICD9:V053": "ICD9:V05",
    }
    assert {c: ut.code_group(c) for c in cases} == cases


def test_next_visit_examples_by_hand():
    """A 3-visit patient gives examples k=1 and k=2: features the groups of the earlier visits (their
    union), age / 90 and sex; labels the groups of visit k. A 1-visit patient gives none."""
    patients = [Patient("a", 45.0, "F", [["4019"], ["25000", "4011"], ["V3000"]]), Patient("b", 90.0, "M", [["4019"]])]
    x, y, owner = ut.next_visit_examples(patients[::-1], ["250", "401", "V30"], ["401", "V30", "250"])
    assert x.tolist() == [[0, 1, 0, 0.5, 1], [1, 1, 0, 0.5, 1]]
    assert y.tolist() == [[1, 0, 1], [0, 1, 0]]
    assert owner.tolist() == [1, 1]


def two_visit_cohort(n, rule, seed, n_visits=2):
    """Patients with one-code visits among codes 100..109 (groups '100'..'109'); each visit's code is
    rule(the previous visit's code, rng)."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        codes = [int(rng.integers(10))]
        while len(codes) < n_visits:
            codes.append(rule(codes[-1], rng))
        out.append(Patient(str(i), float(rng.integers(20, 80)), "MF"[i % 2], [[f"{100 + a}1"] for a in codes]))
    return out


def independent(a, rng):
    return int(rng.integers(10))


def determined(a, rng):
    return (a + 3) % 10


def test_tstr_auroc_is_chance_when_the_next_visit_is_independent_and_high_when_it_is_determined():
    noise_train, noise_test = two_visit_cohort(1500, independent, 0), two_visit_cohort(1500, independent, 1)
    m, _ = ut.utility_metrics(noise_train, noise_train, noise_test, n_boot=50)
    assert abs(m["utility_auroc_real"] - 0.5) < 0.05 and m["utility_auroc_real_low"] < 0.5 < m["utility_auroc_real_high"]
    assert m["utility_groups"] == 10 and m["utility_groups_scored"] == 10 and m["utility_examples_test"] == 1500

    real, test = two_visit_cohort(600, determined, 0), two_visit_cohort(600, determined, 1)
    m, per_group = ut.utility_metrics(real, real, test, n_boot=50)
    assert m["utility_auroc_real"] > 0.97 and m["utility_ratio"] == pytest.approx(1)
    assert m["utility_auroc_real_low"] <= m["utility_auroc_real"] <= m["utility_auroc_real_high"]
    assert sum(per_group["test_patients_positive"]) == 600
    # a generated cohort whose next visits ignore the history teaches nothing: ratio about 1/2
    m, _ = ut.utility_metrics(real, two_visit_cohort(600, independent, 2), test, n_boot=50)
    assert m["utility_auroc_real"] > 0.97 and abs(m["utility_auroc_synthetic"] - 0.5) < 0.1
    assert m["utility_ratio_low"] < m["utility_ratio"] < m["utility_ratio_high"] < 0.7


def test_utility_intervals_resample_test_patients():
    """Each replicate is the macro AUROC on test PATIENTS drawn with replacement (all examples of a
    patient together), scored by the same fitted model."""
    real = two_visit_cohort(200, independent, 0, n_visits=3)
    test = two_visit_cohort(40, independent, 1, n_visits=4)
    m, _ = ut.utility_metrics(real, real, test, n_boot=25, seed=3)
    features = sorted({ut.code_group(c) for p in real for v in p.visits for c in v})
    labels = ut.label_groups(real)
    x, y, _ = ut.next_visit_examples(real, features, labels)
    w = bootstrap_weights(len(test), 25, np.random.default_rng(3)).astype(int)
    values = []
    for wb in w:
        x_b, y_b, _ = ut.next_visit_examples([p for p, n in zip(test, wb) for _ in range(n)], features, labels)
        values.append(ut.macro_auroc(y_b, ut.fit_predict(x, y, x_b, seed=3)[0])[0])
    assert (m["utility_auroc_real_low"], m["utility_auroc_real_high"]) == pytest.approx(interval(values))


def test_groups_missing_from_a_training_cohort_get_a_constant_predictor():
    real, test = two_visit_cohort(400, determined, 0), two_visit_cohort(400, determined, 1)
    # the generated cohort never has group 103 in a next visit (3 = 0 + 3): that group scores 0.5
    generated = [p for p in real if p.visits[1] != ["1031"]]
    m, per_group = ut.utility_metrics(real, generated, test, n_boot=0)
    assert m["utility_groups_constant_synthetic"] == 1 and m["utility_groups_constant_real"] == 0
    assert per_group["auroc_synthetic"][per_group["groups"].index("103")] == 0.5
    assert "utility_ratio_low" not in m  # no bootstrap asked
    # no next visit at all: every group constant, AUROC 0.5
    m, _ = ut.utility_metrics(real, [Patient("s", 50.0, "M", [["1001"]])], test, n_boot=0)
    assert m["utility_examples_synthetic"] == 0 and m["utility_groups_constant_synthetic"] == 10
    assert m["utility_auroc_synthetic"] == 0.5


def test_weighted_auroc_is_sklearns_on_the_resample():
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 5, 80).astype(float)  # many ties
    labels = rng.random(80) < 0.3
    w = bootstrap_weights(80, 20, rng)
    got = weighted_auroc(scores, labels, w)
    for b in range(20):
        idx = np.repeat(np.arange(80), w[b].astype(int))
        assert got[b] == pytest.approx(roc_auc_score(labels[idx], scores[idx]))
    assert weighted_auroc(scores, labels, np.ones((1, 80)))[0] == pytest.approx(roc_auc_score(labels, scores))
    assert np.isnan(weighted_auroc(scores, np.zeros(80), np.ones((1, 80)))[0])
    assert interval([np.nan, *range(101)]) == pytest.approx((2.5, 97.5))
