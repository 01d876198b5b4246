"""Privacy figures of the quality report on hand-made cohorts with known answers: exact copies,
nearest-neighbour distances, membership inference by distance to the released cohort (AUC and HALO's
median-threshold accuracy), attribute inference by nearest neighbours."""

import numpy as np
import pytest

from promptehr.report import privacy as pv
from promptehr.schema import Patient


def P(*visits):
    return Patient("x", 50.0, "M", [list(v) for v in visits])


def rename(patients, suffix):
    return [Patient(p.subject_id, p.age, p.sex, [[c + suffix for c in v] for v in p.visits]) for p in patients]


def test_privacy_copies_and_nearest_neighbours(cohort):
    train, other = cohort[:400], cohort[400:]
    copies = [
        Patient("s", p.age, p.sex, [list(reversed(v)) for v in p.visits]) for p in train[:50]
    ]  # code order is irrelevant
    assert pv.exact_copy_share(copies, train) == 1.0
    assert pv.exact_copy_share(rename(other, "x"), train) == 0.0
    assert np.all(pv.nearest_neighbour_distances(copies, train, chunk=16) == 0)
    assert np.all(pv.nearest_neighbour_distances(rename(other[:20], "x"), train) == 1)
    d = pv.nearest_neighbour_distances(other, train)
    assert 0 < d.mean() < 1
    # brute force on a few
    for p, got in zip(other[:5], d[:5]):
        a = {c for v in p.visits for c in v}
        best = min(1 - len(a & b) / len(a | b) for b in ({c for v in q.visits for c in v} for q in train))
        assert got == pytest.approx(best, abs=1e-6)


def test_membership_by_distance_by_hand():
    """Released {A,B}. Members {A,B}, {A,B} (distance 0) and {A} (1/2); non-members {B}, {B} (1/2) and
    {C} (1). AUC of "closer => member": of the 9 member/non-member pairs 7 are ordered right and 2
    tied: 8/9. The median of the six distances is 1/2; members strictly below it: 2 of 3, non-members
    not below it: 3 of 3; accuracy (2/3 + 1) / 2."""
    m, d = pv.distance_membership_inference([P("AB"), P("AB"), P("A")], [P("B"), P("B"), P("C")], [P("AB")], n_boot=0)
    assert m["membership_distance_auc"] == pytest.approx(8 / 9)
    assert m["membership_distance_accuracy"] == pytest.approx(5 / 6)
    assert d["members"] == pytest.approx([0, 0, 0.5]) and d["nonmembers"] == pytest.approx([0.5, 0.5, 1])


def test_membership_by_distance_separates_copies_and_not_fresh_patients(cohort):
    train, heldout = cohort[:200], cohort[200:400]
    # a released cohort that copies its training patients: perfect attack
    m, _ = pv.distance_membership_inference(train[:100], heldout[:100], rename(train, ""), n_boot=50)
    assert m["membership_distance_auc"] > 0.9 and m["membership_distance_accuracy"] > 0.8
    # fresh patients of the same population: no signal, and the interval says so
    m, _ = pv.distance_membership_inference(train[:100], heldout[:100], cohort[400:], n_boot=200, seed=1)
    assert abs(m["membership_distance_auc"] - 0.5) < 0.1 and abs(m["membership_distance_accuracy"] - 0.5) < 0.1
    assert m["membership_distance_auc_low"] < 0.5 < m["membership_distance_auc_high"]
    assert m["membership_distance_auc_high"] - m["membership_distance_auc_low"] < 0.25


def test_attribute_inference_by_hand():
    """Known codes K, L. Target {K,X} lies nearest to pool patient {K,X} (Hamming 0), then {K,L,Z} (1),
    then {L,Y} (2); target {L,Y} likewise. k=1 infers X and Y: F1 1. k=2 and k=3: no other code is
    held by more than half of the neighbours: nothing inferred, F1 0."""
    targets = [P("KX"), P("LY")]
    pool = [P("KX"), P("LY"), P("KLZ")]
    assert pv.attribute_inference_f1(targets, pool, ["K", "L"], ks=(1, 2, 3)) == {1: 1.0, 2: 0.0, 3: 0.0}
    # a wrong neighbour {K,W} in place of {K,X}: one false positive, one false negative: F1 2/(2+1+1)
    pool[0] = P("KW")
    assert pv.attribute_inference_f1(targets, pool, ["K", "L"], ks=(1,))[1] == pytest.approx(2 / 4)
    # known codes are neither inferred nor scored: target {K,X}, neighbour {K,L,X}: only X is inferred, and right
    assert pv.attribute_inference_f1([P("KX")], [P("KLX")], ["K", "L"], ks=(1,)) == {1: 1.0}


def test_attribute_inference_beside_heldout_patients(cohort):
    """A released cohort that copies the attacked training patients gives their other codes away; the
    same attack with as many held-out real patients (the reference) recovers far less. The metric is
    the attacker's best k."""
    train, heldout = cohort[:300], cohort[300:]
    targets = train[:60]
    m, per_k = pv.attribute_inference(targets, targets, heldout, train, seed=0)
    assert m["attribute_inference_pool"] == 60
    assert m["attribute_inference_f1"] == max(m[f"attribute_inference_f1_k{k}"] for k in pv.ATTRIBUTE_KS)
    assert m["attribute_inference_f1_heldout"] == max(m[f"attribute_inference_f1_heldout_k{k}"] for k in pv.ATTRIBUTE_KS)
    assert per_k["k"] == [1, 2, 3, 4, 5] and per_k["synthetic"][0] == m["attribute_inference_f1_k1"]
    assert m["attribute_inference_f1"] > 0.8 and m["attribute_inference_f1_heldout"] < 0.5
    # patients of the same population in place of copies: about the held-out figure
    fresh, _ = pv.attribute_inference(targets, heldout[:150], heldout[150:], train, seed=0)
    assert abs(fresh["attribute_inference_f1"] - fresh["attribute_inference_f1_heldout"]) < 0.1
