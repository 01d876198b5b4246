"""The code-to-code cohort model (promptehr/cohorts/transition.py): its exact next-visit probabilities
checked against brute-force enumeration of a tiny model, and against what its sampler draws."""

from __future__ import annotations

import itertools
from collections import Counter

import numpy as np
import pytest

from promptehr.cohorts import TransitionModel, cohort_model
from promptehr.schema import Patient
from promptehr.validity import code_allowed, code_restriction

TINY_CODES = ["4019", "0389", "V270", "185"]  # chronic, acute, pregnancy (F 12-55), male-only
TINY_T = np.array(
    [  # rows: previous code, columns: next code
        [0.8, 0.1, 0.0, 0.0],
        [0.0, 0.05, 0.0, 0.3],
        [0.2, 0.0, 0.6, 0.0],
        [0.3, 0.0, 0.0, 0.7],
    ]
)


def csr(dense: np.ndarray):
    rows = [np.flatnonzero(r) for r in dense]
    indptr = np.concatenate([[0], np.cumsum([r.size for r in rows])])
    return indptr, np.concatenate(rows), np.concatenate([dense[i, r] for i, r in enumerate(rows)])


def tiny_model(**kw) -> TransitionModel:
    params = dict(
        codes=TINY_CODES,
        profile_names=["general", "obstetric"],
        profile_logit=[0.0, 0.8],
        profile_logit_age=[0.0, 0.0],  # no age slope: patients can be grouped exactly in the MC test
        profile_logit_male=[0.3, 0.0],
        profile_min_age=[0.0, 15.0],
        profile_max_age=[999.0, 46.0],
        profile_sex=[None, "F"],
        profile_prob=[[0.6, 0.5, 0.0, 0.3], [0.1, 0.05, 0.4, 0.0]],
        age_band_edges=[50.0],
        background=[[0.1, 0.2, 0.05, 0.1], [0.3, 0.1, 0.0, 0.2]],
        transition=csr(TINY_T),
        continue_logit=-1.0,
        continue_logit_later=0.5,
        continue_code_logit=[0.8, 0.0, -1.0, 0.3],
        max_visits=4,
        neonate_share=0.0,
        adult_male_share=0.3,
        age_top_share=0.0,
        age_beta_a=1.0,  # young: many women eligible for both profiles
        age_beta_b=2.0,
    )
    params.update(kw)
    return TransitionModel(**params)


def all_subsets(codes):
    return [list(s) for r in range(1, len(codes) + 1) for s in itertools.combinations(codes, r)]


def brute_force_joint(m: TransitionModel, age: float, sex: str, visits) -> float:
    """P(visits, each exists) from the raw parameters: sum over the first visit's profile, then the
    noisy-OR of background and T, each visit conditioned on being non-empty, times P(continue)."""
    allowed = np.array([code_allowed(c, age, sex) for c in m.codes])
    eligible = np.array(
        [
            (m.profile_min_age[k] <= age < m.profile_max_age[k]) and m.profile_sex[k] in (None, sex)
            for k in range(m.n_profiles)
        ]
    )
    pi = np.where(eligible, np.exp(m.profile_logit + m.profile_logit_male * (sex == "M")), 0.0)
    pi /= pi.sum()
    dense_t = np.zeros((m.n_codes, m.n_codes))
    indptr, indices, data = m.transition
    for j in range(m.n_codes):
        dense_t[j, indices[indptr[j] : indptr[j + 1]]] = data[indptr[j] : indptr[j + 1]]
    band = int(age >= m.age_band_edges[0])

    def set_prob(p, visit):
        inside = np.array([c in visit for c in m.codes])
        return np.prod(np.where(inside, p, 1 - p)) / (1 - np.prod(1 - p))

    def cont(visit, k):
        logit = (
            m.continue_logit
            + m.continue_logit_later * (k >= 1)
            + sum(m.continue_code_logit[m.codes.index(c)] for c in visit)
        )
        return 1 / (1 + np.exp(-logit))

    total = sum(pi[z] * set_prob(m.profile_prob[z] * allowed, visits[0]) for z in range(m.n_profiles))
    for k in range(1, len(visits)):
        prev = [m.codes.index(c) for c in visits[k - 1]]
        p = allowed * (1 - (1 - m.background[band]) * np.prod(1 - dense_t[prev], axis=0))
        total *= cont(visits[k - 1], k - 1) * set_prob(p, visits[k])
    return total


