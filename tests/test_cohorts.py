"""The built-in cohorts behind `data.synthetic.generator` (promptehr/cohorts): the registry and config,
loading through `load_patients`, and what every MIMIC-scale generator promises: reproducible draws,
MIMIC-like shape, age/sex rules obeyed, chronic codes that persist, and exact next-visit probabilities
that agree with what the sampler draws."""

from __future__ import annotations

import hashlib
import logging
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from promptehr import cli
from promptehr.cohorts import GENERATORS, CohortModel, TransitionModel, cohort_model, cohort_model_for, sample_cohort
from promptehr.cohorts.icd9 import category, mimic_vocabulary
from promptehr.config import load_config
from promptehr.data import load_patients
from promptehr.schema import DataError, Patient
from promptehr.validity import code_allowed, code_restriction

ROOT = Path(__file__).resolve().parents[1]
MIMIC_SCALE = ("hmm", "transition")


@pytest.fixture(scope="module", params=MIMIC_SCALE)
def generated(request):
    """(name, model, 6,000 patients of seed 0)."""
    model = cohort_model(request.param)
    return request.param, model, model.sample(6000, seed=0)


def shape(patients) -> dict[str, float]:
    counts = Counter(c for p in patients for v in p.visits for c in v)
    n_visits = np.array([len(p.visits) for p in patients])
    return {
        "distinct": len(counts),
        "top100": sum(n for _, n in counts.most_common(100)) / sum(counts.values()),
        "visits": n_visits.mean(),
        "multi": (n_visits >= 2).mean(),
        "codes": np.mean([len(v) for p in patients for v in p.visits]),
    }


# ---------------------------------------------------------------------------------------------
# registry, config, loading
# ---------------------------------------------------------------------------------------------


def test_registry_and_config_default():
    assert set(GENERATORS) == {"hmm", "transition", "small"}
    assert load_config().data.synthetic.generator == "hmm"
    assert load_config(ROOT / "experiments" / "base.yaml").data.synthetic.generator == "hmm"
    assert load_config(ROOT / "experiments" / "tiny.yaml").data.synthetic.generator == "small"
    assert isinstance(cohort_model("hmm"), CohortModel) and isinstance(cohort_model("transition"), TransitionModel)


@pytest.mark.parametrize("name", sorted(GENERATORS))
def test_load_patients_draws_the_configured_generator(name):
    cfg = load_config(
        ROOT / "experiments" / "tiny.yaml",
        ["data.synthetic.n_patients=200", "data.synthetic.seed=4", f"data.synthetic.generator={name}"],
    )
    patients, vocab, report = load_patients(cfg.data)
    assert patients == sample_cohort(200, seed=4, generator=name) == cohort_model_for(cfg.data).sample(200, 4)
    assert report.source == f"synthetic:{name}" and report.counts["patients"] == 200
    assert set(vocab) <= set(cohort_model(name).codes)
    if name != "small":
        assert len(vocab) > 600  # MIMIC-scale: 200 patients already hold hundreds of distinct codes (small: ~250)


def test_unknown_generator_names_the_key_and_the_choices(tmp_path, caplog):
    cfg = load_config(None, ["data.synthetic.generator=mimic"])
    with pytest.raises(DataError, match=r"data\.synthetic\.generator must be one of hmm, transition, small; got 'mimic'"):
        load_patients(cfg.data)
    # through the command line: a clear error, exit code 2, nothing trained
    caplog.set_level(logging.ERROR)
    rc = cli.main(
        [
            "train",
            "--config",
            str(ROOT / "experiments" / "tiny.yaml"),
            "--no-tracking",
            "--overrides",
            f"data.synthetic.generator=mimic training.checkpoint_dir={tmp_path / 'ck'}",
        ]
    )
    assert rc == 2 and "data.synthetic.generator=mimic: must be one of hmm, transition, small" in caplog.text
    assert not (tmp_path / "ck").exists()
    with pytest.raises(DataError, match="data.source=synthetic"):
        cohort_model_for(load_config(None, ["data.source=mimic3"]).data)


# ---------------------------------------------------------------------------------------------
# the vocabulary
# ---------------------------------------------------------------------------------------------


