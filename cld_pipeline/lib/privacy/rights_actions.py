"""What each right does to the stores, set-based over whole tables.

The processor zone (identifiable.duckdb) is the record: an erasure deletes the person's submitted
rows there (every submission, current and superseded, and the hospital extracts) and blanks links to
them from other people's rows; a restriction flags them. The analysts' zone is derived: its
rebuildable tables are rebuilt afterwards (the caller runs the Dagster jobs for the affected
partitions), and the two kinds of table that cannot be rebuilt, superseded submissions' rows
(`pseudonymised.events_history`) and analysts' ad hoc extracts (`analyst.*`), are edited here:
rows deleted on erasure, moved to a hold in the processor zone on restriction and moved back when
it is lifted. Nothing here logs an identifier.
"""

from __future__ import annotations

import datetime as dt
import html
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import duckdb

from cld_pipeline.lib.linkage import review
from cld_pipeline.lib.privacy import rights
from cld_pipeline.lib.privacy.pseudonymise import PseudoKey
from cld_pipeline.lib.privacy.rights import la_message_sql, nhs_message_sql
from cld_pipeline.lib.warehouse import table_exists

HELD_SCHEMA = "rights_hold"


@dataclass
class Affected:
    """Where a request touched data: what must be rebuilt, and counts per table (no identifiers)."""

    partitions: set[tuple[str, str]] = field(default_factory=set)     # (LA code, quarter), current submissions
    hospital_quarters: set[str] = field(default_factory=set)
    quarters: set[str] = field(default_factory=set)                    # linked and benchmark tables
    rows: dict[str, int] = field(default_factory=dict)

    def count(self, table: str, n: int) -> None:
        if n:
            self.rows[table] = self.rows.get(table, 0) + int(n)

    def as_dict(self) -> dict:
        return {"partitions": sorted(f"{q} x {la}" for la, q in self.partitions),
                "hospital_quarters": sorted(self.hospital_quarters), "quarters": sorted(self.quarters),
                "rows": dict(sorted(self.rows.items()))}


# --- processor zone --------------------------------------------------------------------------------

def find_person_rows(con: duckdb.DuckDBPyConnection, messages: set[str]) -> Affected:
    """Temp tables `person_messages`, `person_raw` (submission_id, row_number) and `person_hospital`
    (extract_id, row_number); the affected current partitions and hospital quarters."""
    affected = Affected()
    con.execute("CREATE OR REPLACE TEMP TABLE person_messages AS SELECT unnest(?::VARCHAR[]) AS message",
                [sorted(messages)])
    con.execute("CREATE OR REPLACE TEMP TABLE person_raw (submission_id VARCHAR, row_number BIGINT)")
    con.execute("CREATE OR REPLACE TEMP TABLE person_hospital (extract_id VARCHAR, row_number BIGINT)")
    if table_exists(con, "raw", "events"):
        con.execute(f"""INSERT INTO person_raw SELECT e.submission_id, e.row_number
            FROM raw.events e JOIN raw.submissions s USING (submission_id)
            WHERE {nhs_message_sql('e.nhs_number')} IN (SELECT message FROM person_messages)
               OR {la_message_sql('s.la_code', 'e.la_person_unique_identifier')} IN (SELECT message FROM person_messages)""")
        affected.partitions = set(con.execute("""SELECT DISTINCT s.la_code, s.quarter FROM person_raw p
            JOIN raw.submissions s USING (submission_id) WHERE s.status = 'accepted'""").fetchall())
    if table_exists(con, "raw", "hospital_episodes"):
        con.execute(f"""INSERT INTO person_hospital SELECT extract_id, row_number FROM raw.hospital_episodes
            WHERE {nhs_message_sql('nhs_number')} IN (SELECT message FROM person_messages)""")
        affected.hospital_quarters = {r[0] for r in con.execute("""SELECT DISTINCT x.quarter FROM person_hospital p
            JOIN raw.hospital_extracts x USING (extract_id) WHERE x.status = 'accepted'""").fetchall()}
    return affected


# The probabilistic linkage's tables name people by NHS number and by (LA code, LA person id).
LINKAGE_TABLES = ("linkage.person_links", "linkage.review_queue", "linkage.review_decisions")


LINKAGE_PERSON = (f"{nhs_message_sql('nhs_number')} IN (SELECT message FROM person_messages) OR "
                  f"{la_message_sql('la_code', 'la_person_id')} IN (SELECT message FROM person_messages)")


