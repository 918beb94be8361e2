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
import re
import secrets
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import duckdb

from cld_pipeline.lib.privacy.identifiers import is_valid_nhs_number, normalise_nhs_number
from cld_pipeline.lib.privacy.pseudonymise import PseudoKey, hmac_sql, token
from cld_pipeline.lib.warehouse import table_exists
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
    """`nhs:<10 digits>` from a submitted NHS number (its digits only, so `999 245 5527`,
    `999-245-5527` and `999.245.5527` are one number), else NULL."""
    digits = f"regexp_replace({raw_sql}, '[^0-9]', '', 'g')"
    return f"CASE WHEN regexp_full_match({digits}, '[0-9]{{10}}') THEN 'nhs:' || {digits} END"


def la_message_sql(la_code_sql: str, person_id_sql: str) -> str:
    """`la:<LA>:<person id>` (the file's LA code), else NULL."""
    return (f"CASE WHEN nullif(trim({person_id_sql}), '') IS NOT NULL "
            f"THEN 'la:' || upper(trim({la_code_sql})) || ':' || trim({person_id_sql}) END")


def register_form(message: str) -> str:
    """The register's canonical form of a message: an LA person id is matched trimmed and without
    regard to case within its council (`ab12 ` and `AB12` are one person to a suppression), so a
    resubmission cannot bring an erased person back by retyping their id."""
    if message.startswith("la:"):
        return "la:" + message[3:].upper()
    return message


def register_form_sql(message_sql: str) -> str:
    return f"(CASE WHEN starts_with({message_sql}, 'la:') THEN 'la:' || upper(substr({message_sql}, 4)) " \
           f"ELSE {message_sql} END)"


def register_token(key: PseudoKey, message: str) -> str:
    return token(key, REGISTER_PREFIX + register_form(message))


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
                canonical = register_form_sql(f"({message})")
                terms.append(f"coalesce({hmac_sql(f'{REGISTER_PREFIX!r} || {canonical}', (f'ipad_{i}', f'opad_{i}'))}"
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


# A reason is a case reference plus, at most, words from this list: free text could name the person
# or carry their date of birth, postcode or NHS number into the audit log, which is kept for ever.
REASON_WORDS = frozenset("""
    a access an and advocate article by case consent copy correction council court data deceased dpo duplicate
    entered erase erasure error for from gdpr ico in la lift lifted object objected objection of on opt opt-out
    order out person record records rectification ref reference representative request requested restrict
    restriction review right rights solicitor subject test the their to uk under unrestrict withdrawn with wrong
    wrongly
""".split())
# A case reference: letters, then up to four groups of at most six digits (SAR-2026-0042, DSR/2026/17,
# ICO12345, T1). Groups of seven digits or more could be an NHS number or a date of birth.
REFERENCE_RE = re.compile(r"[A-Za-z]{1,12}(?:[-/][A-Za-z]{1,12})?[-/]?\d{1,6}(?:[-/]\d{1,6}){0,3}")


def _hides_an_identifier(digits: str) -> bool:
    """Any run of the reason's digits, read together, that is a valid NHS number or a plausible date
    of birth (YYYYMMDD, DDMMYYYY or DDMMYY): splitting them across a reference does not hide them."""
    def date(day: int, month: int, year: int) -> bool:
        try:
            return 1890 <= year <= dt.date.today().year and bool(dt.date(year, month, day))
        except ValueError:
            return False

    for i in range(len(digits)):
        if is_valid_nhs_number(digits[i:i + 10]) and len(digits[i:i + 10]) == 10:
            return True
        w8, w6 = digits[i:i + 8], digits[i:i + 6]
        if len(w8) == 8 and (date(int(w8[6:]), int(w8[4:6]), int(w8[:4])) or date(int(w8[:2]), int(w8[2:4]), int(w8[4:]))):
            return True
        if len(w6) == 6 and date(int(w6[:2]), int(w6[2:4]), 1900 + int(w6[4:])):
            return True
    return False


def check_reason(text: str) -> str:
    """The reason for a rights request, as the audit log may hold it: a case reference and words
    from REASON_WORDS (article numbers too); anything else is refused, naming no value."""
    text = " ".join((text or "").split())
    if not text:
        raise RightsError("--reason is required (it is recorded in the audit log): give the case reference.")
    words = [w.strip(",.;:()") for w in text.split()]
    references = [w for w in words if REFERENCE_RE.fullmatch(w)]
    others = [w for w in words if w and not REFERENCE_RE.fullmatch(w) and w.lower() not in REASON_WORDS
              and not re.fullmatch(r"\d{1,2}", w)]
    if _hides_an_identifier("".join(c for c in text if c.isdigit())):
        raise RightsError("--reason has digits that could be an NHS number or a date of birth, however they are "
                          "split; give the case reference in another form.")
    if not references or others:
        raise RightsError(
            "--reason must be a case reference (such as SAR-2026-0042) with, at most, a few plain words such as "
            "'subject access request' or 'erasure': the audit log is kept for ever and must never hold a name, "
            f"date of birth, postcode or NHS number. {len(others)} word(s) were not accepted"
            f"{'' if references else ', and no case reference was given'}.")
    return text


def check_free_text(label: str, text: str) -> str:
    """Free text for the audit log (who requested): refuse anything that looks like an identifier,
    however it is written (digits split by spaces, dots or dashes; a postcode with or without its space)."""
    from cld_pipeline.lib.privacy.identifiers import POSTCODE_RE

    text = " ".join(text.split())
    if not text:
        raise RightsError(f"{label} is required (it is recorded in the audit log).")
    squeezed = text.upper().replace(" ", "")
    looks_like = (re.search(r"\d[\d\s./-]{5,}\d", text)
                  or any(POSTCODE_RE.match(w.upper()) for w in text.split())
                  or any(POSTCODE_RE.match(squeezed[i:i + n]) for n in (5, 6, 7) for i in range(len(squeezed) - n + 1))
                  or re.search(r"\d{1,2}\s*[A-Za-z]{3,9}\s*\d{2,4}", text))    # 2 March 1950
    if looks_like:
        raise RightsError(f"{label} looks as if it contains an identifier (a long number, a date or a postcode); "
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
                [request_id, action, check_free_text("--requested-by", requested_by), check_reason(reason)])
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
    if not table_exists(con, "raw", "events"):
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


def rows_held(con: duckdb.DuckDBPyConnection, person: Person) -> int:
    """How many submitted rows (social care and hospital) name the person, matched as the
    suppression list matches: NHS number by its digits, LA person id trimmed and case-folded."""
    wanted = sorted({register_form(m) for m in person.messages()})
    total = 0
    if table_exists(con, "raw", "events"):
        total += con.execute(f"""
            SELECT count(*) FROM raw.events e JOIN raw.submissions s USING (submission_id)
            WHERE {register_form_sql(nhs_message_sql('e.nhs_number'))} IN (SELECT unnest($m))
               OR {register_form_sql(la_message_sql('s.la_code', 'e.la_person_unique_identifier'))}
                  IN (SELECT unnest($m))""", {"m": wanted}).fetchall()[0][0]
    if table_exists(con, "raw", "hospital_episodes"):
        total += con.execute(f"SELECT count(*) FROM raw.hospital_episodes WHERE {nhs_message_sql('nhs_number')} "
                             "IN (SELECT unnest($m))", {"m": wanted}).fetchall()[0][0]
    return total


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
