"""The `transition` built-in cohort: MIMIC-scale codes that follow the previous visit's codes.

Same vocabulary as `hmm` (icd9.py) and the same interface (`codes`, `sample(n, seed)`, exact
`next_visit_log_probs(patient)`), but a different structure, so that a recipe tuned on one generator is
checked on another:
- `hmm` carries a hidden phenotype state through every visit (a Markov chain over states; codes depend
  on the current state, the number of visits on the state). Here nothing is hidden after the first
  visit: visit k >= 1 depends only on the codes of visit k-1 and the demographics, through a SPARSE
  code-to-code matrix (about 9 targets per code); the number of visits depends only on observed codes.
- The first visit is a mixture of K = 12 broad demographic-dependent profiles (tables/
  transition_profiles.tsv), drawn over head and tail codes alike, not the hmm's 31 states.

Generative process (`TransitionModel.sample`; `next_visit_log_prob` computes probabilities under it)
------------------------------------------------------------------------------------------------------
1. Demographics as in `promptehr.cohorts.hmm` (neonates at age 0, adults 18-90).
2. Profile z ~ softmax over the profiles eligible for (age, sex) of
   `profile_logit + profile_logit_age * (age - 60) / 10 + profile_logit_male * [male]`.
3. Visit 0: code c independently with probability allowed_c(age, sex) * profile_prob[z, c], redrawn
   until non-empty.
4. Visit k >= 1: code c independently with probability
       p_c = allowed_c(age, sex) * (1 - (1 - b_c(age)) * prod_{j in visit k-1} (1 - T[j, c]))
   (a noisy-OR of the age band's background rate b and the previous visit's codes), redrawn until
   non-empty. T[j, j] is a chronic code's persistence (0.5-0.85) or a small recurrence of an acute one;
   the other targets of j are codes of its category, frequent companions and codes of its chapter.
5. After visit k another visit follows with probability
       sigmoid(continue_logit + continue_logit_later * [k >= 1] + sum_{c in visit k} continue_code_logit[c])
   while k + 1 < max_visits. It depends on observed codes only, so it tells nothing about visit k+1
   beyond visit k itself: P(visit k+1 | history, it exists) = P(visit k+1 | visit k, age, sex).
Exact next-visit probability: visit 0 sums over the K profiles; visit k >= 1 is one Bernoulli set
probability divided by P(non-empty).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from promptehr.cohorts import small
from promptehr.cohorts.base import (
    N_DEMOGRAPHIC_KEYS,
    CodeLookup,
    demographic_key,
    demographic_keys,
    draw_demographics,
    draw_nonempty_visits,
    emit_visits,
    key_from_bits,
    logsumexp,
    sample_categorical,
)
from promptehr.cohorts.hmm import DEFAULT_MAX_VISITS
from promptehr.cohorts.icd9 import STRUCTURE_SEED, Vocabulary, mimic_vocabulary, phenotype_weights, read_phenotypes
from promptehr.schema import MAX_AGE, Patient


@dataclass
class TransitionModel(CodeLookup):
    """A first-order code-to-code patient model; see the module docstring. K profiles, C codes, B age bands."""

    codes: list[str]  # (C,)
    profile_names: list[str]  # (K,)
    profile_logit: np.ndarray  # (K,) first-visit profile log-weight at age 60, female
    profile_logit_age: np.ndarray  # (K,) added per 10 years of age above 60
    profile_logit_male: np.ndarray  # (K,) added for men
    profile_min_age: np.ndarray  # (K,) profile k is eligible iff min_age[k] <= age < max_age[k] ...
    profile_max_age: np.ndarray  # (K,)
    profile_sex: list[str | None]  # (K,) ... and its sex is None or the patient's
    profile_prob: np.ndarray  # (K, C) first-visit Bernoulli probabilities, < 1
    age_band_edges: np.ndarray  # (B-1,) increasing; band of an age = number of edges <= age
    background: np.ndarray  # (B, C) later-visit background rate b_c per age band, < 1
    transition: tuple[np.ndarray, np.ndarray, np.ndarray]  # sparse T as CSR (indptr (C+1,), indices, data < 1)
    continue_logit: float
    continue_logit_later: float  # added when deciding after visit k >= 1
    continue_code_logit: np.ndarray  # (C,) added per code of the visit just made
    max_visits: int = DEFAULT_MAX_VISITS
    # demographics (used by `sample` only), as in CohortModel
    neonate_share: float = 0.09
    neonate_male_share: float = 0.53
    adult_male_share: float = 0.56
    age_min_adult: float = 18.0
    age_top: float = MAX_AGE
    age_top_share: float = 0.07
    age_beta_a: float = 2.4
    age_beta_b: float = 1.6
    sample_block_rows: int = 1024  # patients per vectorised draw (memory ~ rows x codes x 8 bytes x a few)

    def __post_init__(self) -> None:
        K, C = len(self.profile_names), len(self.codes)
        for name in ("profile_logit", "profile_logit_age", "profile_logit_male", "profile_min_age", "profile_max_age"):
            setattr(self, name, np.asarray(getattr(self, name), dtype=np.float64).reshape(K))
        self.profile_prob = np.asarray(self.profile_prob, dtype=np.float64).reshape(K, C)
        self.age_band_edges = np.asarray(self.age_band_edges, dtype=np.float64).reshape(-1)
        self.background = np.asarray(self.background, dtype=np.float64).reshape(self.age_band_edges.size + 1, C)
        self.continue_code_logit = np.asarray(self.continue_code_logit, dtype=np.float64).reshape(C)
        indptr, indices, data = (np.asarray(a) for a in self.transition)
        self.transition = (indptr.astype(np.int64), indices.astype(np.int64), data.astype(np.float64))
        if len(set(self.codes)) != C:
            raise ValueError("codes must be distinct")
        csr_ok = indptr.shape == (C + 1,) and indptr[0] == 0 and np.all(np.diff(indptr) >= 0)
        csr_ok = csr_ok and indptr[-1] == indices.size == data.size and np.all((indices >= 0) & (indices < C))
        if not csr_ok:
            raise ValueError("transition must be a CSR triple (indptr (C+1,), indices in [0, C), data)")
        for name, arr in (("profile_prob", self.profile_prob), ("background", self.background), ("transition data", data)):
            if np.any(arr < 0) or np.any(arr >= 1):
                raise ValueError(f"{name} must lie in [0, 1)")
        if len(self.profile_sex) != K or any(x not in (None, "M", "F") for x in self.profile_sex):
            raise ValueError("profile_sex needs one of None/'M'/'F' per profile")
        if np.any(np.diff(self.age_band_edges) <= 0) or self.max_visits < 1:
            raise ValueError("age_band_edges must increase and max_visits must be >= 1")
        self._index_codes()
        self._cache = {}

    # -- sizes and lookups --------------------------------------------------------------------

    @property
    def n_profiles(self) -> int:
        return len(self.profile_names)

    def age_band(self, age: float) -> int:
        return int(np.searchsorted(self.age_band_edges, age, side="right"))

    def _targets(self, prev_idx: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(position in prev_idx, target code, T value) of every stored entry of the rows `prev_idx`."""
        indptr, indices, data = self.transition
        counts = indptr[prev_idx + 1] - indptr[prev_idx]
        starts = np.repeat(indptr[prev_idx] - np.cumsum(counts) + counts, counts)
        pos = starts + np.arange(counts.sum())
        return np.repeat(np.arange(prev_idx.size), counts), indices[pos], data[pos]

    # -- probabilities ------------------------------------------------------------------------

    def profile_weights(self, age: np.ndarray, male: np.ndarray) -> np.ndarray:
        """(n, K) P(profile | age, sex) of n patients, up to a factor per row (0 where not eligible)."""
        sex_ok = np.array([[s is None or (s == "M") == m for s in self.profile_sex] for m in (False, True)])
        eligible = (self.profile_min_age <= age[:, None]) & (age[:, None] < self.profile_max_age)
        eligible &= sex_ok[male.astype(int)]
        if not eligible.any(1).all():
            i = int(np.flatnonzero(~eligible.any(1))[0])
            raise ValueError(f"no profile is eligible for age={age[i]}, male={bool(male[i])}")
        logits = self.profile_logit + self.profile_logit_age * (age[:, None] - 60.0) / 10.0
        logits = np.where(eligible, logits + self.profile_logit_male * male[:, None], -np.inf)
        return np.exp(logits - logits.max(1, keepdims=True))

    def profile_probs(self, age: float, sex: str) -> np.ndarray:
        """(K,) P(profile | age, sex)."""
        w = self.profile_weights(np.array([age], dtype=np.float64), np.array([sex == "M"]))[0]
        return w / w.sum()

    def _first_tables(self, key):
        """Per demographic key: masked (K, C) log p, log(1-p) and the row sums of log(1-p)."""
        cached = self._cache.get(("first", key))
        if cached is None:
            P = self.profile_prob * self._key_mask(key)[None, :]
            with np.errstate(divide="ignore"):
                logp = np.log(P)
            log1m = np.log1p(-P)
            cached = self._cache[("first", key)] = (logp, log1m, log1m.sum(1))
        return cached

    def later_log1m(self, prev_idx: np.ndarray, age: float, sex: str) -> np.ndarray:
        """(C,) log(1 - p_c) of a visit after the visit with codes `prev_idx` (0 where a code is not allowed)."""
        log1m = np.log1p(-self.background[self.age_band(age)])
        if prev_idx is not None and prev_idx.size:
            _, cols, vals = self._targets(prev_idx)
            log1m = log1m + np.bincount(cols, weights=np.log1p(-vals), minlength=self.n_codes)
        return log1m * self.allowed_mask(age, sex)

    def code_probs(self, age: float, sex: str, previous_visit=None, profile: int | None = None) -> np.ndarray:
        """(C,) Bernoulli probability of each code before the non-empty conditioning: of a first visit of
        `profile`, or of a visit after `previous_visit` (codes outside the vocabulary are ignored)."""
        if profile is not None:
            return self.profile_prob[profile] * self.allowed_mask(age, sex)
        prev = np.array(sorted({self._index[c] for c in previous_visit or () if c in self._index}), dtype=np.int64)
        return -np.expm1(self.later_log1m(prev, age, sex))

    def _first_visit_log_prob(self, idx, age: float, sex: str) -> float:
        logp, log1m, total = self._first_tables(demographic_key(age, sex))
        with np.errstate(divide="ignore", invalid="ignore"):
            ll = total + (logp[:, idx] - log1m[:, idx]).sum(1) - np.log(-np.expm1(total))
            ll = np.where(np.isnan(ll), -np.inf, ll)
            return float(logsumexp(np.log(self.profile_probs(age, sex)) + ll))

    def _later_visit_log_prob(self, idx, prev_idx, age: float, sex: str) -> float:
        log1m = self.later_log1m(prev_idx, age, sex)
        total = log1m.sum()
        with np.errstate(divide="ignore", invalid="ignore"):
            ll = total + np.sum(np.log(-np.expm1(log1m[idx])) - log1m[idx]) - np.log(-np.expm1(total))
        return float(ll) if not np.isnan(ll) else float("-inf")

    def next_visit_log_probs(self, patient: Patient) -> np.ndarray:
        """(n_visits,) entry k = log P(visits[k] | visits[:k], age, sex, visit k exists), exactly: the first
        visit sums over the profiles; a later one depends on the previous visit only (the visit count
        depends on observed codes alone, so that visit k exists adds nothing). -inf for a visit the model
        cannot make (empty, a code outside `codes` or forbidden for the age/sex), nan after one."""
        if len(patient.visits) > self.max_visits:
            raise ValueError(f"the model never makes more than max_visits={self.max_visits} visits")
        out = np.full(len(patient.visits), np.nan)
        prev = None
        for k, visit in enumerate(patient.visits):
            idx = self.visit_indices(visit)
            if idx is None or idx.size == 0:
                out[k] = -np.inf
            elif k == 0:
                out[k] = self._first_visit_log_prob(idx, patient.age, patient.sex)
            else:
                out[k] = self._later_visit_log_prob(idx, prev, patient.age, patient.sex)
            if out[k] == -np.inf:
                break
            prev = idx
        return out

    def next_visit_log_prob(self, patient: Patient, k: int) -> float:
        """Entry k of `next_visit_log_probs`."""
        if not 0 <= k < len(patient.visits):
            raise IndexError(f"visit {k} out of range for a patient with {len(patient.visits)} visits")
        return float(
            self.next_visit_log_probs(Patient(patient.subject_id, patient.age, patient.sex, patient.visits[: k + 1]))[k]
        )

    def continue_prob(self, visit, k: int) -> float:
        """P(another visit follows visit k, whose codes are `visit`) (before the max_visits cap)."""
        idx = self.visit_indices(visit)
        logit = self.continue_logit + self.continue_logit_later * (k >= 1) + self.continue_code_logit[idx].sum()
        return float(1.0 / (1.0 + np.exp(-logit)))

    def next_visit_exists_prob(self, patient: Patient, k: int) -> float:
        """P(visit k exists | visits[:k], age, sex) for 1 <= k <= n_visits (0 when k >= max_visits)."""
        if not 1 <= k <= len(patient.visits):
            raise IndexError(f"visit {k} out of range: need 1 <= k <= {len(patient.visits)}")
        return 0.0 if k >= self.max_visits else self.continue_prob(patient.visits[k - 1], k - 1)

    def next_visit_code_marginals(self, patient: Patient, k: int) -> np.ndarray:
        """(C,) P(code c in visits[k] | visits[:k], age, sex, visit k exists) (k may equal n_visits)."""
        age, sex = patient.age, patient.sex
        if k == 0:
            out = np.zeros(self.n_codes)
            for z, w in enumerate(self.profile_probs(age, sex)):
                if w > 0:
                    p = self.code_probs(age, sex, profile=z)
                    out += w * p / -np.expm1(np.log1p(-p).sum())
            return out
        p = self.code_probs(age, sex, patient.visits[k - 1])
        return p / -np.expm1(np.log1p(-p).sum())

    # -- sampling -----------------------------------------------------------------------------

    def sample(self, n_patients: int, seed: int) -> list[Patient]:
        """Draw `n_patients` patients (vectorised over patients); the same seed gives the same cohort."""
        if n_patients < 0:
            raise ValueError("n_patients must be >= 0")
        rng = np.random.default_rng(seed)
        n, C = n_patients, self.n_codes
        age, male = draw_demographics(self, n, rng)
        sex = np.where(male, "M", "F")
        key = demographic_keys(age, ~male)
        masks = np.stack([self._key_mask(key_from_bits(g)) for g in range(N_DEMOGRAPHIC_KEYS)])
        band = np.searchsorted(self.age_band_edges, age, side="right")
        log1m_background = np.log1p(-self.background)
        codes_arr = np.array(self.codes, dtype=object)
        visits: list[list[list[str]]] = [[] for _ in range(n)]

        # first visits: a profile, then its codes
        z = sample_categorical(self.profile_weights(age, male), rng)
        active = np.arange(n)
        cur = np.zeros((n, C), dtype=bool)
        for b in range(0, n, self.sample_block_rows):
            rows = active[b : b + self.sample_block_rows]
            cur[rows] = draw_nonempty_visits(self.profile_prob[z[rows]] * masks[key[rows]], rng)
        for j in range(self.max_visits):
            for i, visit in zip(active.tolist(), emit_visits(cur, codes_arr, rng)):
                visits[i].append(visit)
            if j + 1 >= self.max_visits:
                break
            r, c = np.nonzero(cur)
            logit = self.continue_logit + self.continue_logit_later * (j >= 1)
            logit = logit + np.bincount(r, weights=self.continue_code_logit[c], minlength=active.size)
            cont = rng.random(active.size) < 1.0 / (1.0 + np.exp(-logit))
            active, prev = active[cont], cur[cont]
            if active.size == 0:
                break
            # visit j + 1: noisy-OR of the background and the previous visit's codes through T
            cur = np.zeros((active.size, C), dtype=bool)
            for b in range(0, active.size, self.sample_block_rows):
                rows = np.arange(b, min(b + self.sample_block_rows, active.size))
                r, src = np.nonzero(prev[rows])
                which, target, t = self._targets(src)
                added = np.bincount(r[which] * C + target, weights=np.log1p(-t), minlength=rows.size * C)
                log1m = log1m_background[band[active[rows]]] + added.reshape(rows.size, C)
                cur[rows] = draw_nonempty_visits(-np.expm1(log1m) * masks[key[active[rows]]], rng)
        return [Patient(f"S{i + 1:07d}", float(age[i]), str(sex[i]), visits[i]) for i in range(n)]


