"""Validated layer: every row of the current submission judged against the CLD Release 2 rules.

Per quarter x LA partition: `validated.events` (accepted rows, typed, with cleaned codes),
`validated.rejections` (one row per fatal failure), `validated.dq_flags` (non-fatal findings), a
summary row in `validated.submissions` with the stated and derived reporting periods, and the
council's data-quality report under `reports/dq/`. Blocking checks stop an unusable submission
from flowing downstream. Metadata and check results carry counts, never submitted values.

A run covers one partition (an arriving file) or many (a quarter's backfill, single-run policy):
the work is the same set-based pass either way, so the results are identical (test_batch_runs).
"""

import shutil
import time
from pathlib import Path

import dagster as dg

from cld_pipeline.defs.errors import values_withheld
from cld_pipeline import settings
from cld_pipeline.defs.ingest.assets import RAW_EVENTS, RAW_SUBMISSIONS
from cld_pipeline.defs.partitions import run_partitions, submission_partitions
from cld_pipeline.defs.resources import LockedDuckDBResource, PseudonymisationKey
from cld_pipeline.lib.ingest import raw_store
from cld_pipeline.lib.privacy import rights
from cld_pipeline.lib.privacy.pseudonymise import KeyError_
from cld_pipeline.lib.validation import store
from cld_pipeline.lib.validation.engine import SubmissionContext, validate_submissions
from cld_pipeline.lib.validation.report import ReportWriter
from cld_pipeline.defs.metadata import table_schema
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
    # A quarter's backfill validates all its councils' submissions in one run, set-based; an
    # arriving file still gets its own run (the landing sensor asks for one partition).
    backfill_policy=dg.BackfillPolicy.single_run(),
    retry_policy=dg.RetryPolicy(max_retries=2, delay=5, backoff=dg.Backoff.EXPONENTIAL),
)
def validated_submission(context: dg.AssetExecutionContext, identifiable_db: LockedDuckDBResource,
                         pseudonymisation_key: PseudonymisationKey):
    with values_withheld("Validation"):
        yield from _validated_submission_body(context, identifiable_db, pseudonymisation_key)


