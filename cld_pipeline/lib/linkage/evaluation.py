"""Precision and recall of the probabilistic links against the synthetic generator's truth.

Only synthetic collections have a truth (`synthetic/truth_people.parquet`: each person's LA code,
LA person id, real NHS number, whether the council recorded it, how the hospital's record of them
differs). A pair is *findable* when the council recorded no NHS number for the person in the
quarter's data and the person is a patient in the hospital extracts held.
"""

from __future__ import annotations

from pathlib import Path

import duckdb


def evaluate(con: duckdb.DuckDBPyConnection, truth_people: Path, quarter: str) -> dict:
    """`con` is identifiable.duckdb (processor zone). Returns counts, precision and recall in total
    and by the kind of difference between the council's and the hospital's record."""
    con.execute(f"CREATE OR REPLACE TEMP TABLE truth AS SELECT * FROM read_parquet('{truth_people}')")
    con.execute("""CREATE OR REPLACE TEMP TABLE quarter_people AS
                   SELECT s.la_code, trim(v.la_person_unique_identifier) AS la_person_id,
                          bool_or(v.nhs_number IS NOT NULL) AS any_number
                   FROM validated.events v JOIN raw.submissions s USING (submission_id)
                   WHERE s.quarter = ? AND s.status = 'accepted' GROUP BY ALL""", [quarter])
    rows = con.execute("""
        WITH patients AS (SELECT DISTINCT nhs_number FROM validated.hospital_episodes WHERE nhs_number IS NOT NULL),
        findable AS (
            SELECT t.la_code, t.la_person_id, t.nhs_number, t.hospital_noise
            FROM quarter_people q JOIN truth t USING (la_code, la_person_id)
            WHERE NOT q.any_number AND t.nhs_number IN (SELECT nhs_number FROM patients)
        ), links AS (
            SELECT l.la_code, l.la_person_id, l.nhs_number AS linked, t.nhs_number AS true_number,
                   coalesce(t.hospital_noise, 'unknown') AS hospital_noise
            FROM linkage.person_links l LEFT JOIN truth t USING (la_code, la_person_id)
            WHERE l.quarter = ? AND l.link_method = 'probabilistic'
        )
        SELECT kind, sum(findable)::BIGINT, sum(links)::BIGINT, sum(correct)::BIGINT FROM (
            SELECT hospital_noise AS kind, 1 AS findable, 0 AS links, 0 AS correct FROM findable
            UNION ALL
            SELECT hospital_noise, 0, 1, (linked = true_number)::INT FROM links
        ) GROUP BY ROLLUP (kind) ORDER BY kind NULLS FIRST""", [quarter]).fetchall()
    out = {}
    for kind, findable, links, correct in rows:
        out[kind or "total"] = {"findable": findable, "links": links, "correct": correct,
                                "precision": round(correct / links, 5) if links else None,
                                "recall": round(correct / findable, 5) if findable else None}
    return out