@pytest.mark.parametrize(
    "age, sex, visits",
    [
        (30.0, "F", [["4019", "V270"], ["V270"], ["0389", "4019"], ["4019", "V270", "0389"]]),
        (30.0, "M", [["4019", "185"], ["185"], ["0389"]]),
        (70.0, "F", [["0389"], ["4019"], ["4019", "0389"]]),
        (52.0, "F", [["0389", "4019"], ["4019"]]),  # older band, pregnancy codes allowed but never drawn
        (52.0, "F", [["V270"], ["4019"]]),  # impossible first visit: -inf, then nan
    ],
)
def test_exact_probabilities_match_brute_force_enumeration(age, sex, visits):
    m = tiny_model()
    patient = Patient("T", age, sex, visits)
    fast = m.next_visit_log_probs(patient)
    for k in range(len(visits)):
        num = brute_force_joint(m, age, sex, visits[: k + 1])
        den = sum(brute_force_joint(m, age, sex, visits[:k] + [v]) for v in all_subsets(TINY_CODES))
        exact = np.log(num / den) if num > 0 else -np.inf if den > 0 else np.nan
        assert fast[k] == pytest.approx(exact, abs=1e-10, nan_ok=True)
        assert m.next_visit_log_prob(patient, k) == pytest.approx(exact, abs=1e-10, nan_ok=True)


@pytest.mark.parametrize("age, sex", [(30.0, "F"), (30.0, "M"), (70.0, "F"), (52.0, "F")])
def test_next_visit_distribution_sums_to_one(age, sex):
    m = tiny_model()
    history = [["4019", "V270"], ["4019", "0389"]] if sex == "F" and age < 46 else [["4019"], ["0389"]]
    for k in range(3):
        probs = np.exp(
            [m.next_visit_log_prob(Patient("T", age, sex, history[:k] + [v]), k) for v in all_subsets(TINY_CODES)]
        )
        assert probs.sum() == pytest.approx(1.0, abs=1e-12)
        marginals = m.next_visit_code_marginals(Patient("T", age, sex, history[:k]), k)
        by_enumeration = sum(p * np.array([c in v for c in TINY_CODES]) for p, v in zip(probs, all_subsets(TINY_CODES)))
        assert marginals == pytest.approx(by_enumeration, abs=1e-12)


