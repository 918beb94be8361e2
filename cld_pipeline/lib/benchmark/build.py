"""Build one quarter's benchmark: DHSC main tables, unsuppressed figures, then the shared tables.

`build_benchmark` works on a DuckDB connection to analytics.duckdb (pseudonymised events, their
history, the submissions ledger, reference and linked tables) and leaves temp tables:
`single`, `joined`, `persons`; `raw_activity`, `raw_costs`, `raw_waiting_times`, `raw_ascof`
(unsuppressed: the caller copies them to the processor zone only); and the shared
`activity`, `costs`, `waiting_times`, `ascof`, `comparison` (after disclosure control).
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

import duckdb
import pyarrow as pa

from cld_pipeline.lib.benchmark import dhsc, exclusions, measures, method
from cld_pipeline.lib.privacy import disclosure
from cld_pipeline.lib.warehouse import table_exists
from cld_pipeline.reference import load_local_authorities
from cld_pipeline.spec import load_spec

ENGLAND_CODE, ENGLAND_NAME = "E92000001", "England"
JOINED_START = dt.date(2023, 4, 1)     # DHSC's joined table runs from the start of CLD collection
NOT_RECORDED = "Not recorded"
RELEASE_CHANGE_THRESHOLD = 0.05   # a headline figure moving more than 5% on the previous quarter is flagged
INTERVALS = ("request_to_assessment", "assessment_to_service", "request_to_service")
WAIT_BANDS = ((0, 7, "0 to 7 days"), (8, 28, "8 to 28 days"), (29, 56, "29 to 56 days"), (57, 91, "57 to 91 days"),
              (92, 100_000, "92 days or more"))


# The columns the main tables carry (DHSC keeps a fixed subset too): identifiers of the row and the
# person, every field the method and the measures read, and the breakdowns the tables offer.
MAIN_COLUMNS = (
    "submission_id", "row_number", "la_code", "quarter", "person_id", "birth_year", "birth_month",
    "age_at_event_start", "gender_cleaned", "ethnicity_cleaned", "date_of_death", "client_type_cleaned",
    "primary_support_reason_cleaned", "accommodation_status_cleaned", "event_type_cleaned", "event_start_date",
    "event_end_date", "der_conversation", "event_outcome_cleaned", "request_route_of_access_cleaned",
    "assessment_type_cleaned", "review_reason_cleaned", "service_type_cleaned", "service_component_cleaned",
    "delivery_mechanism_cleaned", "unit_cost", "cost_frequency_unit_type_cleaned", "planned_units_per_week",
)


@dataclass(frozen=True)
class BenchmarkInputs:
    quarter: str
    period_start: dt.date
    period_end: dt.date
    as_of: dt.date
    joined_start: dt.date = JOINED_START


def _params(inputs: BenchmarkInputs) -> dict:
    return {"period_start": inputs.period_start, "period_end": inputs.period_end, "as_of": inputs.as_of}


def _run(con, sql: str, params: dict) -> None:
    con.execute(sql, {k: v for k, v in params.items() if f"${k}" in sql})


def _geographies(value_cols: str, source: str, extra_group: str) -> str:
    """LA, region and England rows of an aggregate over `source` (which has la_code, region_code)."""
    return f"""
        SELECT CASE WHEN grouping(la_code) = 0 THEN 'LA' WHEN grouping(region_code) = 0 THEN 'Region'
                    ELSE 'England' END AS geography_level,
               coalesce(la_code, region_code, '{ENGLAND_CODE}') AS geography_code, {extra_group}, {value_cols}
        FROM {source}
        GROUP BY GROUPING SETS ((la_code, region_code, {extra_group}), (region_code, {extra_group}), ({extra_group}))"""


def build_main_tables(con: duckdb.DuckDBPyConnection, inputs: BenchmarkInputs) -> dict[str, int]:
    params = _params(inputs)
    exclusions.ensure_schema(con)
    # The operator's excluded submissions are never chosen (DHSC's import blacklist).
    con.execute(f"""CREATE OR REPLACE TEMP TABLE ledger AS
        SELECT submission_id, la_code, received_at, derived_period_start, derived_period_end
        FROM pseudonymised.submissions WHERE derived_period_start IS NOT NULL
          AND submission_id NOT IN (SELECT submission_id FROM {exclusions.TABLE})""")
    _run(con, f"CREATE OR REPLACE TEMP TABLE selection_single AS {dhsc.single_selection_sql()}", params)
    windows = dhsc.quarter_windows(inputs.joined_start, inputs.period_end)
    _run(con, f"CREATE OR REPLACE TEMP TABLE selection_joined AS {dhsc.joined_selection_sql(windows)}", params)
    columns = ", ".join(MAIN_COLUMNS)
    con.execute(f"""CREATE OR REPLACE TEMP VIEW rows AS
        SELECT {columns} FROM pseudonymised.events
        WHERE submission_id IN (SELECT submission_id FROM selection_single UNION SELECT submission_id FROM selection_joined)
        UNION ALL
        SELECT {columns} FROM pseudonymised.events_history
        WHERE submission_id IN (SELECT submission_id FROM selection_single UNION SELECT submission_id FROM selection_joined)""")
    con.execute(f"CREATE OR REPLACE TEMP TABLE single AS {dhsc.main_table_sql('SELECT * FROM selection_single', 'rows', single=True)}")
    con.execute(f"CREATE OR REPLACE TEMP TABLE joined AS {dhsc.main_table_sql('SELECT * FROM selection_joined', 'rows', single=False)}")
    con.execute(f"CREATE OR REPLACE TEMP TABLE persons AS {measures.persons_sql()}")
    councils = list(load_local_authorities())
    con.register("councils_in", pa.table({
        "la_code": [c.submission_code for c in councils], "la_name": [c.name for c in councils],
        "region_code": [c.region_code for c in councils], "region_name": [c.region_name for c in councils],
        "pop_18_plus": pa.array([c.population_18_plus for c in councils], pa.int64()),
        "pop_65_plus": pa.array([c.population_65_plus for c in councils], pa.int64())}))
    con.execute("""CREATE OR REPLACE TEMP TABLE population AS
        SELECT *, pop_18_plus - pop_65_plus AS pop_18_64 FROM councils_in""")
    con.unregister("councils_in")
    con.execute("""CREATE OR REPLACE TEMP TABLE submissions_used AS
        SELECT la_code, string_agg(DISTINCT submission_id, ',' ORDER BY submission_id) AS submission_ids
        FROM (SELECT la_code, submission_id FROM selection_single UNION SELECT la_code, submission_id FROM selection_joined)
        GROUP BY la_code""")
    counts = {t: con.execute(f"SELECT count(*) FROM {t}").fetchall()[0][0]
              for t in ("selection_single", "selection_joined", "single", "joined", "persons")}
    counts["excluded_submissions"] = con.execute(f"SELECT count(*) FROM {exclusions.TABLE}").fetchall()[0][0]
    return counts


def _breakdowns() -> dict[str, tuple[str | None, str]]:
    """Breakdown name -> (event type key it applies to, or None for all; column). Blanks count as
    'Not recorded' so that a breakdown's values add up to its total."""
    return {"event_outcome": (None, "event_outcome_cleaned"), "client_type": (None, "client_type_cleaned"),
            "age_band": (None, "der_age_band"), "gender": (None, "gender_cleaned"),
            "ethnicity": (None, "ethnicity_grouped"),
            "request_route_of_access": ("request", "request_route_of_access_cleaned"),
            "assessment_type": ("assessment", "assessment_type_cleaned"),
            "service_type": ("service", "service_type_cleaned"),
            "service_component": ("service", "service_component_cleaned"),
            "review_type": ("review", "review_type")}


