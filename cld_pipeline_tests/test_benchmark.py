"""Benchmark layer on generated data: de-duplication against the generator's truth, disclosure
control over every shared table and dashboard, reproducibility as of a date, and a real browser."""

from __future__ import annotations

import datetime as dt
import hashlib
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import dagster as dg
import duckdb
import pytest

from cld_pipeline.lib.benchmark import dhsc
from cld_pipeline.lib.privacy.disclosure import count_sql, secondary_suppression

from .conftest import ARTIFACTS, environment, find_chromium

COUNT_COLUMNS = {"events", "people", "numerator", "services", "waits", "requests", "assessments", "clusters", "rows",
                 "submitted_rows"}


def _analytics(data_dir: Path) -> duckdb.DuckDBPyConnection:
    return duckdb.connect(str(data_dir / "analytics.duckdb"), read_only=True)


# --- de-duplication against the truth -------------------------------------------------------------

@pytest.mark.parametrize("table", ["single_submissions", "joined_submissions"])
def test_unique_events_per_la_equal_the_true_events_in_the_period(pseudonymised_pipeline, table):
    data_dir, _, _, _ = pseudonymised_pipeline
    con = duckdb.connect()
    con.execute(f"ATTACH '{data_dir / 'analytics.duckdb'}' AS a (READ_ONLY)")
    con.execute(f"ATTACH '{data_dir / 'identifiable.duckdb'}' AS i (READ_ONLY)")
    truth = data_dir / "synthetic" / "truth_rows.parquet"
    defects = data_dir / "synthetic" / "defects.csv"
    # Events with an injected defect in any of their rows are left out: a corrupted identifying field
    # (an unmapped code, a missing NHS number) makes DHSC keep both versions, by design.
    con.execute(f"""CREATE TABLE row_event AS
        WITH t AS (SELECT * FROM read_parquet('{truth}')),
        damaged AS (SELECT DISTINCT t.event FROM t JOIN read_csv('{defects}', all_varchar=true) d
                    ON d.file_name = t.file_name AND CAST(d.row_number AS BIGINT) = t.row_number)
        SELECT s.submission_id, t.row_number, t.event FROM i.raw.submissions s JOIN t USING (file_name)
        WHERE t.event NOT IN (SELECT event FROM damaged)""")
    quarter = "2026-Q3"
    con.execute(f"""CREATE TABLE selection AS SELECT DISTINCT submission_id, any_value(received_at) AS received_at,
                           ref_period_start, ref_period_end
                    FROM a.dhsc.{table} WHERE benchmark_quarter = '{quarter}' GROUP BY submission_id, ref_period_start,
                         ref_period_end""")
    con.execute("""CREATE VIEW rows AS SELECT * FROM a.pseudonymised.events UNION ALL BY NAME
                   SELECT * FROM a.pseudonymised.events_history""")
    stacked = dhsc.stacked_sql("SELECT * FROM selection", "rows")
    expected = dict(con.execute(f"""SELECT s.la_code, count(DISTINCT e.event) FROM ({stacked}) s
                                    JOIN row_event e USING (submission_id, row_number) GROUP BY 1""").fetchall())
    kept = con.execute(f"""SELECT k.la_code, count(*), count(DISTINCT e.event) FROM a.dhsc.{table} k
                           JOIN row_event e USING (submission_id, row_number)
                           WHERE k.benchmark_quarter = '{quarter}' GROUP BY 1""").fetchall()
    assert len(kept) == 6
    for la, rows, events in kept:
        assert rows == events, f"{la}: a true event kept twice"
        assert events == expected[la], f"{la}: {events} unique events, {expected[la]} true events in the period"


# --- disclosure control ---------------------------------------------------------------------------

def test_no_shared_table_shows_a_small_or_unrounded_count(pseudonymised_pipeline):
    data_dir, _, _, _ = pseudonymised_pipeline
    with _analytics(data_dir) as con:
        tables = [t for (t,) in con.execute("SELECT table_name FROM information_schema.tables WHERE "
                                            "table_schema = 'benchmark'").fetchall()]
        assert {"activity", "waiting_times", "ascof", "costs", "comparison", "waiting_time_bands"} <= set(tables)
        checked = 0
        for t in tables:
            cols = {c for (c,) in con.execute("SELECT column_name FROM information_schema.columns WHERE "
                                              "table_schema = 'benchmark' AND table_name = ?", [t]).fetchall()}
            for c in cols & COUNT_COLUMNS:
                bad = con.execute(f"SELECT count(*) FROM benchmark.{t} WHERE {c} IS NOT NULL AND "
                                  f"({c} BETWEEN 1 AND 7 OR {c} % 5 <> 0)").fetchall()[0][0]
                checked += con.execute(f"SELECT count({c}) FROM benchmark.{t}").fetchall()[0][0]
                assert bad == 0, (t, c)
            if "median_days" in cols:
                behind = "people" if "people" in cols else "waits"
                assert con.execute(f"SELECT count(*) FROM benchmark.{t} WHERE median_days IS NOT NULL AND "
                                   f"coalesce({behind}, 0) < 8").fetchall()[0][0] == 0
        suppressed = con.execute("SELECT count(*) FROM benchmark.activity WHERE events IS NULL").fetchall()[0][0]
        unsuppressed = {t for (t,) in con.execute("SELECT DISTINCT table_schema FROM information_schema.tables")
                        .fetchall()}
    assert checked > 1000 and suppressed > 0, "the tiny data has both shown and suppressed cells"
    assert "benchmark_unsuppressed" not in unsuppressed, "unsuppressed figures stay in the processor zone"
    with duckdb.connect(str(data_dir / "identifiable.duckdb"), read_only=True) as con:
        assert con.execute("SELECT count(*) FROM benchmark_unsuppressed.activity").fetchall()[0][0] > 0


