"""Raw layer: land each submission file byte-for-byte and every record as submitted text.

One run per arriving file (started by `landing_sensor`), partitioned by quarter x LA. The original
is copied to `archive/<sha256>` before anything else; a file that cannot be processed at all is
moved to `quarantine/` with `<name>.error.json`, recorded in `raw.submissions`, and its run fails
with the reason in plain words. Nothing of a refused file reaches `raw.events`.
"""


import datetime as dt
import re
import shutil
import time
from pathlib import Path

import dagster as dg
from dagster_duckdb import DuckDBResource

from cld_pipeline.defs.errors import values_withheld
from cld_pipeline import settings
from cld_pipeline.defs.partitions import run_partitions, submission_partitions
from cld_pipeline.defs.resources import PseudonymisationKey
from cld_pipeline.lib.ingest import raw_store
from cld_pipeline.lib.privacy import retention, rights
from cld_pipeline.lib.privacy.pseudonymise import KeyError_
from cld_pipeline.lib.ingest.submission_files import (
    SubmissionRefused,
    archive_copy,
    check_name,
    confined_name,
    inspect_and_read,
    received_time,
    sha256_of,
    write_refusal,
)
from cld_pipeline.defs.metadata import table_schema

OWNERS = ["team:cld-platform"]
RAW_SUBMISSIONS = dg.AssetKey(["raw", "submissions"])
RAW_EVENTS = dg.AssetKey(["raw", "events"])


class SubmissionFile(dg.Config):
    """Which arrival to land. Left empty (a backfill or a re-run from the UI), the partition is
    rebuilt from the archived copy of its current accepted submission."""

    file_name: str = ""
    sha256: str = ""
    received_at: str = ""   # ISO timestamp of arrival (the file's modification time)


SHA256 = re.compile(r"^[0-9a-f]{64}$")


def _received(config: SubmissionFile, path: Path | None) -> dt.datetime:
    """The sensor's received time, else the file's; never later than the pipeline's clock."""
    if config.received_at:
        try:
            return received_time(dt.datetime.fromisoformat(config.received_at))
        except ValueError:
            raise dg.Failure(description="The run config's received_at is not an ISO date and time.",
                             allow_retries=False) from None
    if path is not None and path.is_file():
        return received_time(path.stat().st_mtime)
    return received_time(time.time())


def direct_child(landing: Path, name: str) -> Path | None:
    """The entry `name` of the landing folder itself (a file or a link), never anything elsewhere."""
    if not name or "/" in name or "\\" in name or name in (".", "..") or "\x00" in name:
        return None
    return landing / name


def quarantine(db: DuckDBResource, name: str, path: Path | None, refusal: SubmissionRefused,
               received_at: dt.datetime, sha256: str | None = None) -> dg.Failure:
    """Archive (when it is a regular file), explain, record, then move to quarantine/; returns the
    Failure for the caller to raise so the run shows the reason. The move comes last, so a run
    killed part-way leaves the file in landing/ to be refused again, under the same submission id."""
    data = settings.data_dir()
    if path is not None and path.is_file() and not path.is_symlink():   # never open a pipe or device
        sha256 = sha256 or sha256_of(path)
        archive_copy(path, data / "archive", sha256)
    write_refusal(data / "quarantine", name, refusal, sha256, received_at)
    receipt = raw_store.Receipt(
        submission_id=raw_store.submission_id(sha256 or "-", name, received_at), la_code=None, quarter=None,
        file_name=name, sha256=sha256, file_size=None, received_at=received_at,
        archive_path=f"archive/{sha256}" if sha256 else None)
    with db.get_connection() as con:
        raw_store.ensure_schema(con)
        raw_store.record_outcome(con, receipt, raw_store.QUARANTINED, f"{refusal.reason}: {refusal.message}")
    if path is not None and (path.is_symlink() or (path.exists() and not path.is_file())):
        path.unlink()   # a link, pipe or socket holds no submission: keeping it would keep what it points at
    elif path is not None and path.exists():
        (data / "quarantine").mkdir(parents=True, exist_ok=True)
        shutil.move(str(path), str(data / "quarantine" / confined_name(name)))
    return dg.Failure(description=f"{name} was refused and moved to quarantine/: {refusal.message}",
                      metadata={"file": name, "reason": refusal.reason, "sha256": sha256 or ""},
                      allow_retries=False)


