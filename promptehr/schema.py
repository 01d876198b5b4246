"""The patient record every stage shares: `Patient` (age and sex prompts, visits of ICD codes), the
allowed values (SEXES, MAX_AGE, ICD_VERSIONS), `DataError` for unusable data and `DataReport`, the
counts a load gives of what it read and what it left out. Loaders (mimic, meds, cohorts) produce
these; nothing here reads a file.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

logger = logging.getLogger(__name__)

SEXES = ("M", "F")  # x_cat index: M -> 0, F -> 1
MAX_AGE = 90.0  # MIMIC shifts ages above 89 to ~300 years: cap them
ICD_VERSIONS = ("9", "10", "both")


class DataError(ValueError):
    """A table is missing, malformed or empty; the message names the file and the problem."""


@dataclass
class Patient:
    subject_id: str  # identifier in the source; never logged or written to MLflow
    age: float  # years at first admission, capped at MAX_AGE
    sex: str  # "M" or "F"
    visits: list[list[str]]  # visits in time order; each a list of distinct codes

    @property
    def n_codes(self) -> int:
        return sum(len(v) for v in self.visits)


@dataclass
class DataReport:
    """Counts describing a load: safe to log (no identifiers, no records)."""

    source: str
    counts: dict[str, int] = field(default_factory=dict)

    def add(self, key: str, n: int) -> None:
        self.counts[key] = self.counts.get(key, 0) + int(n)

    def left_out(self, key: str, n: int, what: str) -> None:
        """Count `n` records left out under `key`, with a warning saying `what` they are when there are any."""
        self.add(key, n)
        if n:
            logger.warning("data[%s] %d %s (%s); they are left out", self.source, n, what, key)

    def log(self) -> None:
        """One line of totals, then one line per non-zero count of something skipped or changed."""
        totals = ("patients", "visits", "code_occurrences", "distinct_codes", "patients_2plus_visits")
        logger.info("data[%s]: %s", self.source, ", ".join(f"{k} {self.counts[k]}" for k in totals if k in self.counts))
        for key, value in self.counts.items():
            if key not in totals and value:
                logger.info("data[%s] %s: %d", self.source, key, value)


def build_vocab(patients: list[Patient]) -> list[str]:
    """Sorted distinct codes of `patients`."""
    return sorted({code for p in patients for visit in p.visits for code in visit})


def summarize(patients: list[Patient], report: DataReport) -> None:
    """Set the report's totals (patients, visits, code occurrences, distinct codes) for `patients`."""
    report.counts["patients"] = len(patients)
    report.counts["visits"] = sum(len(p.visits) for p in patients)
    report.counts["code_occurrences"] = sum(p.n_codes for p in patients)
    report.counts["distinct_codes"] = len(build_vocab(patients))
    report.counts["patients_2plus_visits"] = sum(len(p.visits) >= 2 for p in patients)
