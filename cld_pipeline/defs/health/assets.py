"""Hospital extracts through the same layers as social care, per quarter of the extract.

- `raw/hospital_extracts` and `validated/hospital_episodes` (identifiable.duckdb, the processor zone):
  the file archived byte-for-byte, every record as text, then typed episodes, with rejected rows and
  data-quality flags kept with their reasons (`validated.hospital_rejections`, `..._dq_flags`).
- `pseudonymised/hospital_episodes` (analytics.duckdb): the same keyed-hash token as social care,
  birth year and month, age at admission, postcode district; no NHS number, date of birth or postcode.
"""

import datetime as dt
import shutil
import time
from pathlib import Path

import dagster as dg
import duckdb

from cld_pipeline.defs.errors import values_withheld
from cld_pipeline import settings
from cld_pipeline.defs.partitions import hospital_quarter_partitions
from cld_pipeline.defs.resources import LockedDuckDBResource, PseudonymisationKey
from cld_pipeline.lib.linkage import hospital
from cld_pipeline.lib.privacy import retention, rights
from cld_pipeline.lib.privacy.pseudonymise import KeyError_
from cld_pipeline.lib.ingest.submission_files import (
    SubmissionRefused,
    archive_copy,
    confined_name,
    received_time,
    sha256_of,
    write_refusal,
)
from cld_pipeline.defs.metadata import table_schema
from cld_pipeline.lib.warehouse import replace_slice, transaction

OWNERS = ["team:cld-linkage"]
TAGS = {"cld/source": "hospital"}
RAW_EXTRACTS = dg.AssetKey(["raw", "hospital_extracts"])
VALIDATED_EPISODES = dg.AssetKey(["validated", "hospital_episodes"])
PSEUDONYMISED_EPISODES = dg.AssetKey(["pseudonymised", "hospital_episodes"])
HEALTH_DIR = "health"


class HospitalExtractFile(dg.Config):
    """The arrival to land (a name under landing/health/). Left empty, the quarter is rebuilt from
    the archived copy of its current extract."""

    file_name: str = ""
    received_at: str = ""


def _ensure_tables(con: duckdb.DuckDBPyConnection) -> None:
    con.execute("CREATE SCHEMA IF NOT EXISTS raw")
    con.execute("CREATE SCHEMA IF NOT EXISTS validated")
    con.execute("""CREATE TABLE IF NOT EXISTS raw.hospital_extracts (
        extract_id VARCHAR PRIMARY KEY, quarter VARCHAR, file_name VARCHAR, sha256 VARCHAR, file_size BIGINT,
        received_at TIMESTAMP, row_count BIGINT, status VARCHAR, error VARCHAR, archive_path VARCHAR,
        loaded_at TIMESTAMP)""")
    text = ", ".join(f"{c} VARCHAR" for c in hospital.validated_columns())
    con.execute(f"""CREATE TABLE IF NOT EXISTS raw.hospital_episodes (
        extract_id VARCHAR, row_number BIGINT, field_count INTEGER, width INTEGER, {text}, extra_values VARCHAR)""")
    for table in ("hospital_rejections", "hospital_dq_flags"):
        con.execute(f"""CREATE TABLE IF NOT EXISTS validated.{table} (
            extract_id VARCHAR, row_number BIGINT, field VARCHAR, rule VARCHAR, message VARCHAR)""")


def refuse(name: str, path: Path | None, refusal: SubmissionRefused, received_at: dt.datetime) -> dg.Failure:
    """Archive, move to quarantine/health/ with its reason; the Failure names the reason."""
    data = settings.data_dir()
    sha = None
    target = data / "quarantine" / HEALTH_DIR
    if path is not None and path.is_file() and not path.is_symlink():
        sha = sha256_of(path)
        archive_copy(path, data / "archive", sha)
    if path is not None and (path.exists() or path.is_symlink()):
        target.mkdir(parents=True, exist_ok=True)
        shutil.move(str(path), str(target / confined_name(name)))
    write_refusal(target, name, refusal, sha, received_at)
    return dg.Failure(description=f"health/{name} was refused and moved to quarantine/health/: {refusal.message}",
                      metadata={"file": name, "reason": refusal.reason}, allow_retries=False)


