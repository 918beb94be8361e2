"""Generator settings: scales, quarters and defect rates."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field, replace
from typing import Literal

Scale = Literal["tiny", "small", "national"]

# Service users simulated per target submitted row (all quarters' files together). Measured on the
# generator itself (about 3.6 rows per person in one rolling 12-month file); used to size the
# population so that a scale gives roughly its target volume.
ROWS_PER_PERSON = 3.6


@dataclass(frozen=True)
class ScaleSpec:
    rows_per_quarter: int   # target submitted rows in one quarter, all LAs together
    la_count: int | None    # None = all 153 councils


SCALES: dict[str, ScaleSpec] = {
    "tiny": ScaleSpec(rows_per_quarter=12_000, la_count=6),
    "small": ScaleSpec(rows_per_quarter=250_000, la_count=None),
    "national": ScaleSpec(rows_per_quarter=8_000_000, la_count=None),
}

# Default reporting period end of the latest quarter: fixed, so that a seed alone decides the output.
DEFAULT_PERIOD_END = dt.date(2026, 9, 30)


@dataclass(frozen=True)
class DefectRates:
    """Share of submitted rows receiving each defect (one defect per row at most).

    `expected` in the manifest says what the validation layer must do with it: `reject` (fatal),
    `flag` (kept with a data-quality flag, value mapped or treated as missing), or `normalise`
    (kept, silently normalised: spaces and case).
    """

    invalid_code: float = 0.004
    release1_value: float = 0.004
    case_whitespace: float = 0.002
    null_literal: float = 0.001
    mandatory_blank: float = 0.001
    missing_nhs_number: float = 0.002
    invalid_nhs_number: float = 0.001
    missing_identifiers: float = 0.0005
    bad_date: float = 0.0005
    missing_start_date: float = 0.0003
    reversed_dates: float = 0.0005
    open_request: float = 0.0005
    unknown_event_type: float = 0.0003
    wrong_la_code: float = 0.0003
    future_date: float = 0.0003
    event_after_death: float = 0.0003
    formula_string: float = 0.0003
    stray_encoding: float = 0.0003

    def scaled(self, factor: float) -> "DefectRates":
        return replace(self, **{k: v * factor for k, v in self.__dict__.items()})

    def items(self):
        return self.__dict__.items()


@dataclass(frozen=True)
class LinkageNoise:
    """How the hospital's record of a person differs from the council's, for probabilistic linkage.

    `nhs_unrecorded` is the mean share of people who have an NHS number (the hospital extract
    carries it) that their council did not record; each council's share varies around it with
    coefficient of variation `council_spread`. The other rates are shares of people whose hospital
    record differs in one way (at most one each): date of birth with day and month swapped (only
    possible when the day is 12 or less and differs from the month), one digit of the date of
    birth mistyped, a postcode that changed on a move, sex not recorded.
    """

    nhs_unrecorded: float = 0.05
    council_spread: float = 0.5
    dob_day_month_swap: float = 0.01
    dob_digit_error: float = 0.01
    postcode_moved: float = 0.05
    sex_unrecorded: float = 0.02


@dataclass(frozen=True)
class GeneratorConfig:
    scale: Scale = "small"
    seed: int = 20251
    quarters: int = 1                          # consecutive quarterly submissions per LA
    period_end: dt.date = DEFAULT_PERIOD_END   # reporting period end of the latest quarter
    defects: DefectRates = field(default_factory=DefectRates)
    resubmission_share: float = 0.05           # share of LA-quarters that send a corrected file
    hospital: bool = True
    linkage: LinkageNoise = field(default_factory=LinkageNoise)
    la_codes: tuple[str, ...] | None = None    # restrict to these councils (overrides the scale's count)
    rows_per_quarter: int | None = None        # override the scale's volume

    @property
    def target_rows(self) -> int:
        return self.rows_per_quarter or SCALES[self.scale].rows_per_quarter


# --- Calibration -----------------------------------------------------------------------------------
#
# What the generator aims at, so that on synthetic data every ASCOF measure and waiting time lands in
# a plausible range and each branch of a measure shows (docs/synthetic-data.md, "Calibration").
# Published England figures, with their source; `target` is what the generator is tuned to and
# `tolerance` what the generator tests accept on the small test collections (which are noisy).
#
#   2A  short-term support (reablement) with no further request for ongoing support:
#       79.5% 2019-20, 74.9% 2020-21 (then numbered 2D, "outcome of short-term services: sequel to
#       service"; NHS Digital, Measures from the ASCOF, England 2020-21); about 75-80% for 2023-24
#       and 2024-25 (CLD-derived, DHSC, Measures from ASCOF, England: 2024 to 2025; figure not
#       retrievable here, range as briefed).
#   2B  new permanent admissions to residential and nursing care, 18-64, per 100,000: 14.1 2014-15,
#       12.8 2016-17, 14.6 2019-20 (Nuffield Trust QualityWatch "Admissions to care homes", from
#       NHS Digital ASCOF); about 14 since.
#   2C  the same, 65 and over: 659 2014-15, 584 2019-20, 498 2020-21 (same source); about 550-570
#       for 2023-24 (as briefed, not verified here).
#   2D  older people still at home 91 days after discharge into reablement: about 82% 2011-12 to
#       2019-20, 82.0% 2019-20, 79.1% 2020-21 (NHS Digital ASCOF 2020-21, then 2B(1); QualityWatch).
#   2E  adults with a learning disability (18-64) living in their own home or with family:
#       77.3% 2019-20 (England comparator quoted by Shropshire Council's performance page), 78% 2020-21,
#       79% 2021-22 (QualityWatch, from NHS Digital ASCOF 1G); about 80-81% for 2023-24 (as briefed).
#   3D-1a self-directed support, clients: about 92-93% (as briefed; SALT LTS001b definition, NHS
#       England "SALT data sources for ASCOF 2023-24", measure 3D).
#   3D-2a direct payments, clients: 26.2% 2022-23, 25.5% 2023-24; 37% of 18-64 and 14% of 65+
#       (People Places Lives, "Direct Payments Analysis 2023/24", from NHS Digital's published data).
#   3D-1b / 3D-2b self-directed support / direct payments, carers: about 89% and 76% (as briefed:
#       3D-1b 88-99%, 3D-2b 75-77%; not verified here).
#   Waiting times (DHSC's CLD waiting-time statistics are announced for 2026-27 and not yet
#       published): request to assessment median 27 days 2022-23 and 41 days 2021-22 (Wokingham
#       Borough Council FOI answer); mean 26-34 days request to assessment and 13-27 days assessment
#       to service 2015-16 to 2018-19 (Devon County Council FOI answers). Briefed: median request to
#       assessment about 20-30 days, assessment to service about 10-30 days.
#
# 2B and 2C are rates per ONS population, so on synthetic data they scale with the volume: the
# national scale (8 million rows a quarter, about the real collection) gives the real rate, and a
# smaller scale gives it times rows_per_quarter / 8 million.
NATIONAL_ROWS_PER_QUARTER = SCALES["national"].rows_per_quarter


@dataclass(frozen=True)
class Target:
    target: float
    tolerance: float   # accepted distance on the tiny test collections


PUBLISHED_TARGETS: dict[str, Target] = {
    "ascof_2a": Target(77.0, 9.0),
    "ascof_2b": Target(14.0, 8.0),          # per 100,000 at national volume
    "ascof_2c": Target(560.0, 160.0),       # per 100,000 at national volume
    "ascof_2d": Target(82.0, 8.0),
    "ascof_2e_ld": Target(80.5, 9.0),
    "ascof_3d_1a": Target(92.5, 4.0),
    "ascof_3d_2a": Target(25.5, 6.0),
    "ascof_3d_1b": Target(89.0, 9.0),
    "ascof_3d_2b": Target(76.0, 12.0),
    "median_request_to_assessment": Target(25.0, 8.0),   # days
    "median_assessment_to_service": Target(20.0, 10.0),  # days
}
