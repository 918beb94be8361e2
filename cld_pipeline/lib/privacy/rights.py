"""Data-subject rights in the processor zone (shared/domain/privacy.md section 4).

A request names a person by NHS number, or by LA code and LA person id. The processor zone is the
only place where those can be matched: the person is *resolved* to every identifier message the
pipeline derives tokens from (`nhs:<number>`, `la:<LA>:<person id>`, following the same person
across the rows where both appear), and those messages are what every action works on:

- `rights.register` holds, per request, a *register token* of each message under every key
  version held: HMAC(key, "rights:" + message). It is domain-separated from the analysts' person
  token, so after an erasure the person's token appears nowhere, while a later submission can still
  be recognised. Erasure and objection register permanently (suppression list); restriction
  registers until lifted. No raw identifier is ever stored here.
- At the write points (raw landing, validation, hospital ingestion) incoming rows are matched
  against the register set-based in SQL: suppressed rows never land, restricted rows are flagged
  `processing_restricted` in the validated layer and never leave the processor zone.
- `rights.pending` holds a lodged request's identifiers until it is applied, then they are deleted:
  the Dagster run only ever sees the request id.
"""

from __future__ import annotations

import datetime as dt
import secrets
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import duckdb

from cld_pipeline.lib.privacy.identifiers import is_valid_nhs_number, normalise_nhs_number
from cld_pipeline.lib.privacy.pseudonymise import PseudoKey, hmac_sql, token
from cld_pipeline.spec import load_spec

ACTIONS = ("copy", "restrict", "unrestrict", "object", "erase")
SUPPRESSING = ("erase", "object")          # removed and kept out for good
RESTRICTING = ("restrict",)                # kept, withheld from analysis until lifted
REGISTER_PREFIX = "rights:"


class RightsError(RuntimeError):
    """A request that cannot be carried out, in plain words (never containing an identifier)."""


def adult_link_columns() -> list[str]:
    """Columns holding another person's LA person id (carers' linked adults)."""
    return [f.column for f in load_spec().fields if f.identifier == "pseudonymise" and f.column.startswith("adult_")]


def ensure_schema(con: duckdb.DuckDBPyConnection) -> None:
    con.execute("CREATE SCHEMA IF NOT EXISTS rights")
    con.execute("""CREATE TABLE IF NOT EXISTS rights.requests (
        request_id VARCHAR PRIMARY KEY, action VARCHAR NOT NULL, status VARCHAR NOT NULL,
        lodged_at TIMESTAMP NOT NULL, applied_at TIMESTAMP, requested_by VARCHAR, reason VARCHAR, summary JSON)""")
    con.execute("""CREATE TABLE IF NOT EXISTS rights.pending (
        request_id VARCHAR PRIMARY KEY, nhs_number VARCHAR, la_code VARCHAR, la_person_id VARCHAR)""")
    con.execute("""CREATE TABLE IF NOT EXISTS rights.register (
        request_id VARCHAR NOT NULL, action VARCHAR NOT NULL, id_kind VARCHAR NOT NULL, key_version VARCHAR NOT NULL,
        token VARCHAR NOT NULL, registered_at TIMESTAMP NOT NULL, lifted_at TIMESTAMP, lifted_by VARCHAR)""")


# --- identifier messages, the same normalisation as the person token ----------------------------

def nhs_message_sql(raw_sql: str) -> str:
    """`nhs:<10 digits>` from a submitted NHS number (spaces and hyphens stripped), else NULL."""
    digits = f"regexp_replace(trim({raw_sql}), '[\\s-]', '', 'g')"
    return f"CASE WHEN regexp_full_match({digits}, '[0-9]{{10}}') THEN 'nhs:' || {digits} END"


def la_message_sql(la_code_sql: str, person_id_sql: str) -> str:
    """`la:<LA>:<person id>` (the file's LA code), else NULL."""
    return (f"CASE WHEN nullif(trim({person_id_sql}), '') IS NOT NULL "
            f"THEN 'la:' || upper(trim({la_code_sql})) || ':' || trim({person_id_sql}) END")


def register_token(key: PseudoKey, message: str) -> str:
    return token(key, REGISTER_PREFIX + message)


