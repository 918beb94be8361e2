"""Is every accepted submission's chain whole? Read from the ledgers, not from the landing folder.

A submission's chain is raw -> validated -> pseudonymised. Each layer writes its ledger row in the
same transaction as its rows, or after them (raw.submissions, validated.submissions,
pseudonymised.submissions), so a ledger row is proof that the layer's rows are there. A run killed
at any moment, or stopped by a full disk, leaves a current submission whose later ledgers lack it:
that is a gap, and `cld-pipeline run` (and the recovery sensor) finish it.

An unusable submission (most rows rejected) ends at the validated layer by design: its chain is
whole without pseudonymised rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import duckdb

from cld_pipeline.lib.validation.store import ensure_usable_column
from cld_pipeline.lib.warehouse import table_exists


@dataclass(frozen=True)
class Gap:
    la_code: str
    quarter: str
    submission_id: str
    missing: str          # the first layer without it: "validated" or "pseudonymised"

    def __str__(self) -> str:
        return f"{self.quarter} x {self.la_code}: submission {self.submission_id} not yet {self.missing}"


def _exists(con: duckdb.DuckDBPyConnection, schema: str, table: str) -> bool:
    # The connection's own database only: another may be attached beside it.
    return table_exists(con, schema, table, con.execute("SELECT current_database()").fetchall()[0][0])


def processor_state(con: duckdb.DuckDBPyConnection) -> list[tuple[str, str, str, bool | None]]:
    """Current accepted submissions (la_code, quarter, submission_id, usable) from identifiable.duckdb;
    `usable` is None when the validated layer has no row for the submission yet."""
    if not _exists(con, "raw", "submissions"):
        return []
    if not _exists(con, "validated", "submissions"):
        return [(la, q, s, None) for la, q, s in con.execute(
            "SELECT la_code, quarter, submission_id FROM raw.submissions WHERE status = 'accepted'").fetchall()]
    ensure_usable_column(con)
    return con.execute("""
        SELECT r.la_code, r.quarter, r.submission_id, CASE WHEN v.submission_id IS NOT NULL THEN v.usable END
        FROM raw.submissions r LEFT JOIN validated.submissions v USING (submission_id)
        WHERE r.status = 'accepted' ORDER BY r.quarter, r.la_code""").fetchall()


def pseudonymised_submissions(con: duckdb.DuckDBPyConnection) -> set[str]:
    """Submissions the analysts' zone holds (analytics.duckdb's pseudonymised.submissions)."""
    if not _exists(con, "pseudonymised", "submissions"):
        return set()
    return {r[0] for r in con.execute("SELECT submission_id FROM pseudonymised.submissions").fetchall()}


def gaps(state: list[tuple[str, str, str, bool | None]], pseudonymised: set[str]) -> list[Gap]:
    out = []
    for la, quarter, submission, usable in state:
        if usable is None:
            out.append(Gap(la, quarter, submission, "validated"))
        elif usable and submission not in pseudonymised:
            out.append(Gap(la, quarter, submission, "pseudonymised"))
    return out