def test_vocabulary_is_mimic_format_icd9_in_real_category_ranges():
    vocab = mimic_vocabulary()
    codes = vocab.codes
    assert codes[:389] == tuple(cohort_model("small").codes) and vocab.n_head == 389
    assert 8000 <= len(codes) <= 10000 and len(set(codes)) == len(codes)
    for code in codes:
        if code.startswith("E"):
            assert len(code) in (4, 5) and code[1:].isdigit() and 800 <= int(code[1:4]) <= 999, code
        elif code.startswith("V"):
            assert 3 <= len(code) <= 5 and code[1:].isdigit() and 1 <= int(code[1:3]) <= 90, code
        else:
            assert 3 <= len(code) <= 5 and code.isdigit() and 1 <= int(code[:3]) <= 999, code
    # codes are leaves: none is the prefix of another code of its category
    by_cat: dict[str, list[str]] = {}
    for code in codes:
        by_cat.setdefault(category(code), []).append(code)
    for members in by_cat.values():
        for a in members:
            assert not any(b != a and b.startswith(a) for b in members), a
    # categories are meaningful: many hold several codes; every restricted group has a tail
    sizes = np.array([len(m) for m in by_cat.values()])
    assert len(by_cat) > 900 and (sizes >= 5).sum() > 300 and sizes.max() <= 60
    groups = Counter(code_restriction(c) for c in codes[389:])
    assert min(groups["pregnancy"], groups["newborn"], groups["male"], groups["female"]) >= 50
    # the structure seed fixes the vocabulary: the same codes on every machine and in every process
    digest = hashlib.sha256(" ".join(codes).encode()).hexdigest()
    assert digest == "6de993542d3ac24d43b6bfecb8d93e91b1fb22ee6752f32721c08bd43dbbeb88", digest


# ---------------------------------------------------------------------------------------------
# every MIMIC-scale generator
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", MIMIC_SCALE)
def test_same_seed_same_cohort_and_seeds_differ(name):
    a, b = sample_cohort(400, seed=7, generator=name), sample_cohort(400, seed=7, generator=name)
    c = sample_cohort(400, seed=8, generator=name)
    assert a == b and a != c and [p.visits for p in a] != [p.visits for p in c]
    assert sample_cohort(0, generator=name) == []


def test_shape_is_mimic_like(generated):
    """Loose bounds on 6,000 patients; tests/test_cohorts.py::test_shape_at_25000_patients (slow) has
    the tight ones."""
    name, model, patients = generated
    s = shape(patients)
    assert s["distinct"] >= 3500, s
    assert 0.42 <= s["top100"] <= 0.55, s
    assert 1.2 <= s["visits"] <= 1.4 and 0.13 <= s["multi"] <= 0.22, s
    assert 9.0 <= s["codes"] <= 11.5, s
    ages = np.array([p.age for p in patients])
    assert 0.06 <= (ages == 0).mean() <= 0.12 and not np.any((ages > 0) & (ages < 18))
    for p in patients:
        assert 1 <= len(p.visits) <= model.max_visits
        for visit in p.visits:
            assert visit and len(set(visit)) == len(visit)


@pytest.mark.slow
@pytest.mark.parametrize("name", MIMIC_SCALE)
def test_shape_at_25000_patients(name):
    s = shape(sample_cohort(25_000, seed=0, generator=name))
    assert s["distinct"] >= 5000, s  # MIMIC-III: 5,562 at 25,000 patients
    assert 0.45 <= s["top100"] <= 0.50, s  # MIMIC-like long tail
    assert 1.25 <= s["visits"] <= 1.5 and 0.14 <= s["multi"] <= 0.20, s
    assert 9.0 <= s["codes"] <= 11.0, s