@dataclass
class Matcher:
    """SQL that tells whether an identifier message is on the register for some actions, under
    every key version held; parameters go with every statement that uses it."""

    versions: list[tuple[int, str]]        # (ring index, key version) present in the register
    actions: tuple[str, ...]
    register: str
    params: dict = field(default_factory=dict)

    def matches(self, message_sqls: Sequence[str]) -> str:
        actions = ", ".join(f"'{a}'" for a in self.actions)
        terms = []
        for i, _ in self.versions:
            active = (f"(SELECT token FROM {self.register} WHERE key_version = $version_{i} "
                      f"AND action IN ({actions}) AND lifted_at IS NULL)")
            for message in message_sqls:
                terms.append(f"coalesce({hmac_sql(f'{REGISTER_PREFIX!r} || ({message})', (f'ipad_{i}', f'opad_{i}'))}"
                             f" IN {active}, false)")
        return "(" + " OR ".join(terms) + ")" if terms else "false"


def matcher(con: duckdb.DuckDBPyConnection, ring: Sequence[PseudoKey] | None, actions: tuple[str, ...],
            register: str = "rights.register") -> Matcher | None:
    """None when nothing is registered for `actions` (the common case: no key needed, no hashing).
    Refuses when a registered request cannot be matched with the keys held."""
    rows = con.execute(f"SELECT request_id, list(DISTINCT key_version) FROM {register} WHERE lifted_at IS NULL "
                       f"AND action IN ({', '.join('?' for _ in actions)}) GROUP BY request_id", list(actions)).fetchall()
    if not rows:
        return None
    if not ring:
        raise RightsError(f"{len(rows)} rights request(s) ({', '.join(sorted({a for a in actions}))}) must be applied "
                          "to incoming data, which needs the pseudonymisation key: set CLD_PSEUDO_KEY.")
    held = {k.version: i for i, k in enumerate(ring)}
    uncovered = [request for request, versions in rows if not set(versions) & set(held)]
    if uncovered:
        raise RightsError(f"Rights requests {', '.join(sorted(uncovered))} were registered under key versions that "
                          "are no longer held; keep the previous key in CLD_PSEUDO_KEY_PREVIOUS until every request "
                          "is also registered under the current one.")
    present = {v for _, versions in rows for v in versions}
    versions = [(i, k.version) for i, k in enumerate(ring) if k.version in present]
    params: dict = {}
    for i, version in versions:
        ipad, opad = ring[i].pads
        params.update({f"ipad_{i}": ipad, f"opad_{i}": opad, f"version_{i}": version})
    return Matcher(versions, actions, register, params)


def copy_register(source: duckdb.DuckDBPyConnection, target: duckdb.DuckDBPyConnection, name: str = "register") -> None:
    """The active register as a table in another connection (a step's scratch database)."""
    ensure_schema(source)
    rows = source.sql("SELECT request_id, action, key_version, token, lifted_at FROM rights.register "
                      "WHERE lifted_at IS NULL").to_arrow_table()
    target.register("_register_rows", rows)
    target.execute(f"CREATE OR REPLACE TABLE {name} AS SELECT * FROM _register_rows")
    target.unregister("_register_rows")


def register_is_empty(con: duckdb.DuckDBPyConnection, actions: tuple[str, ...] = SUPPRESSING + RESTRICTING) -> bool:
    ensure_schema(con)
    return not con.execute(f"SELECT count(*) FROM rights.register WHERE lifted_at IS NULL AND action IN "
                           f"({', '.join('?' for _ in actions)})", list(actions)).fetchall()[0][0]


# --- the write points -------------------------------------------------------------------------

def suppress_submission(con: duckdb.DuckDBPyConnection, ring, submission_id: str, la_code: str) -> int:
    """Drop a landing submission's rows of people who erased or objected, and blank links to them
    from other people's rows; returns the rows dropped. Runs inside the landing transaction."""
    ensure_schema(con)
    m = matcher(con, ring, SUPPRESSING)
    if m is None:
        return 0
    person = m.matches([nhs_message_sql("nhs_number"), la_message_sql("$la_code", "la_person_unique_identifier")])
    dropped = con.execute(f"DELETE FROM raw.events WHERE submission_id = $submission_id AND {person}",
                          {**m.params, "submission_id": submission_id, "la_code": la_code}).fetchall()[0][0]
    for column in adult_link_columns():
        con.execute(f"UPDATE raw.events SET {column} = NULL WHERE submission_id = $submission_id AND "
                    f"{m.matches([la_message_sql('$la_code', column)])}",
                    {**m.params, "submission_id": submission_id, "la_code": la_code})
    return dropped