# ----------------------------------------------------------------------------------------------
# The MIMIC-scale model
# ----------------------------------------------------------------------------------------------

MODEL_SEED = STRUCTURE_SEED + 2
HEAD_SHARE = 0.45  # share of the code popularity that the 389 head codes hold
MAX_PROFILE_PROB = 0.8
AGE_BAND_EDGES = (1.0, 40.0, 65.0, 80.0)  # bands: newborn, 1-39, 40-64, 65-79, 80+
BACKGROUND_CODES = (2.5, 2.5, 2.5, 2.5, 2.5)  # expected background codes of a later visit, per band
MAX_BACKGROUND = 0.3
# per-band weight of a chapter in the background (1 where not listed; newborn band: only these)
BAND_CHAPTER_WEIGHTS = {
    "perinatal": (3.0, 0.0, 0.0, 0.0, 0.0),
    "congenital": (1.0, 0.5, 0.3, 0.3, 0.3),
    "supplementary": (1.0, 1.0, 1.0, 1.0, 1.0),
    "pregnancy": (0.0, 0.0, 0.0, 0.0, 0.0),
    "circulatory": (0.0, 0.4, 1.0, 1.5, 1.8),
    "neoplasms": (0.0, 0.5, 1.0, 1.2, 1.0),
    "injury": (0.0, 1.6, 1.0, 0.8, 1.0),
    "external": (0.0, 1.6, 1.0, 0.8, 1.0),
    "mental": (0.0, 1.5, 1.0, 0.7, 0.6),
}
ACUTE_RECURRENCE = 0.05  # T[j, j] of an acute code (a chronic one: its persistence)
SAME_CATEGORY_TARGETS = 2  # up to this many other codes of j's category, T ~ log-normal around:
SAME_CATEGORY_T = 0.08
RELATED_TARGETS = 6  # mean number of other targets (frequent companions, codes of j's chapter), T around:
RELATED_T = 0.035
T_SIGMA = 0.7
MAX_T = 0.6
CONTINUE_LOGIT = -2.2
CONTINUE_LOGIT_LATER = 0.7
CHRONIC_CONTINUE_LOGIT = 0.12  # per chronic code of the visit
CHAPTER_CONTINUE_LOGIT = {"neoplasms": 0.15, "pregnancy": -0.5, "perinatal": -0.3}