def _received(config: HospitalExtractFile) -> dt.datetime:
    """The sensor's received time, never later than the pipeline's clock."""
    try:
        return received_time(dt.datetime.fromisoformat(config.received_at) if config.received_at else time.time())
    except ValueError:
        raise dg.Failure(description="The run config's received_at is not an ISO date and time.",
                         allow_retries=False) from None


def health_file(name: str) -> Path | None:
    if not name or confined_name(name) != name:
        return None
    return settings.landing_dir() / HEALTH_DIR / name


@dg.multi_asset(
    specs=[
        dg.AssetSpec(RAW_EXTRACTS, group_name="raw", kinds={"duckdb"}, owners=OWNERS, tags=TAGS,
                     description="Ledger of hospital extracts and every episode as text (`raw.hospital_extracts`, "
                                 "`raw.hospital_episodes` in identifiable.duckdb)."),
        dg.AssetSpec(VALIDATED_EPISODES, group_name="validated", kinds={"duckdb"}, owners=OWNERS, tags=TAGS,
                     deps=[RAW_EXTRACTS],
                     description="Typed hospital episodes that pass the identifier, date and code-list rules "
                                 "(`validated.hospital_episodes`), with rejections and flags and their reasons."),
    ],
    partitions_def=hospital_quarter_partitions,
    check_specs=[dg.AssetCheckSpec("row_conservation", asset=VALIDATED_EPISODES, blocking=True,
                                   description="Every received episode is accepted or rejected, none lost.")],
    retry_policy=dg.RetryPolicy(max_retries=2, delay=5, backoff=dg.Backoff.EXPONENTIAL),
)
def hospital_extract(context: dg.AssetExecutionContext, config: HospitalExtractFile,
                     identifiable_db: LockedDuckDBResource, pseudonymisation_key: PseudonymisationKey):
    with values_withheld("Landing the hospital extract"):
        yield from _hospital_extract_body(context, config, identifiable_db, pseudonymisation_key)


