"""Linked layer (analytics.duckdb, schema `linked`), one partition per CLD quarter.

Built from every LA's pseudonymised events of the quarter and every hospital extract held, joined on
the person token (the same keyed hash of the NHS number on both sides). One step writes all the
quarter's linked tables from shared temporary tables, each replaced for the quarter in one
transaction. The SQL lives in `lib/linkage/tables.py`, where the window rules are written down.
"""

import datetime as dt
import time

import dagster as dg

from cld_pipeline.defs.errors import values_withheld
from cld_pipeline.defs.health.assets import PSEUDONYMISED_EPISODES
from cld_pipeline.defs.linked.probabilistic import LINKS as PERSON_LINKS
from cld_pipeline.defs.partitions import QUARTERLY, quarter_partitions
from cld_pipeline.defs.pseudonymise.assets import EVENTS as PSEUDONYMISED_EVENTS
from cld_pipeline.defs.resources import LockedDuckDBResource
from cld_pipeline.lib.linkage import tables as linkage
from cld_pipeline.lib.linkage.person_links import ensure_link_columns, stored_link_method_sql
from cld_pipeline.defs.metadata import table_schema
from cld_pipeline.lib.warehouse import transaction

OWNERS = ["team:cld-linkage"]
LOW_MATCH_SHARE = 0.75      # an LA below 75% of England's match rate is flagged
MIN_PEOPLE_FOR_RATE = 20

TABLES = {
    "person_spells": "Each social care person token (per LA) with every hospital spell of theirs that overlaps "
                     "the reporting period, and how the person was linked (link_method, match_probability).",
    "match_rates": "People, people linked to at least one hospital spell, the match rate (people_linked / "
                   "people), people without a valid NHS number and those of them linked probabilistically, per LA.",
    "linkage_bias": "Among people without a valid NHS number, per LA and England, in total and by age band, sex "
                    "and ethnicity group: how many the probabilistic linkage links and the share left unmatched.",
    "match_rates_by_group": "Match rates per LA by age band and by ethnicity group (breakdown, breakdown_value).",
    "discharge_to_care": "Each hospital discharge in the period of a person known to social care: the next "
                         "social care event and service, days from discharge and from the discharge-ready date, "
                         "within 7 and 28 days.",
    "reablement_outcomes": "ASCOF 2D per reablement cluster linked to a qualifying 65+ discharge: death, emergency "
                           "readmission and long-term residential or nursing care within 84 days.",
    "ascof_2d": "ASCOF 2D per LA: part 1 (remained at home 84 days after discharge into reablement) and part 2 "
                "(qualifying discharges that went into reablement), unsuppressed (processor and analysts only).",
    "readmissions": "Each service starting in the period with emergency admissions within 30 and 91 days of "
                    "its start.",
}
# Rebuild a quarter once its inputs change and nothing upstream is still running. Not `eager()`:
# that waits for every mapped LA partition to exist, and most quarters never have all 153.
AUTOMATION = (dg.AutomationCondition.any_deps_updated().since_last_handled()
              & ~dg.AutomationCondition.any_deps_in_progress() & ~dg.AutomationCondition.in_progress())
KEYS = {name: dg.AssetKey(["linked", name]) for name in TABLES}


def quarter_period(quarter: str) -> tuple[dt.date, dt.date]:
    """The rolling 12 months that a CLD quarter's submissions cover: ending on the quarter's last day."""
    year, q = int(quarter[:4]), int(quarter[-1])
    after = dt.date(year + (q == 4), (3 * q) % 12 + 1, 1)
    return dt.date(after.year - 1, after.month, 1), after - dt.timedelta(days=1)


# The hospital columns the linkage reads (pseudonymised.hospital_episodes holds more).
EPISODE_COLUMNS = {"extract_quarter": "VARCHAR", "row_number": "BIGINT", "person_id": "VARCHAR", "spell_id": "VARCHAR",
                   "last_episode_in_spell": "INTEGER", "admission_date": "DATE", "discharge_date": "DATE",
                   "discharge_ready_date": "DATE", "admission_method": "VARCHAR", "discharge_method": "VARCHAR",
                   "discharge_destination": "VARCHAR", "management_type": "VARCHAR",
                   "treatment_function_code": "VARCHAR", "age_at_admission": "INTEGER", "age_at_discharge": "INTEGER"}

