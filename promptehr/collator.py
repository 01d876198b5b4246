"""Dataset and collator: patients -> padded denoising batches (docs/PROMPTEHR.md section 3).

`EHRPatientDataset` encodes each patient once (codes -> ids, long patients trimmed to `max_length`);
`EHRDataCollator` plans each patient's rows, corrupts what the encoder sees and pads the batch (the
row layout, padding and grammar live in `promptehr.patient_format`):
  - reconstruction / denoising: the encoder sees the patient, corrupted with `corruption_prob`
    (span infilling with Poisson(lambda_poisson) spans, deletion, replacement by random codes);
  - next_visit_prediction (2+ visits): the encoder sees visits[:k] and a `<v> <mask> </v>` placeholder;
  - first_visit (share `first_visit_prob`): the encoder sees only the placeholder.
A visit's codes are written in id order for an ordered vocabulary (`tokenizer.ordered`), else shuffled
per row (`shuffle_codes`). Labels are always the CLEAN patient (pad = -100); a next-visit row's labels
stop after visit k plus the token that follows it (`<v>` if more visits come, `</s>` if not), so the
model learns when to stop.
Training batches come from `RowBucketSampler` (rows planned per epoch, batched by length: little
padding); `LengthBucketSampler` batches whole patients (`bucket_by_length: false`).
"""

from __future__ import annotations

import logging
from collections import Counter

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from promptehr.patient_format import (
    arrange_visits,
    first_fitting_visit,
    hidden_visit_row,
    pad_batch,
    row_lengths,
    whole_patient_row,
)
from promptehr.schema import SEXES, Patient
from promptehr.tokenizer import DiagnosisCodeTokenizer

logger = logging.getLogger(__name__)

TASK_TYPES = ("reconstruction", "denoising", "next_visit_prediction", "first_visit")
TASK_ID = {name: i for i, name in enumerate(TASK_TYPES)}


class EHRPatientDataset(Dataset):
    """Patients as per-visit arrays of code ids; items are `(index, visits, age, sex_id)`.

    Unknown codes become `<unk>` and patients longer than `max_length` tokens lose their earliest
    visits (a single over-long visit keeps its first codes); both are counted in `self.report`.
    """

    def __init__(self, patients: list[Patient], tokenizer: DiagnosisCodeTokenizer, max_length: int = 512):
        self.tokenizer = tokenizer
        self.report: Counter = Counter()
        self.visits: list[list[np.ndarray]] = []
        self.ages = np.zeros(len(patients), dtype=np.float32)
        self.sexes = np.zeros(len(patients), dtype=np.int64)
        self.lengths = np.zeros(len(patients), dtype=np.int64)
        budget = max_length - 2  # <s> ... </s>
        for i, p in enumerate(patients):
            if p.sex not in SEXES:
                raise ValueError(f"patient #{i}: sex must be one of {SEXES}, got {p.sex!r}")
            visits = []
            for visit in p.visits:
                ids = np.fromiter((tokenizer.encode_code(c) for c in visit), dtype=np.int64, count=len(visit))
                self.report["unknown_codes"] += int((ids == tokenizer.unk_token_id).sum())
                if len(ids) + 2 > budget:
                    self.report["codes_truncated"] += len(ids) + 2 - budget
                    ids = ids[: budget - 2]
                visits.append(ids)
            if not visits:
                raise ValueError(f"patient #{i} has no visits")
            start = first_fitting_visit(visits, max_length)  # every visit fits alone (codes truncated above)
            visits = visits[start:]
            self.report["visits_truncated"] += start
            if tokenizer.ordered:  # the one order the grammar admits (`patient_format`)
                visits = [np.sort(v) for v in visits]
            self.visits.append(visits)
            self.ages[i] = p.age
            self.sexes[i] = SEXES.index(p.sex)
            self.lengths[i] = 2 + sum(len(v) + 2 for v in visits)
        for key, value in self.report.items():
            if value:
                logger.warning("dataset: %d %s (see EHRPatientDataset)", value, key.replace("_", " "))

    def __len__(self) -> int:
        return len(self.visits)

    def __getitem__(self, index):
        """`index`: a patient index, or a planned row `(patient index, task id, k, row id)` of
        `RowBucketSampler`, which is passed on to the collator as a fifth field."""
        if isinstance(index, (tuple, list)):
            i = int(index[0])
            return i, self.visits[i], float(self.ages[i]), int(self.sexes[i]), tuple(int(x) for x in index[1:])
        return index, self.visits[index], float(self.ages[index]), int(self.sexes[index])