@dg.multi_asset(
    specs=[
        dg.AssetSpec(RAW_SUBMISSIONS, skippable=True, group_name="raw", kinds={"duckdb"}, owners=OWNERS,
                     description="Ledger of received files (`raw.submissions` in identifiable.duckdb): checksum, "
                                 "reporting period, rows, and status accepted / duplicate / quarantined / superseded."),
        dg.AssetSpec(RAW_EVENTS, skippable=True, group_name="raw", kinds={"duckdb"}, owners=OWNERS,
                     description="Every submitted record as text with its submission id and row number "
                                 "(`raw.events` in identifiable.duckdb); identifiers present."),
    ],
    partitions_def=submission_partitions,
    check_specs=[
        dg.AssetCheckSpec("archive_intact", asset=RAW_SUBMISSIONS, blocking=True,
                          description="The archived original still hashes to the SHA-256 recorded on arrival."),
        dg.AssetCheckSpec("every_record_landed", asset=RAW_EVENTS, blocking=True,
                          description="raw.events holds exactly the records read from the file, numbered 1..n "
                                      "(less the rows of people on the rights register's suppression list)."),
    ],
    # A quarter's backfill re-lands every council's archived file in one run (see validated_submission).
    backfill_policy=dg.BackfillPolicy.single_run(),
    retry_policy=dg.RetryPolicy(max_retries=2, delay=5, backoff=dg.Backoff.EXPONENTIAL),
)
def raw_submission(context: dg.AssetExecutionContext, config: SubmissionFile, identifiable_db: DuckDBResource,
                   pseudonymisation_key: PseudonymisationKey):
    with values_withheld("Landing the submission"):
        yield from _raw_submission_body(context, config, identifiable_db, pseudonymisation_key)


def _raw_submission_body(context: dg.AssetExecutionContext, config: SubmissionFile, identifiable_db: DuckDBResource,
                         pseudonymisation_key: PseudonymisationKey):
    started = time.perf_counter()
    try:
        retention.assert_processing_allowed()
    except retention.AgreementEnded as err:
        raise dg.Failure(description=str(err), allow_retries=False) from None
    partitions = run_partitions(context)
    if config.file_name and len(partitions) != 1:
        raise dg.Failure(description=f"{config.file_name} belongs to one partition; this run covers {len(partitions)}. "
                                     "A run over many partitions rebuilds each from its archived submission.",
                         allow_retries=False)
    outcomes = [_land(context, config, identifiable_db, pseudonymisation_key, la, quarter) for la, quarter in partitions]
    if outcomes[0].get("duplicate_of"):   # only an arriving file can be a duplicate
        # No materialisation, so downstream partitions are untouched; the checks still report.
        yield dg.AssetCheckResult(check_name="archive_intact", asset_key=RAW_SUBMISSIONS,
                                  passed=outcomes[0]["archive_intact"],
                                  metadata={"duplicate_of": outcomes[0]["duplicate_of"]})
        yield dg.AssetCheckResult(check_name="every_record_landed", asset_key=RAW_EVENTS, passed=True,
                                  metadata={"duplicate_of": outcomes[0]["duplicate_of"], "rows_landed": 0})
        return
    seconds = round(time.perf_counter() - started, 2)
    read, landed, suppressed = (sum(o[k] for o in outcomes) for k in ("records_read", "rows_landed", "suppressed"))
    if len(outcomes) == 1:
        common = {k: outcomes[0][k] for k in ("file", "sha256", "submission_id", "status", "reporting_period")}
    else:   # one run for many partitions: the same metadata lands on each, so it describes the batch
        common = {"submissions": len(outcomes)}
    common["seconds"] = seconds
    yield dg.MaterializeResult(asset_key=RAW_SUBMISSIONS, metadata={
        **common, "dagster/row_count": len(outcomes), "dagster/column_schema": outcomes[-1]["ledger_schema"],
        "dagster/table_name": "identifiable.raw.submissions"})
    yield dg.MaterializeResult(asset_key=RAW_EVENTS, metadata={
        **common, "dagster/row_count": landed, "rows_per_second": round(read / max(seconds, 1e-3)),
        "rows_suppressed_by_rights_register": suppressed,
        "unrecognised_columns": sum(o["unknown_columns"] for o in outcomes),
        "dagster/column_schema": outcomes[-1]["events_schema"], "dagster/table_name": "identifiable.raw.events"})
    intact = [o for o in outcomes if not o["archive_intact"]]
    yield dg.AssetCheckResult(check_name="archive_intact", asset_key=RAW_SUBMISSIONS, passed=not intact,
                              metadata={"archives_checked": len(outcomes),
                                        "archives_altered": ", ".join(o["archive"] for o in intact) or "none"})
    complete = all(o["complete"] for o in outcomes)
    yield dg.AssetCheckResult(check_name="every_record_landed", asset_key=RAW_EVENTS, passed=complete,
                              metadata={"records_read": read, "rows_landed": landed,
                                        "rows_suppressed_by_rights_register": suppressed})


