"""The raw layer's tables in the processor zone: the submission ledger and every submitted row.

`raw.submissions` has one row per received file (accepted, duplicate, quarantined or superseded);
`raw.events` keeps every record of every accepted or superseded submission as submitted text. All
writes for one submission happen in one transaction, so a run killed at any point leaves the tables
as they were before it, and a re-run replaces exactly what it wrote.
"""

from __future__ import annotations

import datetime as dt
import hashlib
from dataclasses import dataclass

import duckdb
import pyarrow as pa

from cld_pipeline.spec import load_spec

ACCEPTED, DUPLICATE, QUARANTINED, SUPERSEDED = "accepted", "duplicate", "quarantined", "superseded"


def submission_id(sha256: str, file_name: str, received_at: dt.datetime) -> str:
    """Stable id of one arrival of one file: the same arrival re-run keeps its id, a renamed copy or
    the same file dropped again later gets a new one."""
    key = f"{sha256}|{file_name}|{received_at.isoformat()}"
    return hashlib.sha256(key.encode()).hexdigest()[:20]


def ensure_schema(con: duckdb.DuckDBPyConnection) -> None:
    spec = load_spec()
    con.execute("CREATE SCHEMA IF NOT EXISTS raw")
    con.execute("""
        CREATE TABLE IF NOT EXISTS raw.submissions (
            submission_id VARCHAR PRIMARY KEY,
            la_code VARCHAR,
            quarter VARCHAR,
            file_name VARCHAR NOT NULL,
            sha256 VARCHAR,
            file_size BIGINT,
            received_at TIMESTAMP NOT NULL,
            reporting_period_start DATE,
            reporting_period_end DATE,
            row_count BIGINT,
            status VARCHAR NOT NULL,
            error VARCHAR,
            superseded_by VARCHAR,
            archive_path VARCHAR,
            loaded_at TIMESTAMP
        )""")
    # Rows of people who erased or objected never land; the ledger counts them (rights register).
    con.execute("ALTER TABLE raw.submissions ADD COLUMN IF NOT EXISTS suppressed_rows BIGINT DEFAULT 0")
    columns = ",\n".join(f"{f.column} VARCHAR" for f in spec.fields)
    con.execute(f"""
        CREATE TABLE IF NOT EXISTS raw.events (
            submission_id VARCHAR NOT NULL,
            row_number BIGINT NOT NULL,
            field_count INTEGER NOT NULL,
            {columns},
            extra_values VARCHAR
        )""")


@dataclass(frozen=True)
class Receipt:
    submission_id: str
    la_code: str | None
    quarter: str | None
    file_name: str
    sha256: str | None
    file_size: int | None
    received_at: dt.datetime
    reporting_period_start: dt.date | None = None
    reporting_period_end: dt.date | None = None
    archive_path: str | None = None


def earlier_copy(con: duckdb.DuckDBPyConnection, receipt: Receipt) -> str | None:
    """The submission that already landed these bytes, if any. Runs land files in arrival order,
    so the first to land wins; re-running either arrival gives the same answer."""
    rows = con.execute("""
        SELECT submission_id FROM raw.submissions
        WHERE sha256 = ? AND submission_id <> ? AND status IN (?, ?)
        ORDER BY received_at, submission_id LIMIT 1""",
        [receipt.sha256, receipt.submission_id, ACCEPTED, SUPERSEDED]).fetchall()
    return rows[0][0] if rows else None


def _upsert(con: duckdb.DuckDBPyConnection, receipt: Receipt, status: str, rows: int | None, error: str | None) -> None:
    con.execute("DELETE FROM raw.submissions WHERE submission_id = ?", [receipt.submission_id])
    con.execute("""INSERT INTO raw.submissions (submission_id, la_code, quarter, file_name, sha256, file_size,
                       received_at, reporting_period_start, reporting_period_end, row_count, status, error,
                       superseded_by, archive_path, loaded_at, suppressed_rows)
                   VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, NULL, ?, now(), 0)""", [
        receipt.submission_id, receipt.la_code, receipt.quarter, receipt.file_name, receipt.sha256, receipt.file_size,
        receipt.received_at, receipt.reporting_period_start, receipt.reporting_period_end, rows, status, error,
        receipt.archive_path])