def ensure_restriction_column(con: duckdb.DuckDBPyConnection, table: str) -> None:
    """The validated tables' `processing_restricted` flag (false unless a restriction is in force)."""
    con.execute(f"ALTER TABLE {table} ADD COLUMN IF NOT EXISTS processing_restricted BOOLEAN DEFAULT false")


def flag_restricted(con: duckdb.DuckDBPyConnection, ring, table: str, where: str, params: dict,
                    nhs_sql: str, la_code_sql: str | None = None, la_id_sql: str | None = None) -> int:
    """Set `processing_restricted` on the rows of `table` matching `where`: true exactly for rows of
    people under an active restriction. Returns the rows restricted."""
    ensure_schema(con)
    ensure_restriction_column(con, table)
    m = matcher(con, ring, RESTRICTING)
    if m is None:
        con.execute(f"UPDATE {table} SET processing_restricted = false WHERE {where} AND processing_restricted",
                    params)
        return 0
    messages = [nhs_message_sql(nhs_sql)]
    if la_id_sql:
        messages.append(la_message_sql(la_code_sql, la_id_sql))
    con.execute(f"UPDATE {table} SET processing_restricted = {m.matches(messages)} WHERE {where}", {**m.params, **params})
    return con.execute(f"SELECT count(*) FROM {table} WHERE {where} AND processing_restricted", params).fetchall()[0][0]


def withheld_links_select(con: duckdb.DuckDBPyConnection, ring, alias: str, la_code_sql: str) -> tuple[str, dict]:
    """`REPLACE (...)` clause for a SELECT over validated rows: links to people under restriction,
    erasure or objection become NULL before they are tokenised for analysts."""
    m = matcher(con, ring, SUPPRESSING + RESTRICTING)
    if m is None:
        return "", {}
    parts = [f"CASE WHEN {m.matches([la_message_sql(la_code_sql, f'{alias}.{c}')])} THEN NULL ELSE {alias}.{c} END AS {c}"
             for c in adult_link_columns()]
    return f" REPLACE ({', '.join(parts)})", m.params


# --- requests -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Person:
    """Who a request is about, as given (validated, never logged)."""

    nhs_number: str | None = None
    la_code: str | None = None
    la_person_id: str | None = None

    def messages(self) -> set[str]:
        if self.nhs_number:
            return {"nhs:" + self.nhs_number}
        return {f"la:{self.la_code}:{self.la_person_id}"}


def parse_person(nhs_number: str | None, la_code: str | None, la_person_id: str | None) -> Person:
    from cld_pipeline.reference import load_local_authorities

    if nhs_number and (la_code or la_person_id):
        raise RightsError("Give either an NHS number, or an LA code with the LA person id, not both.")
    if nhs_number:
        number = normalise_nhs_number(nhs_number)
        if not is_valid_nhs_number(number):
            raise RightsError("That NHS number is not valid (10 digits with a correct check digit).")
        return Person(nhs_number=number)
    if not (la_code and la_person_id and la_person_id.strip()):
        raise RightsError("Name the person by --nhs-number, or by --la with --person-id.")
    council = load_local_authorities().get(la_code.strip())
    if council is None:
        raise RightsError(f"{la_code} is not one of the 153 councils' CLD or ONS codes.")
    return Person(la_code=council.submission_code.upper(), la_person_id=la_person_id.strip())


def check_free_text(label: str, text: str) -> str:
    """Reasons and names go into the audit log: refuse anything that looks like an identifier."""
    import re

    from cld_pipeline.lib.privacy.identifiers import POSTCODE_RE

    text = " ".join(text.split())
    if not text:
        raise RightsError(f"{label} is required (it is recorded in the audit log).")
    if re.search(r"\d[\d\s-]{5,}\d", text) or any(POSTCODE_RE.match(w.upper()) for w in text.split()):
        raise RightsError(f"{label} looks as if it contains an identifier (a long number or a postcode); "
                          "the audit log never holds identifiers: give the case reference instead.")
    return text


def new_request_id(action: str) -> str:
    return f"R-{dt.date.today():%Y%m%d}-{action}-{secrets.token_hex(4)}"


