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

from cld_pipeline import settings
from cld_pipeline.lib.linkage.person_links import ensure_tables
from cld_pipeline.lib.linkage.probabilistic import probability_sql

EXPORT_COLUMNS = ("pair_id", "reason", "match_probability", "council_dob", "council_sex", "council_postcode",
                  "hospital_dob", "hospital_sex", "hospital_postcode", "decision")
DECISIONS = {"match": True, "non_match": False, "unsure": None}
SAMPLE = 100          # pairs near the threshold sampled for review per quarter (ambiguous people on top)
LOWEST = 0.2          # ... from this probability up to 90% of the way from the threshold to 1


class ReviewError(ValueError):
    """A review file that cannot be recorded; the message names the file, row and field, never a value."""


def folder() -> Path:
    """Where review files are exported to (processor zone; destroyed with the agreement's data)."""
    return settings.data_dir() / "linkage" / "review"


def default_path(quarter: str) -> Path:
    return folder() / f"review_{quarter}.csv"


def queue_sql(quarter: str, threshold: float, shift: float) -> str:
    """The quarter's pairs for review, from the linkage step's `scores`, `links`, `sc_people`,
    `council_people`, `patients` and `review_labels`: every ambiguous person's best pair, then a
    seeded sample of undecided pairs near the threshold."""
    weight = f"s.match_weight + {float(shift)}"
    upper = f"least({float(threshold)} + (1 - {float(threshold)}) * 0.9, 0.99999)"
    return f"""
        WITH candidates AS (
            SELECT s.sc_record_id, s.patient_record_id, {probability_sql(weight)} AS match_probability,
                   {weight} AS match_weight,
                   CASE WHEN l.decision = 'ambiguous' THEN 'ambiguous' ELSE 'near_threshold' END AS reason
            FROM scores s JOIN sc_people u ON u.record_id = s.sc_record_id AND u.role = 'unlabelled'
            LEFT JOIN links l ON l.sc_record_id = s.sc_record_id
            LEFT JOIN review_labels r ON r.sc_record_id = s.sc_record_id AND r.patient_record_id = s.patient_record_id
            WHERE r.is_match IS NULL
              AND ((l.decision = 'ambiguous' AND s.patient_record_id = l.patient_record_id)
                   OR {probability_sql(weight)} BETWEEN {LOWEST} AND {upper})
        ), picked AS (
            SELECT * FROM candidates
            QUALIFY reason = 'ambiguous'
                 OR row_number() OVER (PARTITION BY reason ORDER BY hash(sc_record_id, patient_record_id, '{quarter}'))
                    <= {SAMPLE}
        )
        SELECT substr(sha256(c.la_code || ':' || c.la_person_id || ':' || p.nhs_number || ':{quarter}'), 1, 16) AS pair_id,
               k.reason, c.la_code, c.la_person_id, p.nhs_number, k.match_probability, k.match_weight,
               c.dob AS council_dob, c.sex AS council_sex, c.postcode AS council_postcode,
               p.dob AS hospital_dob, p.sex AS hospital_sex, p.postcode AS hospital_postcode
        FROM picked k JOIN council_people c ON c.record_id = k.sc_record_id
        JOIN patients p ON p.record_id = k.patient_record_id
        ORDER BY reason, match_probability DESC"""


def scrub_exports(pair_ids: set[str]) -> int:
    """Remove these pairs (an erased person's) from every exported review file; returns rows removed.
    Each file is rewritten beside itself and swapped in, so a crash leaves the old or the new file."""
    removed = 0
    for path in sorted(folder().glob("*.csv")) if pair_ids else ():
        with path.open(newline="", encoding="utf-8") as fh:
            reader = csv.reader(fh)
            header = next(reader, None)
            rows = list(reader)
        if not header or "pair_id" not in header:
            continue
        at = header.index("pair_id")
        kept = [r for r in rows if len(r) <= at or r[at].strip() not in pair_ids]
        if len(kept) == len(rows):
            continue
        removed += len(rows) - len(kept)
        tmp = path.with_name(f".{path.name}.partial")
        _write_owner_only(tmp, header, kept)
        tmp.replace(path)
    return removed


def _write_owner_only(path: Path, header, rows) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        writer.writerows(rows)
    os.chmod(path, 0o600)


def export_queue(con: duckdb.DuckDBPyConnection, quarter: str, path: Path) -> int:
    """The quarter's queued pairs not yet decided, as CSV with an empty `decision` column (0600)."""
    ensure_tables(con)
    rows = con.execute("""
        SELECT q.pair_id, q.reason, round(q.match_probability, 4), q.council_dob, q.council_sex, q.council_postcode,
               q.hospital_dob, q.hospital_sex, q.hospital_postcode, ''
        FROM linkage.review_queue q
        WHERE q.quarter = ? AND q.pair_id NOT IN (SELECT pair_id FROM linkage.review_decisions WHERE pair_id IS NOT NULL)
        ORDER BY q.reason, q.match_probability DESC""", [quarter]).fetchall()
    _write_owner_only(path, EXPORT_COLUMNS, rows)
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