def _validated_submission_body(context: dg.AssetExecutionContext, identifiable_db: LockedDuckDBResource,
                               pseudonymisation_key: PseudonymisationKey):
    started = time.perf_counter()
    partitions = run_partitions(context)
    scratch = settings.new_scratch("validate-")
    try:
        with identifiable_db.get_connection() as con:
            raw_store.ensure_schema(con)
            currents = current_submissions(con, partitions)
            ids = [c["submission_id"] for c in currents.values()]
            store.export_raw_rows(con, ids, scratch / "raw.parquet")
            restrictions = not rights.register_is_empty(con, rights.RESTRICTING)
        ring = None
        if restrictions:   # matching the register needs the key; most runs never load it here
            try:
                ring = pseudonymisation_key.load_ring()
            except KeyError_ as err:
                raise dg.Failure(description=f"Active restrictions must be applied to these submissions: {err}",
                                 allow_retries=False) from None
        widths = _field_counts(scratch / "raw.parquet")
        contexts = {p: SubmissionContext(
            submission_id=c["submission_id"], la_code=p[0], quarter=p[1], received_date=c["received_at"].date(),
            expected_field_count=widths.get(c["submission_id"], 0),
            reporting_period_start=c["reporting_period_start"], reporting_period_end=c["reporting_period_end"])
            for p, c in currents.items()}
        batch = validate_submissions(scratch / "raw.parquet", list(contexts.values()), scratch)

        councils = load_local_authorities()
        reported = []
        t = time.perf_counter()
        with ReportWriter(scratch) as reports:
            for (la_code, quarter), ctx in contexts.items():
                result, current = batch.results[ctx.submission_id], currents[(la_code, quarter)]
                derived_start, derived_end = result.derived_period
                differs = (derived_start, derived_end) != (ctx.reporting_period_start, ctx.reporting_period_end)
                html, csv_path = reports.write(settings.data_dir() / "reports" / "dq" / quarter, {
                    "la_code": la_code, "la_name": councils[la_code].name, "quarter": quarter,
                    "file_name": current["file_name"], "submission_id": ctx.submission_id,
                    "received_at": current["received_at"].isoformat(sep=" "), "raw_rows": result.raw_rows,
                    "accepted_rows": result.accepted_rows, "rejected_rows": result.rejected_rows,
                    "flagged_rows": result.flagged_rows,
                    "stated_period": f"{ctx.reporting_period_start} to {ctx.reporting_period_end}",
                    "derived_period": f"{derived_start} to {derived_end}", "period_differs": differs,
                })
                reported.append({"la_code": la_code, "quarter": quarter, "submission_id": ctx.submission_id,
                                 "summary": {
                    "raw_rows": result.raw_rows, "accepted_rows": result.accepted_rows,
                    "rejected_rows": result.rejected_rows, "flagged_rows": result.flagged_rows,
                    "stated_start": ctx.reporting_period_start, "stated_end": ctx.reporting_period_end,
                    "derived_start": derived_start, "derived_end": derived_end, "period_differs": differs,
                    "report_html": str(html.relative_to(settings.data_dir())),
                    "report_csv": str(csv_path.relative_to(settings.data_dir())), "seconds": batch.seconds,
                    "usable": usable(result)}})
        batch.seconds["reports"] = round(time.perf_counter() - t, 3)
        t = time.perf_counter()
        with identifiable_db.get_connection() as con:
            try:
                restricted = store.replace_partitions(con, reported, scratch, ring)
            except rights.RightsError as err:
                raise dg.Failure(description=str(err), allow_retries=False) from None
            schemas = {t: table_schema(con, "validated", t) for t in store.TABLES}
        batch.seconds["store"] = round(time.perf_counter() - t, 3)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    results = [batch.results[c.submission_id] for c in contexts.values()]
    raw_rows, accepted, rejected = (sum(getattr(r, a) for r in results)
                                    for a in ("raw_rows", "accepted_rows", "rejected_rows"))
    flagged = sum(r.flagged_rows for r in results)
    rule_counts: dict[str, int] = {}
    for r in results:
        for rule, n in r.rule_counts.items():
            rule_counts[rule] = rule_counts.get(rule, 0) + n
    seconds = round(time.perf_counter() - started, 2)
    timing = {**batch.seconds, "total": seconds}
    timing["other"] = round(seconds - sum(v for k, v in batch.seconds.items()), 3)
    worst = sorted(rule_counts.items(), key=lambda kv: -kv[1])[:10]
    if len(contexts) == 1:
        (ctx,) = contexts.values()
        common = {"submission_id": ctx.submission_id, "file": currents[(ctx.la_code, ctx.quarter)]["file_name"]}
    else:   # one run for many partitions: the same metadata lands on each, so it describes the batch
        common = {"submissions": len(contexts), "rows_by_la": dg.MetadataValue.json(
            {p[0]: {"submitted": batch.results[c.submission_id].raw_rows,
                    "rejected": batch.results[c.submission_id].rejected_rows} for p, c in contexts.items()})}
    yield dg.MaterializeResult(asset_key=EVENTS, metadata={
        **common, "dagster/row_count": accepted, "rows_submitted": raw_rows,
        "rows_rejected": rejected, "rows_flagged": flagged, "rows_restricted": restricted,
        "rows_per_second": round(raw_rows / max(seconds, 1e-3)), "seconds": dg.MetadataValue.json(timing),
        "most_frequent_findings": dg.MetadataValue.json(dict(worst)),
        "reports": len(reported), "dagster/column_schema": schemas["events"],
        "dagster/table_name": "identifiable.validated.events"})
    yield dg.MaterializeResult(asset_key=REJECTIONS, metadata={
        **common, "dagster/row_count": sum(v for k, v in rule_counts.items() if _fatal(k)),
        "dagster/column_schema": schemas["rejections"], "dagster/table_name": "identifiable.validated.rejections"})
    yield dg.MaterializeResult(asset_key=DQ_FLAGS, metadata={
        **common, "dagster/row_count": sum(v for k, v in rule_counts.items() if not _fatal(k)),
        "dagster/column_schema": schemas["dq_flags"], "dagster/table_name": "identifiable.validated.dq_flags"})
    yield from _check_results(contexts, batch, raw_rows, accepted, rejected)