class EHRDataCollator:
    """Builds denoising / next-visit rows; randomness is seeded per batch by (seed, epoch, first index),
    so batches are reproducible across DataLoader workers and across a resume."""

    def __init__(
        self,
        tokenizer: DiagnosisCodeTokenizer,
        lambda_poisson: float = 3.0,
        mask_probability: float = 0.15,
        del_probability: float = 0.15,
        rep_probability: float = 0.15,
        corruption_prob: float = 0.5,
        next_visit_rows: bool = True,
        first_visit_prob: float = 0.3,
        shuffle_codes: bool = True,
        seed: int = 0,
    ):
        for name, value in (
            ("mask_probability", mask_probability),
            ("del_probability", del_probability),
            ("rep_probability", rep_probability),
            ("corruption_prob", corruption_prob),
            ("first_visit_prob", first_visit_prob),
        ):
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"collator.{name} must lie in [0, 1], got {value}")
        if lambda_poisson < 0:
            raise ValueError(f"collator.lambda_poisson must be >= 0, got {lambda_poisson}")
        self.tok = tokenizer
        self.lambda_poisson = lambda_poisson
        self.mask_probability = mask_probability
        self.del_probability = del_probability
        self.rep_probability = rep_probability
        self.corruption_prob = corruption_prob
        self.next_visit_rows = next_visit_rows
        self.first_visit_prob = first_visit_prob
        self.shuffle_codes = shuffle_codes
        self.seed = seed
        self.epoch = 0

    @classmethod
    def from_config(cls, tokenizer, cfg, seed: int = 0) -> EHRDataCollator:
        from dataclasses import asdict

        kwargs = asdict(cfg)
        kwargs.pop("max_length")  # applied by EHRPatientDataset
        return cls(tokenizer, seed=seed, **kwargs)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    # ------------------------------------------------------------------ corruption

    def _corrupt(self, visits: list[np.ndarray], rng: np.random.Generator) -> list[np.ndarray]:
        """Span infilling, deletion and replacement; guarantees at least one change."""
        out, changed = [], False
        for codes in visits:
            original, codes = codes, codes.copy()
            n = len(codes)
            span = None
            if rng.random() < self.mask_probability:
                length = min(int(rng.poisson(self.lambda_poisson)), n)
                start = int(rng.integers(0, n - length + 1))
                span = (start, length)
            keep = rng.random(n) >= self.del_probability
            replace = rng.random(n) < self.rep_probability
            if replace.any():
                codes[replace] = rng.integers(self.tok.n_special, len(self.tok), size=int(replace.sum()))
            if span is not None:
                start, length = span
                keep[start : start + length] = False
                pieces = [codes[:start][keep[:start]], [self.tok.mask_token_id], codes[start:][keep[start:]]]
                new = np.concatenate(pieces).astype(np.int64)
            else:
                new = codes[keep]
            changed |= span is not None or not keep.all() or bool((codes != original).any())
            out.append(new)
        if not changed:  # force one span so a "denoising" row is never a plain copy
            j = int(rng.integers(0, len(out)))
            n = len(out[j])
            length = max(1, min(int(rng.poisson(self.lambda_poisson)), n))
            start = int(rng.integers(0, n - length + 1))
            out[j] = np.concatenate([out[j][:start], [self.tok.mask_token_id], out[j][start + length :]]).astype(np.int64)
        return out

    # ------------------------------------------------------------------ encoding

    def plan_rows(self, n_visits: int, rng: np.random.Generator) -> list[tuple[int, int]]:
        """The rows a patient with `n_visits` visits expands into this time, as (task id, k): its
        reconstruction or (with `corruption_prob`) denoising row (k = -1), a next-visit row hiding a
        random visit k >= 1 (2+ visits), and with `first_visit_prob` a first-visit row (k = 0)."""
        whole = "denoising" if rng.random() < self.corruption_prob else "reconstruction"
        rows = [(TASK_ID[whole], -1)]
        if self.next_visit_rows and n_visits >= 2:
            rows.append((TASK_ID["next_visit_prediction"], int(rng.integers(1, n_visits))))
        if self.first_visit_prob > 0 and rng.random() < self.first_visit_prob:
            rows.append((TASK_ID["first_visit"], 0))
        return rows

    @property
    def shuffles(self) -> bool:
        """Whether rows shuffle a visit's codes: `shuffle_codes` with a random-order vocabulary (an
        ordered one's visits are held sorted by the dataset)."""
        return self.shuffle_codes and not self.tok.ordered

    def build_row(self, visits: list[np.ndarray], task: int, k: int, rng: np.random.Generator, shuffle: bool = True):
        """One planned row: (encoder ids, label ids, first target label position or -1, task name)."""
        tok = self.tok
        if shuffle and self.shuffles:
            visits = arrange_visits(self.tok, visits, rng)
        name = TASK_TYPES[task]
        if k >= 0:
            return (*hidden_visit_row(tok, visits, k), name)
        shown = self._corrupt(visits, rng) if name == "denoising" else None
        return (*whole_patient_row(tok, visits, shown), -1, name)

    def rows_for_patient(self, visits: list[np.ndarray], rng: np.random.Generator):
        """Yield (encoder ids, label ids, first target label position or -1, task name) for every row
        of `plan_rows`; the codes of each visit are shuffled once for all of the patient's rows."""
        if self.shuffles:
            visits = arrange_visits(self.tok, visits, rng)
        for task, k in self.plan_rows(len(visits), rng):
            yield self.build_row(visits, task, k, rng, shuffle=False)

    def __call__(self, items) -> dict[str, torch.Tensor]:
        planned = len(items[0]) == 5  # rows planned by RowBucketSampler: (task id, k, row id) each
        first = int(items[0][4][2]) if planned else int(items[0][0])
        rng = np.random.default_rng([self.seed, self.epoch, first, len(items), int(planned)])
        enc_rows, label_rows, starts, tasks, ages, sexes = [], [], [], [], [], []
        for _, visits, age, sex, *plan in items:
            rows = [self.build_row(visits, plan[0][0], plan[0][1], rng)] if planned else self.rows_for_patient(visits, rng)
            for enc, labels, start, task in rows:
                enc_rows.append(enc)
                label_rows.append(labels)
                starts.append(start)
                tasks.append(TASK_ID[task])
                ages.append(age)
                sexes.append(sex)
        return pad_batch(self.tok, enc_rows, label_rows, starts, tasks, ages, sexes)