def _linkage_tables(con) -> list[str]:
    return [t for t in LINKAGE_TABLES if table_exists(con, *t.split("."))]


def _delete_keyed(con, table: str, keys: str, key_columns: str) -> int:
    if not table_exists(con, *table.split(".")):
        return 0
    return con.execute(f"DELETE FROM {table} WHERE ({key_columns}) IN (SELECT ({key_columns}) FROM {keys})"
                       ).fetchall()[0][0]


def erase_in_processor_zone(con: duckdb.DuckDBPyConnection, affected: Affected) -> None:
    """Delete the person's rows from every processor table and blank links to them (after
    `find_person_rows`); the submission ledger counts what was removed."""
    if table_exists(con, "raw", "events"):
        con.execute("""UPDATE raw.submissions s SET suppressed_rows = coalesce(s.suppressed_rows, 0) + p.n
                       FROM (SELECT submission_id, count(*) AS n FROM person_raw GROUP BY ALL) p
                       WHERE s.submission_id = p.submission_id""")
    for table in ("raw.events", "validated.events", "validated.rejections", "validated.dq_flags"):
        affected.count(table, _delete_keyed(con, table, "person_raw", "submission_id, row_number"))
    for table in ("raw.hospital_episodes", "validated.hospital_episodes", "validated.hospital_rejections",
                  "validated.hospital_dq_flags"):
        affected.count(table, _delete_keyed(con, table, "person_hospital", "extract_id, row_number"))
    if table_exists(con, "linkage", "review_queue"):   # and from review files already exported
        pairs = {r[0] for r in con.execute(f"SELECT pair_id FROM linkage.review_queue WHERE {LINKAGE_PERSON}").fetchall()}
        affected.count("linkage review files", review.scrub_exports(pairs))
    for table in _linkage_tables(con):
        affected.count(table, con.execute(f"DELETE FROM {table} WHERE {LINKAGE_PERSON}").fetchall()[0][0])
    for column in rights.adult_link_columns():
        for table, la_code in (("raw.events", "s.la_code"), ("validated.events", "s.la_code")):
            if not table_exists(con, *table.split(".")):
                continue
            n = con.execute(f"""UPDATE {table} e SET {column} = NULL FROM raw.submissions s
                WHERE e.submission_id = s.submission_id
                  AND {la_message_sql(la_code, f'e.{column}')} IN (SELECT message FROM person_messages)""").fetchall()[0][0]
            affected.count(f"{table} (links blanked)", n)


def restrict_in_processor_zone(con: duckdb.DuckDBPyConnection, ring: Sequence[PseudoKey], affected: Affected) -> None:
    """Recompute `processing_restricted` on the person's validated rows from the register (the
    same rule validation applies to every later submission)."""
    if table_exists(con, "validated", "events"):
        affected.count("validated.events", rights.flag_restricted(
            con, ring, "validated.events", "(submission_id, row_number) IN (SELECT (submission_id, row_number) "
            "FROM person_raw)", {}, "nhs_number", "la_code_of_file", "la_person_unique_identifier"))
    if table_exists(con, "validated", "hospital_episodes"):
        affected.count("validated.hospital_episodes", rights.flag_restricted(
            con, ring, "validated.hospital_episodes", "(extract_id, row_number) IN (SELECT (extract_id, row_number) "
            "FROM person_hospital)", {}, "nhs_number"))


# --- analysts' zone --------------------------------------------------------------------------------

def person_tables(con: duckdb.DuckDBPyConnection) -> dict[str, list[str]]:
    """`schema.table` -> its columns that hold person tokens (person id, carers' links)."""
    links = rights.adult_link_columns()
    rows = con.execute("""SELECT table_schema || '.' || table_name, list(column_name ORDER BY ordinal_position)
        FROM information_schema.columns c JOIN information_schema.tables t USING (table_catalog, table_schema, table_name)
        WHERE t.table_type = 'BASE TABLE' AND c.table_catalog = current_database()
          AND (column_name = 'person_id' OR column_name IN (SELECT unnest(?::VARCHAR[])))
        GROUP BY ALL ORDER BY 1""", [links]).fetchall()
    return {table: columns for table, columns in rows}


def held(table: str) -> bool:
    """Tables no job can rebuild: their rows are moved to the hold on restriction."""
    return table == "pseudonymised.events_history" or table.startswith("analyst.") and table != "analyst.cohort_runs"


