"""NHS number and postcode rules (shared/domain/privacy.md sections 1.3 and 1.4).

Scalar functions for validation and explanation, vectorised numpy versions for the synthetic
generator; both implement the same modulus-11 rule and are tested against each other.
"""

from __future__ import annotations

import re
from functools import lru_cache

import numpy as np

_WEIGHTS = np.arange(10, 1, -1)  # 10, 9, ..., 2 for digits 1..9
TEST_RANGE_PREFIX = "999"        # 999 000 0000 - 999 999 9999 is never issued

POSTCODE_RE = re.compile(r"^([A-Z]{1,2}[0-9][A-Z0-9]?) ?([0-9][ABD-HJLNP-UW-Z]{2})$")
# NHS pseudo-postcodes (no fixed abode, not known, ...): valid but not geocodable, so never an error.
PSEUDO_POSTCODE_RE = re.compile(r"^(ZZ99) ?([0-9][A-Z]{2})$")
# Letters allowed in the two-letter unit of the inward code (never C, I, K, M, O or V).
INWARD_UNIT_LETTERS = "ABDEFGHJLNPQRSTUWXYZ"
# Anything shaped like an NHS number, a date or a postcode, for scanning text that must hold none (a
# linkage model's JSON, say). Ten digits after a decimal point are a parameter, not an NHS number.
IDENTIFIER_SHAPED = re.compile(r"(?<![\d.])\d{10}(?!\d)|\b(19|20)\d\d-\d\d-\d\d\b|\b[A-Z]{1,2}\d[A-Z\d]? ?\d[A-Z]{2}\b")


def normalise_nhs_number(raw: str | None) -> str | None:
    """Strip spaces, hyphens and dots (`999 245 5527`, `999-245-5527`, `999.245.5527`); None for blank input."""
    if raw is None:
        return None
    cleaned = re.sub(r"[\s.-]", "", raw)
    return cleaned or None


def nhs_check_digit(first_nine: str) -> int | None:
    """Modulus-11 check digit for nine digits, or None when the remainder gives 10 (no valid number)."""
    total = sum(int(d) * w for d, w in zip(first_nine, _WEIGHTS))
    check = 11 - total % 11
    if check == 11:
        return 0
    return None if check == 10 else check


def nhs_number_problem(raw: str | None) -> str | None:
    """Why a submitted NHS number is unusable (plain words), or None when it is valid."""
    number = normalise_nhs_number(raw)
    if number is None:
        return "missing"
    if not re.fullmatch(r"\d{10}", number):
        return "not 10 digits"
    if len(set(number)) == 1:
        return "all digits the same"
    if nhs_check_digit(number[:9]) != int(number[9]):
        return "fails the modulus-11 check digit"
    return None


def is_valid_nhs_number(raw: str | None) -> bool:
    return nhs_number_problem(raw) is None


def check_digits(prefixes: np.ndarray) -> np.ndarray:
    """Vectorised check digit for int64 nine-digit prefixes; -1 where no valid number exists."""
    digits = (prefixes[:, None] // (10 ** np.arange(8, -1, -1))) % 10
    check = 11 - (digits @ _WEIGHTS) % 11
    check = np.where(check == 11, 0, check)
    return np.where(check == 10, -1, check)


@lru_cache(maxsize=1)
def never_issued_valid_numbers() -> np.ndarray:
    """Every valid NHS number of the never-issued 999 range (909,091 of them), ascending."""
    prefixes = 999_000_000 + np.arange(1_000_000, dtype=np.int64)
    checks = check_digits(prefixes)
    valid = prefixes[checks >= 0] * 10 + checks[checks >= 0]
    valid.setflags(write=False)
    return valid


def never_issued_nhs_numbers(count: int, rng: np.random.Generator) -> np.ndarray:
    """`count` distinct valid NHS numbers from the never-issued 999 range, as int64, in random order.

    Asking for more than the range holds is an error, not a silent reuse.
    """
    valid = never_issued_valid_numbers()
    if count > valid.size:
        raise ValueError(f"the test range holds {valid.size:,} valid NHS numbers; {count:,} requested")
    return rng.permutation(valid)[:count]


def postcode_district(raw: str | None) -> str | None:
    """Outward code (postcode district) of a valid postcode, else None."""
    if raw is None:
        return None
    text = re.sub(r"\s+", " ", raw.strip().upper())
    match = POSTCODE_RE.match(text) or PSEUDO_POSTCODE_RE.match(text)
    return match.group(1) if match else None