def test_no_suppressed_cell_is_recoverable_from_its_row_or_column_total(pseudonymised_pipeline):
    data_dir, _, _, _ = pseudonymised_pipeline
    with _analytics(data_dir) as con:
        for column in ("events", "people"):
            # breakdown values of one geography add up to its total row
            lone = con.execute(f"""
                SELECT count(*) FROM (
                    SELECT b.quarter, b.geography_code, b.event_type, b.breakdown
                    FROM benchmark.activity b JOIN benchmark.activity t ON t.quarter = b.quarter
                     AND t.geography_code = b.geography_code AND t.event_type = b.event_type AND t.breakdown = 'total'
                    WHERE b.breakdown <> 'total' AND t.{column} IS NOT NULL
                    GROUP BY ALL HAVING count(*) FILTER (WHERE b.{column} IS NULL) = 1)""").fetchall()[0][0]
            assert lone == 0, f"{column}: a lone suppressed breakdown value"
            # the LAs of a region add up to the region
            lone = con.execute(f"""
                WITH la AS (SELECT a.*, p.region_code FROM benchmark.activity a
                            JOIN benchmark.comparison p ON p.la_code = a.geography_code AND p.quarter = a.quarter
                            WHERE a.geography_level = 'LA' QUALIFY row_number() OVER (PARTITION BY a.quarter,
                                a.geography_code, a.event_type, a.breakdown, a.breakdown_value) = 1)
                SELECT count(*) FROM (
                    SELECT la.quarter, la.region_code, la.event_type, la.breakdown, la.breakdown_value FROM la
                    JOIN benchmark.activity r ON r.quarter = la.quarter AND r.geography_code = la.region_code
                     AND r.event_type = la.event_type AND r.breakdown = la.breakdown AND r.breakdown_value = la.breakdown_value
                    WHERE r.{column} IS NOT NULL GROUP BY ALL HAVING count(*) FILTER (WHERE la.{column} IS NULL) = 1)
            """).fetchall()[0][0]
            assert lone == 0, f"{column}: a lone suppressed council within its region"


def test_secondary_suppression_hides_a_second_cell():
    con = duckdb.connect()
    con.execute("CREATE TABLE t (g VARCHAR, raw BIGINT)")
    con.executemany("INSERT INTO t VALUES (?, ?)", [("a", 3), ("a", 40), ("a", 12), ("b", 50), ("b", 60)])
    con.execute(f"CREATE TABLE s AS SELECT g, raw, {count_sql('raw')} AS shown FROM t")
    assert secondary_suppression(con, "s", "raw", "shown", [(["g"], "true")], order=["g", "raw"]) == 1
    assert con.execute("SELECT g, raw FROM s WHERE shown IS NULL ORDER BY raw").fetchall() == [("a", 3), ("a", 12)]
    assert con.execute(f"SELECT {count_sql('x')} FROM (VALUES (0), (7), (8), (12), (13), (1002)) v(x)").fetchall() == [
        (0,), (None,), (10,), (10,), (15,), (1000,)]


class _Tables(HTMLParser):
    """Header names and cell texts of every table of a page."""

    def __init__(self):
        super().__init__()
        self.tables, self._cell, self._in = [], None, None

    def handle_starttag(self, tag, attrs):
        if tag == "table":
            self.tables.append({"header": [], "rows": []})
        elif tag == "tr" and self.tables:
            self.tables[-1]["rows"].append([])
        elif tag in ("td", "th"):
            self._in, self._cell = tag, ""

    def handle_data(self, data):
        if self._in:
            self._cell += data

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._in:
            table = self.tables[-1]
            (table["header"] if self._in == "th" else table["rows"][-1]).append(self._cell.strip())
            self._in = None