def build_activity(con: duckdb.DuckDBPyConnection) -> None:
    """`raw_activity`: events and distinct people per geography, event type and breakdown value. Per
    breakdown, the rows are first reduced to one per LA, event type, value and person (with its
    events): the LA, region and England aggregates then count people over that much smaller table,
    instead of 33 distinct counts over every event of the quarter."""
    con.execute("""CREATE OR REPLACE TEMP TABLE raw_activity (geography_level VARCHAR, geography_code VARCHAR,
        event_type VARCHAR, breakdown VARCHAR, breakdown_value VARCHAR, events BIGINT, people BIGINT)""")
    levels = {"LA": ("la_code", "la_code"), "Region": ("region_code", "region_code"),
              "England": (f"'{ENGLAND_CODE}'", "1")}
    items = {"total": (None, "'total'"), **{b: (t, f"coalesce({c}, '{NOT_RECORDED}')") for b, (t, c) in _breakdowns().items()}}
    for breakdown, (event, value) in items.items():
        where = f"WHERE {dhsc.is_event(event)}" if event else ""
        con.execute(f"""CREATE OR REPLACE TEMP TABLE activity_by_person AS
            SELECT la_code, region_code, event_type_cleaned, {value} AS breakdown_value, person_id, count(*) AS events
            FROM activity_base {where} GROUP BY ALL""")
        con.execute("INSERT INTO raw_activity " + " UNION ALL ".join(
            f"""SELECT '{level}', {code}, event_type_cleaned, '{breakdown}', breakdown_value,
                       CAST(sum(events) AS BIGINT), count(DISTINCT person_id)
                FROM activity_by_person GROUP BY {group}, event_type_cleaned, breakdown_value"""
            for level, (code, group) in levels.items()))
    con.execute("DROP TABLE activity_by_person")


