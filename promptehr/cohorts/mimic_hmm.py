"""The `hmm` built-in cohort: MIMIC-scale vocabulary (~9,000 ICD-9 codes), 31 hidden phenotype states.

A `CohortModel` (promptehr/cohorts/hmm.py: same generative process and exact forward algorithm as the
`small` cohort) whose states are the rows of `tables/mimic_hmm_states.tsv`. Each state refines one of
the small cohort's 9 states (its `parent`): it inherits the parent's head-code probabilities (scaled,
with per-state noise) and adds a heavy-tailed share of the generated tail codes (`icd9.py`): codes of its
focus categories, of its chapters and a background over every chapter, so related states share codes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from promptehr.cohorts import small
from promptehr.cohorts.hmm import DEFAULT_MAX_VISITS, CohortModel
from promptehr.cohorts.icd9 import STRUCTURE_SEED, Vocabulary, mimic_vocabulary, read_table

HEAD_SCALE = 0.65           # a state's head codes: its parent's probabilities times this ...
HEAD_NOISE_SIGMA = 0.3      # ... times a log-normal factor per state and code
FOCUS_HEAD_BOOST = 1.5      # head codes of a state's focus categories are this much more likely
MAX_HEAD_PROB = 0.9
FOCUS_WEIGHT = 30.0         # tail weight of a focus category, against 1-4 for a chapter, `background` for the rest
TAIL_NOISE_SIGMA = 0.8      # log-normal factor per state and category on the tail's popularity
MAX_TAIL_PROB = 0.5
SIBLING_SHARE = 0.08        # transition mass from a state to the other states of its family (same parent)
STATE_SEED = STRUCTURE_SEED + 1


@dataclass(frozen=True)
class StateSpec:
    """One row of tables/mimic_hmm_states.tsv."""

    name: str
    parent: str                    # the small cohort's state it refines
    sex: str | None
    min_age: float
    max_age: float
    init_logit: float              # first-visit log-weight at age 60, female
    age_slope: float               # added per 10 years above 60
    male: float                    # added for men
    continue_prob: float
    tail_codes: float              # expected number of tail codes per visit (before the age/sex rules)
    background: float              # tail weight of every chapter not listed
    emits: frozenset[str]          # restricted code groups the state may hold: pregnancy, newborn
    chapters: dict[str, float]
    focus: tuple[str, ...]         # categories ("428", "V45", "E888")


def read_states(vocab: Vocabulary) -> list[StateSpec]:
    """The state table, checked against the small cohort's states and the vocabulary's chapters."""
    specs = []
    for i, row in enumerate(read_table("mimic_hmm_states.tsv"), start=2):
        where = f"tables/mimic_hmm_states.tsv line {i} ({row.get('state')})"
        try:
            chapters = {k: float(w) for k, w in (item.split(":") for item in row["chapters"].split())}
            spec = StateSpec(
                name=row["state"], parent=row["parent"], sex=None if row["sex"] == "-" else row["sex"],
                min_age=float(row["min_age"]), max_age=float(row["max_age"]), init_logit=float(row["init_logit"]),
                age_slope=float(row["age_slope"]), male=float(row["male"]), continue_prob=float(row["continue"]),
                tail_codes=float(row["tail_codes"]), background=float(row["background"]),
                emits=frozenset() if row["emits"] == "-" else frozenset(row["emits"].split(",")),
                chapters=chapters, focus=tuple(row["focus"].split()))
        except (KeyError, ValueError) as exc:
            raise ValueError(f"{where}: {exc}") from None
        if spec.parent not in small.STATE_NAMES:
            raise ValueError(f"{where}: parent {spec.parent!r} is not a state of the small cohort")
        unknown = (set(spec.chapters) - set(vocab.chapter_names)) | (spec.emits - {"pregnancy", "newborn"})
        if unknown or spec.sex not in (None, "M", "F"):
            raise ValueError(f"{where}: unknown chapter, emits or sex {sorted(unknown) or spec.sex}")
        specs.append(spec)
    return specs


def head_probs(specs: list[StateSpec], vocab: Vocabulary, rng: np.random.Generator) -> np.ndarray:
    """(S, n_head): the parent's code probabilities, scaled, noisy, boosted in the focus categories."""
    parent = small.small_cohort_model()
    assert list(parent.codes) == list(vocab.codes[:vocab.n_head])
    cats = np.array(vocab.category[:vocab.n_head])
    out = np.zeros((len(specs), vocab.n_head))
    for s, spec in enumerate(specs):
        p = parent.code_prob[small.STATE_NAMES.index(spec.parent)] * HEAD_SCALE
        p = p * rng.lognormal(0.0, HEAD_NOISE_SIGMA, vocab.n_head)
        p = np.where(np.isin(cats, spec.focus), p * FOCUS_HEAD_BOOST, p)
        out[s] = np.minimum(p, MAX_HEAD_PROB)
    return out


def tail_probs(specs: list[StateSpec], vocab: Vocabulary, rng: np.random.Generator) -> np.ndarray:
    """(S, n_tail): popularity x (background + chapter weight + focus weight) x per-state category noise,
    scaled to `tail_codes` expected codes per visit."""
    tail = slice(vocab.n_head, vocab.n_codes)
    chapter, cat_id = vocab.chapter[tail], vocab.category_id[tail]
    cats = np.array(vocab.categories)
    out = np.zeros((len(specs), vocab.n_codes - vocab.n_head))
    for s, spec in enumerate(specs):
        chapter_w = np.array([spec.chapters.get(name, spec.background) for name in vocab.chapter_names])
        focus = np.isin(cats, spec.focus)
        noise = rng.lognormal(0.0, TAIL_NOISE_SIGMA, len(cats))
        w = vocab.popularity[tail] * (chapter_w[chapter] + FOCUS_WEIGHT * focus[cat_id]) * noise[cat_id]
        out[s] = np.minimum(w * spec.tail_codes / w.sum(), MAX_TAIL_PROB)
    return out


def transition_matrix(specs: list[StateSpec]) -> np.ndarray:
    """(S, S): the small cohort's transitions between parents, spread over each family's states; a state
    keeps its parent's stickiness less SIBLING_SHARE, which goes to the other states of its family."""
    parents = [small.STATE_NAMES.index(spec.parent) for spec in specs]
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
    # pregnancy and newborn codes only in the states meant for them (the age/sex rules mask the rest)
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
        continue_prob=np.array([spec.continue_prob for spec in specs]),
        max_visits=DEFAULT_MAX_VISITS,
        sample_block_rows=1024,
    )
