"""What the built-in cohort models share: demographics, the age/sex code masks, visits drawn as
non-empty sets of independent Bernoulli codes, codes emitted in random order.

Inputs are numpy arrays and a `np.random.Generator`; every function draws in a fixed order, so a
model built on them gives the same patients for the same seed.
"""

from __future__ import annotations

import numpy as np

from promptehr.validity import NEWBORN_AGE_LIMIT, PREGNANCY_AGE_RANGE, code_restriction

N_DEMOGRAPHIC_KEYS = 8  # (female, newborn age, pregnancy age) as bits 4, 2, 1


def logsumexp(x: np.ndarray, axis=None) -> np.ndarray:
    m = np.max(x, axis=axis, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    with np.errstate(divide="ignore"):
        out = np.log(np.sum(np.exp(x - m), axis=axis, keepdims=True)) + m
    return np.squeeze(out, axis=axis) if axis is not None else out.reshape(())[()]


def demographic_key(age: float, sex: str) -> tuple[bool, bool, bool]:
    """The facts the code rules depend on: (female, newborn age, pregnancy age)."""
    return (sex == "F", age < NEWBORN_AGE_LIMIT, PREGNANCY_AGE_RANGE[0] <= age <= PREGNANCY_AGE_RANGE[1])


def demographic_keys(age: np.ndarray, female: np.ndarray) -> np.ndarray:
    """(n,) int in [0, 8): `demographic_key` of each patient as bits (female 4, newborn 2, pregnancy 1)."""
    return (
        female.astype(int) * 4
        + (age < NEWBORN_AGE_LIMIT) * 2
        + ((age >= PREGNANCY_AGE_RANGE[0]) & (age <= PREGNANCY_AGE_RANGE[1]))
    )


def key_from_bits(g: int) -> tuple[bool, bool, bool]:
    return bool(g & 4), bool(g & 2), bool(g & 1)


def allowed_for_key(restrictions, key: tuple[bool, bool, bool]) -> np.ndarray:
    """(C,) 1.0 where a code with this `validity.code_restriction` is allowed for the key, else 0.0."""
    female, newborn, preg_age = key
    ok = {None: True, "pregnancy": female and preg_age, "newborn": newborn, "male": not female, "female": female}
    return np.array([ok[r] for r in restrictions], dtype=np.float64)


def draw_demographics(m, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(ages (n,), male (n,) bool) from the demographic fields of model `m` (see `CohortModel`):
    neonates (age 0) with `neonate_share`, else adults with a Beta-shaped age and a pile-up at `age_top`."""
    neo = rng.random(n) < m.neonate_share
    male = rng.random(n) < np.where(neo, m.neonate_male_share, m.adult_male_share)
    top = rng.random(n) < m.age_top_share
    body = m.age_min_adult + (m.age_top - m.age_min_adult) * rng.beta(m.age_beta_a, m.age_beta_b, n)
    age = np.where(neo, 0.0, np.where(top, m.age_top, np.round(body, 1)))
    return np.minimum(age, m.age_top), male


def sample_categorical(weights: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One draw per row of non-negative (n, K) weights (rows need not be normalised)."""
    cdf = np.cumsum(weights, axis=1)
    u = (1.0 - rng.random(weights.shape[0])) * cdf[:, -1]  # in (0, total]
    return np.minimum((cdf < u[:, None]).sum(1), weights.shape[1] - 1)


def draw_nonempty_visits(p: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """(n, C) bool: code c in row i with probability p[i, c], independently, each row redrawn until it is
    non-empty (every row needs some p > 0)."""
    v = rng.random(p.shape) < p
    empty = np.flatnonzero(~v.any(1))
    while empty.size:
        v[empty] = rng.random((empty.size, p.shape[1])) < p[empty]
        empty = empty[~v[empty].any(1)]
    return v


def emit_visits(cur: np.ndarray, codes: np.ndarray, rng: np.random.Generator) -> list[list[str]]:
    """The code strings of each row of the (n, C) bool `cur`, in random order inside each row."""
    r, c = np.nonzero(cur)
    order = np.lexsort((rng.random(r.size), r))
    names = codes[c[order]].tolist()
    ends = np.cumsum(cur.sum(1)).tolist()
    return [names[start:end] for start, end in zip([0, *ends[:-1]], ends)]


class CodeLookup:
    """What both cohort models do with their vocabulary `self.codes`: code -> index, and the codes a
    patient's age and sex allow (`validity.code_restriction`, masks cached per demographic key).
    A model calls `_index_codes()` once its codes are checked."""

    def _index_codes(self) -> None:
        self._index = {c: i for i, c in enumerate(self.codes)}
        self._restriction = [code_restriction(c) for c in self.codes]
        self._mask_cache = {}

    @property
    def n_codes(self) -> int:
        return len(self.codes)

    def code_index(self, code: str) -> int:
        return self._index[code]

    def visit_indices(self, visit) -> np.ndarray | None:
        """Sorted distinct vocabulary indices of `visit`, or None if a code is outside the vocabulary."""
        idx = {self._index.get(c, -1) for c in visit}
        return None if -1 in idx else np.array(sorted(idx), dtype=np.int64)

    def _key_mask(self, key: tuple[bool, bool, bool]) -> np.ndarray:
        mask = self._mask_cache.get(key)
        if mask is None:
            mask = self._mask_cache[key] = allowed_for_key(self._restriction, key)
        return mask

    def allowed_mask(self, age: float, sex: str) -> np.ndarray:
        """(C,) 1.0 where `code_allowed(code, age, sex)`, else 0.0."""
        return self._key_mask(demographic_key(age, sex))
