"""The processor zone's record of who links to whom (identifiable.duckdb, schema `linkage`), and
the one rule that turns a validated row and its person's link into the analysts' person token.

Used by the pseudonymised layer (when it runs after the linkage) and by the linkage step (which
re-keys rows already pseudonymised), so the order in which the two run never changes a token.
"""

from __future__ import annotations

import json

import duckdb

from cld_pipeline.lib.privacy.pseudonymise import person_token_sql

LINKS_COLUMNS = """quarter VARCHAR, la_code VARCHAR, la_person_id VARCHAR, nhs_number VARCHAR, link_method VARCHAR,
    match_probability DOUBLE, match_weight DOUBLE, decided_by VARCHAR, model_id VARCHAR"""
REVIEW_COLUMNS = """quarter VARCHAR, pair_id VARCHAR, reason VARCHAR, la_code VARCHAR, la_person_id VARCHAR,
    nhs_number VARCHAR, match_probability DOUBLE, match_weight DOUBLE, council_dob DATE, council_sex VARCHAR,
    council_postcode VARCHAR, hospital_dob DATE, hospital_sex VARCHAR, hospital_postcode VARCHAR,
    queued_at TIMESTAMP"""
DECISION_COLUMNS = """pair_id VARCHAR, la_code VARCHAR, la_person_id VARCHAR, nhs_number VARCHAR, is_match BOOLEAN,
    reviewer VARCHAR, decided_at TIMESTAMP"""


def ensure_tables(con: duckdb.DuckDBPyConnection) -> None:
    con.execute("CREATE SCHEMA IF NOT EXISTS linkage")
    con.execute("""CREATE TABLE IF NOT EXISTS linkage.models (quarter VARCHAR, model_id VARCHAR, trained_at TIMESTAMP,
                   threshold DOUBLE, model_json VARCHAR, metrics_json VARCHAR)""")
    con.execute(f"CREATE TABLE IF NOT EXISTS linkage.person_links ({LINKS_COLUMNS})")
    con.execute(f"CREATE TABLE IF NOT EXISTS linkage.review_queue ({REVIEW_COLUMNS})")
    con.execute(f"CREATE TABLE IF NOT EXISTS linkage.review_decisions ({DECISION_COLUMNS})")


def links_join_sql(v: str, la_code_sql: str, quarter_sql: str, alias: str = "l") -> str:
    """LEFT JOIN of a validated row `v` (without a valid NHS number) to its person's link."""
    return (f"LEFT JOIN linkage.person_links {alias} ON {v}.nhs_number IS NULL AND {alias}.quarter = {quarter_sql} "
            f"AND {alias}.la_code = {la_code_sql} AND {alias}.la_person_id = trim({v}.la_person_unique_identifier)")


def linked_person_select(v: str, la_code_sql: str, link_nhs: str, link_method: str, link_probability: str) -> str:
    """person_id, link_method and match_probability for a validated row `v` given its person's link
    (SQL expressions, NULL when the person has none): a row's own valid NHS number first, then the
    linked patient's, then the council's person id."""
    return (f"{person_token_sql(f'coalesce({v}.nhs_number, {link_nhs})', la_code_sql, f'{v}.la_person_unique_identifier')}"
            f" AS person_id, "
            f"CASE WHEN {v}.nhs_number IS NOT NULL THEN 'nhs_number' ELSE coalesce({link_method}, 'none') END "
            f"AS link_method, "
            f"CASE WHEN {v}.nhs_number IS NULL AND {link_method} = 'probabilistic' THEN {link_probability} END "
            f"AS match_probability")


def ensure_link_columns(con: duckdb.DuckDBPyConnection) -> None:
    """`pseudonymised.events` (analysts' zone) as created before the linkage existed gains its columns."""
    con.execute("ALTER TABLE pseudonymised.events ADD COLUMN IF NOT EXISTS link_method VARCHAR")
    con.execute("ALTER TABLE pseudonymised.events ADD COLUMN IF NOT EXISTS match_probability DOUBLE")


def stored_link_method_sql(link_method: str = "link_method", person_id_source: str = "person_id_source") -> str:
    """A pseudonymised row's link method; rows pseudonymised before the linkage existed carry none,
    and their own token's source says it."""
    return f"coalesce({link_method}, CASE {person_id_source} WHEN 'nhs' THEN 'nhs_number' ELSE 'none' END)"


def models(con: duckdb.DuckDBPyConnection, quarter: str | None = None) -> list[dict]:
    """The stored models (every quarter, or one) with their held-out metrics; no record values."""
    ensure_tables(con)
    rows = con.execute("SELECT quarter, model_id, trained_at, threshold, metrics_json FROM linkage.models "
                       "WHERE ? IS NULL OR quarter = ? ORDER BY quarter", [quarter, quarter]).fetchall()
    return [{"quarter": q, "model_id": m, "trained_at": str(t), "threshold": th, "metrics": json.loads(js)}
            for q, m, t, th, js in rows]
