"""Validated layer: every row of the current submission judged against the CLD Release 2 rules.

Per quarter x LA partition: `validated.events` (accepted rows, typed, with cleaned codes),
`validated.rejections` (one row per fatal failure), `validated.dq_flags` (non-fatal findings), a
summary row in `validated.submissions` with the stated and derived reporting periods, and the
council's data-quality report under `reports/dq/`. Blocking checks stop an unusable submission
from flowing downstream. Metadata and check results carry counts, never submitted values.
"""

import shutil
import time
from pathlib import Path

import dagster as dg
import pyarrow.parquet as pq

from cld_pipeline import settings
from cld_pipeline.defs.ingest.assets import RAW_EVENTS, RAW_SUBMISSIONS
from cld_pipeline.defs.partitions import submission_partitions
from cld_pipeline.defs.resources import LockedDuckDBResource, PseudonymisationKey
from cld_pipeline.lib import raw_store, rights
from cld_pipeline.lib.pseudonymise import KeyError_
from cld_pipeline.lib.validation import store
from cld_pipeline.lib.validation.engine import SubmissionContext, validate_submission
from cld_pipeline.lib.validation.report import write_report
from cld_pipeline.lib.warehouse import table_schema
from cld_pipeline.reference import load_local_authorities

OWNERS = ["team:cld-platform"]
EVENTS = dg.AssetKey(["validated", "events"])
REJECTIONS = dg.AssetKey(["validated", "rejections"])
DQ_FLAGS = dg.AssetKey(["validated", "dq_flags"])
MAX_REJECTED_SHARE = 0.5

CHECKS = [
    dg.AssetCheckSpec("usable_submission", asset=EVENTS, blocking=True,
                      description=f"At most {MAX_REJECTED_SHARE:.0%} of the submission's rows are rejected."),
    dg.AssetCheckSpec("row_conservation", asset=EVENTS, blocking=True,
                      description="Every submitted row is either accepted or rejected with its reasons."),
    dg.AssetCheckSpec("matches_output_schema", asset=EVENTS, blocking=True,
                      description="Accepted rows satisfy the pandera schema of validated.events."),
    dg.AssetCheckSpec("submission_expectations", asset=EVENTS,
                      description="Great-expectations suite: completeness by event type, share of invalid codes, "
                                  "date ranges, uniqueness (a warning)."),
    dg.AssetCheckSpec("reporting_period_as_stated", asset=EVENTS,
                      description="DHSC's derived reporting period equals the period the file states (a warning)."),
]


