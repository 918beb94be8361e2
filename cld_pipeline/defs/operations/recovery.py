"""`chain_recovery_sensor`: under the daemon, finish every submission whose chain stopped short.

A council's partition is landed (raw) and then validated and pseudonymised in the same run. When
that run dies between the two (a killed process, a full disk, a lost worker) and Dagster's run
retries are spent, the partition's raw layer is newer than its later layers and nothing would ever
pick it up: the landing folder is already empty. This sensor reads that from Dagster's own
records (never from the databases, so a tick never waits on a writer) and starts one run of the
later layers per such partition, once per raw materialisation (run key). It leaves alone a
partition that has a run in progress, and one whose last run failed: bad data, which a re-run does
not mend, is for operators (the failure alert and `cld-pipeline backfill --failed-only`).
`cld-pipeline run` does the same from the ledgers before and after it processes the landing folder.
"""

from __future__ import annotations

import dagster as dg

from cld_pipeline.defs.ingest.jobs import ingest_submission_job
from cld_pipeline.defs.partitions import submission_partitions

RAW_EVENTS = dg.AssetKey(["raw", "events"])
LATER = [dg.AssetKey(["validated", "events"]), dg.AssetKey(["validated", "rejections"]),
         dg.AssetKey(["validated", "dq_flags"]), dg.AssetKey(["pseudonymised", "events"])]
IN_PROGRESS = [dg.DagsterRunStatus.QUEUED, dg.DagsterRunStatus.NOT_STARTED, dg.DagsterRunStatus.STARTING,
               dg.DagsterRunStatus.STARTED, dg.DagsterRunStatus.CANCELING]
RANGE_START = "dagster/asset_partition_range_start"


def stopped_short(instance: dg.DagsterInstance) -> dict[str, int]:
    """Partition key -> storage id of its raw materialisation, where a later layer is older."""
    def latest(key: dg.AssetKey) -> dict[str, int]:
        return instance.event_log_storage.get_latest_storage_id_by_partition(
            key, dg.DagsterEventType.ASSET_MATERIALIZATION)

    raw = latest(RAW_EVENTS)
    later = [latest(k) for k in (LATER[0], LATER[3])]
    return {key: sid for key, sid in raw.items() if any(done.get(key, -1) < sid for done in later)}


def _quarter(key: str) -> str:
    return submission_partitions.get_partition_key_from_str(key).keys_by_dimension["quarter"]


def _busy_or_failed(instance: dg.DagsterInstance, keys: set[str]) -> set[str]:
    busy: set[str] = set()
    quarters_busy: set[str] = set()
    for record in instance.get_run_records(dg.RunsFilter(statuses=IN_PROGRESS, job_name=ingest_submission_job.name)):
        tags = record.dagster_run.tags
        if "dagster/partition" in tags:
            busy.add(tags["dagster/partition"])
        elif RANGE_START in tags:          # a batch or a quarter's backfill: leave its quarter alone
            quarters_busy.add(_quarter(tags[RANGE_START]))
    for key in keys - busy:
        if _quarter(key) in quarters_busy:
            busy.add(key)
            continue
        last = instance.get_run_records(dg.RunsFilter(job_name=ingest_submission_job.name,
                                                      tags={"dagster/partition": key}), limit=1)
        if last and last[0].dagster_run.status == dg.DagsterRunStatus.FAILURE:
            busy.add(key)
    return busy


@dg.sensor(
    name="chain_recovery_sensor",
    job=ingest_submission_job,
    minimum_interval_seconds=60,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Finishes the validated and pseudonymised layers of any council partition whose run stopped "
                "after landing it (once per landing; never one whose last run failed).",
)
def chain_recovery_sensor(context: dg.SensorEvaluationContext):
    todo = stopped_short(context.instance)
    todo = {k: v for k, v in todo.items() if k not in _busy_or_failed(context.instance, set(todo))}
    if not todo:
        return dg.SkipReason("Every landed partition has its validated and pseudonymised layers.")
    return [dg.RunRequest(run_key=f"recover:{key}:{sid}", partition_key=submission_partitions.get_partition_key_from_str(key),
                          asset_selection=LATER, tags={"cld/recovery": "chain"})
            for key, sid in sorted(todo.items())]
