"""The `hmm` built-in cohort: the MIMIC-scale ICD-9 vocabulary (icd9.py) and hidden phenotype states.

A `CohortModel` (promptehr/cohorts/hmm.py: same generative process and exact forward algorithm as the
`small` cohort) whose states are the rows of `tables/mimic_hmm_states.tsv`. Each state refines one of
the small cohort's 9 states (its `parent`): it inherits the parent's head-code probabilities (scaled,
with per-state noise) and adds a heavy-tailed share of the generated tail codes (`icd9.py`): codes of its
focus categories, of its chapters and a background over every chapter, so related states share codes.
"""

from __future__ import annotations

import numpy as np

from promptehr.cohorts import small
from promptehr.cohorts.hmm import DEFAULT_MAX_VISITS, CohortModel
from promptehr.cohorts.icd9 import (
    STRUCTURE_SEED,
    Phenotype,
    Vocabulary,
    mimic_vocabulary,
    phenotype_weights,
    read_phenotypes,
)

HEAD_SCALE = 0.65  # a state's head codes: its parent's probabilities times this ...
HEAD_NOISE_SIGMA = 0.3  # ... times a log-normal factor per state and code
FOCUS_HEAD_BOOST = 1.5  # head codes of a state's focus categories are this much more likely
MAX_HEAD_PROB = 0.9
MAX_TAIL_PROB = 0.5
SIBLING_SHARE = 0.08  # transition mass from a state to the other states of its family (same parent)
STATE_SEED = STRUCTURE_SEED + 1


def read_states(vocab: Vocabulary) -> list[Phenotype]:
    """tables/mimic_hmm_states.tsv: phenotypes whose `parent` (a small-cohort state), `continue` and
    `tail_codes` (expected tail codes per visit) columns are checked here."""
    states = read_phenotypes("mimic_hmm_states.tsv", vocab)
    for ph in states:
        try:
            if ph.extra["parent"] not in small.STATE_NAMES:
                raise ValueError(f"parent {ph.extra['parent']!r} is not a state of the small cohort")
            float(ph.extra["continue"]), float(ph.extra["tail_codes"])
        except (KeyError, ValueError) as exc:
            raise ValueError(f"tables/mimic_hmm_states.tsv, state {ph.name}: {exc!r}") from None
    return states


def head_probs(specs: list[Phenotype], vocab: Vocabulary, rng: np.random.Generator) -> np.ndarray:
    """(S, n_head): the parent's code probabilities, scaled, noisy, boosted in the focus categories."""
    parent = small.small_cohort_model()
    assert list(parent.codes) == list(vocab.codes[: vocab.n_head])
    cats = np.array(vocab.category[: vocab.n_head])
    out = np.zeros((len(specs), vocab.n_head))
    for s, spec in enumerate(specs):
        p = parent.code_prob[small.STATE_NAMES.index(spec.extra["parent"])] * HEAD_SCALE
        p = p * rng.lognormal(0.0, HEAD_NOISE_SIGMA, vocab.n_head)
        p = np.where(np.isin(cats, spec.focus), p * FOCUS_HEAD_BOOST, p)
        out[s] = np.minimum(p, MAX_HEAD_PROB)
    return out


def tail_probs(specs: list[Phenotype], vocab: Vocabulary, rng: np.random.Generator) -> np.ndarray:
    """(S, n_tail): `icd9.phenotype_weights` of the tail codes, scaled to `tail_codes` expected codes per visit."""
    idx = np.arange(vocab.n_head, vocab.n_codes)
    out = np.zeros((len(specs), idx.size))
    for s, spec in enumerate(specs):
        w = phenotype_weights(spec, vocab, idx, vocab.popularity[idx], rng)
        out[s] = np.minimum(w * float(spec.extra["tail_codes"]) / w.sum(), MAX_TAIL_PROB)
    return out


def transition_matrix(specs: list[Phenotype]) -> np.ndarray:
    """(S, S): the small cohort's transitions between parents, spread over each family's states; a state
    keeps its parent's stickiness less SIBLING_SHARE, which goes to the other states of its family."""
    parents = [small.STATE_NAMES.index(spec.extra["parent"]) for spec in specs]
    family = np.array(parents)
    size = np.bincount(family, minlength=len(small.STATE_NAMES))
    T = np.zeros((len(specs), len(specs)))
    for s, a in enumerate(parents):
        for t, b in enumerate(parents):
            if a != b:
                T[s, t] = small.TRANSITION[a, b] / size[b]
        siblings = (family == a) & (np.arange(len(specs)) != s)
        stay = small.TRANSITION[a, a]
        if siblings.any():
            T[s, siblings] = SIBLING_SHARE / siblings.sum()
            stay -= SIBLING_SHARE
        T[s, s] = stay
    return T


def mimic_hmm_model() -> CohortModel:
    """The MIMIC-scale hidden-Markov cohort model (a fresh object on every call)."""
    vocab = mimic_vocabulary()
    specs = read_states(vocab)
    rng = np.random.default_rng(STATE_SEED)
    code_prob = np.concatenate([head_probs(specs, vocab, rng), tail_probs(specs, vocab, rng)], axis=1)
    # head codes too: pregnancy and newborn codes only in the states meant for them (the age/sex rules mask the rest)
    restriction = np.array([r or "" for r in vocab.restriction])
    for s, spec in enumerate(specs):
        for group in ("pregnancy", "newborn"):
            if group not in spec.emits:
                code_prob[s, restriction == group] = 0.0
    return CohortModel(
        codes=list(vocab.codes),
        state_names=[spec.name for spec in specs],
        init_logit=np.array([spec.init_logit for spec in specs]),
        init_logit_age=np.array([spec.age_slope for spec in specs]),
        init_logit_male=np.array([spec.male for spec in specs]),
        state_min_age=np.array([spec.min_age for spec in specs]),
        state_max_age=np.array([spec.max_age for spec in specs]),
        state_sex=[spec.sex for spec in specs],
        transition=transition_matrix(specs),
        code_prob=code_prob,
        persistence=vocab.persistence.copy(),
        continue_prob=np.array([float(spec.extra["continue"]) for spec in specs]),
        max_visits=DEFAULT_MAX_VISITS,
        sample_block_rows=1024,
    )