def _quarter_column(con, table: str) -> str | None:
    schema, name = table.split(".")
    columns = {r[0] for r in con.execute("SELECT column_name FROM information_schema.columns WHERE table_schema = ? "
                                         "AND table_name = ?", [schema, name]).fetchall()}
    return next((c for c in ("benchmark_quarter", "quarter") if c in columns), None)


def _load_tokens(con: duckdb.DuckDBPyConnection, tokens: list[str]) -> None:
    """The person's tokens as temp table `person_tokens`, which the filters below refer to."""
    con.execute("CREATE OR REPLACE TEMP TABLE person_tokens AS SELECT unnest(?::VARCHAR[]) AS token", [tokens])


def _token_filter(columns: list[str]) -> tuple[str, str]:
    """(rows of the person, rows of the person or linking to them) over a table's token columns."""
    person = "person_id IN (SELECT token FROM person_tokens)" if "person_id" in columns else "false"
    links = [f"{c} IN (SELECT token FROM person_tokens)" for c in columns if c != "person_id"]
    return person, " OR ".join([person, *links])


def export_for_hold(con: duckdb.DuckDBPyConnection, tokens: list[str], scratch: Path) -> list[tuple[str, Path]]:
    """A restricted person's rows (and rows linking to them) of the tables no job can rebuild, as
    Parquet files for the hold; returns (table, file)."""
    _load_tokens(con, tokens)
    out = []
    for table, columns in person_tables(con).items():
        if held(table):
            target = scratch / f"{table}.parquet"
            con.execute(f"COPY (SELECT * FROM {table} WHERE {_token_filter(columns)[1]}) TO '{target}' (FORMAT parquet)")
            out.append((table, target))
    return out


def act_in_analytics(con: duckdb.DuckDBPyConnection, action: str, tokens: list[str], affected: Affected) -> None:
    """Remove the person from the analysts' zone: their rows deleted and links to them blanked
    (restriction: rows of tables that cannot be rebuilt go whole, after `export_for_hold`). Records
    the quarters whose linked and benchmark tables held them."""
    _load_tokens(con, tokens)
    for table, columns in person_tables(con).items():
        person, touching = _token_filter(columns)
        if quarter := _quarter_column(con, table):
            affected.quarters |= {r[0] for r in con.execute(
                f"SELECT DISTINCT {quarter} FROM {table} WHERE {touching}").fetchall() if r[0]}
        if action == "restrict" and held(table):
            affected.count(f"{table} (held)", con.execute(f"DELETE FROM {table} WHERE {touching}").fetchall()[0][0])
            continue
        affected.count(table, con.execute(f"DELETE FROM {table} WHERE {person}").fetchall()[0][0])
        for c in columns:
            if c != "person_id":
                affected.count(f"{table} (links blanked)", con.execute(
                    f"UPDATE {table} SET {c} = NULL WHERE {c} IN (SELECT token FROM person_tokens)").fetchall()[0][0])


def hold(con: duckdb.DuckDBPyConnection, request_id: str, files: list[tuple[str, Path]]) -> None:
    """Keep a restricted person's rows of tables that cannot be rebuilt, in the processor zone."""
    con.execute(f"CREATE SCHEMA IF NOT EXISTS {HELD_SCHEMA}")
    for table, path in files:
        name = f'{HELD_SCHEMA}."{table}"'
        con.execute(f"CREATE TABLE IF NOT EXISTS {name} AS SELECT ''::VARCHAR AS held_by_request, * "
                    f"FROM read_parquet('{path}') LIMIT 0")
        con.execute(f"INSERT INTO {name} SELECT ?, * FROM read_parquet('{path}')", [request_id])


def release(icon: duckdb.DuckDBPyConnection, tokens: list[str], scratch: Path) -> list[tuple[str, Path]]:
    """Take the person's held rows out of the hold (lifting a restriction); returns Parquet files to
    put back into the analysts' tables."""
    out = []
    if not icon.execute("SELECT count(*) FROM information_schema.schemata WHERE schema_name = ?",
                        [HELD_SCHEMA]).fetchall()[0][0]:
        return out
    _load_tokens(icon, tokens)
    for (table,) in icon.execute("SELECT table_name FROM information_schema.tables WHERE table_schema = ?",
                                 [HELD_SCHEMA]).fetchall():
        name = f'{HELD_SCHEMA}."{table}"'
        columns = [c for c in person_tables_columns(icon, HELD_SCHEMA, table)]
        where = " OR ".join(f"{c} IN (SELECT token FROM person_tokens)" for c in columns) or "false"
        target = scratch / f"release-{table}.parquet"
        icon.execute(f"COPY (SELECT * EXCLUDE (held_by_request) FROM {name} WHERE {where}) TO '{target}' (FORMAT parquet)")
        icon.execute(f"DELETE FROM {name} WHERE {where}")
        out.append((table, target))
    return out


