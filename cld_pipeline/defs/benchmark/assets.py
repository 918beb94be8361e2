"""Benchmark layer (analytics.duckdb `benchmark.*` and `dhsc.*`), one partition per CLD quarter.

One step builds the quarter from every LA partition: DHSC's main tables (`dhsc.single_submissions`,
`dhsc.joined_submissions`, record level and pseudonymised), then activity, costs, waiting times and
ASCOF for each LA, region and England. The unsuppressed figures are written only to the processor
zone (`benchmark_unsuppressed.*` in identifiable.duckdb); the `benchmark` schema councils see is
after disclosure control, and every row carries the quarter, the as-of date and the ids of the
submissions it came from. The dashboards are built from those shared tables only.
"""

import datetime as dt
import shutil
import time

import dagster as dg
from pydantic import Field

from cld_pipeline.defs.errors import values_withheld
from cld_pipeline import settings
from cld_pipeline.defs.linked.assets import AUTOMATION, KEYS as LINKED, quarter_period
from cld_pipeline.defs.partitions import QUARTERLY, quarter_partitions
from cld_pipeline.defs.pseudonymise.assets import EVENTS as PSEUDONYMISED_EVENTS
from cld_pipeline.defs.resources import LockedDuckDBResource, ProcessorZoneOutbox
from cld_pipeline.lib.benchmark import build as benchmark
from cld_pipeline.lib.benchmark.dashboard import DashboardBuilder
from cld_pipeline.defs.metadata import table_schema
from cld_pipeline.lib.warehouse import replace_slice

OWNERS = ["team:cld-benchmarking"]
MEMORY_LIMIT = "3GB"
SHARED = {
    "activity": "Requests, assessments, services and reviews: events and people by LA, region and England, by "
                "outcome, route, service type and component, client type, age band, gender, ethnicity; per 100,000 adults.",
    "costs": "Service costs in the period's last quarter (DHSC method 2.4): people and total cost by service type.",
    "waiting_times": "Request to assessment (first response), assessment to service, request to service: people, "
                     "median, 90th percentile and share within 28 days.",
    "waiting_time_bands": "How many waits fall in each band of days, per interval and geography.",
    "waiting_times_quarterly": "DHSC's waiting times by statistical quarter (of the follow-up event) and age band "
                               "(25 to 64, 65 and above), every quarter since collection began: waits, median days, "
                               "and the requests, assessments and services behind them.",
    "waiting_time_diagnostics": "Which events the waits end in: the first response (request, assessment or service), "
                                "the assessment type, the first service's type; per statistical quarter and age band.",
    "data_quality": "Data-quality benchmark (DHSC's DQ values): for each field and rule, the rows it caught in the "
                    "files behind the 12-month figures, as a share of submitted rows, beside England's share.",
    "ascof": "ASCOF 2A, 2B, 2C, 2D (parts 1, 2), 2E (and LD), 3D (1a, 2a, 1b, 2b): numerator, denominator, value.",
    "ascof_exclusions": "DHSC's ASCOF exclusions: people in the 2E and 2E-LD cohorts whose accommodation is unknown, "
                        "invalid or only presumed, and 3D clients and carers whose delivery mechanism is unknown.",
    "ascof_2a_outcomes": "ASCOF 2A's reablement clusters by age group, sequel type (deceased, hospital, service, "
                         "outcome, equipment, unable to classify) and final outcome, with whether each counts.",
    "comparison": "Each LA's headline figures beside its region and England, with its rank among the LAs that "
                  "submitted (a council without a file is listed as such, never ranked).",
    "bcf_metrics": "Better Care Fund metrics: ASCOF 2C and 2D parts 1 and 2 for each council with its region, the "
                   "region and England (after disclosure control).",
    "release_changes": "Each headline figure against the previous quarter's build; moves beyond the threshold "
                       "(5% by default) flagged for the analyst who signs the quarter off.",
    "method_log": "The method version that built the quarter and what changed in it (lib/benchmark/method.py).",
}
MAIN = {"single_submissions": "DHSC single-submissions main table: one row per unique event in the rolling 12 months.",
        "joined_submissions": "DHSC joined-submissions main table (every quarter since collection began, costs dropped)."}
KEYS = {name: dg.AssetKey(["benchmark", name]) for name in SHARED}
MAIN_KEYS = {name: dg.AssetKey(["dhsc", name]) for name in MAIN}
DASHBOARDS = dg.AssetKey(["benchmark", "la_dashboards"])
COUNT_COLUMNS = {"activity": ("events", "people"), "costs": ("people",), "waiting_times": ("people",),
                 "waiting_time_bands": ("people",), "ascof": ("numerator",), "bcf_metrics": ("numerator",),
                 "waiting_times_quarterly": ("waits", "requests", "assessments", "services"),
                 "waiting_time_diagnostics": ("waits",), "data_quality": ("rows", "submitted_rows"),
                 "ascof_exclusions": ("people",), "ascof_2a_outcomes": ("clusters",)}