def code_popularity(vocab: Vocabulary) -> np.ndarray:
    """(C,) head codes: the small cohort's mean code probability; tail: icd9's popularity; scaled so the
    head holds HEAD_SHARE of the total."""
    head = small.small_cohort_model().code_prob.mean(0)
    tail = vocab.popularity[vocab.n_head :]
    return np.concatenate([head / head.sum() * HEAD_SHARE, tail / tail.sum() * (1.0 - HEAD_SHARE)])


def profile_table(vocab: Vocabulary, popularity: np.ndarray, rng: np.random.Generator):
    profiles = read_phenotypes("transition_profiles.tsv", vocab)
    idx = np.arange(vocab.n_codes)
    prob = np.zeros((len(profiles), vocab.n_codes))
    for k, ph in enumerate(profiles):
        w = phenotype_weights(ph, vocab, idx, popularity, rng)
        prob[k] = np.minimum(w * float(ph.extra["codes"]) / w.sum(), MAX_PROFILE_PROB)
    return profiles, prob


def background_table(vocab: Vocabulary, popularity: np.ndarray) -> np.ndarray:
    restriction = np.array([r or "" for r in vocab.restriction])
    out = np.zeros((len(AGE_BAND_EDGES) + 1, vocab.n_codes))
    for band in range(out.shape[0]):
        default = 0.0 if band == 0 else 1.0
        chapter_w = np.array(
            [BAND_CHAPTER_WEIGHTS.get(name, (default,) * out.shape[0])[band] for name in vocab.chapter_names]
        )
        w = popularity * chapter_w[vocab.chapter]
        w[restriction == "pregnancy"] = 0.0
        if band > 0:
            w[restriction == "newborn"] = 0.0
        out[band] = np.minimum(w * BACKGROUND_CODES[band] / w.sum(), MAX_BACKGROUND)
    return out


