"""The code location loads, follows the project's Dagster conventions, and its assets materialise."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import dagster as dg
import duckdb
import pytest

from cld_pipeline.defs.reference.assets import code_lists, local_authorities, local_authorities_complete

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


@pytest.fixture
def data_dir(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("CLD_DATA_DIR", str(tmp_path))
    return tmp_path


def load_defs() -> dg.Definitions:
    from cld_pipeline.definitions import defs
    return defs()


def test_definitions_load_with_every_asset_described_owned_and_grouped(data_dir):
    defs = load_defs()
    graph = defs.resolve_asset_graph()
    keys = {k.to_user_string() for k in graph.get_all_asset_keys()}
    assert {"reference/local_authorities", "reference/code_lists", "raw/submissions", "raw/events",
            "validated/events", "validated/rejections", "validated/dq_flags", "pseudonymised/events"} <= keys
    assert {s.name for s in defs.sensors} >= {"landing_sensor"}
    assert {j.name for j in defs.jobs} >= {"ingest_submission_job", "quarantine_job"}
    for spec in defs.resolve_all_asset_specs():
        assert spec.description, spec.key
        assert spec.group_name and spec.group_name != "default", spec.key
        assert spec.owners, spec.key
        assert spec.kinds, spec.key
    assert set(defs.resources) >= {"identifiable_db", "analytics_db", "pseudonymisation_key"}


@pytest.mark.parametrize("command", [
    ["dagster", "definitions", "validate", "-w", "workspace.yaml"],
    ["dg", "check", "defs"],
])
def test_dagster_cli_validates_the_code_location(command, data_dir):
    env = {**os.environ, "CLD_DATA_DIR": str(data_dir)}
    env.pop("DAGSTER_HOME", None)
    done = subprocess.run([str(BIN / command[0]), *command[1:]], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stdout + done.stderr


def test_reference_assets_materialise_into_the_analytics_zone(data_dir):
    defs = load_defs()
    result = dg.materialize(
        [local_authorities, code_lists, local_authorities_complete],
        resources=defs.resources,
        instance=dg.DagsterInstance.ephemeral(),
    )
    assert result.success
    checks = result.get_asset_check_evaluations()
    assert [c.passed for c in checks] == [True]
    materialisations = {e.asset_key.to_user_string(): e.materialization.metadata
                        for e in result.get_asset_materialization_events()}
    assert materialisations["reference/local_authorities"]["dagster/row_count"].value == 153
    assert "dagster/column_schema" in materialisations["reference/code_lists"]
    with duckdb.connect(str(data_dir / "analytics.duckdb"), read_only=True) as con:
        england = con.execute("SELECT sum(population_18_plus), count(DISTINCT region_code) "
                              "FROM reference.local_authorities").fetchall()[0]
        assert england == (46_437_085, 9)   # DHSC's published England total (reference README)
        outcome = con.execute("""SELECT value_group, rank FROM reference.code_list_values
                                 WHERE code_list = 'event_outcome' AND key = 'nfa_deceased'""").fetchall()
        assert outcome == [("NFA", 13)]
        mapped = con.execute("""SELECT count(*) FROM reference.code_list_mappings m
                                LEFT JOIN reference.code_list_values v
                                  ON v.code_list = m.code_list AND v.value = m.cleaned_value
                                WHERE v.value IS NULL AND m.cleaned_value <> 'Invalid and not mapped'""").fetchall()[0][0]
        assert mapped == 0


def test_spec_docs_are_up_to_date():
    from cld_pipeline.spec.docs import DOC_PATH, render_field_docs

    assert DOC_PATH.read_text(encoding="utf-8") == render_field_docs(), "run `make docs`"