def _check_results(contexts, batch, raw_rows, accepted, rejected):
    unusable = sorted(p[0] for p, c in contexts.items() if not usable(batch.results[c.submission_id]))
    share = rejected / max(raw_rows, 1)
    # One file: an unusable submission fails the run's blocking check, so nothing flows downstream.
    # A batch: the check warns and names the councils; pseudonymisation leaves exactly those out
    # (validated.submissions.usable), so one bad file does not hold back the rest of the quarter.
    yield dg.AssetCheckResult(check_name="usable_submission", asset_key=EVENTS, passed=not unusable,
                              severity=dg.AssetCheckSeverity.ERROR if len(contexts) == 1 else dg.AssetCheckSeverity.WARN,
                              metadata={"rows_rejected": rejected, "rows_submitted": raw_rows,
                                        "rejected_percent": round(100 * share, 2),
                                        "unusable_las": ", ".join(unusable) or "none"})
    conserved = all(r.raw_rows == r.accepted_rows + r.rejected_rows for r in batch.results.values()) and \
        raw_rows == accepted + rejected
    yield dg.AssetCheckResult(check_name="row_conservation", asset_key=EVENTS, passed=conserved,
                              severity=dg.AssetCheckSeverity.ERROR,
                              metadata={"raw": raw_rows, "accepted": accepted, "rejected": rejected})
    yield dg.AssetCheckResult(check_name="matches_output_schema", asset_key=EVENTS, passed=batch.schema_failures == 0,
                              severity=dg.AssetCheckSeverity.ERROR, metadata={"failures": batch.schema_failures})
    failed: dict[str, list[str]] = {}
    for (la_code, _), ctx in contexts.items():
        for e in batch.results[ctx.submission_id].expectations:
            if not e["success"]:
                failed.setdefault(e["expectation"], []).append(la_code)
    yield dg.AssetCheckResult(check_name="submission_expectations", asset_key=EVENTS, passed=not failed,
                              severity=dg.AssetCheckSeverity.WARN, metadata={
                                  "submissions": len(contexts), "failed": len(failed),
                                  "failed_expectations": dg.MetadataValue.json(_failed_detail(contexts, batch, failed))})
    differs = sorted(p[0] for p, c in contexts.items()
                     if batch.results[c.submission_id].derived_period != (c.reporting_period_start,
                                                                          c.reporting_period_end))
    if len(contexts) == 1:
        (ctx,) = contexts.values()
        start, end = batch.results[ctx.submission_id].derived_period
        detail = {"stated": f"{ctx.reporting_period_start} to {ctx.reporting_period_end}",
                  "derived": f"{start} to {end}"}
    else:
        detail = {"las_differing": ", ".join(differs) or "none"}
    yield dg.AssetCheckResult(check_name="reporting_period_as_stated", asset_key=EVENTS, passed=not differs,
                              severity=dg.AssetCheckSeverity.WARN, metadata=detail)


def _failed_detail(contexts, batch, failed: dict[str, list[str]]) -> dict:
    """Per failed expectation: its unexpected percentage (one file), or the councils failing it (a batch)."""
    if len(contexts) == 1:
        (ctx,) = contexts.values()
        return {e["expectation"]: e["unexpected_percent"] for e in batch.results[ctx.submission_id].expectations
                if not e["success"]}
    return {name: las for name, las in failed.items()}


def usable(result) -> bool:
    return result.rejected_rows / max(result.raw_rows, 1) <= MAX_REJECTED_SHARE


def current_submissions(con, partitions: list[tuple[str, str]]) -> dict[tuple[str, str], dict]:
    """The current accepted submission of each partition; a partition with none fails the run plainly."""
    currents = {p: raw_store.current_submission(con, *p) for p in partitions}
    missing = sorted(f"{la} {quarter}" for (la, quarter), c in currents.items() if c is None)
    if missing:
        raise dg.Failure(description=f"No accepted submission to process for {', '.join(missing[:20])}"
                                     f"{' and more' if len(missing) > 20 else ''}: select only partitions whose "
                                     "council has submitted (a backfill of missing partitions includes councils "
                                     "that never did).", allow_retries=False)
    return currents


def _fatal(check_name: str) -> bool:
    from cld_pipeline.lib.validation.rules import FATAL, rule_index

    return rule_index()[check_name].severity == FATAL


def _field_counts(raw: Path) -> dict[str, int]:
    """Each submission's header width: the most common field count of its records."""
    import duckdb

    return dict(duckdb.sql(f"SELECT submission_id, mode(field_count) FROM read_parquet('{raw}') GROUP BY ALL").fetchall())