def transition_table(vocab: Vocabulary, popularity: np.ndarray, rng: np.random.Generator):
    """Sparse T as CSR: per code j, itself, up to SAME_CATEGORY_TARGETS codes of its category, and about
    RELATED_TARGETS others, alternately: companions (for a head code, by co-occurrence in the small
    cohort's states; for a tail code, by popularity within its chapter) and codes by popularity
    anywhere. A pregnancy or newborn code is the target only of codes of its own group."""
    C = vocab.n_codes
    group = np.array([{"pregnancy": 1, "newborn": 2}.get(r, 0) for r in vocab.restriction])
    small_prob = small.small_cohort_model().code_prob
    cooccur = small_prob.T @ small_prob  # (n_head, n_head)
    pools: dict[tuple, tuple[np.ndarray, np.ndarray]] = {}

    def pool(kind: str, j: int) -> tuple[np.ndarray, np.ndarray]:
        """(candidate codes, cumulative weights) for drawing a target of j."""
        key = (kind, j if kind == "cooccur" else int(vocab.chapter[j]) if kind == "chapter" else None, group[j])
        if key not in pools:
            if kind == "cooccur":
                cand, w = np.arange(vocab.n_head), cooccur[j]
            elif kind == "chapter":
                cand = np.flatnonzero(vocab.chapter == vocab.chapter[j])
                w = popularity[cand]
            else:
                cand, w = np.arange(C), popularity
            w = w * ((group[cand] == 0) | (group[cand] == group[j]))
            pools[key] = (cand, np.cumsum(w))
        return pools[key]

    order = np.argsort(vocab.category_id, kind="stable")
    bounds = np.searchsorted(vocab.category_id[order], np.arange(len(vocab.categories) + 1))
    rows_idx, rows_val = [], []
    for j in range(C):
        targets = {j: vocab.persistence[j] if vocab.persistence[j] > 0 else ACUTE_RECURRENCE}
        cat = vocab.category_id[j]
        same = [c for c in order[bounds[cat] : bounds[cat + 1]] if c != j and group[c] in (0, group[j])]
        for c in rng.permutation(np.array(same, dtype=np.int64))[:SAME_CATEGORY_TARGETS]:
            targets[int(c)] = SAME_CATEGORY_T * rng.lognormal(0.0, T_SIGMA)
        for t in range(rng.poisson(RELATED_TARGETS)):
            kind = "anywhere" if t % 2 else "cooccur" if j < vocab.n_head else "chapter"
            cand, cum = pool(kind, j)
            if cum[-1] <= 0:
                continue
            c = int(cand[min(np.searchsorted(cum, rng.random() * cum[-1], side="right"), cand.size - 1)])
            if c not in targets:
                targets[c] = RELATED_T * rng.lognormal(0.0, T_SIGMA)
        cols = sorted(targets)
        rows_idx.append(np.array(cols, dtype=np.int64))
        rows_val.append(np.minimum([targets[c] for c in cols], MAX_T))
    indptr = np.concatenate([[0], np.cumsum([r.size for r in rows_idx])])
    return indptr, np.concatenate(rows_idx), np.concatenate(rows_val)


