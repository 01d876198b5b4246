"""Validity: codes that cannot occur for the patient they were generated for.
Input: patients. Output: the share of code occurrences (and of patients with one) that the age/sex
rule table (`promptehr.validity.code_allowed`) rules out, and of codes repeated inside their visit."""

from __future__ import annotations

from promptehr.schema import Patient
from promptehr.validity import code_allowed


def _rule_code(code: str) -> str | None:
    """The ICD-9 code the rule table checks: MIMIC-IV's `ICD9:` prefix removed; ICD-10 codes are not
    covered by the table (None)."""
    if code.startswith("ICD10:"):
        return None
    return code[5:] if code.startswith("ICD9:") else code


def validity_metrics(patients: list[Patient]) -> dict:
    """Share of code occurrences (and of patients with one) that `code_allowed` rules out for the
    patient's age and sex, and the share of code occurrences repeated inside their visit."""
    n_codes = invalid = patients_invalid = duplicates = 0
    for p in patients:
        bad = 0
        for v in p.visits:
            n_codes += len(v)
            duplicates += len(v) - len(set(v))
            for c in v:
                rc = _rule_code(c)
                bad += rc is not None and not code_allowed(rc, p.age, p.sex)
        invalid += bad
        patients_invalid += bad > 0
    return {
        "invalid_code_rate": invalid / max(n_codes, 1),
        "invalid_patient_rate": patients_invalid / max(len(patients), 1),
        "duplicate_code_rate": duplicates / max(n_codes, 1),
    }