def lodge(con: duckdb.DuckDBPyConnection, action: str, person: Person, requested_by: str, reason: str) -> str:
    if action not in ACTIONS:
        raise RightsError(f"{action!r} is not one of {', '.join(ACTIONS)}.")
    ensure_schema(con)
    request_id = new_request_id(action)
    con.execute("INSERT INTO rights.requests VALUES (?, ?, 'lodged', now(), NULL, ?, ?, NULL)",
                [request_id, action, check_free_text("--requested-by", requested_by), check_free_text("--reason", reason)])
    con.execute("INSERT INTO rights.pending VALUES (?, ?, ?, ?)",
                [request_id, person.nhs_number, person.la_code, person.la_person_id])
    return request_id


def pending(con: duckdb.DuckDBPyConnection, request_id: str) -> tuple[str, Person]:
    ensure_schema(con)
    rows = con.execute("SELECT r.action, r.status, p.nhs_number, p.la_code, p.la_person_id FROM rights.requests r "
                       "LEFT JOIN rights.pending p USING (request_id) WHERE request_id = ?", [request_id]).fetchall()
    if not rows:
        raise RightsError(f"No rights request {request_id} has been lodged.")
    action, status, nhs, la, pid = rows[0]
    if nhs is None and pid is None:
        raise RightsError(f"Rights request {request_id} is {status}; its identifiers are no longer held "
                          "(lodge a new request).")
    return action, Person(nhs, la, pid)


def resolve(con: duckdb.DuckDBPyConnection, person: Person, rounds: int = 3) -> set[str]:
    """Every identifier message of the person: follow NHS number <-> LA person id through the
    submitted rows (all submissions, current and superseded) until nothing new is found."""
    messages = person.messages()
    if not _table_exists(con, "raw", "events"):
        return messages
    for _ in range(rounds):
        con.execute("CREATE OR REPLACE TEMP TABLE person_messages AS SELECT unnest(?::VARCHAR[]) AS message",
                    [sorted(messages)])
        found = con.execute(f"""
            WITH m AS (SELECT {nhs_message_sql('e.nhs_number')} AS nhs,
                              {la_message_sql('s.la_code', 'e.la_person_unique_identifier')} AS la
                       FROM raw.events e JOIN raw.submissions s USING (submission_id))
            SELECT DISTINCT unnest([nhs, la]) FROM m
            WHERE nhs IN (SELECT message FROM person_messages) OR la IN (SELECT message FROM person_messages)
            """).fetchall()
        more = {r[0] for r in found if r[0]} | messages
        if more == messages:
            break
        messages = more
    return messages


def _table_exists(con: duckdb.DuckDBPyConnection, schema: str, table: str, catalog: str | None = None) -> bool:
    where = "table_schema = ? AND table_name = ?" + (" AND table_catalog = ?" if catalog else "")
    return bool(con.execute(f"SELECT count(*) FROM information_schema.tables WHERE {where}",
                            [schema, table, *([catalog] if catalog else [])]).fetchall()[0][0])


def register(con: duckdb.DuckDBPyConnection, request_id: str, action: str, messages: Iterable[str],
             ring: Sequence[PseudoKey]) -> int:
    rows = [(request_id, action, m.split(":", 1)[0], k.version, register_token(k, m)) for m in sorted(messages)
            for k in ring]
    con.executemany("INSERT INTO rights.register VALUES (?, ?, ?, ?, ?, now(), NULL, NULL)", rows)
    return len(rows)


def lift(con: duckdb.DuckDBPyConnection, request_id: str, messages: Iterable[str], ring: Sequence[PseudoKey]) -> int:
    tokens = sorted({register_token(k, m) for m in messages for k in ring})
    return con.execute("UPDATE rights.register SET lifted_at = now(), lifted_by = ? WHERE action = 'restrict' AND "
                       "lifted_at IS NULL AND token IN (SELECT unnest(?::VARCHAR[]))", [request_id, tokens]
                       ).fetchall()[0][0]


def person_tokens(messages: Iterable[str], ring: Sequence[PseudoKey]) -> list[str]:
    """The person's tokens as analysts' tables hold them (person id and carers' links), every key version."""
    return sorted({token(k, m) for m in messages for k in ring})