def _land(context: dg.AssetExecutionContext, config: SubmissionFile, identifiable_db: DuckDBResource,
          pseudonymisation_key: PseudonymisationKey, la_code: str, quarter: str) -> dict:
    """Land one partition: the arriving file named by `config`, or else the archived copy of the
    partition's current accepted submission. Returns what the checks and metadata need."""
    data = settings.data_dir()
    landing = settings.landing_dir()
    if config.file_name:
        try:
            path = check_name(landing, config.file_name)
        except SubmissionRefused as refusal:
            raise quarantine(identifiable_db, config.file_name, direct_child(landing, config.file_name), refusal,
                             _received(config, None)) from None
        received_at = _received(config, path)
        if config.sha256 and not SHA256.match(config.sha256):
            raise dg.Failure(description="The run config's sha256 is not 64 hexadecimal digits; leave it empty.",
                             allow_retries=False)
        source = path if path.is_file() else data / "archive" / config.sha256 if config.sha256 else None
        if source is None or not source.is_file():
            raise dg.Failure(description=f"{config.file_name} is neither in landing/ nor in the archive.",
                             allow_retries=False)
        archived = archive_copy(source, data / "archive", sha256_of(source))  # before anything else is written
        try:
            facts, records = inspect_and_read(archived, received=received_at.date())
        except SubmissionRefused as refusal:
            raise quarantine(identifiable_db, config.file_name, path if path.exists() else None, refusal,
                             received_at, archived.name) from None
        name = config.file_name
    else:
        with identifiable_db.get_connection() as con:
            raw_store.ensure_schema(con)
            current = raw_store.current_submission(con, la_code, quarter)
        if current is None:
            raise dg.Failure(description=f"No accepted submission has been received for LA {la_code} in {quarter}; "
                                         "place the council's file in the landing folder.", allow_retries=False)
        name, received_at, path = current["file_name"], current["received_at"], None
        archived = data / "archive" / current["sha256"]
        if not archived.is_file():
            raise dg.Failure(
                description=f"The archived original of submission {current['submission_id']} (LA {la_code}, {quarter}, "
                            f"file {name}) is missing from archive/{current['sha256']}. Restore that file from the "
                            "backup of the archive (its SHA-256 is its name), or ask the council to submit the "
                            "file again, then re-run this partition.", allow_retries=False)
        try:
            facts, records = inspect_and_read(archived, received=received_at.date())
        except SubmissionRefused as refusal:
            raise dg.Failure(description=f"The archived original of submission {current['submission_id']} can no "
                                         f"longer be landed: {refusal.message}", allow_retries=False) from None

    if (facts.la_code, facts.quarter) != (la_code, quarter):
        raise dg.Failure(description=f"{name} belongs to LA {facts.la_code} {facts.quarter}, not to this partition "
                                     f"({la_code} {quarter}); it was not loaded.", allow_retries=False)

    receipt = raw_store.Receipt(
        submission_id=raw_store.submission_id(facts.sha256, name, received_at), la_code=la_code, quarter=quarter,
        file_name=name, sha256=facts.sha256, file_size=facts.size, received_at=received_at,
        reporting_period_start=facts.reporting_period_start, reporting_period_end=facts.reporting_period_end,
        archive_path=f"archive/{facts.sha256}")

    with identifiable_db.get_connection() as con:
        raw_store.ensure_schema(con)
        earlier = raw_store.earlier_copy(con, receipt)
        if earlier is not None:
            raw_store.record_outcome(con, receipt, raw_store.DUPLICATE, f"same SHA-256 as submission {earlier}")
        suppression_list = not rights.register_is_empty(con, rights.SUPPRESSING)
    if earlier is not None:
        if path is not None and path.exists():
            path.unlink()
        context.log.info(f"{name} is a copy of submission {earlier} (same SHA-256): recorded as a duplicate, "
                         "nothing else changes.")
        return {"duplicate_of": earlier, "archive_intact": sha256_of(archived) == facts.sha256}

    ring = None
    if suppression_list:   # people who erased or objected are kept out: matching needs the key
        try:
            ring = pseudonymisation_key.load_ring()
        except KeyError_ as err:
            raise dg.Failure(description=f"The rights register's suppression list must be applied to {name}: {err}",
                             allow_retries=False) from None
    with identifiable_db.get_connection() as con:   # the file was parsed before connecting
        try:
            current, suppressed = raw_store.load_submission(con, receipt, records, ring)
        except rights.RightsError as err:
            raise dg.Failure(description=str(err), allow_retries=False) from None
        ledger_schema = table_schema(con, "raw", "submissions")
        events_schema = table_schema(con, "raw", "events")
        landed, first, last = con.execute("SELECT count(*), min(row_number), max(row_number) FROM raw.events "
                                          "WHERE submission_id = ?", [receipt.submission_id]).fetchall()[0]
    if path is not None and path.exists():
        path.unlink()  # landed: the archive holds the original
    return {
        "file": name, "sha256": facts.sha256, "submission_id": receipt.submission_id,
        "status": raw_store.ACCEPTED if current == receipt.submission_id else raw_store.SUPERSEDED,
        "reporting_period": f"{facts.reporting_period_start} to {facts.reporting_period_end}",
        "records_read": records.num_rows, "rows_landed": landed, "suppressed": suppressed,
        "unknown_columns": len(facts.unknown_columns), "ledger_schema": ledger_schema, "events_schema": events_schema,
        "archive": f"archive/{facts.sha256}",
        "archive_intact": sha256_of(data / "archive" / facts.sha256) == facts.sha256,
        "complete": landed + suppressed == records.num_rows and (suppressed > 0 or landed == 0 or
                                                                (first, last) == (1, landed)),
    }


class RefusedFile(dg.Config):
    file_name: str
    reason: str
    message: str
    received_at: str = ""


@dg.op(description="Move a file that cannot be processed to quarantine/ with its reason, record "
                                   "it in raw.submissions, and fail the run with the reason in plain words.")
def quarantine_file(config: RefusedFile, identifiable_db: DuckDBResource) -> None:
    path = direct_child(settings.landing_dir(), config.file_name)
    refusal = SubmissionRefused(config.reason, config.message)
    received_at = dt.datetime.fromisoformat(config.received_at) if config.received_at else _received(
        SubmissionFile(), path)
    raise quarantine(identifiable_db, config.file_name, path, refusal, received_at)


@dg.job(tags={"cld/layer": "raw"}, description="Refuse a landing file whole (started by landing_sensor).")
def quarantine_job():
    quarantine_file()
