"""Pseudonymised layer: the analysts' copy of each accepted row, with no direct identifier.

What happens to each field follows its identifier class in the specification: `keep` fields are
copied, `pseudonymise` fields become keyed-hash tokens (the person, carers' linked adults),
`coarsen` fields become birth year and month, ages and age bands (date of birth) or postcode
district and area (postcode), and `remove` fields are dropped (the event description leaves only a
"conversation" flag). Written to `pseudonymised.events` in analytics.duckdb, which never holds an
NHS number, LA person id, date of birth, postcode or name.
"""

import shutil
import time

import dagster as dg
import pyarrow as pa

from cld_pipeline.defs.errors import values_withheld
from cld_pipeline import settings
from cld_pipeline.defs.partitions import (
    SUBMISSION_WINDOW,
    run_partitions,
    submission_partitions,
)
from cld_pipeline.defs.resources import LockedDuckDBResource, PseudonymisationKey
from cld_pipeline.defs.validate.assets import EVENTS as VALIDATED_EVENTS
from cld_pipeline.defs.validate.assets import current_submissions
from cld_pipeline.lib.privacy import rights
from cld_pipeline.lib.linkage.person_links import ensure_tables as ensure_link_tables
from cld_pipeline.lib.linkage.person_links import linked_person_select, links_join_sql
from cld_pipeline.lib.privacy.pseudonymise import KeyError_, hmac_sql
from cld_pipeline.lib.validation.store import unusable_submissions
from cld_pipeline.defs.metadata import table_schema
from cld_pipeline.lib.warehouse import add_missing_columns, replace_slice, transaction
from cld_pipeline.spec import load_spec

OWNERS = ["team:cld-platform"]
EVENTS = dg.AssetKey(["pseudonymised", "events"])
QUASI_IDENTIFIERS = ("age_band", "gender_cleaned", "ethnicity_cleaned", "postcode_district", "la_code")
SMALL_GROUP = 5
MAX_SMALL_GROUP_SHARE = 0.01


def _band_sql(age: str, bands, unknown: str) -> str:
    cases = " ".join(f"WHEN {age} BETWEEN {b.min} AND {b.max} THEN '{b.label}'" for b in bands)
    return f"CASE {cases} ELSE '{unknown}' END"


def pseudonymise_sql(source: str) -> str:
    """SELECT over validated rows (`v`) and their submissions (`s`: submission_id, la_code, quarter,
    period_end)."""
    spec = load_spec()
    derived = spec.derived
    birth = "make_date(year(v.date_of_birth), month(v.date_of_birth), 1)"   # DHSC: born on the 1st

    def age_at(day: str) -> str:
        return f"CAST(floor(date_diff('day', {birth}, {day}) / 365.25) AS INTEGER)"

    select = ["submission_id", "v.row_number", "s.la_code", "s.quarter",
              linked_person_select("v", "s.la_code", "v.link_nhs_number", "v.link_method", "v.link_match_probability"),
              "CASE WHEN v.nhs_number IS NOT NULL THEN 'nhs' WHEN v.la_person_unique_identifier IS NOT NULL "
              "THEN 'la' END AS person_id_source",
              "$key_version AS key_version"]
    for f in spec.fields:
        if not f.cld:
            continue
        c = f.column
        if f.name == "LA_Code":
            continue  # s.la_code: every accepted row carries the file's LA code
        if f.identifier == "keep":
            # Coded fields keep only their cleaned value: the submitted text of an unmappable code
            # could be anything typed into the wrong column, a name included.
            select.append(f"v.{c}_cleaned" if f.type == "coded" else f"v.{c}")
        elif f.identifier == "pseudonymise" and c.startswith("adult_"):
            message = f"'la:' || upper(trim(s.la_code)) || ':' || trim(v.{c})"
            select.append(f"CASE WHEN v.{c} IS NOT NULL THEN {hmac_sql(message)} END AS {c}")
        elif f.name == "Date_of_Birth":
            select += [
                "year(v.date_of_birth) AS birth_year", "month(v.date_of_birth) AS birth_month",
                f"{age_at('v.event_start_date')} AS age_at_event_start",
                f"{age_at('s.period_end')} AS age_at_period_end",
                f"{_band_sql(age_at('v.event_start_date'), derived.age_bands, derived.unknown_age_band)} AS age_band",
                f"{_band_sql(age_at('v.event_start_date'), derived.working_age_bands, derived.unknown_age_band)} "
                "AS working_age_band",
            ]
        elif f.name == "Postcode":
            select += [
                "regexp_extract(upper(trim(v.postcode)), '^([A-Z]{1,2}[0-9][A-Z0-9]?) ?[0-9][A-Z]{2}$', 1) "
                "AS postcode_district_raw",
                "s.la_code AS area_la_code",
                "CAST(NULL AS VARCHAR) AS area_lsoa_code",   # slot for an ONS postcode-to-LSOA lookup
            ]
        elif f.name == "Event_Description":
            select.append("coalesce(v.event_description ILIKE '%conversation%', false) AS der_conversation")
        # everything else of class remove / pseudonymise (NHS number, LA person id) is not selected
    inner = f"SELECT {', '.join(select)} FROM {source} v JOIN submission s USING (submission_id)"
    return (f"SELECT * EXCLUDE (postcode_district_raw), nullif(postcode_district_raw, '') AS postcode_district "
            f"FROM ({inner})")   # unordered: sorting a national quarter's rows costs minutes, buys nothing