def build_raw_measures(con: duckdb.DuckDBPyConnection, inputs: BenchmarkInputs) -> None:
    params = _params(inputs)
    con.execute("""CREATE OR REPLACE TEMP TABLE activity_base AS
        SELECT s.*, p.region_code FROM single s JOIN population p USING (la_code)""")
    build_activity(con)

    # Costs (outputs-and-measures.md 2.4): services overlapping the period's last quarter.
    freq = load_spec().code_list("cost_frequency_unit_type")
    per_week = " ".join(
        f"WHEN '{v.value}' THEN " + ("abs(planned_units_per_week)" if v.attrs.get("per_week") == "planned_units"
                                     else str(v.attrs.get("per_week")) if v.attrs.get("per_week") is not None else "NULL")
        for v in freq.values)
    one_off = dhsc.value("cost_frequency_unit_type", "one_off")
    q_start = dt.date(inputs.period_end.year, inputs.period_end.month, 1) - dt.timedelta(days=62)
    q_start = dt.date(q_start.year, q_start.month, 1)
    con.execute(f"""CREATE OR REPLACE TEMP TABLE cost_rows AS
        WITH s AS (
            SELECT la_code, person_id, service_type_cleaned, abs(unit_cost) AS unit_cost_abs,
                   cost_frequency_unit_type_cleaned = {one_off} AS one_off,
                   CASE cost_frequency_unit_type_cleaned {per_week} ELSE abs(planned_units_per_week) END AS units,
                   greatest(event_start_date, DATE '{q_start}') AS s, least(coalesce(der_event_end_date,
                   DATE '{inputs.period_end}'), DATE '{inputs.period_end}') AS e
            FROM single WHERE {dhsc.is_event('service')} AND event_start_date <= DATE '{inputs.period_end}'
              AND coalesce(der_event_end_date >= DATE '{q_start}', true)
        )
        SELECT la_code, person_id, service_type_cleaned,
               CAST(CASE WHEN one_off THEN unit_cost_abs
                         ELSE unit_cost_abs * units * (date_diff('day', s, e) + 1) / 7.0 END AS DECIMAL(18, 2))
                   AS total_cost   -- exact sums: the same data always gives the same pounds
        FROM s WHERE coalesce(unit_cost_abs, 0) <> 0 AND (one_off OR coalesce(units, 0) <> 0)""")
    con.execute(f"""CREATE OR REPLACE TEMP TABLE raw_costs AS
        {_geographies('count(DISTINCT person_id) AS people, sum(total_cost) AS total_cost',
                      "(SELECT c.*, p.region_code, x.b AS breakdown, x.v AS breakdown_value FROM cost_rows c "
                      "JOIN population p USING (la_code), LATERAL (SELECT unnest([{'b': 'total', 'v': 'total'}, "
                      "{'b': 'service_type', 'v': coalesce(c.service_type_cleaned, 'Not recorded')}]) AS x))",
                      'breakdown, breakdown_value')}""")

    # Waiting times (section 4): waits whose response (or service) started in the 12-month period.
    _run(con, f"CREATE OR REPLACE TEMP TABLE waits AS {measures.waits_sql()}", params)
    con.execute(f"""CREATE OR REPLACE TEMP TABLE wait_rows AS
        SELECT w.la_code, p.region_code, 'request_to_assessment' AS interval,
               date_diff('day', request_start, response_start) AS days, person_id
        FROM waits w JOIN population p USING (la_code)
        WHERE response_start BETWEEN DATE '{inputs.period_start}' AND DATE '{inputs.period_end}'
        UNION ALL
        SELECT w.la_code, p.region_code, 'assessment_to_service', date_diff('day', response_start, service_start), person_id
        FROM waits w JOIN population p USING (la_code)
        WHERE response = 'assessment' AND service_start BETWEEN DATE '{inputs.period_start}' AND DATE '{inputs.period_end}'
        UNION ALL
        SELECT w.la_code, p.region_code, 'request_to_service', date_diff('day', request_start, service_start), person_id
        FROM waits w JOIN population p USING (la_code)
        WHERE service_start BETWEEN DATE '{inputs.period_start}' AND DATE '{inputs.period_end}'""")
    con.execute(f"""CREATE OR REPLACE TEMP TABLE raw_waiting_times AS
        {_geographies("count(*) AS people, quantile_cont(days, 0.5) AS median_days, quantile_cont(days, 0.9) AS p90_days, "
                      "count(*) FILTER (WHERE days <= 28) AS within_28_days", 'wait_rows', 'interval')}""")

    bands = " ".join(f"WHEN days BETWEEN {lo} AND {hi} THEN {i}" for i, (lo, hi, _) in enumerate(WAIT_BANDS))
    labels = " ".join(f"WHEN {i} THEN '{label}'" for i, (_, _, label) in enumerate(WAIT_BANDS))
    con.execute(f"""CREATE OR REPLACE TEMP TABLE raw_waiting_time_bands AS
        SELECT *, CASE band_order {labels} END AS wait_band FROM (
        {_geographies('count(*) AS people', f"(SELECT *, CASE {bands} ELSE 0 END AS band_order FROM wait_rows)",
                      'interval, band_order')})""")

    build_raw_quarterly_waits(con, params)
    build_raw_data_quality(con)

    # ASCOF: LA rows from the measures, every LA present (0/0 when it has no data), then region and England sums.
    parts = [measures.ascof_2a_sql(), measures.ascof_2bc_sql(), measures.ascof_2e_sql(), measures.ascof_3d_sql()]
    _run(con, "CREATE OR REPLACE TEMP TABLE ascof_la AS " + " UNION ALL ".join(f"SELECT * FROM ({p})" for p in parts),
         params)
    if table_exists(con, "linked", "ascof_2d"):
        con.execute("INSERT INTO ascof_la SELECT la_code, measure, 'Total', numerator, denominator FROM linked.ascof_2d "
                    "WHERE quarter = ?", [inputs.quarter])
    # DHSC's companions to ASCOF: people left out for unknown accommodation or delivery mechanism
    # (every submitting council, 0 when none), and 2A's clusters by sequel type and final outcome.
    _run(con, f"""CREATE OR REPLACE TEMP TABLE raw_ascof_exclusions AS
        WITH counts AS ({measures.ascof_exclusions_sql()}),
        grid AS (SELECT p.la_code, p.region_code, m.measure, m.reason, coalesce(c.people, 0) AS people
                 FROM population p CROSS JOIN (VALUES ('2E', '{measures.UNKNOWN_ACCOMMODATION}'),
                     ('2E-LD', '{measures.UNKNOWN_ACCOMMODATION}'), ('3D (clients)', '{measures.UNKNOWN_DELIVERY}'),
                     ('3D (carers)', '{measures.UNKNOWN_DELIVERY}')) m(measure, reason)
                 LEFT JOIN counts c ON c.la_code = p.la_code AND c.measure = m.measure
                 WHERE p.la_code IN (SELECT la_code FROM selection_single))
        {_geographies('sum(people) AS people', 'grid', 'measure, reason')}""", params)
    _run(con, f"""CREATE OR REPLACE TEMP TABLE raw_ascof_2a_outcomes AS
        {_geographies('sum(clusters) AS clusters', f"(SELECT o.*, p.region_code FROM ({measures.ascof_2a_outcomes_sql()}) o "
                      "JOIN population p USING (la_code))",
                      'age_group, sequel_type, final_outcome, in_denominator, in_numerator')}""", params)

    # Councils without a file keep their rows, marked, with no figures: DHSC's outputs carry them as
    # zeros, which would chart and rank them as 0 and dilute region and England 2B/2C denominators.
    con.execute(f"""CREATE OR REPLACE TEMP TABLE raw_ascof AS
        WITH grid AS (SELECT p.la_code, p.region_code, m.measure, m.measure_group,
                             coalesce(a.numerator, 0) AS numerator,
                             coalesce(a.denominator, CASE WHEN m.measure = '2B' THEN p.pop_18_64
                                                          WHEN m.measure = '2C' THEN p.pop_65_plus ELSE 0 END) AS denominator
                      FROM population p CROSS JOIN (SELECT DISTINCT measure, measure_group FROM ascof_la) m
                      LEFT JOIN ascof_la a ON a.la_code = p.la_code AND a.measure = m.measure
                                          AND a.measure_group = m.measure_group
                      WHERE p.la_code IN (SELECT la_code FROM selection_single))
        SELECT *, false AS no_submission FROM (
        {_geographies('sum(numerator) AS numerator, sum(denominator) AS denominator', 'grid', 'measure, measure_group')})
        UNION ALL
        SELECT 'LA', p.la_code, m.measure, m.measure_group, NULL, NULL, true
        FROM population p CROSS JOIN (SELECT DISTINCT measure, measure_group FROM ascof_la) m
        WHERE p.la_code NOT IN (SELECT la_code FROM selection_single)""")


