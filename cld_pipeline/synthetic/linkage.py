"""What probabilistic linkage has to find: NHS numbers councils did not record, and the ways a
hospital's record of a person differs from the council's (`LinkageNoise` in config.py).

Drawn from their own random stream (`linkage_rng`), so changing a linkage rate never changes the
social care journeys themselves.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from cld_pipeline.synthetic.config import LinkageNoise
from cld_pipeline.synthetic.simulate import EPOCH, People

NOISE_KINDS = ("none", "dob_day_month_swap", "dob_digit_error", "postcode_moved", "sex_unrecorded")


def linkage_rng(seed: int) -> np.random.Generator:
    return np.random.default_rng([seed, 19])


def prioritise_nhs_numbers(people: People, hospital_person: np.ndarray, rng: np.random.Generator) -> int:
    """Give test-range NHS numbers to people with hospital activity first.

    The never-issued range holds about 909,000 valid numbers; above that, people go without one. A
    person without a number never appears in a hospital extract, so numbers held by people with no
    hospital activity pass to people with some who lack one. Returns how many numbers moved (none
    below national scale, where everybody has a number).
    """
    numbers = people.nhs_number
    active = np.zeros(numbers.size, dtype=bool)
    active[hospital_person] = True
    needy = np.flatnonzero(active & (numbers == 0))
    if needy.size == 0:
        return 0
    donors = rng.permutation(np.flatnonzero(~active & (numbers > 0)))
    moved = min(needy.size, donors.size)
    numbers[needy[:moved]] = numbers[donors[:moved]]
    numbers[donors[:moved]] = 0
    return int(moved)


def nhs_recorded(people: People, council_count: int, noise: LinkageNoise, rng: np.random.Generator) -> np.ndarray:
    """Whether each person's council records their NHS number: not for a share of those who have
    one, that share varying between councils (gamma-distributed around the mean)."""
    if noise.nhs_unrecorded <= 0:
        return people.nhs_number > 0
    shape = 1 / max(noise.council_spread, 1e-6) ** 2
    share = np.clip(noise.nhs_unrecorded * rng.gamma(shape, 1 / shape, council_count), 0, 0.9)
    unrecorded = rng.random(people.nhs_number.size) < share[people.la_idx]
    return (people.nhs_number > 0) & ~unrecorded


@dataclass
class HospitalView:
    """A person as the hospital records them (index = person)."""

    dob: np.ndarray                 # days since the epoch
    gender: np.ndarray              # gender positions; -1 = sex not recorded
    postcode_district: np.ndarray
    postcode_sector: np.ndarray
    postcode_unit: np.ndarray
    noise: np.ndarray               # positions in NOISE_KINDS


def _ymd(days: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    d = (np.datetime64(EPOCH, "D") + days.astype("timedelta64[D]"))
    y = d.astype("datetime64[Y]").astype(np.int64) + 1970
    m = d.astype("datetime64[M]").astype(np.int64) % 12 + 1
    day = (d - d.astype("datetime64[M]")).astype(np.int64) + 1
    return y, m, day


def _days(y: np.ndarray, m: np.ndarray, d: np.ndarray) -> np.ndarray:
    months = ((y - 1970) * 12 + (m - 1)).astype("datetime64[M]")
    return ((months.astype("datetime64[D]") + (d - 1).astype("timedelta64[D]"))
            - np.datetime64(EPOCH, "D")).astype(np.int32)


def _days_in_month(y: np.ndarray, m: np.ndarray) -> np.ndarray:
    start = ((y - 1970) * 12 + (m - 1)).astype("datetime64[M]")
    return ((start + 1).astype("datetime64[D]") - start.astype("datetime64[D]")).astype(np.int64)


def hospital_view(people: People, noise: LinkageNoise, rng: np.random.Generator) -> HospitalView:
    n = len(people)
    dob = people.dob.copy()
    gender = people.coded["Gender"].astype(np.int16).copy()
    district, sector, unit = (people.postcode_district.copy(), people.postcode_sector.copy(),
                              people.postcode_unit.copy())
    kind = np.zeros(n, dtype=np.int8)
    u = rng.random(n)
    edges = np.cumsum([noise.dob_day_month_swap, noise.dob_digit_error, noise.postcode_moved, noise.sex_unrecorded])
    drawn = np.searchsorted(edges, u, side="right") + 1     # 1..4, 5 = none
    y, m, d = _ymd(dob)

    swap = (drawn == 1) & (d <= 12) & (d != m)
    dob[swap] = _days(y[swap], d[swap], m[swap])
    kind[swap] = 1

    digit = np.flatnonzero(drawn == 2)
    if digit.size:
        yd, md, dd = y[digit], m[digit], d[digit]
        tens, ones = dd // 10, dd % 10
        new_ones = (ones + rng.integers(1, 10, digit.size)) % 10
        new_day = tens * 10 + new_ones
        ok = (new_day >= 1) & (new_day <= _days_in_month(yd, md))
        # When the day cannot take another last digit, the year's last digit is mistyped instead.
        new_year = np.where(ok, yd, yd - yd % 10 + (yd % 10 + rng.integers(1, 10, digit.size)) % 10)
        new_day = np.where(ok, new_day, np.minimum(dd, _days_in_month(new_year, md)))
        dob[digit] = _days(new_year, md, new_day)
        kind[digit] = 2

    # Most moves are short: half stay in the postcode sector, three in ten in the district, the rest
    # go elsewhere in the council's area. Every move changes the unit at least.
    moved = np.flatnonzero(drawn == 3)
    reach = rng.random(moved.size)
    far, mid = moved[reach >= 0.8], moved[(reach >= 0.5) & (reach < 0.8)]
    district[far] = (district[far] - 1 + rng.integers(1, 29, far.size)) % 29 + 1
    sector[mid] = (sector[mid] + rng.integers(1, 10, mid.size)) % 10
    sector[far] = rng.integers(0, 10, far.size)
    unit[moved] = (unit[moved] + rng.integers(1, 400, moved.size)) % 400
    kind[moved] = 3

    unrecorded = drawn == 4
    gender[unrecorded] = -1
    kind[unrecorded] = 4
    return HospitalView(dob=dob, gender=gender, postcode_district=district, postcode_sector=sector,
                        postcode_unit=unit, noise=kind)
