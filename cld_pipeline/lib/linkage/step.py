"""One quarter's probabilistic linkage step, without Dagster (the asset is `defs/linked/probabilistic.py`).

1. `export_inputs`: from identifiable.duckdb, the quarter's council people (with their role), the
   hospital patients and the reviewers' decisions, to parquet in a scratch folder;
2. `link_quarter`: on a scratch connection, the model trained, the people decided, the review
   queue sampled (`links.parquet`, `review.parquet`);
3. `store`: the quarter's model, links and review queue replace the old ones in one transaction,
   and the model's JSON is written beside them (owner-only);
4. `rekey_rows` then `apply_to_analysts_zone`: the quarter's rows without an NHS number get the
   person token, `link_method` and `match_probability` the pseudonymised layer would give them.

Each step writes whole files or commits whole transactions, so a step killed half-way leaves the
tables of the last complete run, and a re-run the tables of a clean run.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import duckdb

from cld_pipeline import settings
from cld_pipeline.lib.linkage import probabilistic as method
from cld_pipeline.lib.linkage import review
from cld_pipeline.lib.linkage.person_links import (
    ensure_link_columns,
    ensure_tables,
    linked_person_select,
    links_join_sql,
)
from cld_pipeline.lib.privacy import rights
from cld_pipeline.lib.warehouse import table_exists, transaction

MIN_LABELLED = 50     # labelled people needed for training, and again for the held-out judgement


@dataclass
class Outcome:
    quarter: str
    model: method.Model | None
    counts: dict
    why_not: str | None       # why no model was trained (None when one was)

    @property
    def model_id(self) -> str:
        """Named by its content: the same data gives the same model, and a re-run the same tables."""
        digest = hashlib.sha256(self.model.to_json().encode()).hexdigest()[:12] if self.model else "none"
        return f"{self.quarter}-{digest}"


def models_dir() -> Path:
    return settings.data_dir() / "linkage" / "models"


def register_submissions(con: duckdb.DuckDBPyConnection, submissions: list[tuple[str, str]]) -> None:
    """Temp table `quarter_submissions` (la_code, submission_id): the quarter's usable submissions."""
    con.execute("CREATE OR REPLACE TEMP TABLE quarter_submissions (la_code VARCHAR, submission_id VARCHAR)")
    con.executemany("INSERT INTO quarter_submissions VALUES (?, ?)", [list(s) for s in submissions])


def export_inputs(con: duckdb.DuckDBPyConnection, scratch: Path, submissions: list[tuple[str, str]]) -> bool:
    """people.parquet, patients.parquet (when hospital data is held) and decisions.parquet; returns
    whether hospital data is held. People under restriction stay out."""
    ensure_tables(con)
    register_submissions(con, submissions)
    for table in ("validated.events", "validated.hospital_episodes"):
        if table_exists(con, *table.split(".")):
            rights.ensure_restriction_column(con, table)
    con.execute(f"COPY ({method.roles_sql(f'({method.social_care_people_sql()})')}) "
                f"TO '{scratch / 'people.parquet'}' (FORMAT parquet)")
    hospital_held = table_exists(con, "validated", "hospital_episodes")
    if hospital_held:
        con.execute(f"COPY ({method.patients_sql()}) TO '{scratch / 'patients.parquet'}' (FORMAT parquet)")
    con.execute(f"COPY (SELECT la_code, la_person_id, nhs_number, arg_max(is_match, decided_at) AS is_match "
                f"FROM linkage.review_decisions GROUP BY ALL) TO '{scratch / 'decisions.parquet'}' (FORMAT parquet)")
    return hospital_held


