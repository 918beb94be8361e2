"""`hospital_sensor`: one run per new hospital extract in `landing/health/`, by the quarter in its name.

The same arrival rules as the landing sensor (settled files only, cursor of handled arrivals, run
keys with the file's size and time). Extracts are national files of a million rows or more, so the
sensor reads only names; the run checks the content.
"""

import time

import dagster as dg

from cld_pipeline import settings
from cld_pipeline.defs.health.assets import HEALTH_DIR, ingest_hospital_job, quarantine_hospital_job
from cld_pipeline.defs.ingest.sensors import scan_arrivals, settle_seconds
from cld_pipeline.defs.partitions import hospital_quarter_partitions
from cld_pipeline.lib.ingest.submission_files import received_time
from cld_pipeline.lib.linkage.hospital import quarter_from_name


def plan_hospital(cursor: str | None, now: float | None = None, settle: float | None = None,
                  known_quarters: set[str] | None = None):
    """(run requests, new quarters, new cursor, skip message), as plain data."""
    now = time.time() if now is None else now
    settle = settle_seconds() if settle is None else settle
    arrivals = scan_arrivals(settings.landing_dir() / HEALTH_DIR, cursor, now, settle)
    requests, new_quarters = [], set()
    for name, stat, fp in arrivals.ready:
        received_at = received_time(stat.st_mtime, now).isoformat()
        config = {"file_name": name, "received_at": received_at}
        quarter = quarter_from_name(name)
        if quarter is None:
            requests.append(dg.RunRequest(
                job_name=quarantine_hospital_job.name, run_key=f"quarantine:health/{name}:{fp}",
                tags={"cld/file": f"health/{name}"[:200], "cld/refused": "no_quarter_in_name"},
                run_config={"ops": {"quarantine_hospital_file": {"config": config}}}))
        else:
            if known_quarters is None or quarter not in known_quarters:
                new_quarters.add(quarter)
            requests.append(dg.RunRequest(
                job_name=ingest_hospital_job.name, run_key=f"health/{name}:{fp}", partition_key=quarter,
                tags={"cld/file": f"health/{name}"[:200], "cld/quarter": quarter, "cld/source": "hospital"},
                run_config={"ops": {"hospital_extract": {"config": config}}}))
        arrivals.handled[name] = fp
    skip = None if requests else (f"{len(arrivals.waiting)} extract(s) still being written" if arrivals.waiting
                                  else "No new hospital extracts")
    return requests, new_quarters, arrivals.cursor(), skip


@dg.sensor(
    name="hospital_sensor",
    jobs=[ingest_hospital_job, quarantine_hospital_job],
    minimum_interval_seconds=30,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Starts one run per new hospital extract in landing/health/ (partition: the quarter in its name).",
)
def hospital_sensor(context: dg.SensorEvaluationContext) -> dg.SensorResult:
    known = set(context.instance.get_dynamic_partitions(hospital_quarter_partitions.name))
    requests, new_quarters, cursor, skip = plan_hospital(context.cursor, known_quarters=known)
    return dg.SensorResult(
        run_requests=requests,
        dynamic_partitions_requests=([hospital_quarter_partitions.build_add_request(sorted(new_quarters))]
                                     if new_quarters else []),
        cursor=cursor, skip_reason=skip)
