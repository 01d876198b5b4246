"""The hidden-Markov cohort model (promptehr/cohorts/hmm.py) and the `small` cohort built with it: shapes,
age/sex rules, persistence and exactness of the forward algorithm."""

from __future__ import annotations

import itertools
from collections import Counter, defaultdict

import numpy as np
import pytest

from promptehr.cohorts import CohortModel, cohort_model, sample_cohort
from promptehr.schema import Patient
from promptehr.validity import code_allowed, code_restriction

N_COHORT = 20_000


@pytest.fixture(scope="module")
def model() -> CohortModel:
    return cohort_model("small")


@pytest.fixture(scope="module")
def cohort(model) -> list[Patient]:
    return model.sample(N_COHORT, seed=123)


# ---------------------------------------------------------------------------------------------
# determinism and shapes
# ---------------------------------------------------------------------------------------------


def test_same_seed_same_cohort_and_seeds_differ():
    a = sample_cohort(2000, seed=7, generator="small")
    b = sample_cohort(2000, seed=7, generator="small")
    c = sample_cohort(2000, seed=8, generator="small")
    assert a == b
    assert a != c
    assert [p.age for p in a] != [p.age for p in c]
    assert [p.visits for p in a] != [p.visits for p in c]


def test_sample_cohort_is_the_small_model(cohort, model):
    assert sample_cohort(300, seed=123, generator="small") == model.sample(300, seed=123)
    assert sample_cohort(0, generator="small") == []


def test_cohort_shapes_are_mimic_like(cohort):
    n_visits = np.array([len(p.visits) for p in cohort])
    codes_per_visit = np.array([len(v) for p in cohort for v in p.visits])
    ages = np.array([p.age for p in cohort])
    male = np.array([p.sex == "M" for p in cohort])
    assert 8.0 <= codes_per_visit.mean() <= 15.0
    assert 1.15 <= n_visits.mean() <= 1.6
    assert 0.65 <= (n_visits == 1).mean() <= 0.9
    assert n_visits.max() >= 5  # a tail of frequent flyers
    assert ages.min() >= 0.0 and ages.max() <= 90.0
    assert 0.05 <= (ages == 0).mean() <= 0.12  # neonates
    assert not np.any((ages > 0) & (ages < 18))  # adults start at 18
    assert 58.0 <= ages[ages > 0].mean() <= 68.0  # adults skewed old
    assert (ages == 90).mean() > 0.03  # MIMIC's pile-up at the cap
    assert 0.5 <= male.mean() <= 0.6
    assert {p.sex for p in cohort} == {"M", "F"}
    ids = [p.subject_id for p in cohort]
    assert len(set(ids)) == len(ids) and all(i.startswith("S") and len(i) == 8 for i in ids)


def test_visits_are_nonempty_sets_of_vocabulary_codes(cohort, model):
    vocab = set(model.codes)
    for p in cohort:
        assert 1 <= len(p.visits) <= model.max_visits
        for visit in p.visits:
            assert len(visit) >= 1
            assert len(set(visit)) == len(visit), "duplicate code inside a visit"
            assert set(visit) <= vocab


def test_vocabulary_is_real_icd9_in_mimic_format(model):
    assert 200 <= len(model.codes) <= 400
    for code in model.codes:
        assert "." not in code
        assert code[0].isdigit() or code[0] in "VE"
        assert 3 <= len(code) <= 5
    for code in ("4019", "25000", "4280", "42731", "0389", "V220", "V3000", "185", "5715", "1970"):
        assert code in model.codes


# ---------------------------------------------------------------------------------------------
# age / sex rules on the sampled cohort
# ---------------------------------------------------------------------------------------------