class BenchmarkConfig(dg.Config):
    as_of_date: str = Field(default="", description="Choose each council's latest file received on or before this "
                            "date (YYYY-MM-DD); blank: today. The same date always rebuilds the same tables.")
    joined_start: str = Field(default=str(benchmark.JOINED_START),
                              description="First day of the joined-submissions table (DHSC: 2023-04-01).")
    release_change_threshold: float = Field(default=benchmark.RELEASE_CHANGE_THRESHOLD, ge=0,
                                            description="Flag a headline figure moving more than this share on the "
                                                        "previous quarter's build (0.05 = 5%).")


def disclosure_problems(con, quarter: str) -> dict[str, int]:
    """Visible counts from 1 to 7, counts not a multiple of 5, statistics on fewer than 8 people."""
    problems = {}
    for table, columns in COUNT_COLUMNS.items():
        for c in columns:
            problems[f"{table}.{c}"] = con.execute(
                f"SELECT count(*) FROM benchmark.{table} WHERE quarter = ? AND {c} IS NOT NULL AND "
                f"({c} BETWEEN 1 AND 7 OR {c} % 5 <> 0)", [quarter]).fetchall()[0][0]
    problems["waiting_times.statistics"] = con.execute(
        "SELECT count(*) FROM benchmark.waiting_times WHERE quarter = ? AND (median_days IS NOT NULL OR p90_days "
        "IS NOT NULL) AND (people IS NULL OR people < 8)", [quarter]).fetchall()[0][0]
    problems["waiting_times_quarterly.statistics"] = con.execute(
        "SELECT count(*) FROM benchmark.waiting_times_quarterly WHERE quarter = ? AND median_days IS NOT NULL "
        "AND (waits IS NULL OR waits < 8)", [quarter]).fetchall()[0][0]
    return {k: v for k, v in problems.items() if v}


@dg.multi_asset(
    specs=[dg.AssetSpec(KEYS[n], group_name="benchmark", kinds={"duckdb"}, owners=OWNERS, description=d,
                        automation_condition=AUTOMATION, freshness_policy=QUARTERLY,
                        deps=[PSEUDONYMISED_EVENTS, LINKED["ascof_2d"], dg.AssetKey(["reference", "local_authorities"])])
           for n, d in SHARED.items()]
          + [dg.AssetSpec(MAIN_KEYS[n], group_name="benchmark", kinds={"duckdb"}, owners=OWNERS, description=d,
                          automation_condition=AUTOMATION, deps=[PSEUDONYMISED_EVENTS]) for n, d in MAIN.items()],
    partitions_def=quarter_partitions,
    check_specs=[
        dg.AssetCheckSpec("disclosure_control", asset=KEYS["activity"], blocking=True,
                          description="No shared count from 1 to 7, every count 0 or a multiple of 5, no median or "
                                      "percentile on fewer than 8 people, in every benchmark table of the quarter."),
        dg.AssetCheckSpec("release_on_release", asset=KEYS["release_changes"],
                          description="No headline figure of any council, region or England moved more than the "
                                      "threshold on the previous quarter's build (a warning: the moves are listed in "
                                      "benchmark.release_changes for the analyst who signs the quarter off)."),
        dg.AssetCheckSpec("every_la_has_a_submission", asset=MAIN_KEYS["single_submissions"],
                          description="Every council has a file covering the 12 months as of the date (a warning: "
                                      "DHSC reports missing councils and carries on)."),
    ],
)
def benchmark_quarter(context: dg.AssetExecutionContext, config: BenchmarkConfig, analytics_db: LockedDuckDBResource,
                      processor_outbox: ProcessorZoneOutbox):
    with values_withheld("The benchmark"):
        yield from _benchmark_quarter_body(context, config, analytics_db, processor_outbox)


