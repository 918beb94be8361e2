"""England's 153 councils with adult social services responsibilities (2025/26 geography).

`local_authorities.csv` is a copy of `shared/reference/local_authorities.csv` (a test keeps the two
identical). Everything that names an LA or a region reads it through this module.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

LA_CSV = Path(__file__).with_name("local_authorities.csv")
ENGLAND_CODE = "E92000001"
ENGLAND_NAME = "England"


@dataclass(frozen=True)
class LocalAuthority:
    cld_la_code: str | None  # 3-digit CASSR code; None for the 9 councils reorganised since 2019
    ons_code: str
    name: str
    region_code: str
    region_name: str
    population_18_plus: int
    population_65_plus: int

    @property
    def submission_code(self) -> str:
        """The LA_Code this council writes in its files: CASSR code, else its ONS code."""
        return self.cld_la_code or self.ons_code


class LocalAuthorities:
    """Lookup by either code scheme; iteration in ONS-code order."""

    def __init__(self, councils: list[LocalAuthority]):
        self._councils = councils
        self._by_code: dict[str, LocalAuthority] = {}
        for la in councils:
            self._by_code[la.ons_code] = la
            if la.cld_la_code:
                self._by_code[la.cld_la_code] = la

    def __iter__(self):
        return iter(self._councils)

    def __len__(self) -> int:
        return len(self._councils)

    def get(self, code: str | None) -> LocalAuthority | None:
        """Match a submitted LA_Code against the CASSR code or the ONS code (trimmed, any case)."""
        if code is None:
            return None
        return self._by_code.get(code.strip().upper())

    def __getitem__(self, code: str) -> LocalAuthority:
        la = self.get(code)
        if la is None:
            raise KeyError(f"{code!r} is not an English council with adult social services responsibilities")
        return la

    @property
    def regions(self) -> dict[str, str]:
        """Region code -> region name, in code order."""
        return dict(sorted({(la.region_code, la.region_name) for la in self._councils}))


@lru_cache(maxsize=1)
def load_local_authorities() -> LocalAuthorities:
    with LA_CSV.open(newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    return LocalAuthorities(
        [
            LocalAuthority(
                cld_la_code=row["cld_la_code"] or None,
                ons_code=row["ons_code"],
                name=row["name"],
                region_code=row["region_code"],
                region_name=row["region_name"],
                population_18_plus=int(row["population_18_plus"]),
                population_65_plus=int(row["population_65_plus"]),
            )
            for row in rows
        ]
    )
