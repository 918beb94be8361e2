"""Ad hoc linkage for analysts: a cohort of social care services linked to hospital activity,
launched from the UI's launchpad with typed config, no code.

Each run writes `analyst.<table_name>` in analytics.duckdb (replaced if it exists) and records its
config in the run's metadata and in `analyst.cohort_runs`, so every analyst table says how it was
made. It reads only the analysts' zone.
"""

import datetime as dt
import json
import time

import dagster as dg
from pydantic import Field

from cld_pipeline.defs.health.assets import PSEUDONYMISED_EPISODES
from cld_pipeline.defs.linked.assets import quarter_period
from cld_pipeline.defs.pseudonymise.assets import EVENTS as PSEUDONYMISED_EVENTS
from cld_pipeline.defs.resources import LockedDuckDBResource
from cld_pipeline.lib.linkage import tables as linkage
from cld_pipeline.defs.metadata import table_schema
from cld_pipeline.lib.warehouse import transaction
from cld_pipeline.spec import load_spec

COHORT = dg.AssetKey(["analyst", "cohort_linkage"])


class CohortLinkage(dg.Config):
    """Which services form the cohort, and the windows to look at hospital activity around them."""

    table_name: str = Field(default="my_cohort", pattern=r"^[a-z][a-z0-9_]{0,62}$",
                            description="Written as analyst.<table_name> (lower case, digits, underscores).")
    quarter: str = Field(default="", description="CLD quarter such as 2026-Q3; blank: the latest loaded.")
    la_codes: list[str] = Field(default=[], description="LA codes; empty: every LA.")
    age_bands: list[str] = Field(default=[], description="Age bands at service start, e.g. '65 to 74'; empty: all.")
    service_types: list[str] = Field(default=[], description="Service types (Release 2 wording, e.g. "
                                     "'Short term support: ST-Max'); empty: every service.")
    start_date: str = Field(default="", description="Services starting on or after (YYYY-MM-DD); blank: period start.")
    end_date: str = Field(default="", description="Services starting on or before (YYYY-MM-DD); blank: period end.")
    discharge_lookback_days: int = Field(default=7, ge=0, le=365,
                                         description="A hospital discharge this many days before the service "
                                                     "start (or up to 3 days after) marks it 'from hospital'.")
    follow_up_days: int = Field(default=91, ge=1, le=730,
                                description="Window after the service start for emergency admissions and death.")


def _check(config: CohortLinkage) -> None:
    spec = load_spec()
    bands = {b.label for b in spec.derived.age_bands} | {spec.derived.unknown_age_band}
    services = set(spec.code_list("service_type").value_strings)
    problems = [f"unknown age band {b!r}" for b in config.age_bands if b not in bands]
    problems += [f"unknown service type {s!r}" for s in config.service_types if s not in services]
    for day in (config.start_date, config.end_date):
        if day:
            try:
                dt.date.fromisoformat(day)
            except ValueError:
                problems.append(f"{day!r} is not a date (YYYY-MM-DD)")
    if problems:
        raise dg.Failure(description="The cohort config is not valid: " + "; ".join(problems) + ".",
                         allow_retries=False)


def cohort_sql(config: CohortLinkage) -> tuple[str, list]:
    """The cohort table's SELECT over `care` and `spells`, with its positional parameters."""
    filters, params = [], []
    for column, values in (("la_code", config.la_codes), ("age_band", config.age_bands),
                           ("service_type_cleaned", config.service_types)):
        if values:
            filters.append(f"c.{column} IN ({', '.join('?' * len(values))})")
            params += list(values)
    where = " AND ".join(["c.event_start_date BETWEEN ?::DATE AND ?::DATE"] + filters)
    back, follow = config.discharge_lookback_days, config.follow_up_days
    after = load_spec().linkage.link_days_after
    sql = f"""
        WITH cohort AS (
            SELECT c.* FROM care c
            WHERE c.event_type_cleaned = {linkage.event_value('service')} AND c.person_id IS NOT NULL AND {where}
        ),
        discharge AS (
            SELECT c.submission_id, c.row_number, max(s.discharge_date) AS discharge_date
            FROM cohort c JOIN spells s ON s.person_id = c.person_id
             AND s.discharge_date BETWEEN c.event_start_date - {back} AND c.event_start_date + {after}
            GROUP BY ALL
        ),
        admissions AS (
            SELECT c.submission_id, c.row_number, count(*) AS emergency_admissions,
                   min(date_diff('day', c.event_start_date, s.admission_date)) AS first_days
            FROM cohort c JOIN spells s ON s.person_id = c.person_id AND s.emergency_admission
             AND s.admission_date > c.event_start_date AND s.admission_date <= c.event_start_date + {follow}
            GROUP BY ALL
        )
        SELECT c.quarter, c.la_code, c.person_id, c.event_start_date AS service_start_date, c.event_end_date AS
               service_end_date, c.service_type_cleaned AS service_type, c.service_component_cleaned AS
               service_component, c.age_band,
               d.discharge_date IS NOT NULL AS from_hospital, d.discharge_date AS hospital_discharge_date,
               date_diff('day', d.discharge_date, c.event_start_date) AS days_from_discharge,
               coalesce(a.emergency_admissions, 0) AS emergency_admissions_in_follow_up,
               a.first_days AS days_to_first_emergency_admission,
               coalesce(c.date_of_death BETWEEN c.event_start_date AND c.event_start_date + {follow}, false)
                   AS died_in_follow_up,
               c.event_start_date + {follow} <= $period_end AS follow_up_complete
        FROM cohort c
        LEFT JOIN discharge d USING (submission_id, row_number)
        LEFT JOIN admissions a USING (submission_id, row_number)
        ORDER BY c.la_code, c.event_start_date, c.submission_id, c.row_number"""
    return sql, params