def person_tables_columns(con, schema: str, table: str) -> list[str]:
    links = set(rights.adult_link_columns()) | {"person_id"}
    return [r[0] for r in con.execute("SELECT column_name FROM information_schema.columns WHERE table_schema = ? AND "
                                      "table_name = ? ORDER BY ordinal_position", [schema, table]).fetchall()
            if r[0] in links]


def put_back(con: duckdb.DuckDBPyConnection, files: list[tuple[str, Path]], affected: Affected) -> None:
    """Rows released from the hold return to their analysts' table (blanked links of other people's
    rows were held with the whole row, so the row is replaced)."""
    for table, path in files:
        if not table_exists(con, *table.split(".")):
            continue
        keys = [c for c in ("submission_id", "row_number") if c in
                {r[0] for r in con.execute(f"DESCRIBE SELECT * FROM read_parquet('{path}')").fetchall()}]
        if len(keys) == 2:
            con.execute(f"DELETE FROM {table} WHERE (submission_id, row_number) IN "
                        f"(SELECT (submission_id, row_number) FROM read_parquet('{path}'))")
        affected.count(f"{table} (restored)", con.execute(
            f"INSERT INTO {table} BY NAME SELECT * FROM read_parquet('{path}')").fetchall()[0][0])


# --- checks and the copy ---------------------------------------------------------------------------

def varchar_columns(con) -> dict[str, list[str]]:
    rows = con.execute("""SELECT '"' || table_schema || '"."' || table_name || '"', list(column_name)
        FROM information_schema.columns c JOIN information_schema.tables t USING (table_catalog, table_schema, table_name)
        WHERE t.table_type = 'BASE TABLE' AND c.table_catalog = current_database() AND data_type = 'VARCHAR'
        GROUP BY ALL""").fetchall()
    return {t: cols for t, cols in rows}


def occurrences(con: duckdb.DuckDBPyConnection, values: list[str]) -> dict[str, int]:
    """Rows of every table (every text column) equal to any of `values`: the proof after erasure."""
    con.execute("CREATE OR REPLACE TEMP TABLE needles AS SELECT unnest(?::VARCHAR[]) AS value", [values])
    found = {}
    for table, columns in varchar_columns(con).items():
        where = " OR ".join(f'"{c}" IN (SELECT value FROM needles)' for c in columns)
        n = con.execute(f"SELECT count(*) FROM {table} WHERE {where}").fetchall()[0][0]
        if n:
            found[table] = n
    return found


def processor_occurrences(con: duckdb.DuckDBPyConnection, messages: set[str]) -> dict[str, int]:
    """Rows still carrying the person's identifiers in the processor zone, by the same normalisation
    the register uses."""
    find_person_rows(con, messages)
    out = {"raw.events": con.execute("SELECT count(*) FROM person_raw").fetchall()[0][0],
           "raw.hospital_episodes": con.execute("SELECT count(*) FROM person_hospital").fetchall()[0][0]}
    for table, la_code in (("raw.events", "s.la_code"), ("validated.events", "s.la_code")):
        if not table_exists(con, *table.split(".")):
            continue
        nhs = nhs_message_sql("e.nhs_number")
        ids = [la_message_sql(la_code, f"e.{c}") for c in ["la_person_unique_identifier", *rights.adult_link_columns()]]
        where = " OR ".join(f"{m} IN (SELECT message FROM person_messages)" for m in [nhs, *ids])
        out[table] = con.execute(f"SELECT count(*) FROM {table} e JOIN raw.submissions s USING (submission_id) "
                                 f"WHERE {where}").fetchall()[0][0]
    if table_exists(con, "validated", "hospital_episodes"):
        out["validated.hospital_episodes"] = con.execute(
            f"SELECT count(*) FROM validated.hospital_episodes WHERE {nhs_message_sql('nhs_number')} IN "
            "(SELECT message FROM person_messages)").fetchall()[0][0]
    for table in _linkage_tables(con):
        out[table] = con.execute(f"SELECT count(*) FROM {table} WHERE {LINKAGE_PERSON}").fetchall()[0][0]
    return {t: n for t, n in out.items() if n}


