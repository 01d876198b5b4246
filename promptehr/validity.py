"""Clinical validity rules: which ICD-9 diagnosis codes an age and sex make possible.

Bounds from the CMS Medicare Code Editor's age and sex edits. Used by the built-in cohorts (a code is
never sampled where it is not allowed) and by the quality report's validity metrics on any data.
"""

from __future__ import annotations

PREGNANCY_AGE_RANGE = (12.0, 55.0)  # inclusive: Medicare Code Editor maternity edit
NEWBORN_AGE_LIMIT = 1.0  # newborn/perinatal codes only for age < 1 year
RESTRICTIONS = ("pregnancy", "newborn", "male", "female")

_PREGNANCY_V = ("V22", "V23", "V24", "V27", "V28")
_NEWBORN_V = ("V29", "V30", "V31", "V32", "V33", "V34", "V35", "V36", "V37", "V38", "V39")


def code_restriction(code: str) -> str | None:
    """The age/sex rule a code falls under: "pregnancy", "newborn", "male", "female" or None.

    Pregnancy: 630-679, V22-V24, V27-V28; newborn/perinatal: 760-779, V29-V39; male-only: prostate 185,
    testis 186-187, male genital organs 600-608; female-only: female breast 174, uterus/ovary/other
    female genital cancers 179-184, their benign tumours 218-221, female genital disorders 614-629.
    """
    if code[:3] in _PREGNANCY_V:
        return "pregnancy"
    if code[:3] in _NEWBORN_V:
        return "newborn"
    if len(code) >= 3 and code[:3].isdigit():
        cat = int(code[:3])
        if 630 <= cat <= 679:
            return "pregnancy"
        if 760 <= cat <= 779:
            return "newborn"
        if 185 <= cat <= 187 or 600 <= cat <= 608:
            return "male"
        if cat == 174 or 179 <= cat <= 184 or 218 <= cat <= 221 or 614 <= cat <= 629:
            return "female"
    return None


def restriction_allowed(rule: str | None, age: float, sex: str) -> bool:
    """Whether a code under `rule` (see `code_restriction`) is possible at this age and sex."""
    if rule is None:
        return True
    if rule == "pregnancy":
        return sex == "F" and PREGNANCY_AGE_RANGE[0] <= age <= PREGNANCY_AGE_RANGE[1]
    if rule == "newborn":
        return age < NEWBORN_AGE_LIMIT
    if rule == "male":
        return sex == "M"
    return sex == "F"  # female


def code_allowed(code: str, age: float, sex: str) -> bool:
    """Whether `code` is clinically possible for a patient of this age (years) and sex ("M"/"F").

    Pregnancy codes: women aged 12 to 55 inclusive; newborn codes: age < 1; male-only and female-only
    codes: that sex. Every other code is allowed for everyone.
    """
    return restriction_allowed(code_restriction(code), age, sex)
