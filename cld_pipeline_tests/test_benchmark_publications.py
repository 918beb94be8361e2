"""What DHSC and its peers publish beside the headline measures: ASCOF exclusions and 2A outcomes,
waiting times by quarter and age band with their context and diagnostics, Better Care Fund
metrics, the data-quality benchmark, release-on-release changes, the method log, the operator's
excluded submissions, and councils without a submission (never valued or ranked)."""

from __future__ import annotations

import datetime as dt
import re
import shutil
from pathlib import Path

import dagster as dg
import duckdb
import pytest

from cld_pipeline.lib.benchmark import build, exclusions, method

from .conftest import environment

QUARTER = "2026-Q3"


def _analytics(data_dir: Path) -> duckdb.DuckDBPyConnection:
    return duckdb.connect(str(data_dir / "analytics.duckdb"), read_only=True)


def _identifiable(data_dir: Path) -> duckdb.DuckDBPyConnection:
    return duckdb.connect(str(data_dir / "identifiable.duckdb"), read_only=True)


# --- councils without a submission ------------------------------------------------------------------

def test_councils_without_a_file_are_marked_never_valued_ranked_or_charted(pseudonymised_pipeline):
    data_dir, _, _, _ = pseudonymised_pipeline
    with _analytics(data_dir) as con:
        submitted = {la for (la,) in con.execute("SELECT DISTINCT la_code FROM pseudonymised.submissions").fetchall()}
        marked = con.execute("""SELECT DISTINCT geography_code FROM benchmark.ascof WHERE quarter = ?
                                AND no_submission""", [QUARTER]).fetchall()
        assert len(marked) == 153 - len(submitted) and not {m for (m,) in marked} & submitted
        assert con.execute("""SELECT count(*) FROM benchmark.ascof WHERE quarter = ? AND no_submission
                              AND (value IS NOT NULL OR numerator IS NOT NULL)""", [QUARTER]).fetchall()[0][0] == 0
        ranks = con.execute("""SELECT max(las_ranked), count(*) FILTER (WHERE no_submission AND la_rank IS NOT NULL),
                                      count(*) FILTER (WHERE no_submission AND la_value IS NOT NULL)
                               FROM benchmark.comparison WHERE quarter = ? AND figure LIKE 'ascof%'""",
                            [QUARTER]).fetchall()[0]
        assert ranks == (len(submitted), 0, 0)
        # England's 2C rate is over the populations of councils that submitted, not all 153.
        england, populations = con.execute("""SELECT e.denominator, sum(l.denominator) FROM benchmark.ascof e
            JOIN benchmark.ascof l ON l.quarter = e.quarter AND l.measure = e.measure AND l.measure_group = e.measure_group
             AND l.geography_level = 'LA' AND NOT l.no_submission
            WHERE e.quarter = ? AND e.geography_level = 'England' AND e.measure = '2C' GROUP BY 1""",
                                           [QUARTER]).fetchall()[0]
        assert england == populations
    page = (data_dir / "reports" / "dashboards" / QUARTER / "england.html").read_text(encoding="utf-8")
    assert "no submission" in page and "not ranked" in page
    assert not re.search(rf"<td>1</td>\s*<td>{153}</td>", page), "nobody is ranked out of all 153 councils"


# --- ASCOF exclusions and the 2A breakdown ------------------------------------------------------------