@dg.asset(
    key=COHORT,
    deps=[PSEUDONYMISED_EVENTS, PSEUDONYMISED_EPISODES],
    group_name="analyst",
    kinds={"duckdb"},
    owners=["team:cld-analysts"],
    description="Ad hoc cohort linkage: launch with your own config (LAs, age bands, service types, dates, "
                "windows) to get analyst.<table_name>, one row per service in the cohort with hospital "
                "discharge before it and emergency admissions and death after it.",
)
def cohort_linkage(context: dg.AssetExecutionContext, config: CohortLinkage, analytics_db: LockedDuckDBResource):
    started = time.perf_counter()
    _check(config)
    with analytics_db.get_connection() as con:
        quarter = config.quarter or (con.execute("SELECT max(quarter) FROM pseudonymised.events").fetchall()[0][0])
        if not quarter:
            raise dg.Failure(description="No pseudonymised events are loaded yet.", allow_retries=False)
        start, end = quarter_period(quarter)
        con.execute("CREATE OR REPLACE TEMP TABLE care AS SELECT * FROM pseudonymised.events WHERE quarter = ?",
                    [quarter])
        con.execute(f"CREATE OR REPLACE TEMP TABLE spells AS {linkage.spells_sql('pseudonymised.hospital_episodes')}")
        sql, params = cohort_sql(config)
        sql = sql.replace("$period_end", f"DATE '{end}'")
        con.execute(f"CREATE OR REPLACE TEMP TABLE cohort_result AS {sql}",
                    [config.start_date or start, config.end_date or end] + params)
        con.execute("CREATE SCHEMA IF NOT EXISTS analyst")
        con.execute("""CREATE TABLE IF NOT EXISTS analyst.cohort_runs (table_name VARCHAR, run_id VARCHAR,
                       created_at TIMESTAMP, quarter VARCHAR, config VARCHAR, rows BIGINT)""")
        rows, people, from_hospital, admitted = con.execute(
            "SELECT count(*), count(DISTINCT person_id), count(*) FILTER (WHERE from_hospital), "
            "count(*) FILTER (WHERE emergency_admissions_in_follow_up > 0) FROM cohort_result").fetchall()[0]
        settings_json = json.dumps(config.model_dump(), sort_keys=True)
        with transaction(con):
            con.execute(f"CREATE OR REPLACE TABLE analyst.{config.table_name} AS SELECT * FROM cohort_result")
            con.execute("INSERT INTO analyst.cohort_runs VALUES (?, ?, now(), ?, ?, ?)",
                        [config.table_name, context.run.run_id, quarter, settings_json, rows])
        schema = table_schema(con, "analyst", config.table_name)
    return dg.MaterializeResult(metadata={
        "dagster/table_name": f"analytics.analyst.{config.table_name}", "dagster/row_count": rows,
        "dagster/column_schema": schema, "table": f"analyst.{config.table_name}", "quarter": quarter,
        "config": dg.MetadataValue.json(config.model_dump()), "people": people,
        "services_from_hospital": from_hospital, "services_followed_by_emergency_admission": admitted,
        "seconds": round(time.perf_counter() - started, 2)})