def build_raw_data_quality(con: duckdb.DuckDBPyConnection) -> None:
    """`raw_data_quality`: how many of the submitted rows each field and rule caught, in the files
    behind the 12-month figures, for each council, region and England (DHSC's DQ values table)."""
    if not table_exists(con, "pseudonymised", "dq_findings"):
        con.execute("CREATE SCHEMA IF NOT EXISTS pseudonymised")
        con.execute("""CREATE TABLE IF NOT EXISTS pseudonymised.dq_findings (submission_id VARCHAR, field VARCHAR,
                       rule VARCHAR, severity VARCHAR, rows BIGINT)""")
    submitted = ("coalesce(s.submitted_rows, s.accepted_rows)" if "submitted_rows" in
                 {r[0] for r in con.execute("DESCRIBE pseudonymised.submissions").fetchall()} else "s.accepted_rows")
    con.execute(f"""CREATE OR REPLACE TEMP TABLE dq_files AS
        SELECT x.la_code, p.region_code, x.submission_id, {submitted} AS submitted_rows
        FROM selection_single x JOIN pseudonymised.submissions s USING (submission_id) JOIN population p ON p.la_code = x.la_code""")
    con.execute(f"""CREATE OR REPLACE TEMP TABLE raw_data_quality AS
        WITH cells AS (
            {_geographies('sum(d.rows) AS rows', '(SELECT f.la_code, f.region_code, d.* FROM pseudonymised.dq_findings d '
                          'JOIN dq_files f USING (submission_id)) d', 'field, rule, severity')}
        ), files AS (
            {_geographies('sum(submitted_rows) AS submitted_rows', "(SELECT *, 'all' AS all_rows FROM dq_files)", 'all_rows')}
        )
        SELECT c.*, f.submitted_rows FROM cells c JOIN files f USING (geography_level, geography_code)""")


