"""The public surface, snapshotted: a rename is a deliberate act, never an accident.

Operators' scripts, the UI's bookmarks, analysts' queries and the acceptance checks name assets,
checks, jobs, sensors and table columns. This compares them with `snapshots/public_surface.json`.
After an intended change, regenerate the file and commit it with the change (and a migration note
in the README where the contract is touched):

    CLD_UPDATE_SNAPSHOTS=1 .venv/bin/python -m pytest cld_pipeline_tests/test_public_surface.py
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import duckdb
import pytest

SNAPSHOT = Path(__file__).parent / "snapshots" / "public_surface.json"


def _compare(section: str, actual) -> None:
    stored = json.loads(SNAPSHOT.read_text()) if SNAPSHOT.exists() else {}
    if os.environ.get("CLD_UPDATE_SNAPSHOTS"):
        stored[section] = actual
        SNAPSHOT.write_text(json.dumps(dict(sorted(stored.items())), indent=1, sort_keys=True) + "\n")
        return
    assert section in stored, f"no snapshot of {section}: regenerate with CLD_UPDATE_SNAPSHOTS=1"
    expected = stored[section]
    if isinstance(expected, dict):
        gone = sorted(set(expected) - set(actual))
        new = sorted(set(actual) - set(expected))
        changed = sorted(k for k in set(expected) & set(actual) if expected[k] != actual[k])
        assert (gone, new, changed) == ([], [], []), (
            f"{section}: removed {gone}, added {new}, changed {changed}; if intended, regenerate the snapshot")
    else:
        assert actual == expected, (f"{section}: removed {sorted(set(expected) - set(actual))}, "
                                    f"added {sorted(set(actual) - set(expected))}; if intended, regenerate")


def test_dagster_objects_keep_their_names(tmp_path, monkeypatch):
    monkeypatch.setenv("CLD_DATA_DIR", str(tmp_path))
    from cld_pipeline.definitions import defs as load

    defs = load()
    graph = defs.resolve_asset_graph()
    assets = {}
    for spec in defs.resolve_all_asset_specs():
        partitions = spec.partitions_def
        assets[spec.key.to_user_string()] = {
            "group": spec.group_name,
            "partitions": type(partitions).__name__ if partitions else None,
        }
    checks = sorted(f"{key.asset_key.to_user_string()}:{key.name}" for key in graph.asset_check_keys)
    _compare("assets", assets)
    _compare("asset_checks", checks)
    _compare("jobs", sorted(j.name for j in defs.jobs if not j.name.startswith("__")))
    _compare("sensors", sorted(s.name for s in defs.sensors))
    _compare("schedules", sorted(s.name for s in defs.schedules))
    _compare("resources", sorted(defs.resources))


def test_the_tables_keep_their_columns(pseudonymised_pipeline):
    """Every table of both zones after a full run of the tiny collection, column names and types
    (but the `analyst` schema, which holds whatever cohorts analysts have materialised)."""
    data_dir = pseudonymised_pipeline[0]
    tables = {}
    for zone in ("identifiable", "analytics"):
        with duckdb.connect(str(data_dir / f"{zone}.duckdb"), read_only=True) as con:
            for schema, table, column, kind in con.execute(
                    "SELECT table_schema, table_name, column_name, data_type FROM information_schema.columns "
                    "WHERE table_catalog = current_database() AND table_schema <> 'analyst' ORDER BY table_schema, table_name, ordinal_position"
            ).fetchall():
                tables.setdefault(f"{zone}:{schema}.{table}", []).append(f"{column} {kind}")
    _compare("tables", tables)


def test_the_snapshot_check_catches_a_rename(monkeypatch):
    monkeypatch.delenv("CLD_UPDATE_SNAPSHOTS", raising=False)   # updating would write the rename to the snapshot
    with pytest.raises(AssertionError, match="removed"):
        stored = json.loads(SNAPSHOT.read_text())["jobs"]
        _compare("jobs", [name + "_renamed" for name in stored])