@functools.lru_cache(maxsize=1)
def _parameters() -> dict:
    """The MIMIC-scale model's parameters (built once per process: the sparse table takes about a second)."""
    vocab = mimic_vocabulary()
    rng = np.random.default_rng(MODEL_SEED)
    popularity = code_popularity(vocab)
    profiles, profile_prob = profile_table(vocab, popularity, rng)
    chapter_logit = np.array([CHAPTER_CONTINUE_LOGIT.get(name, 0.0) for name in vocab.chapter_names])
    return dict(
        codes=list(vocab.codes),
        profile_names=[ph.name for ph in profiles],
        profile_logit=np.array([ph.init_logit for ph in profiles]),
        profile_logit_age=np.array([ph.age_slope for ph in profiles]),
        profile_logit_male=np.array([ph.male for ph in profiles]),
        profile_min_age=np.array([ph.min_age for ph in profiles]),
        profile_max_age=np.array([ph.max_age for ph in profiles]),
        profile_sex=[ph.sex for ph in profiles],
        profile_prob=profile_prob,
        age_band_edges=np.array(AGE_BAND_EDGES),
        background=background_table(vocab, popularity),
        transition=transition_table(vocab, popularity, rng),
        continue_logit=CONTINUE_LOGIT,
        continue_logit_later=CONTINUE_LOGIT_LATER,
        continue_code_logit=CHRONIC_CONTINUE_LOGIT * (vocab.persistence > 0) + chapter_logit[vocab.chapter],
    )


def transition_model() -> TransitionModel:
    """The MIMIC-scale code-to-code cohort model (a fresh object on every call)."""
    params = _parameters()
    fresh = {key: value.copy() if isinstance(value, (np.ndarray, list)) else value for key, value in params.items()}
    fresh["transition"] = tuple(a.copy() for a in params["transition"])
    return TransitionModel(**fresh)