def link_quarter(work: duckdb.DuckDBPyConnection, scratch: Path, quarter: str, hospital_held: bool) -> Outcome:
    """Train, score and decide on the scratch copies; writes links.parquet and review.parquet."""
    # Stored in record-id order: nothing downstream depends on the order the inputs were written in.
    work.execute(f"CREATE TABLE council_people AS SELECT row_number() OVER (ORDER BY la_code, la_person_id) AS record_id, * "
                 f"FROM read_parquet('{scratch / 'people.parquet'}') ORDER BY record_id")
    if hospital_held:
        work.execute(f"CREATE TABLE patients AS SELECT row_number() OVER (ORDER BY nhs_number) AS record_id, * "
                     f"FROM read_parquet('{scratch / 'patients.parquet'}') WHERE dob IS NOT NULL ORDER BY record_id")
    else:
        work.execute("CREATE TABLE patients (record_id BIGINT, nhs_number VARCHAR, dob DATE, sex VARCHAR, postcode VARCHAR)")
    work.execute("""CREATE TABLE sc_people AS SELECT record_id, dob, sex, postcode, role,
                    CASE WHEN role <> 'unlabelled' THEN nhs_number END AS nhs_number
                    FROM council_people WHERE role IS NOT NULL ORDER BY record_id""")
    work.execute(f"""CREATE TEMP TABLE review_labels AS
                     SELECT c.record_id AS sc_record_id, p.record_id AS patient_record_id, d.is_match
                     FROM read_parquet('{scratch / 'decisions.parquet'}') d
                     JOIN council_people c ON c.la_code = d.la_code AND c.la_person_id = d.la_person_id
                     JOIN patients p ON p.nhs_number = d.nhs_number""")
    counts = dict(zip(("unlabelled", "train", "holdout"), work.execute(
        "SELECT count(*) FILTER (WHERE role = 'unlabelled'), count(*) FILTER (WHERE role = 'train'), "
        "count(*) FILTER (WHERE role = 'holdout') FROM sc_people").fetchall()[0]))
    why_not = None
    if not work.execute("SELECT count(*) FROM patients").fetchall()[0][0]:
        why_not = "no hospital patients held"
    elif not counts["unlabelled"]:
        why_not = "every council person has a valid NHS number"
    elif counts["train"] < MIN_LABELLED or counts["holdout"] < MIN_LABELLED:
        why_not = f"fewer than {MIN_LABELLED} labelled people for training or for the held-out judgement"
    model = None
    work.execute("CREATE TEMP TABLE links (sc_record_id BIGINT, patient_record_id BIGINT, match_probability DOUBLE, "
                 "match_weight DOUBLE, decision VARCHAR)")
    work.execute("CREATE TEMP TABLE scores (sc_record_id BIGINT, patient_record_id BIGINT, match_probability DOUBLE, "
                 "match_weight DOUBLE)")
    if why_not is None:
        model = method.train(work)
        method.link(work, model)
    # Deterministic first: people whose other rows carry their one valid NHS number.
    work.execute(f"""COPY (
        SELECT la_code, la_person_id, nhs_number, 'nhs_number' AS link_method, NULL::DOUBLE AS match_probability,
               NULL::DOUBLE AS match_weight, 'other_rows' AS decided_by
        FROM council_people WHERE other_rows
        UNION ALL
        SELECT c.la_code, c.la_person_id, p.nhs_number, 'probabilistic', round(l.match_probability, 9),
               round(l.match_weight, 6),
               CASE WHEN r.is_match THEN 'reviewer' ELSE 'model' END
        FROM links l JOIN council_people c ON c.record_id = l.sc_record_id
        JOIN patients p ON p.record_id = l.patient_record_id
        LEFT JOIN review_labels r ON r.sc_record_id = l.sc_record_id AND r.patient_record_id = l.patient_record_id
        WHERE l.decision = 'linked') TO '{scratch / 'links.parquet'}' (FORMAT parquet)""")
    threshold = model.threshold if model is not None else 1.0
    shift = model.prior_shift if model is not None else 0.0
    work.execute(f"COPY ({review.queue_sql(quarter, threshold, shift)}) TO '{scratch / 'review.parquet'}' "
                 "(FORMAT parquet)")
    counts.update(zip(("links", "probabilistic", "other_rows"), work.execute(
        f"SELECT count(*), count(*) FILTER (WHERE link_method = 'probabilistic'), count(*) FILTER (WHERE decided_by = 'other_rows') "
        f"FROM read_parquet('{scratch / 'links.parquet'}')").fetchall()[0]))
    counts["ambiguous"] = work.execute("SELECT count(*) FROM links WHERE decision = 'ambiguous'").fetchall()[0][0]
    counts["review"] = work.execute(f"SELECT count(*) FROM read_parquet('{scratch / 'review.parquet'}')").fetchall()[0][0]
    return Outcome(quarter, model, counts, why_not)


