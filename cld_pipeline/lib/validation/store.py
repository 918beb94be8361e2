"""The validated layer's tables in the processor zone, replaced per partition in one transaction."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import duckdb
import pyarrow as pa

TABLES = ("events", "rejections", "dq_flags")


def export_raw_rows(con: duckdb.DuckDBPyConnection, submission_ids: list[str], target: Path) -> None:
    con.execute(f"COPY (SELECT * FROM raw.events WHERE submission_id IN (SELECT unnest($ids))) "
                f"TO '{target}' (FORMAT parquet)", {"ids": submission_ids})


def replace_partitions(con: duckdb.DuckDBPyConnection, submissions: list[dict], work: Path, ring=None) -> int:
    """For each of `submissions` (la_code, quarter, submission_id, summary): remove whatever an
    earlier submission of its LA-quarter left and insert this one's results (the batch's Parquet
    files in `work`), all in one transaction; then flag the rows of people under a restriction
    (`ring`: the keys to match the rights register, needed only when a restriction is active).
    Returns the rows restricted."""
    from cld_pipeline.lib.privacy.rights import ensure_restriction_column, flag_restricted

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
    ensure_usable_column(con)
    now = dt.datetime.now()
    batch = [{"submission_id": b["submission_id"], "la_code": b["la_code"], "quarter": b["quarter"],
              "raw_rows": b["summary"]["raw_rows"], "accepted_rows": b["summary"]["accepted_rows"],
              "rejected_rows": b["summary"]["rejected_rows"], "flagged_rows": b["summary"]["flagged_rows"],
              "stated_period_start": b["summary"]["stated_start"], "stated_period_end": b["summary"]["stated_end"],
              "derived_period_start": b["summary"]["derived_start"],
              "derived_period_end": b["summary"]["derived_end"], "period_differs": b["summary"]["period_differs"],
              "report_html": b["summary"]["report_html"], "report_csv": b["summary"]["report_csv"],
              "seconds": json.dumps(b["summary"]["seconds"]), "validated_at": now,
              "usable": b["summary"]["usable"]} for b in submissions]
    con.register("batch_submissions", pa.Table.from_pylist(batch))
    earlier = ("SELECT s.submission_id FROM raw.submissions s JOIN batch_submissions b "
               "ON s.la_code = b.la_code AND s.quarter = b.quarter")
    con.execute("BEGIN TRANSACTION")
    try:
        for table in TABLES + ("submissions",):
            con.execute(f"DELETE FROM validated.{table} WHERE submission_id IN ({earlier})")
        for table in TABLES:
            con.execute(f"INSERT INTO validated.{table} BY NAME "
                        f"SELECT * FROM read_parquet('{work / (table + '.parquet')}')")
        con.execute("INSERT INTO validated.submissions BY NAME SELECT * FROM batch_submissions")
        restricted = flag_restricted(con, ring, "validated.events",
                                     "submission_id IN (SELECT submission_id FROM batch_submissions)", {},
                                     "nhs_number", "la_code_of_file", "la_person_unique_identifier")
        con.execute("COMMIT")
    except BaseException:
        con.execute("ROLLBACK")
        raise
    finally:
        con.unregister("batch_submissions")
    return restricted


def ensure_usable_column(con: duckdb.DuckDBPyConnection) -> None:
    """`validated.submissions.usable`, added to stores made before batches existed."""
    con.execute("ALTER TABLE validated.submissions ADD COLUMN IF NOT EXISTS usable BOOLEAN DEFAULT true")


def unusable_submissions(con: duckdb.DuckDBPyConnection, submission_ids: list[str]) -> set[str]:
    """Which of these submissions the validated layer judged unusable (most rows rejected)."""
    ensure_usable_column(con)
    return {r[0] for r in con.execute("SELECT submission_id FROM validated.submissions WHERE NOT usable AND "
                                      "submission_id IN (SELECT unnest($ids))", {"ids": submission_ids}).fetchall()}