def _hospital_extract_body(context: dg.AssetExecutionContext, config: HospitalExtractFile,
                           identifiable_db: LockedDuckDBResource, pseudonymisation_key: PseudonymisationKey):
    started = time.perf_counter()
    quarter = context.partition_key
    data = settings.data_dir()
    try:
        retention.assert_processing_allowed()
    except retention.AgreementEnded as err:
        raise dg.Failure(description=str(err), allow_retries=False) from None
    if config.file_name:
        path = health_file(config.file_name)
        received_at = _received(config)
        if path is None or not path.is_file() or path.is_symlink():
            raise refuse(config.file_name, path, SubmissionRefused(
                "not_a_file", "Only regular files placed in landing/health/ are read."), received_at)
        try:
            facts, records = hospital.inspect_and_read_extract(path)
        except SubmissionRefused as refusal:
            raise refuse(config.file_name, path, refusal, received_at) from None
        archived = archive_copy(path, data / "archive", facts.sha256)
        name = config.file_name
    else:
        with identifiable_db.get_connection() as con:
            _ensure_tables(con)
            current = con.execute("SELECT file_name, sha256, received_at FROM raw.hospital_extracts "
                                  "WHERE quarter = ? AND status = 'accepted'", [quarter]).fetchall()
        if not current:
            raise dg.Failure(description=f"No hospital extract has been received for {quarter}.", allow_retries=False)
        name, sha, received_at = current[0]
        path, archived = None, data / "archive" / sha
        if not archived.is_file():
            raise dg.Failure(description=f"The archived original of the hospital extract for {quarter} ({name}) is "
                                         f"missing from archive/{sha}. Restore that file from the backup of the "
                                         "archive (its SHA-256 is its name), or place the extract in landing/health/ "
                                         "again.", allow_retries=False)
        try:
            facts, records = hospital.inspect_and_read_extract(archived, name=name)
        except SubmissionRefused as refusal:
            raise dg.Failure(description=f"The archived hospital extract for {quarter} can no longer be landed: "
                                         f"{refusal.message}", allow_retries=False) from None
    if facts.quarter != quarter:
        raise dg.Failure(description=f"{name} is the extract for {facts.quarter}, not {quarter}.", allow_retries=False)

    extract_id = facts.sha256[:20]
    scratch = settings.new_scratch("hospital-")
    try:
        work = settings.work_connection(scratch)
        work.register("records", records)
        work.execute(f"""CREATE TABLE episodes AS SELECT '{extract_id}' AS extract_id, row_number, field_count,
                         {facts.width} AS width, {', '.join(hospital.validated_columns())}, extra_values FROM records""")
        # People on the rights register: erased or objecting people's episodes never land, and
        # restricted people's are flagged below; matching needs the key only when the register is used.
        with identifiable_db.get_connection() as con:
            rights.copy_register(con, work)
        ring = None
        if work.execute("SELECT count(*) FROM register").fetchall()[0][0]:
            try:
                ring = pseudonymisation_key.load_ring()
            except KeyError_ as err:
                raise dg.Failure(description=f"The rights register must be applied to {name}: {err}",
                                 allow_retries=False) from None
        suppressed = 0
        try:
            if m := rights.matcher(work, ring, rights.SUPPRESSING, register="register"):
                suppressed = work.execute(f"DELETE FROM episodes WHERE {m.matches([rights.nhs_message_sql('nhs_number')])}",
                                          m.params).fetchall()[0][0]
        except rights.RightsError as err:
            raise dg.Failure(description=str(err), allow_retries=False) from None
        work.execute(f"CREATE TABLE typed AS {hospital.typed_sql('episodes')}")
        work.execute(f"CREATE TABLE failures AS {hospital.failures_sql('typed')}")
        cols = ", ".join(f"t.{c}" for c in hospital.validated_columns())
        work.execute(f"""COPY (SELECT t.extract_id, '{quarter}' AS quarter, t.row_number, {cols} FROM typed t
                         WHERE NOT EXISTS (SELECT 1 FROM failures f WHERE f.row_number = t.row_number
                                           AND f.severity = '{hospital.FATAL}') ORDER BY t.row_number)
                         TO '{scratch / 'accepted.parquet'}' (FORMAT parquet)""")
        for severity, file in ((hospital.FATAL, "rejections"), (hospital.FLAG, "flags")):
            work.execute(f"""COPY (SELECT extract_id, row_number, field, rule, message FROM failures
                             WHERE severity = '{severity}' ORDER BY row_number, field, rule)
                             TO '{scratch / file}.parquet' (FORMAT parquet)""")
        work.execute(f"COPY episodes TO '{scratch / 'raw.parquet'}' (FORMAT parquet)")
        accepted, rejected_rows = work.execute(
            f"SELECT (SELECT count(*) FROM read_parquet('{scratch / 'accepted.parquet'}')), "
            f"(SELECT count(DISTINCT row_number) FROM failures WHERE severity = '{hospital.FATAL}')").fetchall()[0]
        by_rule = dict(work.execute("SELECT rule, count(*) FROM failures GROUP BY rule ORDER BY rule").fetchall())
        work.close()

        restricted = 0
        with identifiable_db.get_connection() as con:
            _ensure_tables(con)
            with transaction(con):
                same = con.execute("SELECT extract_id FROM raw.hospital_extracts WHERE quarter = ? AND "
                                   "status = 'accepted' AND sha256 = ?", [quarter, facts.sha256]).fetchall()
                status = "duplicate" if same and config.file_name else "accepted"
                if status == "accepted":
                    con.execute("UPDATE raw.hospital_extracts SET status = 'superseded' WHERE quarter = ? "
                                "AND status = 'accepted' AND extract_id <> ?", [quarter, extract_id])
                    con.execute("DELETE FROM raw.hospital_episodes WHERE extract_id = ?", [extract_id])
                    con.execute(f"INSERT INTO raw.hospital_episodes BY NAME SELECT * FROM "
                                f"read_parquet('{scratch / 'raw.parquet'}')")
                    con.execute("CREATE TABLE IF NOT EXISTS validated.hospital_episodes AS SELECT * FROM "
                                f"read_parquet('{scratch / 'accepted.parquet'}') LIMIT 0")
                    rights.ensure_restriction_column(con, "validated.hospital_episodes")
                    con.execute("DELETE FROM validated.hospital_episodes WHERE quarter = ?", [quarter])
                    con.execute("INSERT INTO validated.hospital_episodes BY NAME SELECT * FROM "
                                f"read_parquet('{scratch / 'accepted.parquet'}')")
                    restricted = rights.flag_restricted(con, ring, "validated.hospital_episodes", "quarter = $quarter",
                                                        {"quarter": quarter}, "nhs_number")
                    for table, file in (("hospital_rejections", "rejections"), ("hospital_dq_flags", "flags")):
                        con.execute(f"DELETE FROM validated.{table} WHERE extract_id IN (SELECT extract_id FROM "
                                    "raw.hospital_extracts WHERE quarter = ?) OR extract_id = ?", [quarter, extract_id])
                        con.execute(f"INSERT INTO validated.{table} SELECT * FROM read_parquet('{scratch / file}.parquet')")
                con.execute("""INSERT OR REPLACE INTO raw.hospital_extracts VALUES
                               (?, ?, ?, ?, ?, ?, ?, ?, NULL, ?, now())""",
                            [extract_id if status == "accepted" else f"{extract_id}-dup-{int(time.time())}",
                             quarter, name, facts.sha256, facts.size, received_at, facts.rows, status,
                             f"archive/{facts.sha256}"])
            raw_schema = table_schema(con, "raw", "hospital_episodes")
            validated_schema = table_schema(con, "validated", "hospital_episodes")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    if path is not None and path.exists():
        path.unlink()   # landed: the archive holds the original
    seconds = round(time.perf_counter() - started, 2)
    common = {"file": name, "sha256": facts.sha256, "extract_id": extract_id, "status": status, "seconds": seconds}
    yield dg.MaterializeResult(asset_key=RAW_EXTRACTS, metadata={
        **common, "dagster/row_count": facts.rows, "dagster/column_schema": raw_schema,
        "dagster/table_name": "identifiable.raw.hospital_episodes"})
    yield dg.MaterializeResult(asset_key=VALIDATED_EPISODES, metadata={
        **common, "dagster/row_count": accepted, "rejected_rows": rejected_rows,
        "rows_suppressed_by_rights_register": suppressed, "rows_restricted": restricted,
        **{f"rule_{k}": v for k, v in by_rule.items()},
        "dagster/column_schema": validated_schema, "dagster/table_name": "identifiable.validated.hospital_episodes"})
    yield dg.AssetCheckResult(check_name="row_conservation", asset_key=VALIDATED_EPISODES,
                              passed=accepted + rejected_rows + suppressed == facts.rows,
                              metadata={"received": facts.rows, "accepted": accepted, "rejected": rejected_rows,
                                        "suppressed": suppressed})