def export_processor_rows(con: duckdb.DuckDBPyConnection, folder: Path) -> dict[str, int]:
    """The person's rows of every processor table as CSV (after `find_person_rows`)."""
    queries = {
        "raw.events": "SELECT s.file_name, s.status AS submission_status, e.* FROM raw.events e "
                      "JOIN raw.submissions s USING (submission_id) JOIN person_raw p USING (submission_id, row_number)",
        "validated.events": "SELECT v.* FROM validated.events v JOIN person_raw USING (submission_id, row_number)",
        "validated.rejections": "SELECT v.* FROM validated.rejections v JOIN person_raw USING (submission_id, row_number)",
        "validated.dq_flags": "SELECT v.* FROM validated.dq_flags v JOIN person_raw USING (submission_id, row_number)",
        "raw.hospital_episodes": "SELECT v.* FROM raw.hospital_episodes v JOIN person_hospital USING (extract_id, row_number)",
        "validated.hospital_episodes": "SELECT v.* FROM validated.hospital_episodes v "
                                       "JOIN person_hospital USING (extract_id, row_number)",
        **{table: f"SELECT * FROM {table} WHERE {LINKAGE_PERSON}" for table in LINKAGE_TABLES},
    }
    counts = {}
    for table, sql in queries.items():
        if table_exists(con, *table.split(".")):
            counts[table] = _csv(con, sql, folder / f"{table}.csv")
    return {k: v for k, v in counts.items() if v}


def export_token_rows(con: duckdb.DuckDBPyConnection, tokens: list[str], folder: Path, schema: str | None = None
                      ) -> dict[str, int]:
    """The person's rows of every table holding person tokens (the analysts' zone, or the hold)."""
    _load_tokens(con, tokens)
    counts = {}
    if schema:
        tables = {f'{schema}."{t}"': person_tables_columns(con, schema, t) for (t,) in con.execute(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = ?", [schema]).fetchall()}
    else:
        tables = person_tables(con)
    for table, columns in tables.items():
        where = " OR ".join(f"{c} IN (SELECT token FROM person_tokens)" for c in columns) or "false"
        name = table.replace('"', "")
        counts[name] = _csv(con, f"SELECT * FROM {table} WHERE {where}", folder / f"{name}.csv")
    return {k: v for k, v in counts.items() if v}


def _csv(con, sql: str, path: Path) -> int:
    n = con.execute(f"SELECT count(*) FROM ({sql})").fetchall()[0][0]
    if n:
        path.parent.mkdir(parents=True, exist_ok=True)
        con.execute(f"COPY ({sql}) TO '{path}' (HEADER, DELIMITER ',')")
    return n


def write_copy_page(folder: Path, request_id: str, counts: dict[str, int]) -> Path:
    """One readable page for the request handler: every table's rows, layer by layer."""
    import csv

    parts = [f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>Copy of data: {request_id}</title>"
             "<style>body{font-family:Arial,sans-serif;margin:2rem}table{border-collapse:collapse;font-size:.8rem}"
             "td,th{border:1px solid #b1b4b6;padding:.2rem .4rem}th{background:#f3f2f1}</style></head><body>",
             f"<h1>Copy of the data held about one person</h1><p>Request {html.escape(request_id)}, produced "
             f"{dt.datetime.now():%Y-%m-%d %H:%M}. Every record held in every layer: what the council submitted "
             "(raw), what was accepted (validated), and the pseudonymised, linked and benchmark-method copies "
             "analysts use. CSV files of the same rows are beside this page.</p><ul>"]
    parts += [f"<li><a href='#{html.escape(t)}'>{html.escape(t)}</a>: {n} row(s)</li>" for t, n in counts.items()]
    parts.append("</ul>")
    for table, n in counts.items():
        with (folder / f"{table}.csv").open(encoding="utf-8", newline="") as fh:
            reader = csv.reader(fh)
            header = next(reader)
            body = "".join("<tr>" + "".join(f"<td>{html.escape(v)}</td>" for v in row) + "</tr>" for row in reader)
        parts.append(f"<h2 id='{html.escape(table)}'>{html.escape(table)} ({n})</h2><table><tr>"
                     + "".join(f"<th>{html.escape(h)}</th>" for h in header) + f"</tr>{body}</table>")
    parts.append("</body></html>")
    page = folder / "copy.html"
    page.write_text("".join(parts), encoding="utf-8")
    return page