def test_ascof_exclusions_and_2a_outcomes_agree_with_the_unsuppressed_measures(pseudonymised_pipeline):
    data_dir, _, _, _ = pseudonymised_pipeline
    with _identifiable(data_dir) as con:
        # The 2A breakdown adds up to the measure, council by council, before rounding.
        mismatched = con.execute("""
            WITH o AS (SELECT geography_code, sum(clusters) FILTER (WHERE in_numerator) AS num,
                              sum(clusters) FILTER (WHERE in_denominator) AS den
                       FROM benchmark_unsuppressed.ascof_2a_outcomes WHERE quarter = ? AND age_group = 'Total' GROUP BY 1)
            SELECT count(*) FROM benchmark_unsuppressed.ascof a JOIN o USING (geography_code)
            WHERE a.quarter = ? AND a.measure = '2A' AND a.measure_group = 'Total'
              AND (coalesce(o.num, 0) <> a.numerator OR coalesce(o.den, 0) <> a.denominator)""",
                                 [QUARTER, QUARTER]).fetchall()[0][0]
        assert mismatched == 0
        sequels = {s for (s,) in con.execute("SELECT DISTINCT sequel_type FROM benchmark_unsuppressed.ascof_2a_outcomes "
                                             "WHERE quarter = ?", [QUARTER]).fetchall()}
        assert {"3", "4a", "6"} <= sequels, sequels
        exclusions_by_measure = dict(con.execute(
            "SELECT measure, sum(people) FROM benchmark_unsuppressed.ascof_exclusions WHERE quarter = ? "
            "AND geography_level = 'LA' GROUP BY 1", [QUARTER]).fetchall())
        assert set(exclusions_by_measure) == {"2E", "2E-LD", "3D (clients)", "3D (carers)"}
        assert exclusions_by_measure["2E"] > 0 and exclusions_by_measure["2E"] >= exclusions_by_measure["2E-LD"]


# --- waiting times by quarter -------------------------------------------------------------------------

def test_quarterly_waits_diagnostics_add_up_to_the_waits(pseudonymised_pipeline):
    """DHSC's identities: response_event_request + _assessment + _service = Number_Of_Waiting_Times_Identified;
    the service types behind part 2 add up to its waits."""
    data_dir, _, _, _ = pseudonymised_pipeline
    with _identifiable(data_dir) as con:
        bad = con.execute("""
            SELECT count(*) FROM benchmark_unsuppressed.waiting_times_quarterly q
            JOIN (SELECT geography_level, geography_code, statistical_quarter_start, age_band, interval, diagnostic,
                         sum(waits) FILTER (WHERE diagnostic_value <> 'Total') AS parts,
                         sum(waits) FILTER (WHERE diagnostic_value = 'Total') AS total
                  FROM benchmark_unsuppressed.waiting_time_diagnostics WHERE quarter = ? GROUP BY ALL) d
              USING (geography_level, geography_code, statistical_quarter_start, age_band, interval)
            WHERE q.quarter = ? AND d.diagnostic <> 'assessment type' AND (d.parts <> q.waits OR d.total <> q.waits)""",
                          [QUARTER, QUARTER]).fetchall()[0][0]
        assert bad == 0
        bands = {b for (b,) in con.execute("SELECT DISTINCT age_band FROM benchmark_unsuppressed.waiting_times_quarterly "
                                           "WHERE quarter = ?", [QUARTER]).fetchall()}
        assert bands == {"25 to 64", "65 and above"}
    with _analytics(data_dir) as con:
        quarters = con.execute("""SELECT min(statistical_quarter_start), max(statistical_quarter_start),
                                         bool_and(statistical_quarter_end = strftime(last_day(statistical_quarter_start
                                                  + INTERVAL 2 MONTH), '%Y-%m-%d'))
                                  FROM benchmark.waiting_times_quarterly WHERE quarter = ?""", [QUARTER]).fetchall()[0]
        assert quarters[1] == dt.date(2026, 7, 1) and quarters[0] < quarters[1] and quarters[2]


# --- Better Care Fund, data quality, method log --------------------------------------------------------

