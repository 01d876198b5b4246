"""Fidelity and validity figures of the quality report on hand-made cohorts with known answers:
R-squared of prevalences (real as truth), visit-to-next-visit pair frequencies, the bootstrap
intervals, and the age/sex validity rules."""

import numpy as np
import pytest

from promptehr.report import fidelity as fd
from promptehr.report.stats import bootstrap_weights, count_distances
from promptehr.report.validity import validity_metrics
from promptehr.schema import Patient


def P(*visits, age=50.0, sex="M"):
    return Patient("x", age, sex, [list(v) for v in visits])


def rename(patients, suffix):
    return [Patient(p.subject_id, p.age, p.sex, [[c + suffix for c in v] for v in p.visits]) for p in patients]


def test_fidelity_is_perfect_on_the_same_cohort_and_poor_on_unrelated_codes(cohort):
    same = fd.fidelity_metrics(cohort, cohort)
    assert same["prevalence_pearson_patient"] == pytest.approx(1) and same["prevalence_pearson_visit"] == pytest.approx(1)
    for name in ("prevalence_r2_patient", "prevalence_r2_visit", "cooccurrence_r2", "transition_r2"):
        assert same[name] == pytest.approx(1)
    assert same["top100_overlap"] == 1 and same["cooccurrence_pearson"] == pytest.approx(1)
    assert same["visits_per_patient_tv"] == 0 and same["codes_per_visit_wasserstein"] == 0
    # other code names, same shapes: no prevalence agreement (R-squared below 0: worse than the mean), same counts
    other = fd.fidelity_metrics(rename(cohort[:300], "x"), cohort[300:])
    assert other["prevalence_pearson_visit"] < 0 and other["top100_overlap"] == 0
    assert other["prevalence_r2_visit"] < 0 and other["transition_r2"] < 0
    assert other["visits_per_patient_tv"] < 0.15
    # a half/half split of one cohort agrees well (what the reference figure measures)
    half = fd.fidelity_metrics(cohort[:300], cohort[300:])
    assert half["prevalence_pearson_visit"] > 0.9 and half["top100_overlap"] > 0.6 and half["cooccurrence_pearson"] > 0.7
    assert half["prevalence_r2_visit"] > 0.7 and half["prevalence_r2_patient"] > 0.7
    assert count_distances([1, 1], [2, 2]) == (1.0, 1.0)
    assert count_distances([1, 2, 3, 4], [1, 2, 3, 4]) == (0.0, 0.0)
    assert count_distances([1, 1], [1, 4]) == pytest.approx((0.5, 1.5))


def test_prevalence_r2_by_hand():
    """Real visits {A,B},{A},{C},{A},{B} (4 patients): per visit A .6, B .4, C .2; per patient A .75,
    B .5, C .25. Generated, one visit each, {A},{B},{A,C},{A}: A .75, B .25, C .25 both ways.
    R2 = 1 - SS_res / SS_tot around the REAL mean: visit 1 - .0475/.08, patient 1 - .0625/.125."""
    real = [P("AB"), P("A"), P("C"), P("A", "B")]
    generated = [P("A"), P("B"), P("AC"), P("A")]
    m = fd.fidelity_metrics(generated, real)
    assert m["prevalence_r2_visit"] == pytest.approx(1 - 0.0475 / 0.08)
    assert m["prevalence_r2_patient"] == pytest.approx(0.5)
    # not symmetric: the real figures are the truth
    assert fd.fidelity_metrics(real, generated)["prevalence_r2_visit"] != pytest.approx(m["prevalence_r2_visit"])


def test_transition_frequencies_by_hand():
    """Consecutive visit pairs: ({A},{A,B}), ({A,B},{C}) and ({B},{A}); a single-visit patient has none.
    Row a, column b: share of the 3 pairs with a in the earlier visit and b in the later one."""
    patients = [P("A", "AB", "C"), P("B", "A"), P("A")]
    got = fd.transition_frequencies(patients, ["A", "B", "C"]).reshape(3, 3)
    assert got * 3 == pytest.approx(np.array([[1, 1, 1], [1, 0, 1], [0, 0, 0]]))
    # reversing every patient's visits transposes the table: transitions are directed
    reverse = [Patient(p.subject_id, p.age, p.sex, p.visits[::-1]) for p in patients]
    assert fd.transition_frequencies(reverse, ["A", "B", "C"]).reshape(3, 3) == pytest.approx(got.T)
    m = fd.fidelity_metrics(reverse * 5, patients * 5)
    assert m["transition_r2"] < 0.5 and m["prevalence_r2_visit"] == pytest.approx(1)  # same visits, other order


def test_fidelity_intervals_are_the_resampled_figures(cohort):
    """The interval is the figure +- 1.96 standard deviations of the replicates, each replicate the
    figure recomputed on patients drawn with replacement (both groups, the codes of the full samples)."""
    generated, real = cohort[:40], cohort[40:100]
    got = fd.fidelity_intervals(generated, real, n_boot=30, seed=4)
    rng = np.random.default_rng(4)
    draws = [bootstrap_weights(len(g), 30, rng).astype(int) for g in (generated, real)]
    codes, top = fd.all_codes(generated, real), fd.top_codes(real)
    values = {name: [] for name in fd.HEADLINE}
    for wg, wr in zip(*draws):
        g = [p for p, n in zip(generated, wg) for _ in range(n)]
        r = [p for p, n in zip(real, wr) for _ in range(n)]
        (gp, gv), (rp, rv) = fd.code_prevalence(g, codes), fd.code_prevalence(r, codes)
        values["prevalence_r2_patient"].append(fd.r2(rp, gp))
        values["prevalence_r2_visit"].append(fd.r2(rv, gv))
        values["transition_r2"].append(fd.r2(fd.transition_frequencies(r, top), fd.transition_frequencies(g, top)))
    point = fd.fidelity_metrics(generated, real)
    for name, v in values.items():
        assert got[f"{name}_low"] == pytest.approx(point[name] - 1.959964 * np.std(v, ddof=1), abs=1e-6)
        assert got[f"{name}_high"] == pytest.approx(point[name] + 1.959964 * np.std(v, ddof=1), abs=1e-6)


def test_validity_flags_age_and_sex_inappropriate_codes_and_duplicates():
    patients = [
        Patient("1", 40.0, "F", [["1850", "4019"]]),  # prostate cancer in a woman
        Patient("2", 30.0, "M", [["65421"], ["4019"]]),  # pregnancy code in a man
        Patient("3", 70.0, "F", [["V3000", "4019", "4019"]]),  # newborn code at 70, and a duplicate
        Patient(
            "4", 60.0, "M", [["ICD9:1742", "ICD10:O80"]]
        ),  # MIMIC-IV prefixes: female breast code in a man; ICD-10 is not checked
        Patient("5", 0.0, "M", [["V3000", "7742"]]),  # a newborn with newborn codes: fine
    ]
    v = validity_metrics(patients)
    assert v["invalid_code_rate"] == pytest.approx(4 / 11)
    assert v["invalid_patient_rate"] == pytest.approx(4 / 5)
    assert v["duplicate_code_rate"] == pytest.approx(1 / 11)
    assert validity_metrics(patients[4:]) == {
        "invalid_code_rate": 0.0,
        "invalid_patient_rate": 0.0,
        "duplicate_code_rate": 0.0,
    }
