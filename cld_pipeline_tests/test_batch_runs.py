"""A quarter processed as one set-based run gives exactly what one run per file gives.

`cld-pipeline run` over a landing folder of many files validates and pseudonymises each quarter's
councils in one run (a range of partitions, as a single-run backfill). Here the same partitions are
then rebuilt two other ways on a copy: one run per partition (what the landing sensor does for an
arriving file), and one backfill-style range run over a quarter including the raw layer (re-landed
from the archive). Every table's content must be the same all three ways.
"""

from __future__ import annotations

import shutil

import duckdb
import pytest

from cld_pipeline_tests.conftest import PIPELINE_KEY, environment

# Content of each table, without the columns that record when or how long.
TABLES = {
    "identifiable.duckdb": {
        "raw.events": "*",
        "validated.events": "*",
        "validated.rejections": "*",
        "validated.dq_flags": "*",
        "validated.submissions": "submission_id, la_code, quarter, raw_rows, accepted_rows, rejected_rows, "
                                 "flagged_rows, derived_period_start, derived_period_end, period_differs, usable",
    },
    "analytics.duckdb": {"pseudonymised.events": "*", "pseudonymised.events_history": "*",
                         "pseudonymised.submissions": "*"},
}


def fingerprints(data_dir) -> dict[str, tuple]:
    out = {}
    for db, tables in TABLES.items():
        with duckdb.connect(str(data_dir / db), read_only=True) as con:
            for table, columns in tables.items():
                out[table] = con.execute(
                    f"SELECT count(*), sum(hash(t)) FROM (SELECT {columns} FROM {table}) t").fetchall()[0]
    return out


@pytest.fixture(scope="module")
def batched(pseudonymised_pipeline, tmp_path_factory):
    data_dir, *_ = pseudonymised_pipeline
    copy = tmp_path_factory.mktemp("batch") / "data"
    shutil.copytree(data_dir, copy)
    return copy


def _partitions(data_dir) -> list[tuple[str, str]]:
    with duckdb.connect(str(data_dir / "identifiable.duckdb"), read_only=True) as con:
        return con.execute("SELECT DISTINCT la_code, quarter FROM raw.submissions WHERE status = 'accepted' "
                           "ORDER BY ALL").fetchall()


def test_the_landing_run_batched_each_quarter(pseudonymised_pipeline):
    """The fixture's run processed its files with raw runs per file and batch runs per quarter."""
    data_dir, _, _, summary = pseudonymised_pipeline
    with environment(DAGSTER_HOME=str(data_dir / "dagster_home")):
        import dagster as dg

        instance = dg.DagsterInstance.get()
        ranged = [r for r in instance.get_runs() if "dagster/asset_partition_range_start" in r.tags]
        instance.dispose()
    assert len(summary.accepted) > 2 and ranged, "expected batch runs over ranges of partitions"
    covered = sum(int(r.tags["cld/las"]) for r in ranged)
    assert covered >= len({(e["la"], e["quarter"]) for e in summary.accepted if e.get("la")})


def test_per_partition_runs_and_a_range_backfill_reproduce_the_batch(batched):
    from cld_pipeline.definitions import defs as load_defs
    from cld_pipeline.defs.partitions import submission_partition_key
    from cld_pipeline.commands.run import BATCH_ASSETS, RANGE_END, RANGE_START, RAW_ASSETS, la_blocks, prepare_instance

    before = fingerprints(batched)
    assert before["validated.events"][0] > 0 and before["pseudonymised.events"][0] > 0
    with environment(CLD_DATA_DIR=str(batched), DAGSTER_HOME=str(batched / "dagster_home"),
                     CLD_PSEUDO_KEY=PIPELINE_KEY, CLD_ENVIRONMENT="production"):
        instance = prepare_instance()
        job = load_defs().resolve_job_def("ingest_submission_job")
        # One run per partition (an arriving file's run shape).
        for la, quarter in _partitions(batched):
            result = job.execute_in_process(instance=instance, asset_selection=BATCH_ASSETS, raise_on_error=False,
                                            partition_key=str(submission_partition_key(la, quarter)))
            assert result.success, (la, quarter)
        assert fingerprints(batched) == before
        # A backfill of each quarter's councils, raw layer included, as ranges of partitions; the
        # pandas-bound validation steps in worker processes.
        with environment(CLD_VALIDATION_WORKERS="2"):
            for quarter in sorted({q for _, q in _partitions(batched)}):
                las = {la for la, q in _partitions(batched) if q == quarter}
                for block in la_blocks(las):
                    result = job.execute_in_process(
                        instance=instance, asset_selection=RAW_ASSETS + BATCH_ASSETS, raise_on_error=False,
                        tags={RANGE_START: str(submission_partition_key(block[0], quarter)),
                              RANGE_END: str(submission_partition_key(block[-1], quarter))})
                    assert result.success, (quarter, block)
                    partitions = {e.partition for e in result.get_asset_materialization_events()
                                  if e.asset_key.path == ["validated", "events"]}
                    assert partitions == {str(submission_partition_key(la, quarter)) for la in block}
        instance.dispose()
    assert fingerprints(batched) == before


def test_a_range_over_a_council_that_never_submitted_fails_plainly(batched):
    from cld_pipeline.definitions import defs as load_defs
    from cld_pipeline.defs.partitions import la_partitions, submission_partition_key
    from cld_pipeline.commands.run import BATCH_ASSETS, RANGE_END, RANGE_START, _failure_message, prepare_instance

    la, quarter = _partitions(batched)[0]
    order = la_partitions.get_partition_keys()
    absent = next(code for code in order if (code, quarter) not in set(_partitions(batched)))
    first, last = sorted([la, absent], key=order.index)
    with environment(CLD_DATA_DIR=str(batched), DAGSTER_HOME=str(batched / "dagster_home"),
                     CLD_PSEUDO_KEY=PIPELINE_KEY, CLD_ENVIRONMENT="production"):
        instance = prepare_instance()
        result = load_defs().resolve_job_def("ingest_submission_job").execute_in_process(
            instance=instance, asset_selection=BATCH_ASSETS, raise_on_error=False,
            tags={RANGE_START: str(submission_partition_key(first, quarter)),
                  RANGE_END: str(submission_partition_key(last, quarter))})
        instance.dispose()
    assert not result.success
    message = _failure_message(result)
    assert "No accepted submission to process for" in message and f"{absent} {quarter}" in message