def build_raw_quarterly_waits(con: duckdb.DuckDBPyConnection, params: dict) -> None:
    """DHSC's waiting-times outputs (stages 4.2 to 5.3): each wait in the statistical quarter of its
    follow-up event's start and that event's age band (25 to 64, 65 and above), every quarter since
    collection began; the median and count (4.2), the requests, assessments and services behind them
    (5.1), and which kinds of event and which assessment and service types the waits end in (5.2,
    5.3). Region and England rows are added (DHSC publishes councils only)."""
    bands = ", ".join(f"'{b}'" for b in measures.WAIT_AGE_BANDS)
    con.execute(f"""CREATE OR REPLACE TEMP TABLE wait_quarter_rows AS
        SELECT w.la_code, p.region_code, 'request_to_assessment' AS interval,
               CAST(date_trunc('quarter', response_start) AS DATE) AS statistical_quarter_start,
               response_band AS age_band, date_diff('day', request_start, response_start) AS days,
               [{{'d': 'response event', 'v': upper(response[1]) || response[2:]}}]
               || CASE WHEN response = 'assessment' THEN [{{'d': 'assessment type',
                                                           'v': coalesce(response_assessment_type, '{NOT_RECORDED}')}}]
                       ELSE [] END AS diagnostics
        FROM waits w JOIN population p USING (la_code) WHERE response_band IN ({bands})
        UNION ALL
        SELECT w.la_code, p.region_code, 'request_to_service', CAST(date_trunc('quarter', service_start) AS DATE),
               service_band, date_diff('day', request_start, service_start),
               [{{'d': 'service type', 'v': coalesce(service_type, '{NOT_RECORDED}')}}]
        FROM waits w JOIN population p USING (la_code) WHERE service_start IS NOT NULL AND service_band IN ({bands})""")
    _run(con, f"""CREATE OR REPLACE TEMP TABLE wait_context AS
        SELECT c.*, p.region_code FROM ({measures.wait_context_sql()}) c JOIN population p USING (la_code)
        WHERE c.age_band IN ({bands})""", params)
    key = "statistical_quarter_start, age_band"
    con.execute(f"""CREATE OR REPLACE TEMP TABLE raw_waiting_times_quarterly AS
        SELECT w.*, c.requests, c.assessments, c.services FROM (
            {_geographies('count(*) AS waits, quantile_cont(days, 0.5) AS median_days', 'wait_quarter_rows',
                          f'{key}, interval')}) w
        LEFT JOIN ({_geographies('sum(requests) AS requests, sum(assessments) AS assessments, '
                                 'sum(services) AS services', 'wait_context', key)}) c
          USING (geography_level, geography_code, statistical_quarter_start, age_band)""")
    con.execute(f"""CREATE OR REPLACE TEMP TABLE raw_waiting_time_diagnostics AS
        {_geographies('count(*) AS waits', "(SELECT *, unnest(diagnostics).d AS diagnostic, "
                      "unnest(diagnostics).v AS diagnostic_value FROM wait_quarter_rows)",
                      f'{key}, interval, diagnostic, diagnostic_value')}
        UNION ALL   -- each diagnostic's total, the cell its values add up to
        {_geographies("count(*) AS waits", "(SELECT *, unnest(diagnostics).d AS diagnostic, 'Total' AS diagnostic_value "
                      "FROM wait_quarter_rows)", f'{key}, interval, diagnostic, diagnostic_value')}""")


def _names(alias: str = "t") -> str:
    return f"""coalesce((SELECT la_name FROM population WHERE la_code = {alias}.geography_code),
                        (SELECT any_value(region_name) FROM population WHERE region_code = {alias}.geography_code),
                        '{ENGLAND_NAME}')"""


def _sources(alias: str = "t") -> str:
    """The submissions behind a row: the LA's own, or all of its region's / England's."""
    return f"""CASE {alias}.geography_level
        WHEN 'LA' THEN (SELECT submission_ids FROM submissions_used WHERE la_code = {alias}.geography_code)
        WHEN 'Region' THEN (SELECT string_agg(u.submission_ids, ',' ORDER BY u.la_code) FROM submissions_used u
                            JOIN population p USING (la_code) WHERE p.region_code = {alias}.geography_code)
        ELSE (SELECT string_agg(submission_ids, ',' ORDER BY la_code) FROM submissions_used) END"""