CARE_COLUMNS = ("submission_id", "row_number", "la_code", "quarter", "person_id", "person_id_source",
                "link_method", "match_probability", "gender_cleaned",
                "event_type_cleaned", "event_start_date", "event_end_date", "service_type_cleaned",
                "service_component_cleaned", "client_type_cleaned", "date_of_death", "age_band",
                "ethnicity_cleaned")


def build_linked_tables(con, quarter: str, care_source: str = "pseudonymised.events",
                        episodes_source: str = "pseudonymised.hospital_episodes") -> dict[str, int]:
    """Compute every linked table of `quarter` into temp tables `<name>` on `con`; returns row counts."""
    start, end = quarter_period(quarter)
    params = {"period_start": start, "period_end": end, "quarter": quarter}
    columns = ", ".join(c if c != "link_method" else f"{stored_link_method_sql()} AS link_method" for c in CARE_COLUMNS)
    con.execute(f"CREATE OR REPLACE TEMP TABLE care AS SELECT {columns} FROM {care_source} "
                "WHERE quarter = $quarter", {"quarter": quarter})
    con.execute(f"CREATE OR REPLACE TEMP TABLE spells AS {linkage.spells_sql(episodes_source)}")
    steps = {
        "person_spells": linkage.person_spells_sql(),
        "match_rates": linkage.match_rates_sql(),
        "match_rates_by_group": (
            f"SELECT quarter, la_code, 'age_band' AS breakdown, age_band AS breakdown_value, people, people_linked, "
            f"match_rate, people_without_nhs_number, people_linked_probabilistic "
            f"FROM ({linkage.match_rates_sql(by='age_band')}) UNION ALL "
            f"SELECT quarter, la_code, 'ethnicity_group', ethnicity_group, people, people_linked, match_rate, "
            f"people_without_nhs_number, people_linked_probabilistic "
            f"FROM ({linkage.match_rates_sql(by='ethnicity_group')})"),
        "linkage_bias": linkage.linkage_bias_sql(),
        "discharge_to_care": linkage.discharge_to_care_sql(),
        "reablement_outcomes": linkage.reablement_outcomes_sql(),
        "ascof_2d": linkage.ascof_2d_sql(),
        "readmissions": linkage.readmissions_sql(),
    }
    counts = {}
    for name, sql in steps.items():
        used = {k: v for k, v in params.items() if f"${k}" in sql}
        con.execute(f"CREATE OR REPLACE TEMP TABLE {name} AS {sql}", used)
        counts[name] = con.execute(f"SELECT count(*) FROM {name}").fetchall()[0][0]
    return counts


@dg.multi_asset(
    # The quarter of pseudonymised/events (quarter x LA) is inferred as the shared dimension.
    specs=[dg.AssetSpec(key, group_name="linked", kinds={"duckdb"}, owners=OWNERS, description=text,
                        automation_condition=AUTOMATION, freshness_policy=QUARTERLY,
                        deps=[PSEUDONYMISED_EVENTS, PERSON_LINKS,
                              dg.AssetDep(PSEUDONYMISED_EPISODES, partition_mapping=dg.AllPartitionMapping())])
           for key, text in ((KEYS[n], TABLES[n]) for n in TABLES)],
    partitions_def=quarter_partitions,
    check_specs=[
        dg.AssetCheckSpec("low_match_rate", asset=KEYS["match_rates"],
                          description=f"No LA's match rate is below {LOW_MATCH_SHARE:.0%} of England's (a data "
                                      "quality signal: missing or invalid NHS numbers); a warning."),
        dg.AssetCheckSpec("hospital_data_held", asset=KEYS["person_spells"],
                          description="At least one hospital extract is loaded (a warning: without one every table "
                                      "is built but nobody links)."),
        dg.AssetCheckSpec("parts_consistent", asset=KEYS["ascof_2d"], blocking=True,
                          description="Numerators never exceed denominators. (Part 1 counts clusters in the "
                                      "reablement's LA, part 2 discharges in the person's LA, so they need not "
                                      "match: DHSC's caveat.)"),
    ],
)
def linked_quarter(context: dg.AssetExecutionContext, analytics_db: LockedDuckDBResource):
    with values_withheld("Linkage"):
        yield from _linked_quarter_body(context, analytics_db)