def test_bcf_data_quality_and_method_log_are_published(pseudonymised_pipeline):
    data_dir, _, _, _ = pseudonymised_pipeline
    with _analytics(data_dir) as con:
        bcf = con.execute("""SELECT DISTINCT measure, geography_level, region_code IS NOT NULL FROM benchmark.bcf_metrics
                             WHERE quarter = ? AND NOT no_submission""", [QUARTER]).fetchall()
        assert {("2C", "LA", True), ("2C", "Region", True), ("2C", "England", False)} <= set(bcf)
        dq = con.execute("""SELECT count(*), count(*) FILTER (WHERE geography_level = 'England'),
                                   bool_and(share_percent BETWEEN 0 AND 100 OR share_percent IS NULL)
                            FROM benchmark.data_quality WHERE quarter = ?""", [QUARTER]).fetchall()[0]
        assert dq[0] > dq[1] > 0 and dq[2]
        beside = con.execute("""SELECT count(*) FROM benchmark.data_quality l JOIN benchmark.data_quality e
                                ON e.quarter = l.quarter AND e.geography_level = 'England' AND e.field = l.field
                                AND e.rule = l.rule AND e.severity = l.severity
                                WHERE l.quarter = ? AND l.england_share_percent IS DISTINCT FROM e.share_percent""",
                             [QUARTER]).fetchall()[0][0]
        assert beside == 0
        log = con.execute("SELECT quarter, method_version FROM benchmark.method_log ORDER BY 1").fetchall()
        assert (QUARTER, method.METHOD_VERSION) in log
    page = next(p for p in (data_dir / "reports" / "dashboards" / QUARTER).glob("*.html") if p.name != "england.html")
    text = page.read_text(encoding="utf-8")
    for title in ("what followed reablement", "Waiting times by quarter and age band", "could not place",
                  "Better Care Fund metrics", "Data quality beside England", "Moves since the previous quarter",
                  f"method version <strong>{method.METHOD_VERSION}</strong>"):
        assert title in text, title


# --- release-on-release -------------------------------------------------------------------------------

def _release_fixture(con, previous: dict, current: dict) -> None:
    con.execute("CREATE SCHEMA benchmark")
    con.execute("CREATE TABLE population AS SELECT * FROM (VALUES ('A', 'R1', 'North'), ('B', 'R1', 'North'), "
                "('C', 'R1', 'North')) t(la_code, region_code, region_name)")
    for schema, quarter, values in (("benchmark.", "2026-Q2", previous), ("", "2026-Q3", current)):
        con.execute(f"""CREATE TABLE {schema}ascof AS SELECT '{quarter}' AS quarter, DATE '2026-11-01' AS as_of_date,
                        'LA' AS geography_level,
                        code AS geography_code, code AS geography_name, '2A' AS measure, 'Total' AS measure_group,
                        CAST(NULL AS BIGINT) AS numerator, CAST(NULL AS BIGINT) AS denominator, v AS value,
                        false AS no_submission, '' AS submission_ids
                        FROM (VALUES {', '.join(f"('{k}', {v})" for k, v in values.items())}) t(code, v)""")
        con.execute(f"""CREATE TABLE {schema}waiting_times (quarter VARCHAR, geography_level VARCHAR,
                        geography_code VARCHAR, geography_name VARCHAR, interval VARCHAR, median_days DOUBLE)""")


def test_release_changes_flag_moves_beyond_the_threshold():
    con = duckdb.connect()
    _release_fixture(con, {"A": 50.0, "B": 50.0, "C": 0.0}, {"A": 53.0, "B": 52.0, "C": 5.0})
    inputs = build.BenchmarkInputs("2026-Q3", dt.date(2025, 10, 1), dt.date(2026, 9, 30), dt.date(2026, 11, 1))
    build.build_release_tables(con, inputs)
    got = dict(con.execute("SELECT geography_code, flagged FROM release_changes").fetchall())
    assert got == {"A": True, "B": False, "C": True}      # +6%, +4%, from 0
    build.build_release_tables(con, inputs, threshold=0.10)
    assert dict(con.execute("SELECT geography_code, flagged FROM release_changes").fetchall()) == {
        "A": False, "B": False, "C": True}
    assert con.execute("SELECT method_version FROM method_log").fetchall() == [(method.METHOD_VERSION,)]


def test_method_log_entries_are_ordered_and_the_current_version_is_the_last():
    versions = [tuple(int(x) for x in c.version.split(".")) for c in method.CHANGES]
    assert versions == sorted(versions) and len(set(versions)) == len(versions)
    assert method.METHOD_VERSION == method.CHANGES[-1].version and all(c.changes for c in method.CHANGES)