def record_outcome(con: duckdb.DuckDBPyConnection, receipt: Receipt, status: str, error: str | None = None) -> None:
    """A duplicate or quarantined arrival: one ledger row, nothing else."""
    con.execute("BEGIN TRANSACTION")
    try:
        _upsert(con, receipt, status, None, error)
        commit(con)
    except BaseException:
        con.execute("ROLLBACK")
        raise


def load_submission(con: duckdb.DuckDBPyConnection, receipt: Receipt, records: pa.Table, ring=None) -> tuple[str, int]:
    """Replace this submission's rows and ledger entry, leaving out the rows of people on the rights
    register's suppression list (`ring`: the keys to match it, needed only when it is not empty),
    then settle which submission of the partition is current (latest arrival wins; the rest are
    superseded). One transaction. Returns the partition's current submission id and the rows left out."""
    from cld_pipeline.lib.privacy.rights import suppress_submission

    spec = load_spec()
    con.register("incoming_records", records)
    con.execute("BEGIN TRANSACTION")
    try:
        con.execute("DELETE FROM raw.events WHERE submission_id = ?", [receipt.submission_id])
        columns = ", ".join(["row_number", "field_count", *(f.column for f in spec.fields), "extra_values"])
        con.execute(f"INSERT INTO raw.events SELECT ? AS submission_id, {columns} FROM incoming_records",
                    [receipt.submission_id])
        suppressed = suppress_submission(con, ring, receipt.submission_id, receipt.la_code)
        _upsert(con, receipt, ACCEPTED, records.num_rows, None)
        con.execute("UPDATE raw.submissions SET suppressed_rows = ? WHERE submission_id = ?",
                    [suppressed, receipt.submission_id])
        current = settle_partition(con, receipt.la_code, receipt.quarter)
        commit(con)
    except BaseException:
        con.execute("ROLLBACK")
        raise
    finally:
        con.unregister("incoming_records")
    return current, suppressed


def settle_partition(con: duckdb.DuckDBPyConnection, la_code: str, quarter: str) -> str:
    """Latest-arriving loaded submission of an LA-quarter is accepted; earlier ones superseded by it."""
    rows = con.execute("""
        SELECT submission_id FROM raw.submissions
        WHERE la_code = ? AND quarter = ? AND status IN (?, ?)
        ORDER BY received_at DESC, submission_id DESC""", [la_code, quarter, ACCEPTED, SUPERSEDED]).fetchall()
    current = rows[0][0]
    con.execute("""UPDATE raw.submissions SET status = ?, superseded_by = NULL WHERE submission_id = ?""",
                [ACCEPTED, current])
    con.execute("""UPDATE raw.submissions SET status = ?, superseded_by = ?
                   WHERE la_code = ? AND quarter = ? AND status IN (?, ?) AND submission_id <> ?""",
                [SUPERSEDED, current, la_code, quarter, ACCEPTED, SUPERSEDED, current])
    return current


def current_submission(con: duckdb.DuckDBPyConnection, la_code: str, quarter: str) -> dict | None:
    rows = con.execute("""SELECT * FROM raw.submissions WHERE la_code = ? AND quarter = ? AND status = ?""",
                       [la_code, quarter, ACCEPTED]).fetchall()
    if not rows:
        return None
    names = [d[0] for d in con.description]
    return dict(zip(names, rows[0]))


def commit(con: duckdb.DuckDBPyConnection) -> None:
    """The single point where a submission's writes become visible (fault tests interrupt here)."""
    con.execute("COMMIT")
