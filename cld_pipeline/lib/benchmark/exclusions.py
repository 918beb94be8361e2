"""The operator's list of excluded submissions (DHSC's import blacklist and manual overrides).

DHSC leaves some imports out of its tables by hand: a file sent to the wrong collection, a council's
test upload, a submission the council has asked to withdraw. Here the list is
`benchmark.excluded_submissions` in the analysts' zone (a submission id, its council and quarter,
the reason and who decided; never a submitted value). Submission selection (lib/benchmark/dhsc.py,
method 2) never chooses a listed file, so the council's previous file covers it when there is one;
the dashboards show each excluded submission with its reason. Every change is in the audit log.
"""

from __future__ import annotations

import datetime as dt

import duckdb

from cld_pipeline.lib.privacy.rights import RightsError, check_free_text
from cld_pipeline.lib.warehouse import table_exists

TABLE = "benchmark.excluded_submissions"


class ExclusionError(ValueError):
    """An exclusion that cannot be made, in plain words."""


def ensure_schema(con: duckdb.DuckDBPyConnection) -> None:
    con.execute("CREATE SCHEMA IF NOT EXISTS benchmark")
    con.execute(f"""CREATE TABLE IF NOT EXISTS {TABLE} (
        submission_id VARCHAR PRIMARY KEY, la_code VARCHAR NOT NULL, quarter VARCHAR, reason VARCHAR NOT NULL,
        excluded_by VARCHAR NOT NULL, excluded_at TIMESTAMP NOT NULL)""")


def exclude(con: duckdb.DuckDBPyConnection, submission_id: str, reason: str, excluded_by: str) -> dict:
    """List a received submission as excluded (replacing an earlier reason). The reason is shown to
    councils, so it is checked like every free text that is kept: no identifier in it."""
    try:
        reason = check_free_text("The reason", reason)
        excluded_by = check_free_text("Who decided", excluded_by)
    except RightsError as err:
        raise ExclusionError(str(err)) from None
    ensure_schema(con)
    found = con.execute("SELECT la_code, quarter FROM pseudonymised.submissions WHERE submission_id = ?",
                        [submission_id]).fetchall() if table_exists(con, "pseudonymised", "submissions") else []
    if not found:
        raise ExclusionError(f"No submission {submission_id!r} has reached the analysts' zone: check the id in "
                             "`cld-pipeline exclude list --received` (or the raw_submission partitions in the UI).")
    la_code, quarter = found[0]
    row = {"submission_id": submission_id, "la_code": la_code, "quarter": quarter, "reason": reason,
           "excluded_by": excluded_by, "excluded_at": dt.datetime.now(dt.timezone.utc).replace(tzinfo=None, microsecond=0)}
    con.execute(f"INSERT OR REPLACE INTO {TABLE} VALUES ($submission_id, $la_code, $quarter, $reason, $excluded_by, "
                "$excluded_at)", row)
    return row


def include(con: duckdb.DuckDBPyConnection, submission_id: str) -> bool:
    """Take a submission off the list; False when it was not on it."""
    ensure_schema(con)
    return bool(con.execute(f"DELETE FROM {TABLE} WHERE submission_id = ? RETURNING 1", [submission_id]).fetchall())


def listing(con: duckdb.DuckDBPyConnection) -> list[dict]:
    ensure_schema(con)
    cur = con.execute(f"SELECT * FROM {TABLE} ORDER BY la_code, quarter, submission_id")
    names = [d[0] for d in cur.description]
    return [dict(zip(names, r)) for r in cur.fetchall()]


def received(con: duckdb.DuckDBPyConnection) -> list[dict]:
    """Submissions that could be listed: the analysts' zone ledger, newest first."""
    if not table_exists(con, "pseudonymised", "submissions"):
        return []
    cur = con.execute("SELECT submission_id, la_code, quarter, received_at, status FROM pseudonymised.submissions "
                      "ORDER BY received_at DESC, submission_id")
    names = [d[0] for d in cur.description]
    return [dict(zip(names, r)) for r in cur.fetchall()]