# --- the operator's excluded submissions -------------------------------------------------------------

def test_an_excluded_reason_holding_an_identifier_is_refused():
    con = duckdb.connect()
    con.execute("CREATE SCHEMA pseudonymised")
    con.execute("CREATE TABLE pseudonymised.submissions AS SELECT 's1' AS submission_id, '123' AS la_code, "
                "'2026-Q3' AS quarter")
    for reason in ("sent by 943 476 5919", "wrong file for DN16 3QF", "born 2 March 1950"):
        with pytest.raises(exclusions.ExclusionError) as refused:
            exclusions.exclude(con, "s1", reason, "operator")
        assert "5919" not in str(refused.value) and "3QF" not in str(refused.value)
    with pytest.raises(exclusions.ExclusionError, match="No submission"):
        exclusions.exclude(con, "nope", "test upload", "operator")
    row = exclusions.exclude(con, "s1", "council's test upload", "operator")
    assert (row["la_code"], row["quarter"]) == ("123", "2026-Q3")
    assert [r["submission_id"] for r in exclusions.listing(con)] == ["s1"]
    assert exclusions.include(con, "s1") and not exclusions.include(con, "s1")


def test_an_excluded_submission_is_never_chosen_and_its_reason_is_shown(pseudonymised_pipeline, tmp_path):
    """DHSC's GetSubmissionsV2 drops blacklisted imports before taking each council's latest file, so
    the council's earlier file covers the period; the dashboards say which file was left out and why."""
    data_dir, _, _, _ = pseudonymised_pipeline
    copy = tmp_path / "data"
    shutil.copytree(data_dir, copy, ignore=shutil.ignore_patterns("reports", "archive", "landing", "*.lock"))
    from cld_pipeline.commands.cli import main
    from cld_pipeline.definitions import defs

    with duckdb.connect(str(copy / "analytics.duckdb"), read_only=True) as con:
        la, earlier, latest = con.execute("""SELECT la_code, arg_min(submission_id, received_at),
                                                    arg_max(submission_id, received_at)
                                             FROM pseudonymised.submissions WHERE quarter = ? GROUP BY 1
                                             HAVING count(*) > 1 ORDER BY 1 LIMIT 1""", [QUARTER]).fetchall()[0]
    with environment(CLD_DATA_DIR=str(copy), DAGSTER_HOME=str(copy / "dagster_home")):
        assert main(["exclude", "add", "--submission", latest, "--reason", "withdrawn by the council",
                     "--by", "cld-operator"]) == 0
        assert main(["exclude", "add", "--submission", latest, "--reason", "NHS 9434765919", "--by", "x"]) == 2
        job = defs().resolve_job_def("benchmark_quarter_job")
        result = job.execute_in_process(run_config={"ops": {"benchmark_quarter": {"config": {"as_of_date": "2030-01-01"}}}},
                                        instance=dg.DagsterInstance.get(), partition_key=QUARTER)
        assert result.success
        checks = {e.check_name: e for e in result.get_asset_check_evaluations()}
        assert "release_on_release" in checks and checks["disclosure_control"].passed
    with duckdb.connect(str(copy / "analytics.duckdb"), read_only=True) as con:
        ids = con.execute("SELECT submission_ids FROM benchmark.activity WHERE quarter = ? AND geography_code = ? "
                          "LIMIT 1", [QUARTER, la]).fetchall()[0][0].split(",")
        assert latest not in ids and earlier in ids
        assert con.execute("SELECT reason FROM benchmark.excluded_submissions").fetchall() == [
            ("withdrawn by the council",)]
    with duckdb.connect(str(copy / "identifiable.duckdb"), read_only=True) as con:
        assert con.execute("SELECT count(*) FROM audit.log WHERE action = 'exclude:add'").fetchall()[0][0] == 1
    page = (copy / "reports" / "dashboards" / QUARTER / f"{la}.html").read_text(encoding="utf-8")
    assert "withdrawn by the council" in page and latest in page
