"""Clerical review of probabilistic links, inside the processor zone.

The linkage step queues pairs (`linkage.review_queue`): every person with two or more patients
above the threshold, and a seeded sample of pairs near it. A reviewer exports the queue to a file
readable by its owner only, writes `match`, `non_match` or `unsure` in its `decision` column, and
records it; the decisions (`linkage.review_decisions`, who and when) are labels for the next model
and override it for their pair. Nothing about a person is decided by the model alone where a
reviewer has looked: a rejected pair is never linked, a confirmed one always is.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

import duckdb

from cld_pipeline.lib.linkage.person_links import ensure_tables

EXPORT_COLUMNS = ("pair_id", "reason", "match_probability", "council_dob", "council_sex", "council_postcode",
                  "hospital_dob", "hospital_sex", "hospital_postcode", "decision")
DECISIONS = {"match": True, "non_match": False, "unsure": None}


class ReviewError(ValueError):
    """A review file that cannot be recorded; the message names the file, row and field, never a value."""


def export_queue(con: duckdb.DuckDBPyConnection, quarter: str, path: Path) -> int:
    """The quarter's queued pairs not yet decided, as CSV with an empty `decision` column (0600)."""
    ensure_tables(con)
    rows = con.execute("""
        SELECT q.pair_id, q.reason, round(q.match_probability, 4), q.council_dob, q.council_sex, q.council_postcode,
               q.hospital_dob, q.hospital_sex, q.hospital_postcode, ''
        FROM linkage.review_queue q
        WHERE q.quarter = ? AND q.pair_id NOT IN (SELECT pair_id FROM linkage.review_decisions WHERE pair_id IS NOT NULL)
        ORDER BY q.reason, q.match_probability DESC""", [quarter]).fetchall()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(EXPORT_COLUMNS)
        writer.writerows(rows)
    os.chmod(path, 0o600)
    return len(rows)


def record_decisions(con: duckdb.DuckDBPyConnection, path: Path, reviewer: str) -> dict[str, int]:
    """Record a reviewed file. Every row is checked before anything is written: an unknown pair or
    decision refuses the whole file, naming its row and field."""
    ensure_tables(con)
    with path.open(newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        missing = [c for c in ("pair_id", "decision") if c not in (reader.fieldnames or [])]
        if missing:
            raise ReviewError(f"{path.name}: the header lacks {', '.join(missing)}.")
        rows = list(reader)
    queued = {r[0]: r[1:] for r in con.execute(
        "SELECT pair_id, la_code, la_person_id, nhs_number FROM linkage.review_queue").fetchall()}
    decided = []
    for number, row in enumerate(rows, start=2):   # row 1 is the header
        decision = (row.get("decision") or "").strip().lower()
        if not decision:
            continue
        if decision not in DECISIONS:
            raise ReviewError(f"{path.name} row {number}, field decision: not one of {', '.join(DECISIONS)}.")
        pair = (row.get("pair_id") or "").strip()
        if pair not in queued:
            raise ReviewError(f"{path.name} row {number}, field pair_id: no such pair in the review queue.")
        if DECISIONS[decision] is not None:
            decided.append((pair, *queued[pair], DECISIONS[decision], reviewer))
    con.executemany("INSERT INTO linkage.review_decisions VALUES (?, ?, ?, ?, ?, ?, now())", decided)
    return {"match": sum(1 for d in decided if d[4]), "non_match": sum(1 for d in decided if not d[4]),
            "undecided": len(rows) - len(decided)}