def test_every_dashboard_page_shows_only_controlled_counts(pseudonymised_pipeline):
    data_dir, _, _, _ = pseudonymised_pipeline
    pages = sorted((data_dir / "reports" / "dashboards").rglob("*.html"))
    assert len(pages) >= 2 * 7, "six councils and England, for each quarter"
    counts = 0
    for page in pages:
        parser = _Tables()
        parser.feed(page.read_text(encoding="utf-8"))
        assert parser.tables, page
        for table in parser.tables:
            positions = [i for i, h in enumerate(table["header"]) if h in COUNT_COLUMNS]
            for row in table["rows"]:
                for i in positions:
                    if i < len(row) and row[i] != "*":
                        value = int(row[i].replace(",", ""))
                        counts += 1
                        assert value == 0 or (value >= 8 and value % 5 == 0), (page.name, table["header"][i], value)
    assert counts > 100


# --- reproducibility as of a date -----------------------------------------------------------------

def _fingerprint(data_dir: Path, quarter: str) -> str:
    digest = hashlib.sha256()
    with _analytics(data_dir) as con:
        for t in ("activity", "costs", "waiting_times", "waiting_time_bands", "ascof", "comparison"):
            for row in con.execute(f"SELECT * FROM benchmark.{t} WHERE quarter = ? ORDER BY ALL", [quarter]).fetchall():
                digest.update(repr(row).encode())
    return digest.hexdigest()


def test_rebuilding_as_of_the_same_date_gives_identical_tables_and_earlier_dates_use_earlier_files(
        pseudonymised_pipeline, tmp_path):
    data_dir, _, _, _ = pseudonymised_pipeline
    copy = tmp_path / "data"
    shutil.copytree(data_dir, copy, ignore=shutil.ignore_patterns("reports", "archive", "landing", "*.lock"))
    from cld_pipeline.definitions import defs

    with environment(CLD_DATA_DIR=str(copy), DAGSTER_HOME=str(copy / "dagster_home")):
        job = defs().resolve_job_def("benchmark_quarter_job")   # resources bind to the copy's databases
        instance = dg.DagsterInstance.get()

        def build(as_of: str) -> str:
            config = {"ops": {"benchmark_quarter": {"config": {"as_of_date": as_of}}}}
            assert job.execute_in_process(run_config=config, instance=instance, partition_key="2026-Q3").success
            return _fingerprint(copy, "2026-Q3")

        first, again = build("2026-11-20"), build("2026-11-20")
        assert first == again
        with duckdb.connect(str(copy / "analytics.duckdb"), read_only=True) as con:
            resubmitted = con.execute("""SELECT la_code, min(received_at), max(received_at) FROM pseudonymised.submissions
                                         WHERE quarter = '2026-Q3' GROUP BY 1 HAVING count(*) > 1""").fetchall()
        assert resubmitted, "the fixture has a corrected resubmission"
        la, first_received, second_received = resubmitted[0]
        before = (first_received + dt.timedelta(days=1)).date()
        assert before < second_received.date()
        build(str(before))
        with duckdb.connect(str(copy / "analytics.duckdb"), read_only=True) as con:
            ids = con.execute("SELECT submission_ids FROM benchmark.activity WHERE quarter = '2026-Q3' AND "
                              "geography_code = ? LIMIT 1", [la]).fetchall()[0][0]
            earlier = con.execute("SELECT submission_id FROM pseudonymised.submissions WHERE la_code = ? AND "
                                  "quarter = '2026-Q3' AND received_at = ?", [la, first_received]).fetchall()[0][0]
            history = con.execute("SELECT count(*) FROM pseudonymised.events_history WHERE submission_id = ?",
                                  [earlier]).fetchall()[0][0]
        assert earlier in ids.split(",") and history > 0


# --- a real browser -------------------------------------------------------------------------------

def test_an_la_dashboard_renders_its_charts_in_headless_chromium(pseudonymised_pipeline):
    data_dir, _, _, _ = pseudonymised_pipeline
    folder = data_dir / "reports" / "dashboards" / "2026-Q3"
    page = sorted(p for p in folder.glob("*.html") if p.name != "england.html")[0]
    chromium = find_chromium()
    flags = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=15000",
             "--window-size=1200,2400"]
    dom = subprocess.run([*flags, "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=180).stdout
    charts = len(re.findall(r'class="main-svg"', dom))
    assert charts >= 8, f"Plotly drew {charts} chart layers"          # two svg layers per chart, 5 charts
    assert "*" in dom or re.search(r"<td>[0-9,]+</td>", dom)
    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / f"dashboard-{page.stem}.png"
    subprocess.run([*flags, f"--screenshot={shot}", page.as_uri()], capture_output=True, timeout=180)
    assert shot.exists() and shot.stat().st_size > 20_000
