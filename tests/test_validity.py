"""Age/sex validity rules of ICD-9 codes (promptehr/validity.py)."""

from __future__ import annotations

import pytest

from promptehr.validity import code_allowed, code_restriction


@pytest.mark.parametrize(
    "code, age, sex, allowed",
    [
        ("V220", 30.0, "F", True),
        ("V220", 30.0, "M", False),
        ("V220", 60.0, "F", False),
        ("V220", 10.0, "F", False),
        ("64413", 45.0, "F", True),
        ("650", 0.0, "F", False),
        ("V270", 55.0, "F", True),
        ("V270", 56.0, "F", False),
        ("185", 70.0, "M", True),
        ("185", 70.0, "F", False),
        ("60000", 70.0, "F", False),
        ("V3000", 0.0, "M", True),
        ("V3000", 1.0, "M", False),
        ("7742", 0.0, "F", True),
        ("7742", 40.0, "F", False),
        ("V290", 30.0, "F", False),
        ("1749", 50.0, "F", True),
        ("1749", 50.0, "M", False),
        ("6202", 40.0, "M", False),
        ("4019", 0.0, "M", True),
        ("4019", 90.0, "F", True),
        ("E8120", 30.0, "M", True),
        ("V053", 0.0, "M", True),
        ("0389", 5.0, "F", True),
    ],
)
def test_code_allowed_rules(code, age, sex, allowed):
    assert code_allowed(code, age, sex) is allowed


def test_restriction_categories():
    assert code_restriction("66401") == "pregnancy"
    assert code_restriction("V2389") == "pregnancy"
    assert code_restriction("76519") == "newborn"
    assert code_restriction("V3101") == "newborn"
    assert code_restriction("6021") == "male"
    assert code_restriction("2189") == "female"
    assert code_restriction("E8497") is None  # E codes are not numeric categories
    assert code_restriction("V5861") is None