def build_shared_tables(con: duckdb.DuckDBPyConnection, inputs: BenchmarkInputs) -> dict[str, int]:
    """Disclosure control, then the tables councils see (every row with quarter, as-of date, sources)."""
    head = f"'{inputs.quarter}' AS quarter, DATE '{inputs.as_of}' AS as_of_date"
    count, rate, stat = disclosure.count_sql, disclosure.rate_sql, disclosure.statistic_sql
    con.execute(f"""CREATE OR REPLACE TEMP TABLE activity AS
        SELECT {head}, t.geography_level, t.geography_code, {_names()} AS geography_name, t.event_type, t.breakdown,
               t.breakdown_value, {count('t.events')} AS events, {count('t.people')} AS people,
               t.events AS _raw_events, t.people AS _raw_people, {_sources()} AS submission_ids
        FROM raw_activity t""")
    # Groups of cells that add up to a total, each with that total's own cell: a breakdown's values
    # and the geography's 'total' row; the LAs of a region and the region; the regions and England.
    con.execute("ALTER TABLE activity ADD COLUMN _region VARCHAR")
    con.execute("ALTER TABLE activity ADD COLUMN _nation VARCHAR")
    con.execute("""UPDATE activity SET
        _region = CASE geography_level WHEN 'Region' THEN geography_code WHEN 'LA' THEN
                  (SELECT region_code FROM population WHERE la_code = geography_code) END,
        _nation = CASE WHEN geography_level IN ('Region', 'England') THEN 'England' END""")
    breakdowns = [b for (b,) in con.execute("SELECT DISTINCT breakdown FROM activity WHERE breakdown <> 'total'").fetchall()]
    groups = [(["geography_level", "geography_code", "event_type"], f"breakdown IN ('total', '{b}')") for b in breakdowns]
    groups += [(["_region", "event_type", "breakdown", "breakdown_value"], "_region IS NOT NULL"),
               (["_nation", "event_type", "breakdown", "breakdown_value"], "_nation IS NOT NULL")]
    secondary = 0
    for shown, raw in (("events", "_raw_events"), ("people", "_raw_people")):
        secondary += disclosure.secondary_suppression(
            con, "activity", raw, shown, groups,
            order=["geography_level", "geography_code", "event_type", "breakdown", "breakdown_value"])
    con.execute(f"""CREATE OR REPLACE TEMP TABLE activity AS
        SELECT a.* EXCLUDE (_raw_events, _raw_people, _region, _nation, submission_ids),
               {rate('a.events', 'p.pop', 100000, 1)} AS events_per_100k_adults, a.submission_ids
        FROM activity a LEFT JOIN (
            SELECT 'LA' AS l, la_code AS c, pop_18_plus AS pop FROM population
            UNION ALL SELECT 'Region', region_code, sum(pop_18_plus) FROM population
                      WHERE la_code IN (SELECT la_code FROM selection_single) GROUP BY region_code
            UNION ALL SELECT 'England', '{ENGLAND_CODE}', sum(pop_18_plus) FROM population
                      WHERE la_code IN (SELECT la_code FROM selection_single)) p
          ON p.l = a.geography_level AND p.c = a.geography_code""")

    con.execute(f"""CREATE OR REPLACE TEMP TABLE waiting_time_bands AS
        SELECT {head}, t.geography_level, t.geography_code, {_names()} AS geography_name, t.interval, t.band_order,
               t.wait_band, {count('t.people')} AS people, t.people AS _raw, {_sources()} AS submission_ids
        FROM raw_waiting_time_bands t""")
    secondary += disclosure.secondary_suppression(con, "waiting_time_bands", "_raw", "people",
                                                  [(["geography_level", "geography_code", "interval"], "true")],
                                                  order=["geography_level", "geography_code", "interval", "band_order"])
    con.execute("ALTER TABLE waiting_time_bands DROP COLUMN _raw")

    con.execute(f"""CREATE OR REPLACE TEMP TABLE costs AS
        SELECT {head}, t.geography_level, t.geography_code, {_names()} AS geography_name, t.breakdown, t.breakdown_value,
               {count('t.people')} AS people,
               CASE WHEN {count('t.people')} IS NOT NULL THEN round(t.total_cost, 0) END AS total_cost,
               {_sources()} AS submission_ids
        FROM raw_costs t""")

    con.execute(f"""CREATE OR REPLACE TEMP TABLE waiting_times AS
        SELECT {head}, t.geography_level, t.geography_code, {_names()} AS geography_name, t.interval,
               {count('t.people')} AS people, {stat('round(t.median_days, 1)', 't.people')} AS median_days,
               {stat('round(t.p90_days, 1)', 't.people')} AS p90_days,
               {rate(count('t.within_28_days'), count('t.people'), 100, 1)} AS share_within_28_days,
               {_sources()} AS submission_ids
        FROM raw_waiting_times t""")

    quarter_cols = ("t.statistical_quarter_start, strftime(last_day(t.statistical_quarter_start + INTERVAL 2 MONTH), "
                    "'%Y-%m-%d') AS statistical_quarter_end, t.age_band, t.interval")
    con.execute(f"""CREATE OR REPLACE TEMP TABLE waiting_times_quarterly AS
        SELECT {head}, t.geography_level, t.geography_code, {_names()} AS geography_name, {quarter_cols},
               {count('t.waits')} AS waits, {stat('round(t.median_days, 1)', 't.waits')} AS median_days,
               {count('t.requests')} AS requests, {count('t.assessments')} AS assessments,
               {count('t.services')} AS services, {_sources()} AS submission_ids
        FROM raw_waiting_times_quarterly t""")
    con.execute(f"""CREATE OR REPLACE TEMP TABLE waiting_time_diagnostics AS
        SELECT {head}, t.geography_level, t.geography_code, {_names()} AS geography_name, {quarter_cols},
               t.diagnostic, t.diagnostic_value, {count('t.waits')} AS waits, t.waits AS _raw,
               {_sources()} AS submission_ids
        FROM raw_waiting_time_diagnostics t""")
    secondary += disclosure.secondary_suppression(
        con, "waiting_time_diagnostics", "_raw", "waits",
        [(["geography_level", "geography_code", "statistical_quarter_start", "age_band", "interval", "diagnostic"], "true")],
        order=["geography_level", "geography_code", "statistical_quarter_start", "age_band", "interval", "diagnostic",
               "diagnostic_value"])
    con.execute("ALTER TABLE waiting_time_diagnostics DROP COLUMN _raw")

    con.execute(f"""CREATE OR REPLACE TEMP TABLE ascof_exclusions AS
        SELECT {head}, t.geography_level, t.geography_code, {_names()} AS geography_name, t.measure, t.reason,
               {count('t.people')} AS people, {_sources()} AS submission_ids
        FROM raw_ascof_exclusions t""")
    con.execute(f"""CREATE OR REPLACE TEMP TABLE ascof_2a_outcomes AS
        SELECT {head}, t.geography_level, t.geography_code, {_names()} AS geography_name, t.age_group, t.sequel_type,
               CASE t.sequel_type WHEN '1' THEN 'Deceased' WHEN '2' THEN 'Admitted to hospital' WHEN '3' THEN 'Service'
                    WHEN '4a' THEN 'Outcome of the reablement' WHEN '4b' THEN 'Outcome of a following event'
                    WHEN '4c' THEN 'Outcome of a nested assessment or review' WHEN '5' THEN 'Equipment'
                    ELSE 'Unable to classify' END AS sequel, t.final_outcome, t.in_denominator, t.in_numerator,
               {count('t.clusters')} AS clusters, t.clusters AS _raw, {_sources()} AS submission_ids
        FROM raw_ascof_2a_outcomes t""")
    secondary += disclosure.secondary_suppression(
        con, "ascof_2a_outcomes", "_raw", "clusters", [(["geography_level", "geography_code", "age_group"], "true")],
        order=["geography_level", "geography_code", "age_group", "sequel_type", "final_outcome"])
    con.execute("ALTER TABLE ascof_2a_outcomes DROP COLUMN _raw")

    # Data quality: each council's share of rows a rule caught, beside its region's and England's.
    con.execute(f"""CREATE OR REPLACE TEMP TABLE data_quality AS
        WITH shown AS (SELECT t.*, {count('t.rows')} AS shown_rows, {count('t.submitted_rows')} AS shown_submitted
                       FROM raw_data_quality t)
        SELECT {head}, t.geography_level, t.geography_code, {_names()} AS geography_name, t.field, t.rule, t.severity,
               t.shown_rows AS rows, t.shown_submitted AS submitted_rows,
               {rate('t.shown_rows', 't.shown_submitted', 100, 2)} AS share_percent,
               {rate('e.shown_rows', 'e.shown_submitted', 100, 2)} AS england_share_percent, {_sources()} AS submission_ids
        FROM shown t LEFT JOIN shown e ON e.geography_level = 'England' AND e.field = t.field AND e.rule = t.rule
                                      AND e.severity = t.severity""")

    per_100k = "t.measure IN ('2B', '2C')"
    digits = "CASE WHEN t.measure LIKE '2D%' THEN 2 ELSE 1 END"
    con.execute(f"""CREATE OR REPLACE TEMP TABLE ascof AS
        SELECT {head}, t.geography_level, t.geography_code, {_names()} AS geography_name, t.measure, t.measure_group,
               {count('t.numerator')} AS numerator,
               CASE WHEN {per_100k} THEN t.denominator ELSE {count('t.denominator')} END AS denominator,
               CASE WHEN {per_100k} THEN {rate(count('t.numerator'), 't.denominator', 100000, 1)}
                    WHEN {digits} = 2 THEN {rate(count('t.numerator'), count('t.denominator'), 100, 2)}
                    ELSE {rate(count('t.numerator'), count('t.denominator'), 100, 1)} END AS value,
               t.no_submission, {_sources()} AS submission_ids
        FROM raw_ascof t""")

    # Comparison: each LA's headline figures beside its region and England, and its rank among the LAs
    # with a figure; a council without a file is listed as such, never valued or ranked.
    con.execute(f"""CREATE OR REPLACE TEMP TABLE comparison AS
        WITH headline AS (
            SELECT geography_level, geography_code, 'ascof ' || measure || ' (' || measure_group || ')' AS figure,
                   CAST(value AS DOUBLE) AS value, no_submission FROM ascof
            WHERE measure_group IN ('Total', '18 to 64', '65 and above') OR measure_group LIKE '%: Total'
            UNION ALL
            SELECT geography_level, geography_code, 'median days ' || interval, CAST(median_days AS DOUBLE), false
            FROM waiting_times
            UNION ALL
            SELECT geography_level, geography_code, lower(event_type) || 's per 100,000 adults',
                   CAST(events_per_100k_adults AS DOUBLE), false FROM activity WHERE breakdown = 'total'
        )
        SELECT {head}, l.geography_code AS la_code, p.la_name, p.region_code, p.region_name, l.figure,
               l.value AS la_value, r.value AS region_value, e.value AS england_value,
               CASE WHEN l.value IS NOT NULL AND NOT l.no_submission
                    THEN rank() OVER (PARTITION BY l.figure ORDER BY l.no_submission, l.value DESC NULLS LAST) END
                   AS la_rank,
               count(l.value) FILTER (WHERE NOT l.no_submission) OVER (PARTITION BY l.figure) AS las_ranked,
               l.no_submission
        FROM headline l JOIN population p ON p.la_code = l.geography_code
        LEFT JOIN headline r ON r.geography_level = 'Region' AND r.geography_code = p.region_code AND r.figure = l.figure
        LEFT JOIN headline e ON e.geography_level = 'England' AND e.figure = l.figure
        WHERE l.geography_level = 'LA'""")
    counts = {t: con.execute(f"SELECT count(*) FROM {t}").fetchall()[0][0]
              for t in SHARED_TABLES}
    counts["secondary_suppressions"] = secondary
    return counts