def _benchmark_quarter_body(context: dg.AssetExecutionContext, config: BenchmarkConfig, analytics_db: LockedDuckDBResource,
                            processor_outbox: ProcessorZoneOutbox):
    started = time.perf_counter()
    quarter = context.partition_key
    start, end = quarter_period(quarter)
    as_of = dt.date.fromisoformat(config.as_of_date) if config.as_of_date else dt.datetime.now(dt.timezone.utc).date()
    inputs = benchmark.BenchmarkInputs(quarter, start, end, as_of, dt.date.fromisoformat(config.joined_start))
    scratch = settings.new_scratch("benchmark-")
    try:
        with analytics_db.get_connection() as con:
            # Bounded memory whatever the national volume: DuckDB spills sorts and joins to scratch.
            con.execute(f"SET temp_directory = '{scratch}'")
            con.execute(f"SET memory_limit = '{MEMORY_LIMIT}'")
            con.execute("SET preserve_insertion_order = false")
            phases = {}
            t = time.perf_counter()
            main_counts = benchmark.build_main_tables(con, inputs)
            phases["main_tables"], t = round(time.perf_counter() - t, 2), time.perf_counter()
            benchmark.build_raw_measures(con, inputs)
            phases["measures"], t = round(time.perf_counter() - t, 2), time.perf_counter()
            counts = benchmark.build_shared_tables(con, inputs)
            counts.update(benchmark.build_release_tables(con, inputs, config.release_change_threshold))
            moves = con.execute("SELECT count(*), count(DISTINCT geography_code) FROM release_changes "
                                "WHERE flagged").fetchall()[0]
            phases["disclosure_control"], t = round(time.perf_counter() - t, 2), time.perf_counter()
            for table in benchmark.RAW_TABLES:
                con.execute(f"COPY (SELECT '{quarter}' AS quarter, DATE '{as_of}' AS as_of_date, * FROM {table}) "
                            f"TO '{scratch / table}.parquet' (FORMAT parquet)")
            for name in SHARED:
                replace_slice(con, f"benchmark.{name}", name, "quarter = ?", [quarter])
            for name, table in (("single_submissions", "single"), ("joined_submissions", "joined")):
                con.execute(f"CREATE OR REPLACE TEMP TABLE {table}_out AS SELECT '{quarter}' AS benchmark_quarter, "
                            f"DATE '{as_of}' AS as_of_date, * FROM {table}")
                replace_slice(con, f"dhsc.{name}", f"{table}_out", "benchmark_quarter = ?", [quarter])
            problems = disclosure_problems(con, quarter)
            missing = con.execute("""SELECT count(*) FROM population WHERE la_code NOT IN
                                     (SELECT la_code FROM selection_single)""").fetchall()[0][0]
            schemas = {n: table_schema(con, "benchmark", n) for n in SHARED}
            schemas.update({n: table_schema(con, "dhsc", n) for n in MAIN})
            phases["writes"] = round(time.perf_counter() - t, 2)
        for table in benchmark.RAW_TABLES:   # unsuppressed figures stay out of the analysts' zone
            processor_outbox.replace_slice(f"benchmark_unsuppressed.{table.removeprefix('raw_')}",
                                           str(scratch / f"{table}.parquet"), "quarter = ?", [quarter])
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    seconds = round(time.perf_counter() - started, 2)
    for name in SHARED:
        yield dg.MaterializeResult(asset_key=KEYS[name], metadata={
            "dagster/row_count": counts[name], "dagster/column_schema": schemas[name], "as_of_date": str(as_of),
            "dagster/table_name": f"analytics.benchmark.{name}", "seconds": seconds,
            "seconds_by_phase": dg.MetadataValue.json(phases),
            **({"secondary_suppressions": counts["secondary_suppressions"]} if name == "activity" else {})})
    for name, table in (("single_submissions", "single"), ("joined_submissions", "joined")):
        yield dg.MaterializeResult(asset_key=MAIN_KEYS[name], metadata={
            "dagster/row_count": main_counts[table], "dagster/column_schema": schemas[name], "as_of_date": str(as_of),
            "files_selected": main_counts[f"selection_{table}"], "dagster/table_name": f"analytics.dhsc.{name}",
            "excluded_submissions": main_counts["excluded_submissions"]})
    yield dg.AssetCheckResult(check_name="disclosure_control", asset_key=KEYS["activity"], passed=not problems,
                              metadata={"problems": ", ".join(f"{k}: {v}" for k, v in problems.items()) or "none"})
    yield dg.AssetCheckResult(check_name="release_on_release", asset_key=KEYS["release_changes"],
                              passed=moves[0] == 0, severity=dg.AssetCheckSeverity.WARN,
                              metadata={"figures_flagged": moves[0], "geographies_flagged": moves[1],
                                        "threshold": config.release_change_threshold,
                                        "compared_with": benchmark.previous_quarter(quarter),
                                        "figures_compared": counts["release_changes"]})
    yield dg.AssetCheckResult(check_name="every_la_has_a_submission", asset_key=MAIN_KEYS["single_submissions"],
                              passed=missing == 0, severity=dg.AssetCheckSeverity.WARN,
                              metadata={"councils_without_a_file": missing})


@dg.asset(
    key=DASHBOARDS,
    deps=list(KEYS.values()),
    partitions_def=quarter_partitions,
    group_name="benchmark",
    kinds={"html"},
    owners=OWNERS,
    automation_condition=AUTOMATION,
    description="One static HTML dashboard per council and an England overview under "
                "reports/dashboards/<quarter>/, opened from disk: headline measures against region and England, "
                "trends, waiting times and activity, each chart with a table view.",
)
def la_dashboards(context: dg.AssetExecutionContext, analytics_db: LockedDuckDBResource) -> dg.MaterializeResult:
    quarter = context.partition_key
    folder = settings.data_dir() / "reports" / "dashboards" / quarter
    with analytics_db.get_connection() as con:
        pages = DashboardBuilder(con, quarter, folder).write_all()
    england = folder / "england.html"
    return dg.MaterializeResult(metadata={
        "pages": len(pages), "folder": dg.MetadataValue.path(str(folder)),
        "england_overview": dg.MetadataValue.url(england.as_uri()),
        "example_council": dg.MetadataValue.url(pages[-1].as_uri())})


benchmark_quarter_job = dg.define_asset_job(
    "benchmark_quarter_job",
    selection=dg.AssetSelection.groups("benchmark"),
    description="Rebuild one quarter's benchmark tables and dashboards (as of a date given in the run config).",
)
