"""The MIMIC-scale ICD-9-CM vocabulary shared by the `hmm` and `transition` cohorts.

The 389 real codes of the `small` cohort are the head; a tail of procedurally generated codes (so many
per chapter of `tables/icd9_chapters.tsv`) lies inside the real ICD-9-CM category ranges, in MIMIC-III
format (no dot: 3-digit categories 001-999 with 4th/5th digits, V01-V90, E800-E999 with a 4th digit),
drawn from the fixed `STRUCTURE_SEED`, so the same codes come back on every machine.
"""

from __future__ import annotations

import csv
import functools
from dataclasses import dataclass
from importlib import resources

import numpy as np

from promptehr.validity import code_restriction

STRUCTURE_SEED = 2001  # fixes the tail codes, their popularity and chronicity (MIMIC-III spans 2001-2012)
CATEGORY_POPULARITY_SIGMA = 1.3  # log-normal spread of a category's popularity: the long tail
CODE_RANK_EXPONENT = 1.1  # a category's r-th code has popularity ~ r^-exponent (the first is "NOS")
PERSISTENCE_RANGE = (0.5, 0.85)  # persistence of a chronic tail code: uniform in this range
DEPTH_SHARES = {0: 0.12, 1: 0.48, 2: 0.40}  # a new category: leaf (0 digits below it), 4th digit, 4th+5th
MAX_CODES_PER_CATEGORY = 60  # 5-digit categories: ICD-9-CM's largest hold a few dozen codes


def read_table(name: str) -> list[dict[str, str]]:
    """The rows of `promptehr/cohorts/tables/<name>` (a TSV file with a header line)."""
    text = resources.files("promptehr.cohorts").joinpath("tables", name).read_text(encoding="utf-8")
    rows = list(csv.DictReader(text.splitlines(), delimiter="\t"))
    if not rows:
        raise ValueError(f"promptehr/cohorts/tables/{name} holds no rows")
    return rows


def state_code_tables(states) -> dict[str, dict[str, float]]:
    """{state or "shared_tail": {code: p}} from tables/small_states.tsv, in file order; `states` are the
    state names the file may use besides "shared_tail"."""
    tables: dict[str, dict[str, float]] = {}
    for i, row in enumerate(read_table("small_states.tsv"), start=2):
        table = tables.setdefault(row["state"], {})
        if row["code"] in table:
            raise ValueError(f"tables/small_states.tsv line {i}: code {row['code']} listed twice for {row['state']}")
        table[row["code"]] = float(row["p"])
    unknown = set(tables) - set(states) - {"shared_tail"}
    if unknown:
        raise ValueError(f"tables/small_states.tsv: unknown states {sorted(unknown)}")
    return tables


def chronic_persistence() -> dict[str, float]:
    """{code: persistence} of the small cohort's chronic codes (tables/small_chronic.tsv); others are acute."""
    out: dict[str, float] = {}
    for row in read_table("small_chronic.tsv"):
        out[row["code"]] = max(out.get(row["code"], 0.0), float(row["persistence"]))
    return out


def head_codes() -> list[str]:
    """The small cohort's 389 real codes, in the order of their first row in tables/small_states.tsv."""
    return list(dict.fromkeys(row["code"] for row in read_table("small_states.tsv")))


def category(code: str) -> str:
    """The 3-character ICD-9 category ("401", "V45"), or 4 characters for E codes ("E888")."""
    return code[:4] if code.startswith("E") else code[:3]


@dataclass(frozen=True)
class Chapter:
    name: str
    categories: tuple[str, ...]  # every category of its range, in order
    tail_codes: int  # how many tail codes to generate in it (approximately: capacity bounds it)
    chronic_share: float  # share of its new categories whose codes are chronic


def _category_range(first: str, last: str) -> tuple[str, ...]:
    if first[0] in "VE":
        prefix, width = first[0], len(first) - 1
        return tuple(f"{prefix}{i:0{width}d}" for i in range(int(first[1:]), int(last[1:]) + 1))
    return tuple(f"{i:03d}" for i in range(int(first), int(last) + 1))


def read_chapters() -> list[Chapter]:
    chapters = []
    for i, row in enumerate(read_table("icd9_chapters.tsv"), start=2):
        try:
            chapters.append(
                Chapter(
                    row["chapter"],
                    _category_range(row["first"], row["last"]),
                    int(row["tail_codes"]),
                    float(row["chronic_share"]),
                )
            )
        except (KeyError, ValueError) as exc:
            raise ValueError(f"tables/icd9_chapters.tsv line {i}: {exc}") from None
    return chapters