@dg.asset(
    key=PSEUDONYMISED_EPISODES,
    deps=[VALIDATED_EPISODES],
    partitions_def=hospital_quarter_partitions,
    group_name="pseudonymised",
    kinds={"duckdb"},
    owners=OWNERS,
    tags=TAGS,
    description="Hospital episodes for analysts (analytics.duckdb): the social-care token function and key, "
                "birth year and month, age at admission and discharge, postcode district; no direct identifier.",
    check_specs=[
        dg.AssetCheckSpec("row_conservation", asset=PSEUDONYMISED_EPISODES, blocking=True,
                          description="One pseudonymised episode per validated episode not under a restriction."),
        dg.AssetCheckSpec("every_episode_tokenised", asset=PSEUDONYMISED_EPISODES, blocking=True,
                          description="Every episode carries a 64-hex person token."),
    ],
    retry_policy=dg.RetryPolicy(max_retries=2, delay=5, backoff=dg.Backoff.EXPONENTIAL),
)
def pseudonymised_hospital_episodes(context: dg.AssetExecutionContext, identifiable_db: LockedDuckDBResource,
                                    analytics_db: LockedDuckDBResource, pseudonymisation_key: PseudonymisationKey):
    with values_withheld("Pseudonymising the hospital extract"):
        yield from _pseudonymised_hospital_episodes_body(context, identifiable_db, analytics_db, pseudonymisation_key)