@dg.asset(
    key=EVENTS,
    deps=[VALIDATED_EVENTS],
    partitions_def=submission_partitions,
    group_name="pseudonymised",
    kinds={"duckdb"},
    owners=OWNERS,
    description="Accepted rows for analysts (analytics.duckdb): keyed-hash person tokens, birth year and month, "
                "ages and age bands, postcode district and area; no NHS number, LA person id, date of birth, "
                "postcode or name.",
    check_specs=[
        dg.AssetCheckSpec("row_conservation", asset=EVENTS, blocking=True,
                          description="One pseudonymised row per validated row not under a restriction."),
        dg.AssetCheckSpec("no_direct_identifiers", asset=EVENTS, blocking=True,
                          description="No column of an identifying field survives; every row has a 64-hex token."),
        dg.AssetCheckSpec("k_anonymity", asset=EVENTS,
                          description=f"People in groups smaller than {SMALL_GROUP} over age band, sex, ethnicity, "
                                      f"area and LA stay under {MAX_SMALL_GROUP_SHARE:.0%} (a warning)."),
    ],
    backfill_policy=dg.BackfillPolicy.single_run(),   # a quarter's backfill in one set-based run
    retry_policy=dg.RetryPolicy(max_retries=2, delay=5, backoff=dg.Backoff.EXPONENTIAL),
    freshness_policy=SUBMISSION_WINDOW,
)
def pseudonymised_events(context: dg.AssetExecutionContext, identifiable_db: LockedDuckDBResource,
                         analytics_db: LockedDuckDBResource, pseudonymisation_key: PseudonymisationKey):
    with values_withheld("Pseudonymisation"):
        yield from _pseudonymised_events_body(context, identifiable_db, analytics_db, pseudonymisation_key)