@dataclass(frozen=True)
class Vocabulary:
    """Codes (head first, then the tail) with what the cohorts build their tables from; arrays (C,)."""

    codes: tuple[str, ...]
    chapter_names: tuple[str, ...]
    chapter: np.ndarray  # chapter index of each code
    category: tuple[str, ...]
    category_id: np.ndarray  # index into `categories`
    categories: tuple[str, ...]
    popularity: np.ndarray  # tail codes: category popularity x rank weight (sums to the category's popularity); head: 0
    persistence: np.ndarray  # chronic tail codes: in PERSISTENCE_RANGE; head: the small cohort's; acute: 0
    restriction: tuple[str | None, ...]  # `validity.code_restriction` of each code
    n_head: int

    @property
    def n_codes(self) -> int:
        return len(self.codes)


def _conflicts(code: str, taken: list[str]) -> bool:
    """Whether `code` and a code already in its category are one the prefix of the other (ICD-9 codes are
    leaves: "4280" and "42801" cannot both be codes)."""
    return any(t.startswith(code) or code.startswith(t) for t in taken)


def _allocate(n: int, weights: np.ndarray, capacity: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """`n` codes spread over categories by `weights`, none above its `capacity` (the surplus is drawn
    again among the categories with room left)."""
    counts = np.zeros(len(weights), dtype=np.int64)
    left = min(n, int(capacity.sum()))
    while left > 0:
        room = capacity - counts
        w = np.where(room > 0, weights, 0.0)
        counts += np.minimum(rng.multinomial(left, w / w.sum()), room)
        left = min(n, int(capacity.sum())) - int(counts.sum())
    return counts


def generate_tail(head: list[str], chapters: list[Chapter], rng: np.random.Generator):
    """New codes per chapter: categories picked by log-normal weight, each with a depth (from its head
    codes, else drawn) and distinct suffixes in random order. Returns [(code, chapter index, rank in its
    category, category weight, chronic)]."""
    by_category: dict[str, list[str]] = {}
    for code in head:
        by_category.setdefault(category(code), []).append(code)
    out = []
    for h, chapter in enumerate(chapters):
        cats = chapter.categories
        weights = rng.lognormal(0.0, CATEGORY_POPULARITY_SIGMA, len(cats))
        chronic = rng.random(len(cats)) < chapter.chronic_share
        drawn = rng.choice(list(DEPTH_SHARES), size=len(cats), p=list(DEPTH_SHARES.values()))
        depth = np.zeros(len(cats), dtype=np.int64)
        capacity = np.zeros(len(cats), dtype=np.int64)
        for g, cat in enumerate(cats):
            taken = by_category.get(cat, [])
            if taken:  # follow the head's depth in this category (its most common code length)
                lengths = [len(t) - len(cat) for t in taken]
                depth[g] = max(set(lengths), key=lengths.count)
            else:
                depth[g] = min(int(drawn[g]), 1) if cat.startswith("E") else drawn[g]  # E codes: one digit
            if depth[g] == 0:
                capacity[g] = 0 if taken else 1
            else:
                capacity[g] = min(10 ** depth[g], MAX_CODES_PER_CATEGORY) - len(taken)
        wanted = _allocate(chapter.tail_codes, weights, np.maximum(capacity, 0), rng)
        for g, cat in enumerate(cats):
            if wanted[g] == 0:
                continue
            taken = list(by_category.get(cat, []))
            suffixes = [""] if depth[g] == 0 else [f"{x:0{depth[g]}d}" for x in rng.permutation(10 ** depth[g])]
            rank = 0
            for suffix in suffixes:
                if rank >= wanted[g]:
                    break
                code = cat + suffix
                if _conflicts(code, taken):
                    continue
                taken.append(code)
                out.append((code, h, rank, float(weights[g]), bool(chronic[g])))
                rank += 1
            by_category[cat] = taken
    return out


@functools.lru_cache(maxsize=1)
def mimic_vocabulary() -> Vocabulary:
    """The head (the small cohort's codes) and the generated tail; built once per process."""
    head = head_codes()
    chapters = read_chapters()
    of_category = {cat: h for h, ch in enumerate(chapters) for cat in ch.categories}
    missing = [c for c in head if category(c) not in of_category]
    if missing:
        raise ValueError(f"head codes outside every chapter of tables/icd9_chapters.tsv: {missing}")
    rng = np.random.default_rng(STRUCTURE_SEED)
    tail = generate_tail(head, chapters, rng)
    codes = head + [t[0] for t in tail]
    rank = np.array([t[2] for t in tail], dtype=np.float64)
    rank_weight = (rank + 1.0) ** -CODE_RANK_EXPONENT
    cat_of_tail = [category(t[0]) for t in tail]
    totals: dict[str, float] = {}
    for cat, w in zip(cat_of_tail, rank_weight):
        totals[cat] = totals.get(cat, 0.0) + w
    popularity = np.zeros(len(codes))
    popularity[len(head) :] = [t[3] * w / totals[cat] for t, w, cat in zip(tail, rank_weight, cat_of_tail)]
    persistence = np.zeros(len(codes))
    head_rho = chronic_persistence()
    persistence[: len(head)] = [head_rho.get(c, 0.0) for c in head]
    chronic_tail = np.array([t[4] for t in tail], dtype=bool)
    persistence[len(head) :] = np.where(chronic_tail, rng.uniform(*PERSISTENCE_RANGE, len(tail)), 0.0)
    cats = [category(c) for c in codes]
    categories = tuple(dict.fromkeys(cats))
    cat_index = {c: i for i, c in enumerate(categories)}
    return Vocabulary(
        codes=tuple(codes),
        chapter_names=tuple(ch.name for ch in chapters),
        chapter=np.array([of_category[c] for c in cats], dtype=np.int64),
        category=tuple(cats),
        category_id=np.array([cat_index[c] for c in cats], dtype=np.int64),
        categories=categories,
        popularity=popularity,
        persistence=persistence,
        restriction=tuple(code_restriction(c) for c in codes),
        n_head=len(head),
    )


# ----------------------------------------------------------------------------------------------
# Phenotypes: the hidden states of `hmm` and the first-visit profiles of `transition`
# ----------------------------------------------------------------------------------------------

FOCUS_WEIGHT = 30.0  # weight of a phenotype's focus category, against 1-4 for its chapters
CATEGORY_NOISE_SIGMA = 0.8  # log-normal factor per phenotype and category: related phenotypes differ


@dataclass(frozen=True)
class Phenotype:
    """One row of a phenotype table (tables/mimic_hmm_states.tsv, tables/transition_profiles.tsv)."""

    name: str
    sex: str | None  # only for this sex; None: both
    min_age: float  # eligible iff min_age <= age < max_age
    max_age: float
    init_logit: float  # first-visit log-weight at age 60, female
    age_slope: float  # added per 10 years above 60
    male: float  # added for men
    background: float  # weight of every chapter not in `chapters`
    emits: frozenset[str]  # restricted code groups it may hold: pregnancy, newborn
    chapters: dict[str, float]
    focus: tuple[str, ...]  # categories ("428", "V45", "E888")
    extra: dict[str, str]  # the table's other columns


def read_phenotypes(name: str, vocab: Vocabulary) -> list[Phenotype]:
    """The rows of tables/<name> (first column: the phenotype's name), checked against the vocabulary."""
    out = []
    common = {"sex", "min_age", "max_age", "init_logit", "age_slope", "male", "background", "emits", "chapters", "focus"}
    for i, row in enumerate(read_table(name), start=2):
        first = next(iter(row))
        where = f"tables/{name} line {i} ({row[first]})"
        try:
            ph = Phenotype(
                name=row[first],
                sex=None if row["sex"] == "-" else row["sex"],
                min_age=float(row["min_age"]),
                max_age=float(row["max_age"]),
                init_logit=float(row["init_logit"]),
                age_slope=float(row["age_slope"]),
                male=float(row["male"]),
                background=float(row["background"]),
                emits=frozenset() if row["emits"] == "-" else frozenset(row["emits"].split(",")),
                chapters={k: float(w) for k, w in (item.split(":") for item in row["chapters"].split())},
                focus=tuple(row["focus"].split()),
                extra={k: v for k, v in row.items() if k != first and k not in common},
            )
        except (KeyError, ValueError) as exc:
            raise ValueError(f"{where}: {exc!r}") from None
        unknown = (set(ph.chapters) - set(vocab.chapter_names)) | (ph.emits - {"pregnancy", "newborn"})
        if unknown or ph.sex not in (None, "M", "F"):
            raise ValueError(f"{where}: unknown chapter, emits or sex: {sorted(unknown) or ph.sex}")
        out.append(ph)
    return out


def phenotype_weights(
    ph: Phenotype, vocab: Vocabulary, idx: np.ndarray, popularity: np.ndarray, rng: np.random.Generator
) -> np.ndarray:
    """(len(idx),) unnormalised weights of codes `idx` in phenotype `ph`: popularity x (chapter weight, or
    `background` outside its chapters, + FOCUS_WEIGHT in its focus categories) x a log-normal factor per
    category; 0 for pregnancy/newborn codes unless the phenotype emits them."""
    chapter_w = np.array([ph.chapters.get(name, ph.background) for name in vocab.chapter_names])
    focus = np.isin(np.array(vocab.categories), ph.focus)
    noise = rng.lognormal(0.0, CATEGORY_NOISE_SIGMA, len(vocab.categories))
    cat = vocab.category_id[idx]
    w = popularity * (chapter_w[vocab.chapter[idx]] + FOCUS_WEIGHT * focus[cat]) * noise[cat]
    restriction = np.array([vocab.restriction[i] or "" for i in idx])
    for group in ("pregnancy", "newborn"):
        if group not in ph.emits:
            w[restriction == group] = 0.0
    return w