def store(con: duckdb.DuckDBPyConnection, scratch: Path, quarter: str, outcome: Outcome) -> None:
    """The quarter's model, links and review queue replace the old ones together; then the model's JSON file."""
    model, model_id = outcome.model, outcome.model_id
    ensure_tables(con)
    with transaction(con):
        for table in ("models", "person_links", "review_queue"):
            con.execute(f"DELETE FROM linkage.{table} WHERE quarter = ?", [quarter])
        if model is not None:
            con.execute("INSERT INTO linkage.models VALUES (?, ?, now(), ?, ?, ?)",
                        [quarter, model_id, model.threshold, model.to_json(), json.dumps(model.metrics)])
        con.execute(f"INSERT INTO linkage.person_links SELECT ?, la_code, la_person_id, nhs_number, link_method, "
                    f"match_probability, match_weight, decided_by, ? FROM read_parquet('{scratch / 'links.parquet'}')",
                    [quarter, model_id])
        con.execute(f"INSERT INTO linkage.review_queue SELECT ?, *, now() "
                    f"FROM read_parquet('{scratch / 'review.parquet'}')", [quarter])
    if model is not None:
        folder = models_dir()
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f".{quarter}.json.partial"
        tmp.write_text(model.to_json(), encoding="utf-8")
        os.chmod(tmp, 0o600)
        tmp.replace(folder / f"{quarter}.json")


def rekey_rows(con: duckdb.DuckDBPyConnection, scratch: Path, quarter: str, key,
               submissions: list[tuple[str, str]]) -> int:
    """The person token, link method and probability of every row without a valid NHS number in the
    quarter's current submissions, as the pseudonymised layer computes them (rekey.parquet)."""
    register_submissions(con, submissions)
    ipad, opad = key.pads
    con.execute(f"""COPY (
        SELECT v.submission_id, v.row_number,
               {linked_person_select('v', 's.la_code', 'l.nhs_number', 'l.link_method', 'l.match_probability')}
        FROM validated.events v JOIN quarter_submissions s USING (submission_id)
        {links_join_sql('v', 's.la_code', '$quarter')}
        WHERE v.nhs_number IS NULL) TO '{scratch / 'rekey.parquet'}' (FORMAT parquet)""",
                {"ipad": ipad, "opad": opad, "quarter": quarter})
    return con.execute(f"SELECT count(*) FROM read_parquet('{scratch / 'rekey.parquet'}')").fetchall()[0][0]


def apply_to_analysts_zone(con: duckdb.DuckDBPyConnection, scratch: Path, quarter: str) -> int:
    """Re-key the quarter's rows without an NHS number in pseudonymised.events (one transaction)."""
    if not table_exists(con, "pseudonymised", "events"):
        return 0
    ensure_link_columns(con)
    with transaction(con):
        changed = con.execute(f"""
            UPDATE pseudonymised.events e
            SET person_id = k.person_id, link_method = k.link_method, match_probability = k.match_probability
            FROM read_parquet('{scratch / 'rekey.parquet'}') k
            WHERE e.quarter = ? AND e.submission_id = k.submission_id AND e.row_number = k.row_number
              AND (e.person_id IS DISTINCT FROM k.person_id OR e.link_method IS DISTINCT FROM k.link_method
                   OR e.match_probability IS DISTINCT FROM k.match_probability)""", [quarter]).fetchall()[0][0]
    return changed
