"""The validated layer's tables in the processor zone, replaced per partition in one transaction."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import duckdb

TABLES = ("events", "rejections", "dq_flags")


def export_raw_rows(con: duckdb.DuckDBPyConnection, submission_id: str, target: Path) -> None:
    con.execute(f"COPY (SELECT * FROM raw.events WHERE submission_id = ? ORDER BY row_number) "
                f"TO '{target}' (FORMAT parquet)", [submission_id])


def replace_partition(con: duckdb.DuckDBPyConnection, la_code: str, quarter: str, submission_id: str,
                      work: Path, summary: dict, ring=None) -> int:
    """Remove whatever an earlier submission of this LA-quarter left, insert this one's results, and
    flag the rows of people under a restriction (`ring`: the keys to match the rights register,
    needed only when a restriction is active). Returns the rows restricted."""
    from cld_pipeline.lib.rights import ensure_restriction_column, flag_restricted

    con.execute("CREATE SCHEMA IF NOT EXISTS validated")
    for table in TABLES:
        con.execute(f"CREATE TABLE IF NOT EXISTS validated.{table} AS "
                    f"SELECT * FROM read_parquet('{work / (table + '.parquet')}') LIMIT 0")
    # Restricted rows stay stored but never leave the processor zone (privacy.md 4.3).
    ensure_restriction_column(con, "validated.events")
    con.execute("""CREATE TABLE IF NOT EXISTS validated.submissions (
        submission_id VARCHAR PRIMARY KEY, la_code VARCHAR, quarter VARCHAR, raw_rows BIGINT,
        accepted_rows BIGINT, rejected_rows BIGINT, flagged_rows BIGINT,
        stated_period_start DATE, stated_period_end DATE, derived_period_start DATE, derived_period_end DATE,
        period_differs BOOLEAN, report_html VARCHAR, report_csv VARCHAR, seconds VARCHAR, validated_at TIMESTAMP)""")
    partition = "SELECT submission_id FROM raw.submissions WHERE la_code = ? AND quarter = ?"
    con.execute("BEGIN TRANSACTION")
    try:
        for table in TABLES + ("submissions",):
            con.execute(f"DELETE FROM validated.{table} WHERE submission_id IN ({partition})", [la_code, quarter])
        for table in TABLES:
            con.execute(f"INSERT INTO validated.{table} BY NAME SELECT * FROM read_parquet('{work / (table + '.parquet')}')")
        con.execute("INSERT INTO validated.submissions VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", [
            submission_id, la_code, quarter, summary["raw_rows"], summary["accepted_rows"], summary["rejected_rows"],
            summary["flagged_rows"], summary["stated_start"], summary["stated_end"], summary["derived_start"],
            summary["derived_end"], summary["period_differs"], summary["report_html"], summary["report_csv"],
            json.dumps(summary["seconds"]), dt.datetime.now()])
        restricted = flag_restricted(con, ring, "validated.events", "submission_id = $submission_id",
                                     {"submission_id": submission_id}, "nhs_number", "la_code_of_file",
                                     "la_person_unique_identifier")
        con.execute("COMMIT")
    except BaseException:
        con.execute("ROLLBACK")
        raise
    return restricted