def test_restrictions_hold_on_every_sampled_patient(cohort, model):
    n_preg = n_neo = n_male_only = n_female_only = 0
    for p in cohort:
        for visit in p.visits:
            for code in visit:
                assert code_allowed(code, p.age, p.sex), (code, p.age, p.sex)
                rule = code_restriction(code)
                if rule == "pregnancy":
                    n_preg += 1
                    assert p.sex == "F" and 15.0 <= p.age < 46.0  # the obstetric state's window
                elif rule == "newborn":
                    n_neo += 1
                    assert p.age == 0.0
                elif rule == "male":
                    n_male_only += 1
                elif rule == "female":
                    n_female_only += 1
    assert min(n_preg, n_neo, n_male_only, n_female_only) > 50  # each rule is exercised
    # the model's own probabilities are exactly 0 where a code is not allowed
    for age, sex in ((0.0, "M"), (30.0, "M"), (30.0, "F"), (70.0, "F")):
        allowed = np.array([code_allowed(c, age, sex) for c in model.codes])
        assert np.array_equal(model.allowed_mask(age, sex) > 0, allowed)
        for s in range(model.n_states):
            assert np.all(model.code_probs(s, age, sex, set(model.codes))[~allowed] == 0.0)


def test_states_follow_demographics(model):
    neo = model.state_names.index("neonatal")
    obs = model.state_names.index("obstetric")
    assert model.initial_state_probs(0.0, "F")[neo] == 1.0
    assert model.initial_state_probs(40.0, "F")[neo] == 0.0
    assert model.initial_state_probs(30.0, "F")[obs] > 0.1
    assert model.initial_state_probs(30.0, "M")[obs] == 0.0
    assert model.initial_state_probs(60.0, "F")[obs] == 0.0
    hf = model.state_names.index("heart_failure_renal")
    assert model.initial_state_probs(85.0, "M")[hf] > 2 * model.initial_state_probs(35.0, "M")[hf]
    T = model.transition_matrix(70.0, "M")
    assert np.allclose(T[~np.all(T == 0, axis=1)].sum(1), 1.0)
    assert np.all(T[:, obs] == 0.0)
    used = ~np.all(T == 0, axis=1)
    assert np.all(np.diag(T)[used] >= 0.45) and np.all(T[used].argmax(1) == np.flatnonzero(used))  # sticky


def test_sampled_hidden_states_are_eligible(model):
    patients, states = model.sample_with_states(5000, seed=3)
    assert patients == model.sample(5000, seed=3)
    neo, obs = model.state_names.index("neonatal"), model.state_names.index("obstetric")
    seen = set()
    for p, zs in zip(patients, states):
        assert len(zs) == len(p.visits)
        for z in zs:
            assert model.eligible_states(p.age, p.sex)[z]
            assert (z == neo) == (p.age == 0.0)
            assert z != obs or (p.sex == "F" and 15.0 <= p.age < 46.0)
            seen.add(z)
    assert seen == set(range(model.n_states))
    tiny = tiny_model()
    patients, states = tiny.sample_with_states(5000, seed=3)
    assert all(z == 0 for p, zs in zip(patients, states) if p.sex == "M" or p.age >= 46 for z in zs)


# ---------------------------------------------------------------------------------------------
# persistence of chronic codes
# ---------------------------------------------------------------------------------------------


def test_chronic_codes_persist_acute_codes_do_not(cohort, model):
    pairs = [(set(p.visits[k]), set(p.visits[k + 1])) for p in cohort for k in range(len(p.visits) - 1)]
    all_visits = [set(v) for p in cohort for v in p.visits]
    assert len(pairs) > 3000

    def rates(code):
        marginal = np.mean([code in v for v in all_visits])
        given = [code in b for a, b in pairs if code in a]
        return marginal, np.mean(given), len(given)

    for code in ("25000", "4280", "2724", "496", "5715"):
        assert model.persistence[model.code_index(code)] >= 0.7
        marginal, persist, n = rates(code)
        assert n > 50
        assert persist >= 0.8 and persist > 2.5 * marginal, (code, marginal, persist)
    for code in ("0389", "5990", "486"):  # acute: they recur only through a sticky state
        assert model.persistence[model.code_index(code)] == 0.0
        marginal, persist, n = rates(code)
        assert n > 50 and persist < 0.55, (code, marginal, persist)