class LengthBucketSampler(Sampler[list[int]]):
    """Batches of patients of similar length: shuffle, sort within windows of `window` batches,
    shuffle the batches. Seeded by (seed, epoch) so a resumed run sees the same order."""

    def __init__(self, lengths, batch_size: int, seed: int = 0, window: int = 50, shuffle: bool = True):
        self.lengths = np.asarray(lengths)
        self.batch_size = batch_size
        self.seed = seed
        self.window = window
        self.shuffle = shuffle
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return (len(self.lengths) + self.batch_size - 1) // self.batch_size

    def __iter__(self):
        rng = np.random.default_rng([self.seed, self.epoch])
        order = rng.permutation(len(self.lengths)) if self.shuffle else np.arange(len(self.lengths))
        chunk = self.batch_size * self.window
        batches = []
        for s in range(0, len(order), chunk):
            part = order[s : s + chunk]
            part = part[np.argsort(self.lengths[part], kind="stable")]
            batches += [part[j : j + self.batch_size].tolist() for j in range(0, len(part), self.batch_size)]
        if self.shuffle:
            batches = [batches[i] for i in rng.permutation(len(batches))]
        return iter(batches)


class RowBucketSampler(Sampler[list[tuple[int, int, int, int]]]):
    """Batches of ROWS of similar length, so that neither the encoder nor the decoder pads much.

    A patient's rows differ in length (its whole-patient row holds every visit, a next-visit row's
    encoder only the history, a first-visit row's encoder 5 tokens), so batching patients pads every
    row to its patient's longest. Each epoch this sampler plans every patient's rows with the
    collator's own `plan_rows` (seeded by (seed, epoch)) and shuffles them; then it keeps the three
    kinds of row apart (whole-patient, next-visit, first-visit), sorts each kind by (label length,
    encoder length) and cuts it into batches holding about equal numbers of tokens (so a batch of
    long rows has fewer of them); the batches are then shuffled. Rows of equal lengths are batched
    in random order, so batches differ from epoch to epoch. `window` (batches) sorts within windows
    instead of the whole epoch: more mixing, more padding.
    An epoch has exactly ceil(patients / batch_size) batches, as with patient batches, so
    `batch_size` keeps its meaning (the rows of that many patients on average) and so do schedules
    counted in steps. Items are `(patient index, task id, k, row id)`; `EHRPatientDataset` and
    `EHRDataCollator` build exactly the planned row.
    """

    def __init__(
        self,
        dataset: EHRPatientDataset,
        collator: EHRDataCollator,
        batch_size: int,
        seed: int = 0,
        window: int | None = None,
    ):
        self.visit_lengths = [np.array([len(v) for v in visits], dtype=np.int64) for visits in dataset.visits]
        self.collator = collator
        self.batch_size = batch_size
        self.seed = seed
        self.window = window
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return (len(self.visit_lengths) + self.batch_size - 1) // self.batch_size

    def plan(self, rng: np.random.Generator) -> np.ndarray:
        """This epoch's rows: (patient, task id, k, kind, encoder length, label length); kind 0 whole
        patient, 1 next visit, 2 first visit."""
        rows = []
        for i, lengths in enumerate(self.visit_lengths):
            for task, k in self.collator.plan_rows(len(lengths), rng):
                rows.append((i, task, k, 0 if k < 0 else 1 if k > 0 else 2, *row_lengths(lengths, k)))
        return np.array(rows, dtype=np.int64).reshape(-1, 6)

    @staticmethod
    def _cut(rows: np.ndarray, n: int) -> list[np.ndarray]:
        """`n` consecutive non-empty batches of sorted `rows`, each holding about the same tokens."""
        tokens = np.cumsum(rows[:, 4] + rows[:, 5])
        cuts = np.searchsorted(tokens, tokens[-1] * np.arange(1, n) / n)
        cuts = np.clip(cuts, np.arange(1, n), len(rows) - np.arange(n - 1, 0, -1))  # none empty
        cuts = np.maximum.accumulate(cuts)
        cuts = np.minimum(cuts, len(rows) - np.arange(n - 1, 0, -1))
        for j in range(1, len(cuts)):  # strictly increasing after the clips
            cuts[j] = max(cuts[j], cuts[j - 1] + 1)
        return np.split(rows, cuts)

    def _window_batches(self, part: np.ndarray, n: int) -> list[np.ndarray]:
        kinds = [part[part[:, 3] == c] for c in range(3)]
        kinds = [r for r in kinds if len(r)]
        if n < len(kinds):  # too few batches to keep the kinds apart
            kinds = [part]
        tokens = np.array([(r[:, 4] + r[:, 5]).sum() for r in kinds], dtype=np.float64)
        share = 1 + (n - len(kinds)) * tokens / tokens.sum()  # one batch each, the rest by tokens
        counts = np.floor(share).astype(int)
        for j in np.argsort(counts - share)[: n - counts.sum()]:  # largest remainders
            counts[j] += 1
        counts = np.minimum(counts, [len(r) for r in kinds])
        while counts.sum() < n:  # a kind with fewer rows than its share: give the rest to the largest
            counts[np.argmax([len(r) - c for r, c in zip(kinds, counts)])] += 1
        out = []
        for r, c in zip(kinds, counts):
            out += self._cut(r[np.lexsort((r[:, 4], r[:, 5]))], int(c))
        return out

    def __iter__(self):
        rng = np.random.default_rng([self.seed, self.epoch])
        rows = self.plan(rng)
        rows = rows[rng.permutation(len(rows))]
        n_batches = len(self)
        n_windows = 1 if self.window is None else (n_batches + self.window - 1) // self.window
        batches = []
        for part, n_part in zip(np.array_split(rows, n_windows), np.array_split(np.arange(n_batches), n_windows)):
            batches += self._window_batches(part, len(n_part))
        batches = [batches[i] for i in rng.permutation(len(batches))]
        row_id = 0
        for b in batches:
            yield [(int(i), int(task), int(k), row_id + j) for j, (i, task, k) in enumerate(b[:, :3])]
            row_id += len(b)