def previous_quarter(quarter: str) -> str:
    year, q = int(quarter[:4]), int(quarter[-1])
    return f"{year - 1}-Q4" if q == 1 else f"{year}-Q{q - 1}"


def build_release_tables(con: duckdb.DuckDBPyConnection, inputs: BenchmarkInputs,
                         threshold: float = RELEASE_CHANGE_THRESHOLD) -> dict[str, int]:
    """Tables about the release itself, from the shared tables (so nothing here is less protected):
    `bcf_metrics` (the Better Care Fund's 2C and 2D with region), `release_changes` (each headline
    figure against the previous quarter's build, moves beyond `threshold` flagged for the analyst who
    signs the quarter off) and `method_log` (the method version that built the quarter)."""
    head = f"'{inputs.quarter}' AS quarter, DATE '{inputs.as_of}' AS as_of_date"
    con.execute("""CREATE OR REPLACE TEMP TABLE bcf_metrics AS
        SELECT a.quarter, a.as_of_date, a.geography_level, a.geography_code, a.geography_name,
               CASE a.geography_level WHEN 'LA' THEN p.region_code WHEN 'Region' THEN a.geography_code END AS region_code,
               CASE a.geography_level WHEN 'LA' THEN p.region_name
                    WHEN 'Region' THEN a.geography_name END AS region_name,
               CASE a.measure WHEN '2C' THEN 'Long-term admissions to residential and nursing care, 65 and over, '
                                             || 'per 100,000'
                              WHEN '2D-1' THEN 'Older people at home 91 days after discharge into reablement (part 1)'
                              ELSE 'Older people offered reablement after discharge from hospital (part 2)' END AS metric,
               a.measure, a.numerator, a.denominator, a.value, a.no_submission, a.submission_ids
        FROM ascof a LEFT JOIN population p ON a.geography_level = 'LA' AND p.la_code = a.geography_code
        WHERE (a.measure = '2C' AND a.measure_group = '65 and above') OR (a.measure IN ('2D-1', '2D-2') AND a.measure_group = 'Total')""")
    previous = previous_quarter(inputs.quarter)
    headline = """SELECT geography_level, geography_code, geography_name, 'ascof ' || measure || ' (' || measure_group || ')'
                         AS figure, CAST(value AS DOUBLE) AS value FROM {s}ascof WHERE {w}
                  UNION ALL
                  SELECT geography_level, geography_code, geography_name, 'median days ' || interval,
                         CAST(median_days AS DOUBLE) FROM {s}waiting_times WHERE {w}"""
    before = (headline.format(s="benchmark.", w=f"quarter = '{previous}'")
              if table_exists(con, "benchmark", "ascof") and table_exists(con, "benchmark", "waiting_times")
              else "SELECT NULL::VARCHAR AS geography_level, NULL::VARCHAR AS geography_code, "
                   "NULL::VARCHAR AS geography_name, NULL::VARCHAR AS figure, NULL::DOUBLE AS value LIMIT 0")
    con.execute(f"""CREATE OR REPLACE TEMP TABLE release_changes AS
        SELECT {head}, '{previous}' AS previous_quarter, n.geography_level, n.geography_code, n.geography_name, n.figure,
               b.value AS previous_value, n.value,
               round(n.value - b.value, 2) AS change,
               CASE WHEN b.value <> 0 THEN round(100 * (n.value - b.value) / abs(b.value), 1) END AS change_percent,
               (b.value = 0 AND n.value <> 0) OR abs(n.value - b.value) > {threshold} * abs(b.value) AS flagged
        FROM ({headline.format(s='', w='true')}) n JOIN ({before}) b USING (geography_level, geography_code, figure)
        WHERE n.value IS NOT NULL AND b.value IS NOT NULL""")
    con.execute("""CREATE OR REPLACE TEMP TABLE method_log AS
        SELECT $quarter AS quarter, $as_of AS as_of_date, $version AS method_version,
               CAST(now() AS TIMESTAMP) AS built_at, $changes AS method_changes""",
                {"quarter": inputs.quarter, "as_of": inputs.as_of, "version": method.METHOD_VERSION,
                 "changes": " ".join(method.changes_in(method.METHOD_VERSION))})
    return {t: con.execute(f"SELECT count(*) FROM {t}").fetchall()[0][0] for t in RELEASE_TABLES}


RELEASE_TABLES = ("bcf_metrics", "release_changes", "method_log")
SHARED_TABLES = ("activity", "costs", "waiting_times", "waiting_time_bands", "waiting_times_quarterly",
                 "waiting_time_diagnostics", "data_quality", "ascof", "ascof_exclusions", "ascof_2a_outcomes",
                 "comparison")
RAW_TABLES = ("raw_activity", "raw_costs", "raw_waiting_times", "raw_waiting_time_bands", "raw_ascof",
              "raw_waiting_times_quarterly", "raw_waiting_time_diagnostics", "raw_data_quality",
              "raw_ascof_exclusions", "raw_ascof_2a_outcomes")