# ---------------------------------------------------------------------------------------------
# exactness: a tiny model checked against brute-force enumeration
# ---------------------------------------------------------------------------------------------

TINY_CODES = ["4019", "0389", "V270", "185"]  # chronic, acute, pregnancy (F 12-55), male-only


def tiny_model(**kw) -> CohortModel:
    params = dict(
        codes=TINY_CODES,
        state_names=["general", "obstetric"],
        init_logit=[0.0, 0.6],
        init_logit_age=[0.0, 0.0],  # no age slope: patients can be grouped exactly in the MC test
        init_logit_male=[0.4, 0.0],
        state_min_age=[0.0, 15.0],
        state_max_age=[999.0, 46.0],
        state_sex=[None, "F"],
        transition=[[0.9, 0.1], [0.1, 0.9]],
        code_prob=[[0.6, 0.5, 0.0, 0.3], [0.1, 0.05, 0.15, 0.0]],
        persistence=[0.8, 0.0, 0.0, 0.5],
        continue_prob=[0.1, 0.8],  # very different: the existence of a visit is informative
        max_visits=4,
        neonate_share=0.0,
        adult_male_share=0.3,
        age_top_share=0.0,
        age_beta_a=1.0,  # young: many women eligible for both states
        age_beta_b=3.0,
    )
    params.update(kw)
    return CohortModel(**params)


def all_subsets(codes):
    return [list(s) for r in range(1, len(codes) + 1) for s in itertools.combinations(codes, r)]


def brute_force_joint(m: CohortModel, age: float, sex: str, visits) -> float:
    """P(visits, each exists) summed over every hidden-state path, from the raw parameters."""
    S = m.n_states
    eligible = np.array(
        [(m.state_min_age[s] <= age < m.state_max_age[s]) and m.state_sex[s] in (None, sex) for s in range(S)]
    )
    logits = m.init_logit + m.init_logit_age * (age - 60) / 10 + m.init_logit_male * (sex == "M")
    pi = np.where(eligible, np.exp(logits), 0.0)
    pi /= pi.sum()
    T = m.transition * eligible[None, :]
    T = T / np.where(T.sum(1, keepdims=True) > 0, T.sum(1, keepdims=True), 1.0)
    allowed = np.array([code_allowed(c, age, sex) for c in m.codes])

    def emission(s, visit, prev):
        p = m.code_prob[s].copy()
        for c in prev or ():
            i = m.codes.index(c)
            p[i] = 1 - (1 - p[i]) * (1 - m.persistence[i])
        p = p * allowed
        inside = np.array([c in visit for c in m.codes])
        bern = np.prod(np.where(inside, p, 1 - p))
        return bern / (1 - np.prod(1 - p))

    total = 0.0
    for path in itertools.product(range(S), repeat=len(visits)):
        w = pi[path[0]] * emission(path[0], visits[0], None)
        for j in range(1, len(visits)):
            w *= m.continue_prob[path[j - 1]] * T[path[j - 1], path[j]]
            w *= emission(path[j], visits[j], visits[j - 1])
        total += w
    return total


@pytest.mark.parametrize(
    "age, sex, visits",
    [
        (30.0, "F", [["4019", "V270"], ["4019"], ["0389", "V270"], ["4019", "0389"]]),
        (30.0, "M", [["4019", "185"], ["185"], ["4019", "0389", "185"]]),
        (60.0, "F", [["0389"], ["4019"], ["4019"]]),
    ],
)
def test_forward_matches_brute_force_enumeration(age, sex, visits):
    m = tiny_model()
    p = Patient("T1", age, sex, visits)
    fast = m.next_visit_log_probs(p)
    for k in range(len(visits)):
        num = brute_force_joint(m, age, sex, visits[: k + 1])
        den = sum(brute_force_joint(m, age, sex, visits[:k] + [v]) for v in all_subsets(TINY_CODES))
        exact = np.log(num / den) if num > 0 else -np.inf
        assert m.next_visit_log_prob(p, k) == pytest.approx(exact, abs=1e-10)
        assert fast[k] == pytest.approx(exact, abs=1e-10)


