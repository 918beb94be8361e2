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
class GeneratorConfig:
    scale: Scale = "small"
    seed: int = 20251
    quarters: int = 1                          # consecutive quarterly submissions per LA
    period_end: dt.date = DEFAULT_PERIOD_END   # reporting period end of the latest quarter
    defects: DefectRates = field(default_factory=DefectRates)
    resubmission_share: float = 0.05           # share of LA-quarters that send a corrected file
    hospital: bool = True
    la_codes: tuple[str, ...] | None = None    # restrict to these councils (overrides the scale's count)
    rows_per_quarter: int | None = None        # override the scale's volume

    @property
    def target_rows(self) -> int:
        return self.rows_per_quarter or SCALES[self.scale].rows_per_quarter
