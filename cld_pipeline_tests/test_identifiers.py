"""NHS number modulus-11 rule and postcode format (privacy.md 1.3 and 1.4)."""

import numpy as np
from hypothesis import given, strategies as st

from cld_pipeline.lib.privacy.identifiers import (
    check_digits, is_valid_nhs_number, nhs_check_digit, nhs_number_problem, postcode_district,
    never_issued_nhs_numbers, never_issued_valid_numbers,
)


def test_known_valid_and_invalid_numbers():
    assert is_valid_nhs_number("943 476 5919")
    assert is_valid_nhs_number("943-476-5919")
    assert nhs_number_problem("987 654 4321") == "fails the modulus-11 check digit"
    assert nhs_number_problem("9434765918") == "fails the modulus-11 check digit"
    assert nhs_number_problem("1111111111") == "all digits the same"
    assert nhs_number_problem("") == "missing"
    assert nhs_number_problem(None) == "missing"
    assert nhs_number_problem("94347659") == "not 10 digits"
    assert nhs_number_problem("94347659A9") == "not 10 digits"


def test_remainder_ten_has_no_valid_number():
    # 000000006: S = 6*2 = 12, 12 mod 11 = 1, 11 - 1 = 10 -> no valid check digit
    assert nhs_check_digit("000000006") is None
    assert check_digits(np.array([6]))[0] == -1


@given(st.integers(min_value=0, max_value=999_999_999))
def test_vectorised_check_digit_matches_scalar(prefix):
    scalar = nhs_check_digit(f"{prefix:09d}")
    assert check_digits(np.array([prefix]))[0] == (-1 if scalar is None else scalar)


@given(st.integers(min_value=100_000_000, max_value=999_999_999), st.integers(min_value=1, max_value=9))
def test_only_the_check_digit_validates(prefix, shift):
    check = nhs_check_digit(str(prefix))
    if check is None:
        assert not any(is_valid_nhs_number(f"{prefix}{d}") for d in range(10))
        return
    number = f"{prefix}{check}"
    assert is_valid_nhs_number(number) == (len(set(number)) > 1)
    assert not is_valid_nhs_number(f"{prefix}{(check + shift) % 10}")


def test_test_range_numbers_are_valid_distinct_and_never_issued():
    numbers = never_issued_nhs_numbers(5000, np.random.default_rng(1))
    assert len(set(numbers.tolist())) == 5000
    assert all(str(n).startswith("999") and is_valid_nhs_number(str(n)) for n in numbers)
    assert never_issued_valid_numbers().size == 909_091


def test_postcode_district():
    assert postcode_district("sw1a 1aa") == "SW1A"
    assert postcode_district("M1 1AE") == "M1"
    assert postcode_district("B33 8TH") == "B33"
    assert postcode_district("B338TH") == "B33"
    assert postcode_district("ZZ99 3VZ") == "ZZ99"   # NHS pseudo-postcode: valid format
    assert postcode_district("B33 8CH") is None       # C never in the inward unit
    assert postcode_district("not a postcode") is None
    assert postcode_district(None) is None