def test_sampler_agrees_with_the_exact_probabilities():
    """Empirical distributions of the first and the second visit of sampled patients == the average of
    the exact predictive distributions (one process: sample() and next_visit_log_prob())."""
    m = tiny_model()
    patients = m.sample(60_000, seed=5)
    subsets = [frozenset(v) for v in all_subsets(TINY_CODES)]

    def agree(group, k, chosen):
        """`group(p)` = (sex, an age with the same exact probabilities as p's, p's visits before k)."""
        groups = Counter(group(p) for p in chosen)
        expected = np.zeros(len(subsets))
        for (sex, age, history), count in groups.items():
            for i, v in enumerate(subsets):
                visits = [sorted(h) for h in history] + [sorted(v)]
                expected[i] += count * np.exp(m.next_visit_log_prob(Patient("T", age, sex, visits), k))
        n = len(chosen)
        expected /= n
        observed = Counter(frozenset(p.visits[k]) for p in chosen)
        observed = np.array([observed[v] for v in subsets]) / n
        assert expected.sum() == pytest.approx(1.0, abs=1e-9)
        assert np.all(observed[expected == 0] == 0)
        cells = expected > 0
        chi2 = float(np.sum(n * (observed[cells] - expected[cells]) ** 2 / expected[cells]))
        dof = int(cells.sum()) - 1
        assert chi2 < dof + 6 * np.sqrt(2 * dof), (k, chi2, dof)  # ~1e-4 false-alarm rate; fixed seed

    # first visits depend on sex, the obstetric profile's window (15-46) and the pregnancy rule (12-55)
    agree(lambda p: (p.sex, 30.0 if 15 <= p.age < 46 else 50.0 if p.age <= 55 else 70.0, ()), 0, patients)
    # second visits on the age band (edge 50), the pregnancy rule and the first visit only
    second = [p for p in patients if len(p.visits) >= 2]
    assert len(second) > 8000
    agree(lambda p: (p.sex, 30.0 if p.age < 50 else 52.0 if p.age <= 55 else 70.0, (frozenset(p.visits[0]),)), 1, second)
    # the return rate follows the first visit's codes: per first visit, the share of patients with a
    # second one is the exact probability (the same for all of them)
    by_first = Counter(frozenset(p.visits[0]) for p in patients)
    came_back = Counter(frozenset(p.visits[0]) for p in second)
    rates = set()
    for v0, n in by_first.items():
        if n >= 1000:
            p_return = m.next_visit_exists_prob(Patient("T", 30.0, "F", [sorted(v0)]), 1)
            assert abs(came_back[v0] / n - p_return) < 5 * np.sqrt(p_return * (1 - p_return) / n), (
                v0,
                came_back[v0] / n,
                p_return,
            )
            rates.add(round(p_return, 3))
    assert len(rates) >= 4
    assert m.next_visit_exists_prob(Patient("T", 30.0, "F", [["V270"]] * 4), 4) == 0.0  # max_visits
    assert max(len(p.visits) for p in patients) == m.max_visits


def test_visit_count_depends_on_codes_not_on_the_profile():
    """Two patients with the same visit have the same chance to come back, whatever their profiles
    could have been: existence carries no hidden information."""
    m = tiny_model()
    a = Patient("A", 30.0, "F", [["4019"]])  # both profiles possible
    b = Patient("B", 70.0, "M", [["4019"]])  # general profile only
    assert m.next_visit_exists_prob(a, 1) == pytest.approx(m.next_visit_exists_prob(b, 1))
    assert m.next_visit_exists_prob(a, 1) == pytest.approx(1 / (1 + np.exp(-(-1.0 + 0.8))))


def test_invalid_parameters_are_rejected():
    with pytest.raises(ValueError, match="profile_prob"):
        tiny_model(profile_prob=[[1.0, 0.5, 0.0, 0.3], [0.1, 0.05, 0.4, 0.0]])
    with pytest.raises(ValueError, match="CSR"):
        tiny_model(transition=(np.array([0, 1]), np.array([0]), np.array([0.5])))
    with pytest.raises(ValueError, match="transition data"):
        tiny_model(transition=csr(np.eye(4)))
    with pytest.raises(ValueError, match="distinct"):
        tiny_model(codes=["4019", "4019", "V270", "185"])


def test_mimic_scale_transition_table_is_sparse_and_respects_restricted_groups():
    m = cohort_model("transition")
    indptr, indices, data = m.transition
    per_code = np.diff(indptr)
    assert 5 <= per_code.mean() <= 15 and per_code.max() <= 30  # sparse: a handful of targets per code
    assert np.all((data > 0) & (data < 1))
    groups = np.array([{"pregnancy": 1, "newborn": 2}.get(code_restriction(c), 0) for c in m.codes])
    source = np.repeat(np.arange(m.n_codes), per_code)
    assert np.all((groups[indices] == 0) | (groups[indices] == groups[source]))
    # a chronic code persists through its own row; an acute one barely recurs
    diag = data[indices == source]
    assert np.all(diag > 0) and (diag >= 0.5).sum() > 1000 and (diag < 0.1).sum() > 3000
