"""The audit log: who did what, when and why, in the processor zone (privacy.md section 4.6).

`audit.log` in identifiable.duckdb is append-only: the only write is `append`, and every entry
carries the SHA-256 of the previous entry and of itself, so an edited or deleted entry breaks the
chain (`verify`). Entries hold request ids, asset keys, partition keys, row counts and run ids,
never an identifier or a token. Dagster runs and materialisations are copied in from the instance's
event log by `defs/operations/audit.py`'s `sync_dagster` (the audit sensor under the daemon, and every CLI command), so runs
started by a sensor, a backfill, the UI or the CLI are all recorded the same way.
"""

from __future__ import annotations

import datetime as dt
import getpass
import hashlib
import json
import os

import duckdb

GENESIS = "0" * 64
FINISHED = ("SUCCESS", "FAILURE", "CANCELED")


def ensure_schema(con: duckdb.DuckDBPyConnection) -> None:
    con.execute("CREATE SCHEMA IF NOT EXISTS audit")
    con.execute("""CREATE TABLE IF NOT EXISTS audit.log (
        seq BIGINT PRIMARY KEY, logged_at TIMESTAMP NOT NULL, actor VARCHAR NOT NULL, role VARCHAR, purpose VARCHAR,
        action VARCHAR NOT NULL, target VARCHAR, detail JSON, run_id VARCHAR,
        prev_hash VARCHAR NOT NULL, entry_hash VARCHAR NOT NULL)""")


def current_actor() -> str:
    """Who is acting: `CLD_ACTOR` (set by the deployment per person or service), else the OS user."""
    try:
        return os.environ.get("CLD_ACTOR") or getpass.getuser()
    except Exception:  # no user name in some containers
        return "unknown"


def _digest(prev: str, fields: list) -> str:
    return hashlib.sha256(json.dumps([prev, *fields], default=str, sort_keys=True).encode()).hexdigest()


def append(con: duckdb.DuckDBPyConnection, action: str, target: str | None = None, detail: dict | None = None,
           actor: str | None = None, purpose: str | None = None, run_id: str | None = None,
           at: dt.datetime | None = None) -> int:
    """Add one entry at the end of the chain; returns its sequence number."""
    ensure_schema(con)
    last = con.execute("SELECT seq, entry_hash FROM audit.log ORDER BY seq DESC LIMIT 1").fetchall()
    seq, prev = (last[0][0] + 1, last[0][1]) if last else (1, GENESIS)
    at = (at or dt.datetime.now(dt.timezone.utc)).replace(tzinfo=None, microsecond=0)
    fields = [seq, at.isoformat(), actor or current_actor(), os.environ.get("CLD_ROLE", "operator"), purpose,
              action, target, json.dumps(detail or {}, sort_keys=True, default=str), run_id]
    con.execute("INSERT INTO audit.log VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", [*fields, prev, _digest(prev, fields)])
    return seq


def verify(con: duckdb.DuckDBPyConnection) -> int | None:
    """The first entry whose chain is broken (edited, removed or reordered), or None when intact."""
    ensure_schema(con)
    prev = GENESIS
    rows = con.execute("SELECT seq, logged_at, actor, role, purpose, action, target, detail, run_id, prev_hash, entry_hash "
                       "FROM audit.log ORDER BY seq").fetchall()
    for expected, row in enumerate(rows, start=1):
        seq, at, *rest, prev_hash, entry_hash = row
        fields = [seq, at.isoformat(), *rest]
        if seq != expected or prev_hash != prev or _digest(prev, fields) != entry_hash:
            return seq
        prev = entry_hash
    return None


def who(tags: dict) -> tuple[str, str]:
    """(actor, purpose) of a Dagster run from its tags."""
    if "cld/actor" in tags:
        return tags["cld/actor"], tags.get("cld/purpose", "operator command")
    if "dagster/sensor_name" in tags:
        return f"sensor:{tags['dagster/sensor_name']}", "automatic processing on arrival or change"
    if "dagster/schedule_name" in tags:
        return f"schedule:{tags['dagster/schedule_name']}", "scheduled job"
    if "dagster/backfill" in tags:
        return f"backfill:{tags['dagster/backfill']}", "backfill"
    return tags.get("user", "dagster-ui"), tags.get("cld/purpose", "launched from the Dagster UI")


def entries(con: duckdb.DuckDBPyConnection, action: str | None = None, limit: int | None = None) -> list[dict]:
    ensure_schema(con)
    where = "WHERE action = ? OR action LIKE ?" if action else ""
    params = [action, action + ":%"] if action else []
    sql = (f"SELECT seq, logged_at, actor, role, purpose, action, target, detail, run_id FROM audit.log {where} "
           f"ORDER BY seq DESC{f' LIMIT {int(limit)}' if limit else ''}")
    cur = con.execute(sql, params)
    names = [d[0] for d in cur.description]
    return [dict(zip(names, row)) for row in reversed(cur.fetchall())]