@dg.multi_asset(
    specs=[
        dg.AssetSpec(EVENTS, deps=[RAW_EVENTS, RAW_SUBMISSIONS], group_name="validated", kinds={"duckdb", "pandera"},
                     owners=OWNERS, description="Accepted rows of the current submission, typed, with a "
                     "`<field>_cleaned` Release 2 value for each coded field (identifiable.duckdb)."),
        dg.AssetSpec(REJECTIONS, deps=[RAW_EVENTS], group_name="validated", kinds={"duckdb"}, owners=OWNERS,
                     description="One row per fatal rule failure: submission, row number, field, rule, message."),
        dg.AssetSpec(DQ_FLAGS, deps=[RAW_EVENTS], group_name="validated", kinds={"duckdb"}, owners=OWNERS,
                     description="Non-fatal findings on accepted rows (Release 1 values mapped, invalid codes, "
                                 "blank mandatory fields, ...)."),
    ],
    check_specs=CHECKS,
    partitions_def=submission_partitions,
    retry_policy=dg.RetryPolicy(max_retries=2, delay=5, backoff=dg.Backoff.EXPONENTIAL),
)
def validated_submission(context: dg.AssetExecutionContext, identifiable_db: LockedDuckDBResource,
                         pseudonymisation_key: PseudonymisationKey):
    started = time.perf_counter()
    keys = context.partition_key.keys_by_dimension
    la_code, quarter = keys["la"], keys["quarter"]
    scratch = settings.new_scratch("validate-")
    try:
        with identifiable_db.get_connection() as con:
            raw_store.ensure_schema(con)
            current = raw_store.current_submission(con, la_code, quarter)
            if current is None:
                raise dg.Failure(description=f"No accepted submission for LA {la_code} in {quarter} to validate.",
                                 allow_retries=False)
            store.export_raw_rows(con, current["submission_id"], scratch / "raw.parquet")
            restrictions = not rights.register_is_empty(con, rights.RESTRICTING)
        ring = None
        if restrictions:   # matching the register needs the key; most runs never load it here
            try:
                ring = pseudonymisation_key.load_ring()
            except KeyError_ as err:
                raise dg.Failure(description=f"Active restrictions must be applied to this submission: {err}",
                                 allow_retries=False) from None
        ctx = SubmissionContext(
            submission_id=current["submission_id"], la_code=la_code, quarter=quarter,
            received_date=current["received_at"].date(), expected_field_count=_field_count(scratch / "raw.parquet"),
            reporting_period_start=current["reporting_period_start"],
            reporting_period_end=current["reporting_period_end"])
        result = validate_submission(scratch / "raw.parquet", ctx, scratch)

        flagged = pq.read_table(result.dq_flags, columns=["row_number"]).column(0).unique()
        council = load_local_authorities()[la_code]
        derived_start, derived_end = result.derived_period
        differs = (derived_start, derived_end) != (ctx.reporting_period_start, ctx.reporting_period_end)
        html, csv_path = write_report(settings.data_dir() / "reports" / "dq" / quarter, {
            "la_code": la_code, "la_name": council.name, "quarter": quarter, "file_name": current["file_name"],
            "submission_id": ctx.submission_id, "received_at": current["received_at"].isoformat(sep=" "),
            "raw_rows": result.raw_rows, "accepted_rows": result.accepted_rows,
            "rejected_rows": result.rejected_rows, "flagged_rows": len(flagged),
            "stated_period": f"{ctx.reporting_period_start} to {ctx.reporting_period_end}",
            "derived_period": f"{derived_start} to {derived_end}", "period_differs": differs,
        }, scratch)
        summary = {
            "raw_rows": result.raw_rows, "accepted_rows": result.accepted_rows, "rejected_rows": result.rejected_rows,
            "flagged_rows": len(flagged), "stated_start": ctx.reporting_period_start,
            "stated_end": ctx.reporting_period_end, "derived_start": derived_start, "derived_end": derived_end,
            "period_differs": differs, "report_html": str(html.relative_to(settings.data_dir())),
            "report_csv": str(csv_path.relative_to(settings.data_dir())), "seconds": result.seconds,
        }
        with identifiable_db.get_connection() as con:
            try:
                restricted = store.replace_partition(con, la_code, quarter, ctx.submission_id, scratch, summary, ring)
            except rights.RightsError as err:
                raise dg.Failure(description=str(err), allow_retries=False) from None
            schemas = {t: table_schema(con, "validated", t) for t in store.TABLES}
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    seconds = round(time.perf_counter() - started, 2)
    timing = {**result.seconds, "total": seconds}
    timing["other"] = round(seconds - result.seconds.get("pandera", 0) - result.seconds.get("great_expectations", 0), 3)
    worst = sorted(result.rule_counts.items(), key=lambda kv: -kv[1])[:10]
    common = {"submission_id": ctx.submission_id, "file": current["file_name"]}
    yield dg.MaterializeResult(asset_key=EVENTS, metadata={
        **common, "dagster/row_count": result.accepted_rows, "rows_submitted": result.raw_rows,
        "rows_rejected": result.rejected_rows, "rows_flagged": len(flagged), "rows_restricted": restricted,
        "rows_per_second": round(result.raw_rows / max(seconds, 1e-3)), "seconds": dg.MetadataValue.json(timing),
        "most_frequent_findings": dg.MetadataValue.json(dict(worst)),
        "report": str(html), "dagster/column_schema": schemas["events"],
        "dagster/table_name": "identifiable.validated.events"})
    yield dg.MaterializeResult(asset_key=REJECTIONS, metadata={
        **common, "dagster/row_count": sum(v for k, v in result.rule_counts.items() if _fatal(k)),
        "dagster/column_schema": schemas["rejections"], "dagster/table_name": "identifiable.validated.rejections"})
    yield dg.MaterializeResult(asset_key=DQ_FLAGS, metadata={
        **common, "dagster/row_count": sum(v for k, v in result.rule_counts.items() if not _fatal(k)),
        "dagster/column_schema": schemas["dq_flags"], "dagster/table_name": "identifiable.validated.dq_flags"})

    share = result.rejected_rows / max(result.raw_rows, 1)
    yield dg.AssetCheckResult(check_name="usable_submission", asset_key=EVENTS, passed=share <= MAX_REJECTED_SHARE,
                              severity=dg.AssetCheckSeverity.ERROR,
                              metadata={"rows_rejected": result.rejected_rows, "rows_submitted": result.raw_rows,
                                        "rejected_percent": round(100 * share, 2)})
    conserved = result.raw_rows == result.accepted_rows + result.rejected_rows
    yield dg.AssetCheckResult(check_name="row_conservation", asset_key=EVENTS, passed=conserved,
                              severity=dg.AssetCheckSeverity.ERROR,
                              metadata={"raw": result.raw_rows, "accepted": result.accepted_rows,
                                        "rejected": result.rejected_rows})
    yield dg.AssetCheckResult(check_name="matches_output_schema", asset_key=EVENTS, passed=result.schema_failures == 0,
                              severity=dg.AssetCheckSeverity.ERROR, metadata={"failures": result.schema_failures})
    failed = [e for e in result.expectations if not e["success"]]
    yield dg.AssetCheckResult(check_name="submission_expectations", asset_key=EVENTS, passed=not failed,
                              severity=dg.AssetCheckSeverity.WARN, metadata={
                                  "expectations": len(result.expectations), "failed": len(failed),
                                  "failed_expectations": dg.MetadataValue.json(
                                      {e["expectation"]: e["unexpected_percent"] for e in failed})})
    yield dg.AssetCheckResult(check_name="reporting_period_as_stated", asset_key=EVENTS, passed=not differs,
                              severity=dg.AssetCheckSeverity.WARN, metadata={
                                  "stated": f"{ctx.reporting_period_start} to {ctx.reporting_period_end}",
                                  "derived": f"{derived_start} to {derived_end}"})


def _fatal(check_name: str) -> bool:
    from cld_pipeline.lib.validation.rules import FATAL, rule_index

    return rule_index()[check_name].severity == FATAL


def _field_count(raw: Path) -> int:
    """The header's width: the most common field count of the submission's records."""
    import duckdb

    return duckdb.sql(f"SELECT mode(field_count) FROM read_parquet('{raw}')").fetchall()[0][0]