def _linked_quarter_body(context: dg.AssetExecutionContext, analytics_db: LockedDuckDBResource):
    started = time.perf_counter()
    quarter = context.partition_key
    with analytics_db.get_connection() as con:
        have = {r[0] for r in con.execute("SELECT table_schema || '.' || table_name FROM information_schema.tables").fetchall()}
        if "pseudonymised.events" not in have:
            raise dg.Failure(description="pseudonymised.events is not loaded yet: no social care submission has "
                                         "been processed.", allow_retries=False)
        hospital_held = "pseudonymised.hospital_episodes" in have
        ensure_link_columns(con)
        if not hospital_held:   # link against no spells: every table is built, the check below says why it is empty
            con.execute(f"CREATE OR REPLACE TEMP TABLE no_episodes ({', '.join(f'{c} {t}' for c, t in EPISODE_COLUMNS.items())})")
        counts = build_linked_tables(con, quarter, episodes_source="pseudonymised.hospital_episodes" if hospital_held
                                     else "no_episodes")
        con.execute("CREATE SCHEMA IF NOT EXISTS linked")
        for name in TABLES:
            con.execute(f"CREATE TABLE IF NOT EXISTS linked.{name} AS SELECT * FROM {name} LIMIT 0")
        with transaction(con):   # the quarter's tables change together
            for name in TABLES:
                con.execute(f"DELETE FROM linked.{name} WHERE quarter = ?", [quarter])
                con.execute(f"INSERT INTO linked.{name} BY NAME SELECT * FROM {name}")
        schemas = {name: table_schema(con, "linked", name) for name in TABLES}
        england = con.execute("SELECT sum(people), sum(people_linked), sum(people_without_nhs_number), "
                              "sum(people_linked_probabilistic) FROM match_rates").fetchall()[0]
        rate = (england[1] or 0) / england[0] if england[0] else None
        low = con.execute(f"SELECT la_code, people, round(match_rate, 4) FROM match_rates WHERE people >= "
                          f"{MIN_PEOPLE_FOR_RATE} AND match_rate < ? ORDER BY la_code",
                          [LOW_MATCH_SHARE * (rate or 0)]).fetchall()
        bad_parts = con.execute("SELECT count(*) FROM ascof_2d WHERE numerator > denominator").fetchall()[0][0]
    seconds = round(time.perf_counter() - started, 2)
    for name in TABLES:
        extra = {}
        if name == "match_rates":
            extra = {"people": int(england[0] or 0), "people_linked": int(england[1] or 0),
                     "england_match_rate": round(rate, 4) if rate is not None else None,
                     "people_without_nhs_number": int(england[2] or 0),
                     "people_linked_probabilistic": int(england[3] or 0)}
        yield dg.MaterializeResult(asset_key=KEYS[name], metadata={
            "dagster/row_count": counts[name], "dagster/column_schema": schemas[name],
            "dagster/table_name": f"analytics.linked.{name}", "seconds": seconds, **extra})
    yield dg.AssetCheckResult(check_name="low_match_rate", asset_key=KEYS["match_rates"], passed=not low,
                              severity=dg.AssetCheckSeverity.WARN, metadata={
                                  "england_match_rate": round(rate, 4) if rate is not None else None,
                                  "las_below": ", ".join(f"{la} ({r:.1%} of {n})" for la, n, r in low) or "none"})
    yield dg.AssetCheckResult(check_name="hospital_data_held", asset_key=KEYS["person_spells"], passed=hospital_held,
                              severity=dg.AssetCheckSeverity.WARN,
                              metadata={"hospital_episodes_table": "present" if hospital_held else
                                        "missing: place hospital extracts in landing/health/"})
    yield dg.AssetCheckResult(check_name="parts_consistent", asset_key=KEYS["ascof_2d"], passed=bad_parts == 0,
                              metadata={"inconsistent_rows": bad_parts})


linked_quarter_job = dg.define_asset_job(
    "linked_quarter_job",
    selection=dg.AssetSelection.groups("probabilistic_linkage", "linked"),
    description="Rebuild one quarter's probabilistic links and linked tables (headless runs and operators; the "
                "automation sensor does the same when inputs change).",
)
