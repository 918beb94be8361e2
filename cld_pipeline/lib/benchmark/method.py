"""The benchmark method's change log: which version of the method built each quarter's figures.

A council comparing this quarter with the last needs to know whether a move is theirs or the
method's. Every build records `METHOD_VERSION` in `benchmark.method_log` beside its quarter and
as-of date, and the dashboards show the version and what changed in it. Add an entry here, with
the version bumped, in the same commit as any change to what a figure counts.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class MethodChange:
    version: str
    released: str       # ISO date
    changes: tuple[str, ...]


CHANGES = (
    MethodChange("1.0", "2026-11-01", (
        "DHSC's CLD method for the main tables, ASCOF 2A to 3D and waiting times (provisional v1.1).",
    )),
    MethodChange("1.1", "2026-12-02", (
        "ASCOF 2A: sequels as DHSC's SQL draws them (services starting from the cluster start and ending after "
        "it, within 7 days of its end; the last-ending nested assessment or review; the cluster's own outcome "
        "only when nothing else is usable).",
        "ASCOF 2E: an invalid accommodation status is treated as unknown and inferred from services.",
        "ASCOF 3D: a client who dies on the last day of the period is counted.",
        "Waiting times: overlapping requests compared on DHSC's modified orders; requests with a blank outcome "
        "dropped.",
        "Councils without a submission are listed as such, never valued or ranked as 0, and left out of region "
        "and England figures.",
        "New tables: ASCOF exclusions, 2A outcomes, waiting times by quarter and age band, Better Care Fund "
        "metrics, data-quality benchmark, release-on-release changes, excluded submissions.",
    )),
)
METHOD_VERSION = CHANGES[-1].version


def changes_in(version: str) -> tuple[str, ...]:
    return next((c.changes for c in CHANGES if c.version == version), ())