@pytest.mark.parametrize("age, sex", [(30.0, "F"), (30.0, "M"), (70.0, "F"), (0.0, "M")])
def test_next_visit_distribution_sums_to_one(age, sex):
    m = tiny_model()
    history = [["4019"], ["4019", "0389"]] if sex == "F" and age < 46 else [["4019"], ["0389"]]
    for k in range(3):
        probs = [
            np.exp(m.next_visit_log_prob(Patient("T", age, sex, history[:k] + [v]), k)) for v in all_subsets(TINY_CODES)
        ]
        assert sum(probs) == pytest.approx(1.0, abs=1e-12)
        for s in range(m.n_states):
            vp = [
                np.exp(m.visit_log_prob(v, s, age, sex, set(history[k - 1]) if k else None)) for v in all_subsets(TINY_CODES)
            ]
            assert sum(vp) == pytest.approx(1.0, abs=1e-12) or sum(vp) == 0.0


def test_sampler_agrees_with_forward_algorithm():
    """Empirical distribution of the second visit of sampled patients == the average of the exact
    predictive distributions (this checks sample() and next_visit_log_prob() describe one process,
    including the information that the second visit exists)."""
    m = tiny_model()
    patients = m.sample(60_000, seed=5)
    assert all(len(p.visits) <= m.max_visits for p in patients)
    second = [p for p in patients if len(p.visits) >= 2]
    subsets = [frozenset(v) for v in all_subsets(TINY_CODES)]
    groups = defaultdict(int)
    for p in second:  # exact predictive depends only on these facts (no age slope in the model)
        groups[(p.sex, 15 <= p.age < 46, 12 <= p.age <= 55, frozenset(p.visits[0]))] += 1
    rep_age = {(True, True): 30.0, (False, True): 50.0, (False, False): 70.0}
    expected = np.zeros(len(subsets))
    for (sex, obs_age, preg_age, v0), count in groups.items():
        age = rep_age[(obs_age, preg_age)]
        for i, v in enumerate(subsets):
            lp = m.next_visit_log_prob(Patient("T", age, sex, [sorted(v0), sorted(v)]), 1)
            expected[i] += count * np.exp(lp)
    n = len(second)
    expected /= n
    observed = Counter(frozenset(p.visits[1]) for p in second)
    observed = np.array([observed[v] for v in subsets]) / n
    assert n > 8000
    assert expected.sum() == pytest.approx(1.0, abs=1e-9)
    assert np.all(observed[expected == 0] == 0)
    cells = expected > 0
    chi2 = float(np.sum(n * (observed[cells] - expected[cells]) ** 2 / expected[cells]))
    dof = int(cells.sum()) - 1
    assert chi2 < dof + 6 * np.sqrt(2 * dof), (chi2, dof)  # ~1e-4 false-alarm rate; fixed seed
    # the share of patients with a second visit follows the state posterior of the first visit
    p_return = np.mean([m.next_visit_exists_prob(p, 1) for p in patients[:20_000]])
    assert abs(n / len(patients) - p_return) < 5 * np.sqrt(p_return * (1 - p_return) / len(patients)) + 0.01
    assert m.next_visit_exists_prob(Patient("T", 30.0, "F", [["V270"]] * 4), 4) == 0.0  # max_visits


