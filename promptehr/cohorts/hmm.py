"""A hidden-Markov patient model with an exact next-visit likelihood (the forward algorithm).

Used by the `small` and `hmm` built-in cohorts (`promptehr.cohorts`): parameters in, patients out
(`sample`), and the exact log P(visit k | visits < k, age, sex, visit k exists) a trained model is
compared with (`next_visit_log_probs`).

Generative process (`CohortModel.sample`; `CohortModel.next_visit_log_prob` computes probabilities
under exactly this process)
------------------------------------------------------------------------------------------------------
1. Demographics (fixed for the whole patient; `age` is the age at the first admission, as in
   `promptehr.mimic`):
   - with probability `neonate_share` the patient is a neonate: age 0.0, male with `neonate_male_share`;
   - otherwise an adult, male with `adult_male_share`; age = `age_top` (90, MIMIC's cap: MIMIC shifts
     ages above 89, `schema.MAX_AGE`) with probability `age_top_share`, else
     `age_min_adult + (age_top - age_min_adult) * Beta(age_beta_a, age_beta_b)` rounded to 0.1 year.
2. Hidden phenotype state of the first visit, z_0 ~ `initial_state_probs(age, sex)`: a softmax over the
   states *eligible* for the patient of
       init_logit[s] + init_logit_age[s] * (age - 60) / 10 + init_logit_male[s] * [sex == "M"].
   State s is eligible iff `state_min_age[s] <= age < state_max_age[s]` and `state_sex[s]` is None or
   equals sex.
3. Visit k in state z_k: each code c of the vocabulary appears independently with probability
       p_c = allowed_c(age, sex) * (1 - (1 - code_prob[z_k, c]) * (1 - persistence[c] * [c in visit k-1]))
   (`code_probs`): a chronic code present in the previous visit persists with probability at least
   `persistence[c]`, in any state; codes that `promptehr.validity.code_allowed` rules out for the
   patient's age and sex have probability exactly 0. The visit is redrawn until it is non-empty
   (rejection), so P(visit) = prod_c Bernoulli / (1 - prod_c (1 - p_c)). Codes are emitted in random
   order (a visit is a set).
4. Number of visits: after visit k (state z_k) another visit follows with probability
   `continue_prob[z_k]` while k + 1 < `max_visits`, else the patient ends.
5. The next visit's state: z_{k+1} ~ transition_matrix(age, sex)[z_k], the base `transition` matrix
   restricted to the states eligible for the patient and renormalised.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

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
from promptehr.schema import MAX_AGE, Patient

DEFAULT_MAX_VISITS = 20


@dataclass
class CohortModel(CodeLookup):
    """A hidden-Markov patient model; see the module docstring for the generative process.

    S = len(state_names) hidden states, C = len(codes) codes. All arrays are float64.
    """

    codes: list[str]  # (C,) ICD-9 codes, MIMIC-III format (no dot)
    state_names: list[str]  # (S,)
    init_logit: np.ndarray  # (S,) first-visit state log-weight at age 60, female
    init_logit_age: np.ndarray  # (S,) added per 10 years of age above 60 (subtracted below)
    init_logit_male: np.ndarray  # (S,) added for men
    state_min_age: np.ndarray  # (S,) state s is eligible iff state_min_age[s] <= age < state_max_age[s]
    state_max_age: np.ndarray  # (S,)
    state_sex: list[str | None]  # (S,) "M" / "F": state only for that sex; None: both
    transition: np.ndarray  # (S, S) base transition matrix, rows sum to 1 (restricted to the
    #        eligible states and renormalised per patient)
    code_prob: np.ndarray  # (S, C) Bernoulli probability of code c in a visit of state s, < 1
    persistence: np.ndarray  # (C,) rho_c in [0, 1): boost of a code present in the previous visit
    continue_prob: np.ndarray  # (S,) P(another visit follows a visit in state s), < 1
    max_visits: int = DEFAULT_MAX_VISITS  # no visit after the max_visits-th
    # demographics (used by `sample` only; probabilities are conditional on age and sex)
    neonate_share: float = 0.09  # P(age 0)
    neonate_male_share: float = 0.53
    adult_male_share: float = 0.56
    age_min_adult: float = 18.0
    age_top: float = MAX_AGE  # MIMIC caps ages at 90: a pile-up there
    age_top_share: float = 0.07  # share of adults at exactly age_top
    age_beta_a: float = 2.4  # adult age = age_min_adult + (age_top - age_min_adult) * Beta(a, b)
    age_beta_b: float = 1.6
    sample_block_rows: int = 8192  # patients per vectorised draw in `sample` (memory ~ rows x codes x 8 bytes
    # x a few); part of the draw sequence, so it is fixed per cohort

    def __post_init__(self) -> None:
        S, C = len(self.state_names), len(self.codes)
        self.init_logit = np.asarray(self.init_logit, dtype=np.float64).reshape(S)
        self.init_logit_age = np.asarray(self.init_logit_age, dtype=np.float64).reshape(S)
        self.init_logit_male = np.asarray(self.init_logit_male, dtype=np.float64).reshape(S)
        self.state_min_age = np.asarray(self.state_min_age, dtype=np.float64).reshape(S)
        self.state_max_age = np.asarray(self.state_max_age, dtype=np.float64).reshape(S)
        self.transition = np.asarray(self.transition, dtype=np.float64).reshape(S, S)
        self.code_prob = np.asarray(self.code_prob, dtype=np.float64).reshape(S, C)
        self.persistence = np.asarray(self.persistence, dtype=np.float64).reshape(C)
        self.continue_prob = np.asarray(self.continue_prob, dtype=np.float64).reshape(S)
        self.state_sex = list(self.state_sex)
        if len(self.state_sex) != S or any(x not in (None, "M", "F") for x in self.state_sex):
            raise ValueError("state_sex needs one of None/'M'/'F' per state")
        if len(set(self.codes)) != C:
            raise ValueError("codes must be distinct")
        if np.any(self.transition < 0) or not np.allclose(self.transition.sum(1), 1.0):
            raise ValueError("transition rows must be probability vectors")
        for name, arr in (
            ("code_prob", self.code_prob),
            ("persistence", self.persistence),
            ("continue_prob", self.continue_prob),
        ):
            if np.any(arr < 0) or np.any(arr >= 1):
                raise ValueError(f"{name} must lie in [0, 1)")
        if self.max_visits < 1:
            raise ValueError("max_visits must be >= 1")
        self._index_codes()
        self._emission_cache = {}

    # -- sizes and lookups --------------------------------------------------------------------

    @property
    def n_states(self) -> int:
        return len(self.state_names)

    # -- demographics -------------------------------------------------------------------------

    def eligible_states(self, age: float, sex: str) -> np.ndarray:
        """(S,) bool: states the patient can be in (age window and sex)."""
        sex_ok = np.array([s is None or s == sex for s in self.state_sex])
        return (self.state_min_age <= age) & (age < self.state_max_age) & sex_ok

    def initial_state_probs(self, age: float, sex: str) -> np.ndarray:
        """(S,) P(z_0 = s | age, sex)."""
        logits = self.init_logit + self.init_logit_age * (age - 60.0) / 10.0
        if sex == "M":
            logits = logits + self.init_logit_male
        eligible = self.eligible_states(age, sex)
        if not eligible.any():
            raise ValueError(f"no state is eligible for age={age}, sex={sex!r}")
        logits = np.where(eligible, logits, -np.inf)
        w = np.exp(logits - logits[eligible].max())
        return w / w.sum()

    def transition_matrix(self, age: float, sex: str) -> np.ndarray:
        """(S, S) P(z_{k+1} = t | z_k = s, age, sex): `transition` restricted to eligible states.

        Rows of ineligible states (never visited by this patient) and rows with no eligible target
        are all zero.
        """
        eligible = self.eligible_states(age, sex)
        T = self.transition * eligible[None, :]
        T = T * eligible[:, None]
        tot = T.sum(1, keepdims=True)
        return np.divide(T, tot, out=np.zeros_like(T), where=tot > 0)

    # -- visits given the state ---------------------------------------------------------------

    def code_probs(self, state: int, age: float, sex: str, previous_visit=None) -> np.ndarray:
        """(C,) Bernoulli probability of each code in a visit of `state`, before the non-empty
        conditioning: persistence boost for chronic codes of `previous_visit`, then the age/sex mask.
        Codes of `previous_visit` outside the vocabulary are ignored."""
        p = self.code_prob[state].copy()
        if previous_visit:
            idx = np.array(sorted({self._index[c] for c in previous_visit if c in self._index}), dtype=np.int64)
            if idx.size:
                p[idx] = 1.0 - (1.0 - p[idx]) * (1.0 - self.persistence[idx])
        return p * self.allowed_mask(age, sex)

    def visit_log_prob(self, visit, state: int, age: float, sex: str, previous_visit=None) -> float:
        """log P(the visit's code set | state, age, sex, previous visit, the visit is non-empty).

        `visit` is treated as a set; an empty visit or one holding a code outside the vocabulary or
        forbidden for this age/sex has probability 0 (returns -inf)."""
        p = self.code_probs(state, age, sex, previous_visit)
        idx = self.visit_indices(visit)
        if idx is None or idx.size == 0 or not np.all(p[idx] > 0):
            return float("-inf")
        with np.errstate(divide="ignore"):
            log1m = np.log1p(-p)
            total = log1m.sum()
            log_nonempty = np.log(-np.expm1(total))
            return float(total + np.sum(np.log(p[idx]) - log1m[idx]) - log_nonempty)

    def _emission_tables(self, age: float, sex: str):
        """Per demographic key: masked (S, C) probabilities, log p, log(1-p) and their row sums."""
        key = demographic_key(age, sex)
        cached = self._emission_cache.get(key)
        if cached is None:
            P = self.code_prob * self._key_mask(key)[None, :]
            with np.errstate(divide="ignore"):
                logp = np.log(P)
            log1m = np.log1p(-P)
            cached = (P, logp, log1m, log1m.sum(1))
            self._emission_cache[key] = cached
        return cached

    def _visit_loglik_states(self, visit_idx, prev_idx, age: float, sex: str) -> np.ndarray:
        """(S,) log P(visit | z = s, ...) for every state at once (same value as `visit_log_prob`).

        Only the columns of the visit and of the previous visit's chronic codes differ from the
        cached per-demographic tables, so the cost is O(S * (|visit| + |previous|))."""
        if visit_idx is None or visit_idx.size == 0:
            return np.full(self.n_states, -np.inf)
        P, logp, log1m, total = self._emission_tables(age, sex)
        logp_v = logp[:, visit_idx]
        log1m_v = log1m[:, visit_idx]
        if prev_idx is not None and prev_idx.size:
            rho = self.persistence[prev_idx]
            prev_idx = prev_idx[rho > 0]
            rho = rho[rho > 0]
        if prev_idx is not None and prev_idx.size:
            mask = self.allowed_mask(age, sex)[prev_idx]
            boosted = (1.0 - (1.0 - P[:, prev_idx]) * (1.0 - rho)[None, :]) * mask[None, :]
            with np.errstate(divide="ignore"):
                log1m_b = np.log1p(-boosted)
            total = total - log1m[:, prev_idx].sum(1) + log1m_b.sum(1)
            pos = np.searchsorted(prev_idx, visit_idx)
            pos = np.minimum(pos, prev_idx.size - 1)
            hit = prev_idx[pos] == visit_idx
            if hit.any():
                with np.errstate(divide="ignore"):
                    logp_v = logp_v.copy()
                    log1m_v = log1m_v.copy()
                    logp_v[:, hit] = np.log(boosted[:, pos[hit]])
                    log1m_v[:, hit] = log1m_b[:, pos[hit]]
        with np.errstate(divide="ignore", invalid="ignore"):
            log_nonempty = np.log(-np.expm1(total))
            ll = total + (logp_v - log1m_v).sum(1) - log_nonempty
        return np.where(np.isnan(ll), -np.inf, ll)

    # -- exact next-visit probabilities (forward algorithm) -----------------------------------

    def _forward(self, patient: Patient, n: int):
        """Yield, for k = 0 .. n-1: (log prior over z_k given visits[:k] and that visit k exists,
        log-likelihood vector of visits[k] per state, predictive log prob of visits[k])."""
        if n > self.max_visits:
            raise ValueError(f"the model never makes more than max_visits={self.max_visits} visits")
        age, sex = patient.age, patient.sex
        with np.errstate(divide="ignore"):
            log_pi = np.log(self.initial_state_probs(age, sex))
            logT = np.log(self.transition_matrix(age, sex))
            log_q = np.log(self.continue_prob)
        log_post = None
        prev_idx = None
        for k in range(n):
            if k == 0:
                log_prior = log_pi
            else:
                w = log_post + log_q  # P(z_{k-1}, visit k exists | history)
                log_prior = logsumexp(w[:, None] + logT, axis=0) - logsumexp(w)
            idx = self.visit_indices(patient.visits[k])
            ll = self._visit_loglik_states(idx, prev_idx, age, sex)
            joint = log_prior + ll
            out = float(logsumexp(joint))
            yield log_prior, ll, out
            with np.errstate(invalid="ignore"):
                log_post = joint - out  # P(z_k | visits[:k+1]); nan after an impossible visit
            prev_idx = idx

    def next_visit_log_probs(self, patient: Patient) -> np.ndarray:
        """(n_visits,) entry k = `next_visit_log_prob(patient, k)`, all in one forward pass."""
        return np.array([out for _, _, out in self._forward(patient, len(patient.visits))])

    def next_visit_log_prob(self, patient: Patient, k: int) -> float:
        """Exact log P(visits[k] | visits[:k], age, sex, visit k exists) under the model.

        The forward algorithm sums over the hidden states of visits 0..k. It conditions on
        everything observed up to visit k and on nothing later: the demographics, the code sets of
        visits 0..k-1, the fact that visits 1..k exist (each existence has probability
        continue_prob[z_{j-1}], which carries information about the states), the persistence of
        chronic codes from visits[k-1], the non-empty conditioning of every visit and the age/sex
        code rules. It does NOT condition on how many visits follow k. k = 0 gives the first
        visit's probability given the demographics. Returns -inf for a visit the model cannot make
        (empty, a code outside `codes`, a code forbidden for the age/sex) and nan when an earlier
        visit is already impossible.
        """
        if not 0 <= k < len(patient.visits):
            raise IndexError(f"visit {k} out of range for a patient with {len(patient.visits)} visits")
        out = float("nan")
        for _, _, out in self._forward(patient, k + 1):  # noqa: B007 (the last step's value is the answer)
            pass
        return out

    def next_visit_exists_prob(self, patient: Patient, k: int) -> float:
        """P(visit k exists | visits[:k], age, sex) for k >= 1: the chance the patient comes back
        after visits[:k] (0 when k >= max_visits)."""
        if not 1 <= k <= len(patient.visits):
            raise IndexError(f"visit {k} out of range: need 1 <= k <= {len(patient.visits)}")
        if k >= self.max_visits:
            return 0.0
        log_post = None
        for log_prior, ll, out in self._forward(patient, k):
            log_post = log_prior + ll - out
        return float(np.exp(log_post) @ self.continue_prob)

    def next_visit_state_probs(self, patient: Patient, k: int) -> np.ndarray:
        """(S,) P(z_k | visits[:k], age, sex, visit k exists): the predictive state distribution."""
        if not 0 <= k <= len(patient.visits):
            raise IndexError(f"visit {k} out of range")
        history = Patient(patient.subject_id, patient.age, patient.sex, list(patient.visits[:k]) + [[self.codes[0]]])
        log_prior = None
        for log_prior, _, _ in self._forward(history, k + 1):  # noqa: B007 (the last step's prior is the answer)
            pass
        return np.exp(log_prior)

    def next_visit_code_marginals(self, patient: Patient, k: int) -> np.ndarray:
        """(C,) P(code c in visits[k] | visits[:k], age, sex, visit k exists): the Bayes-optimal
        per-code probabilities (visits[k] itself need not exist: k may equal len(visits))."""
        w = self.next_visit_state_probs(patient, k)
        prev = patient.visits[k - 1] if k >= 1 else None
        out = np.zeros(self.n_codes)
        for s in np.flatnonzero(w > 0):
            p = self.code_probs(int(s), patient.age, patient.sex, prev)
            nonempty = -np.expm1(np.log1p(-p).sum())
            out += w[s] * p / nonempty
        return out

    # -- sampling -----------------------------------------------------------------------------

    def sample_demographics(self, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """(ages (n,), male (n,) bool) drawn from the model's demographic distribution."""
        return draw_demographics(self, n, rng)

    def sample(self, n_patients: int, seed: int) -> list[Patient]:
        """Draw `n_patients` patients (vectorised over patients); the same seed gives the same cohort."""
        return self.sample_with_states(n_patients, seed)[0]

    def sample_with_states(self, n_patients: int, seed: int) -> tuple[list[Patient], list[list[int]]]:
        """`sample`, plus the hidden state index of every visit of every patient (same draws: the
        patients equal `sample(n_patients, seed)`)."""
        if n_patients < 0:
            raise ValueError("n_patients must be >= 0")
        rng = np.random.default_rng(seed)
        n, S, C = n_patients, self.n_states, self.n_codes
        age, male = self.sample_demographics(n, rng)
        sex = np.where(male, "M", "F")
        female = ~male

        # per-patient eligibility of states, and the demographic key of the code rules
        sex_ok = np.array([[s is None or (s == "M") == m for s in self.state_sex] for m in (False, True)])
        eligible = (self.state_min_age[None, :] <= age[:, None]) & (age[:, None] < self.state_max_age[None, :])
        eligible &= sex_ok[male.astype(int)]
        key = demographic_keys(age, female)
        masks = np.stack([self._key_mask(key_from_bits(g)) for g in range(N_DEMOGRAPHIC_KEYS)])

        # first-visit states
        logits = self.init_logit[None, :] + self.init_logit_age[None, :] * (age[:, None] - 60.0) / 10.0
        logits = logits + self.init_logit_male[None, :] * male[:, None]
        logits = np.where(eligible, logits, -np.inf)
        if n and not eligible.any(1).all():
            raise ValueError("a sampled patient has no eligible state")
        w = np.exp(logits - logits.max(1, keepdims=True)) if n else np.zeros((0, S))
        z = sample_categorical(w, rng)

        codes_arr = np.array(self.codes, dtype=object)
        chronic = self.persistence > 0
        visits: list[list[list[str]]] = [[] for _ in range(n)]
        states: list[list[int]] = [[] for _ in range(n)]
        active = np.arange(n)
        prev = None
        block = self.sample_block_rows
        for j in range(self.max_visits):
            if active.size == 0:
                break
            cur = np.zeros((active.size, C), dtype=bool)
            for s in range(S):
                rows_s = np.flatnonzero(z == s)
                for b in range(0, rows_s.size, block):
                    rows = rows_s[b : b + block]
                    p = np.broadcast_to(self.code_prob[s], (rows.size, C))
                    if prev is not None:
                        boost = prev[rows] & chronic[None, :]
                        p = np.where(boost, 1.0 - (1.0 - p) * (1.0 - self.persistence[None, :]), p)
                    p = p * masks[key[active[rows]]]
                    if not (p > 0).any(1).all():
                        raise ValueError(f"state {self.state_names[s]} cannot make a non-empty visit for some patient")
                    cur[rows] = draw_nonempty_visits(p, rng)
            for i, visit, state in zip(active.tolist(), emit_visits(cur, codes_arr, rng), z.tolist()):
                visits[i].append(visit)
                states[i].append(state)
            # does another visit follow, and in which state
            if j + 1 >= self.max_visits:
                break
            cont = rng.random(active.size) < self.continue_prob[z]
            active, z, prev = active[cont], z[cont], cur[cont]
            if active.size:
                T = self.transition[z] * eligible[active]
                if not (T.sum(1) > 0).all():
                    raise ValueError("a state transitions only to states the patient is not eligible for")
                z = sample_categorical(T, rng)

        patients = [Patient(f"S{i + 1:07d}", float(age[i]), str(sex[i]), visits[i]) for i in range(n)]
        return patients, states