def _pseudonymised_events_body(context: dg.AssetExecutionContext, identifiable_db: LockedDuckDBResource,
                               analytics_db: LockedDuckDBResource, pseudonymisation_key: PseudonymisationKey):
    started = time.perf_counter()
    partitions = run_partitions(context)
    try:
        ring = pseudonymisation_key.load_ring()
    except KeyError_ as err:
        raise dg.Failure(description=str(err), allow_retries=False) from None
    key = ring[0]
    if key.development:
        context.log.warning("Using the DEVELOPMENT-ONLY pseudonymisation key from the data folder: tokens are not "
                            "linkable with any other system. Set CLD_PSEUDO_KEY for real data.")
    scratch = settings.new_scratch("pseudonymise-")
    try:
        with identifiable_db.get_connection() as con:
            currents = current_submissions(con, partitions)
            # In a batch, a submission the validated layer judged unusable is left out here (one file
            # alone is stopped by the blocking check before this step runs).
            unusable = unusable_submissions(con, [c["submission_id"] for c in currents.values()])
            if len(currents) > 1:
                currents = {p: c for p, c in currents.items() if c["submission_id"] not in unusable}
            skipped = sorted(p[0] for p in partitions if p not in currents)
            batch = pa.Table.from_pylist([{"submission_id": c["submission_id"], "la_code": p[0], "quarter": p[1],
                                           "period_end": c["reporting_period_end"]} for p, c in currents.items()],
                                         schema=pa.schema([("submission_id", pa.string()), ("la_code", pa.string()),
                                                           ("quarter", pa.string()), ("period_end", pa.date32())]))
            con.register("batch_submissions", batch)
            # Rows of people under restriction stay in the processor zone, and so do links to people
            # under restriction, erasure or objection from other people's rows.
            try:
                links, params = rights.withheld_links_select(con, ring, "v", "v.la_code_of_file")
            except rights.RightsError as err:
                raise dg.Failure(description=str(err), allow_retries=False) from None
            rights.ensure_restriction_column(con, "validated.events")
            ids = "(SELECT submission_id FROM batch_submissions)"
            # With each row, its person's link to a hospital patient when the linkage step found one
            # (linked/probabilistic.py, which also re-keys rows pseudonymised before it ran).
            ensure_link_tables(con)
            con.execute(f"COPY (SELECT v.*{links}, l.nhs_number AS link_nhs_number, l.link_method, "
                        f"l.match_probability AS link_match_probability "
                        f"FROM validated.events v JOIN batch_submissions b USING (submission_id) "
                        f"{links_join_sql('v', 'b.la_code', 'b.quarter')} WHERE NOT v.processing_restricted) "
                        f"TO '{scratch / 'validated.parquet'}' (FORMAT parquet)", params)
            restricted = con.execute(f"SELECT count(*) FROM validated.events WHERE submission_id IN {ids} AND "
                                     "processing_restricted").fetchall()[0][0]
            # The submissions' non-identifying facts, for DHSC's submission selection in the analysts' zone.
            con.execute(f"""COPY (SELECT s.submission_id, s.la_code, s.quarter, s.received_at, s.reporting_period_start,
                                        s.reporting_period_end, v.derived_period_start, v.derived_period_end,
                                        s.status, v.accepted_rows, s.row_count AS submitted_rows
                                 FROM raw.submissions s JOIN validated.submissions v USING (submission_id)
                                 WHERE s.submission_id IN {ids}) TO '{scratch / 'ledger.parquet'}' (FORMAT parquet)""")
            # How many rows each field and rule caught (never a value): the data-quality benchmark.
            # Field and rule names come from the spec and the rules; anything else is 'other', so
            # nothing a file carried (a header, say) can reach the analysts' zone through here.
            known = ", ".join("'" + f.name.replace("'", "''") + "'" for f in load_spec().fields)
            field = f"CASE WHEN field IN ({known}) THEN field ELSE 'other' END"
            rule = "CASE WHEN regexp_full_match(rule, '[a-z0-9_]{1,64}') THEN rule ELSE 'other' END"
            con.execute(f"""COPY (SELECT submission_id, {field} AS field, {rule} AS rule, 'reject' AS severity,
                                        count(DISTINCT row_number) AS rows
                                 FROM validated.rejections WHERE submission_id IN {ids} GROUP BY ALL
                                 UNION ALL
                                 SELECT submission_id, {field}, {rule}, 'flag', count(DISTINCT row_number)
                                 FROM validated.dq_flags WHERE submission_id IN {ids} GROUP BY ALL)
                            TO '{scratch / 'dq_findings.parquet'}' (FORMAT parquet)""")
            con.unregister("batch_submissions")
        ipad, opad = key.pads
        work = settings.work_connection(scratch)
        work.register("batch_submissions", batch)
        work.execute("CREATE TABLE submission AS SELECT * FROM batch_submissions")
        out = scratch / "pseudonymised.parquet"
        validated = f"read_parquet('{scratch / 'validated.parquet'}')"
        work.execute(f"COPY ({pseudonymise_sql(validated)}) TO '{out}' (FORMAT parquet)",
                     {"ipad": ipad, "opad": opad, "key_version": key.version})
        validated_rows = work.execute(f"SELECT count(*) FROM {validated}").fetchall()[0][0]
        rows, tokened, people = work.execute(
            f"SELECT count(*), count(*) FILTER (WHERE regexp_full_match(person_id, '[0-9a-f]{{64}}')), "
            f"count(DISTINCT person_id) FROM read_parquet('{out}')").fetchall()[0]
        qi = ", ".join(QUASI_IDENTIFIERS)
        groups, in_small, smallest = work.execute(f"""
            WITH people AS (SELECT DISTINCT person_id, {qi} FROM read_parquet('{out}')),
                 g AS (SELECT {qi}, count(*) AS k FROM people GROUP BY ALL)
            SELECT count(*), coalesce(sum(k) FILTER (WHERE k < {SMALL_GROUP}), 0), min(k) FROM g""").fetchall()[0]
        work.close()
        with analytics_db.get_connection() as con:
            # A superseded submission's rows move to events_history, so benchmarks "as of" an earlier
            # date can still be rebuilt from the file that was current then.
            con.execute("CREATE SCHEMA IF NOT EXISTS pseudonymised")
            con.execute(f"CREATE TABLE IF NOT EXISTS pseudonymised.events AS SELECT * FROM read_parquet('{out}') LIMIT 0")
            con.execute("CREATE TABLE IF NOT EXISTS pseudonymised.events_history AS SELECT * FROM pseudonymised.events LIMIT 0")
            # events gains columns as the method grows (the linkage's, say): history follows
            add_missing_columns(con, "pseudonymised.events_history", "pseudonymised.events")
            con.register("batch_submissions", batch)
            slices = "la_code || '|' || quarter IN (SELECT la_code || '|' || quarter FROM batch_submissions)"
            current_ids = "(SELECT submission_id FROM batch_submissions)"
            with transaction(con):
                con.execute(f"""INSERT INTO pseudonymised.events_history BY NAME SELECT * FROM pseudonymised.events
                               WHERE {slices} AND submission_id NOT IN {current_ids} AND submission_id NOT IN
                                     (SELECT DISTINCT submission_id FROM pseudonymised.events_history)""")
                con.execute(f"DELETE FROM pseudonymised.events_history WHERE submission_id IN {current_ids}")
            replace_slice(con, "pseudonymised.events", f"read_parquet('{out}')", slices, [])
            # before the ledger row, which says the layer is complete
            replace_slice(con, "pseudonymised.dq_findings", f"read_parquet('{scratch / 'dq_findings.parquet'}')",
                          f"submission_id IN {current_ids}", [])
            replace_slice(con, "pseudonymised.submissions", f"read_parquet('{scratch / 'ledger.parquet'}')",
                          f"submission_id IN {current_ids}", [])
            con.execute(f"UPDATE pseudonymised.submissions SET status = 'superseded' WHERE {slices} "
                        f"AND submission_id NOT IN {current_ids}")
            con.unregister("batch_submissions")
            schema = table_schema(con, "pseudonymised", "events")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    identifying = {f.column for f in load_spec().fields if f.identifier in ("remove", "coarsen")} | {
        "nhs_number", "la_person_unique_identifier"}
    leaked_columns = sorted(identifying & {c.name for c in schema.columns})
    seconds = round(time.perf_counter() - started, 2)
    yield dg.MaterializeResult(metadata={
        "dagster/row_count": rows, "people": people, "key_version": key.version,
        "rows_withheld_by_restriction": restricted, "submissions": len(currents),
        "las_left_out_as_unusable": ", ".join(skipped) or "none",
        "development_key": key.development, "seconds": seconds,
        "rows_per_second": round(rows / max(seconds, 1e-3)),
        "people_in_groups_smaller_than_5": int(in_small), "quasi_identifier_groups": groups,
        "dagster/column_schema": schema, "dagster/table_name": "analytics.pseudonymised.events"})
    yield dg.AssetCheckResult(check_name="row_conservation", passed=rows == validated_rows,
                              metadata={"validated": validated_rows + restricted, "restricted": restricted,
                                        "pseudonymised": rows})
    yield dg.AssetCheckResult(check_name="no_direct_identifiers", passed=not leaked_columns and tokened == rows,
                              metadata={"identifying_columns": ", ".join(leaked_columns) or "none",
                                        "rows_without_token": rows - tokened})
    share = in_small / max(people, 1)
    yield dg.AssetCheckResult(check_name="k_anonymity", passed=share <= MAX_SMALL_GROUP_SHARE,
                              severity=dg.AssetCheckSeverity.WARN, metadata={
                                  "people": people, "groups": groups, "smallest_group": smallest or 0,
                                  "people_in_groups_smaller_than_5": int(in_small),
                                  "share_percent": round(100 * share, 2)})