def test_return_rate_matches_the_forward_algorithm(cohort, model):
    for k in (1, 2):
        at_risk = [p for p in cohort if len(p.visits) >= k]
        came_back = np.mean([len(p.visits) > k for p in at_risk])
        expected = np.mean([model.next_visit_exists_prob(p, k) for p in at_risk[:8000]])
        tol = 5 * np.sqrt(expected * (1 - expected) / len(at_risk)) + 0.01
        assert abs(came_back - expected) < tol, (k, came_back, expected)


def test_codes_come_in_random_order(cohort, model):
    ranks = [[model.code_index(c) for c in v] for p in cohort[:3000] for v in p.visits if len(v) >= 3]
    assert np.mean([r == sorted(r) for r in ranks]) < 0.3


def test_default_model_marginals_match_samples(cohort, model):
    """Monte Carlo check on the default model: the average exact per-code probability of visit 1
    equals the observed code frequency in visit 1."""
    second = [p for p in cohort if len(p.visits) >= 2]
    pred = np.mean([model.next_visit_code_marginals(p, 1) for p in second], axis=0)
    counts = Counter(c for p in second for c in p.visits[1])
    obs = np.array([counts[c] for c in model.codes]) / len(second)
    n = len(second)
    tol = 5 * np.sqrt(pred * (1 - pred) / n) + 2e-3
    assert np.all(np.abs(obs - pred) <= tol)
    assert pred.sum() == pytest.approx(np.mean([len(p.visits[1]) for p in second]), rel=0.03)


# ---------------------------------------------------------------------------------------------
# next_visit_log_prob on real cohort patients
# ---------------------------------------------------------------------------------------------


def test_next_visit_log_prob_on_sampled_patients(cohort, model):
    multi = [p for p in cohort if len(p.visits) >= 3][:30]
    assert multi
    for p in multi:
        lps = model.next_visit_log_probs(p)
        assert np.all(np.isfinite(lps)) and np.all(lps < 0)
        for k in range(len(p.visits)):
            assert model.next_visit_log_prob(p, k) == pytest.approx(lps[k], abs=1e-9)
    with pytest.raises(IndexError):
        model.next_visit_log_prob(multi[0], len(multi[0].visits))


def test_impossible_visits_get_minus_infinity(cohort, model):
    man = next(p for p in cohort if p.sex == "M" and p.age > 18 and len(p.visits) >= 2)
    adult_woman = next(p for p in cohort if p.sex == "F" and p.age > 60 and len(p.visits) >= 2)
    for patient, bad in (
        (man, "V270"),
        (man, "1749"),
        (man, "V3000"),
        (adult_woman, "185"),
        (adult_woman, "64413"),
        (man, "NOT_A_CODE"),
    ):
        visits = [list(v) for v in patient.visits]
        visits[1] = visits[1] + [bad]
        lp = model.next_visit_log_prob(Patient(patient.subject_id, patient.age, patient.sex, visits), 1)
        assert lp == -np.inf
    empty = Patient(man.subject_id, man.age, man.sex, [man.visits[0], []])
    assert model.next_visit_log_prob(empty, 1) == -np.inf


def test_persistence_raises_the_exact_probability(model):
    """A chronic code in the previous visit makes its repetition far more likely."""
    base = Patient("X", 70.0, "M", [["0389", "5990", "99591"], ["0389", "25000"]])
    with_dm = Patient("X", 70.0, "M", [["0389", "5990", "99591", "25000"], ["0389", "25000"]])
    assert model.next_visit_log_prob(with_dm, 1) > model.next_visit_log_prob(base, 1) + 0.5


def test_invalid_parameters_are_rejected():
    with pytest.raises(ValueError):
        tiny_model(code_prob=[[1.0, 0.3, 0.0, 0.25], [0.15, 0.1, 0.6, 0.05]])
    with pytest.raises(ValueError):
        tiny_model(transition=[[0.5, 0.4], [0.4, 0.6]])
    with pytest.raises(ValueError):
        tiny_model(codes=["4019", "4019", "V270", "185"])