def test_age_and_sex_rules_hold_for_every_sampled_code(generated):
    name, model, patients = generated
    seen = Counter()
    for p in patients:
        for visit in p.visits:
            for code in visit:
                assert code_allowed(code, p.age, p.sex), (name, code, p.age, p.sex)
                seen[code_restriction(code)] += 1
                if code_restriction(code) == "pregnancy":
                    assert p.sex == "F" and 15.0 <= p.age < 46.0  # the obstetric phenotype's window
                if code_restriction(code) == "newborn":
                    assert p.age == 0.0
    assert min(seen["pregnancy"], seen["newborn"], seen["male"], seen["female"]) > 50, seen
    # the model itself gives exactly 0 to a forbidden code, whatever came before
    for age, sex in ((0.0, "M"), (30.0, "M"), (30.0, "F"), (70.0, "F")):
        forbidden = np.array([not code_allowed(c, age, sex) for c in model.codes])
        assert np.array_equal(model.allowed_mask(age, sex) == 0, forbidden)
        history = Patient("X", age, sex, [[c for c, bad in zip(model.codes, forbidden) if not bad]])
        assert np.all(model.next_visit_code_marginals(history, 0)[forbidden] == 0)
        assert np.all(model.next_visit_code_marginals(history, 1)[forbidden] == 0)


def test_chronic_codes_persist_and_acute_codes_do_not(generated):
    name, model, patients = generated
    pairs = [(set(p.visits[k]), set(p.visits[k + 1])) for p in patients for k in range(len(p.visits) - 1)]
    persistence = mimic_vocabulary().persistence
    index = {c: i for i, c in enumerate(model.codes)}
    kept = Counter(c for a, b in pairs for c in a & b)
    present = Counter(c for a, _ in pairs for c in a)
    chronic = [c for c in present if persistence[index[c]] > 0 and present[c] >= 30]
    acute = [c for c in present if persistence[index[c]] == 0 and present[c] >= 30]
    assert len(chronic) >= 10 and len(acute) >= 10, name
    rate = lambda codes: sum(kept[c] for c in codes) / sum(present[c] for c in codes)  # noqa: E731
    assert rate(chronic) > 0.6 and rate(acute) < 0.35, (name, rate(chronic), rate(acute))


def test_exact_marginals_agree_with_sampled_second_visits(generated):
    """Monte Carlo: the mean exact P(code c in visit 1 | visit 0, age, sex, visit 1 exists) over the
    patients with a second visit equals the observed frequency of c in their second visits."""
    name, model, patients = generated
    second = [p for p in patients if len(p.visits) >= 2][:600]
    pred = np.mean([model.next_visit_code_marginals(p, 1) for p in second], axis=0)
    counts = Counter(c for p in second for c in p.visits[1])
    obs = np.array([counts[c] for c in model.codes]) / len(second)
    tol = 5 * np.sqrt(pred * (1 - pred) / len(second)) + 3 / len(second)
    assert np.all(np.abs(obs - pred) <= tol), (name, np.max(np.abs(obs - pred) - tol))
    assert pred.sum() == pytest.approx(np.mean([len(p.visits[1]) for p in second]), rel=0.03)
    # and the exact log-likelihoods of those visits are finite and below 0
    lps = np.array([model.next_visit_log_prob(p, 1) for p in second[:100]])
    assert np.all(np.isfinite(lps)) and np.all(lps < 0)


def test_return_rate_matches_the_exact_existence_probability(generated):
    """Patients whose first visit makes a return likelier (by the exact P(visit 1 exists | visit 0))
    come back more often, as often as predicted: in each half of the patients split at the median."""
    name, model, patients = generated
    expected = np.array([model.next_visit_exists_prob(p, 1) for p in patients])
    came_back = np.array([len(p.visits) > 1 for p in patients])
    high = expected > np.median(expected)
    for half in (high, ~high):
        e, n = expected[half].mean(), half.sum()
        assert abs(came_back[half].mean() - e) < 5 * np.sqrt(e * (1 - e) / n) + 0.005, (name, came_back[half].mean(), e)
    assert expected[high].mean() > 1.5 * expected[~high].mean()


def test_impossible_visits_get_minus_infinity(generated):
    name, model, patients = generated
    man = next(p for p in patients if p.sex == "M" and p.age > 18 and len(p.visits) >= 2)
    for bad in ("V270", "1749", "V3000", "NOT_A_CODE"):
        visits = [list(v) for v in man.visits]
        visits[1] = visits[1] + [bad]
        assert model.next_visit_log_prob(Patient("X", man.age, man.sex, visits), 1) == -np.inf, (name, bad)
    assert model.next_visit_log_prob(Patient("X", man.age, man.sex, [man.visits[0], []]), 1) == -np.inf