def _pseudonymised_hospital_episodes_body(context: dg.AssetExecutionContext, identifiable_db: LockedDuckDBResource,
                                          analytics_db: LockedDuckDBResource, pseudonymisation_key: PseudonymisationKey):
    started = time.perf_counter()
    quarter = context.partition_key
    try:
        key = pseudonymisation_key.load()
    except KeyError_ as err:
        raise dg.Failure(description=str(err), allow_retries=False) from None
    scratch = settings.new_scratch("hospital-pseudo-")
    try:
        source = scratch / "validated.parquet"
        with identifiable_db.get_connection() as con:
            _ensure_tables(con)
            rights.ensure_restriction_column(con, "validated.hospital_episodes")
            con.execute(f"COPY (SELECT * FROM validated.hospital_episodes WHERE quarter = ? AND NOT processing_restricted "
                        f"ORDER BY row_number) TO '{source}' (FORMAT parquet)", [quarter])
        out = scratch / "pseudonymised.parquet"
        ipad, opad = key.pads
        work = settings.work_connection(scratch)
        work.execute(f"COPY ({hospital.pseudonymise_sql(f'read_parquet({chr(39)}{source}{chr(39)})', '$quarter')}) "
                     f"TO '{out}' (FORMAT parquet)", {"ipad": ipad, "opad": opad, "key_version": key.version,
                                                      "quarter": quarter})
        validated_rows = work.execute(f"SELECT count(*) FROM read_parquet('{source}')").fetchall()[0][0]
        rows, tokened, people = work.execute(
            f"SELECT count(*), count(*) FILTER (WHERE regexp_full_match(person_id, '[0-9a-f]{{64}}')), "
            f"count(DISTINCT person_id) FROM read_parquet('{out}')").fetchall()[0]
        work.close()
        with analytics_db.get_connection() as con:
            replace_slice(con, "pseudonymised.hospital_episodes", f"read_parquet('{out}')", "extract_quarter = ?",
                          [quarter])
            schema = table_schema(con, "pseudonymised", "hospital_episodes")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    seconds = round(time.perf_counter() - started, 2)
    yield dg.MaterializeResult(metadata={
        "dagster/row_count": rows, "people": people, "key_version": key.version, "seconds": seconds,
        "dagster/column_schema": schema, "dagster/table_name": "analytics.pseudonymised.hospital_episodes"})
    yield dg.AssetCheckResult(check_name="row_conservation", passed=rows == validated_rows,
                              metadata={"validated": validated_rows, "pseudonymised": rows})
    yield dg.AssetCheckResult(check_name="every_episode_tokenised", passed=tokened == rows,
                              metadata={"episodes_without_token": rows - tokened})


@dg.op(description="Move a hospital extract that cannot be processed to quarantine/health/ with its reason.")
def quarantine_hospital_file(config: HospitalExtractFile) -> None:
    received_at = _received(config)
    raise refuse(config.file_name, health_file(config.file_name), SubmissionRefused(
        "no_quarter_in_name", "A hospital extract's name must carry its quarter, as in "
        "hospital_extract_2026-Q3.csv."), received_at)


@dg.job(tags={"cld/layer": "raw"}, description="Refuse a hospital extract whole (started by hospital_sensor).")
def quarantine_hospital_job():
    quarantine_hospital_file()


ingest_hospital_job = dg.define_asset_job(
    "ingest_hospital_job",
    selection=dg.AssetSelection.tag("cld/source", "hospital"),
    tags={"dagster/max_retries": "1", "dagster/retry_strategy": "FROM_FAILURE"},
    description="Land one quarter's hospital extract and pseudonymise it.",
)
