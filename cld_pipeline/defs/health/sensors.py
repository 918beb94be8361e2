"""`hospital_sensor`: one run per new hospital extract in `landing/health/`, by the quarter in its name.

The same arrival rules as the landing sensor (settled files only, cursor of handled arrivals, run
keys with the file's size and time). Extracts are national files of a million rows or more, so the
sensor reads only names; the run checks the content.
"""

import datetime as dt
import json
import time

import dagster as dg

from cld_pipeline import settings
from cld_pipeline.defs.health.assets import HEALTH_DIR, ingest_hospital_job, quarantine_hospital_job
from cld_pipeline.defs.ingest.sensors import _arrivals, _fingerprint, settle_seconds
from cld_pipeline.defs.partitions import hospital_quarter_partitions
from cld_pipeline.lib.hospital import quarter_from_name


def plan_hospital(cursor: str | None, now: float | None = None, settle: float | None = None,
                  known_quarters: set[str] | None = None):
    """(run requests, new quarters, new cursor, skip message), as plain data."""
    now = time.time() if now is None else now
    settle = settle_seconds() if settle is None else settle
    state = json.loads(cursor) if cursor else {}
    handled, pending = state.get("handled", {}), state.get("pending", {})
    present = _arrivals(settings.landing_dir() / HEALTH_DIR)
    names = {name for name, _ in present}
    handled = {n: fp for n, fp in handled.items() if n in names}
    waiting, requests, new_quarters = {}, [], set()
    for name, stat in present:
        fp = _fingerprint(stat)
        if handled.get(name) == fp:
            continue
        if not (now - stat.st_mtime >= settle or pending.get(name) == fp):
            waiting[name] = fp
            continue
        received_at = dt.datetime.fromtimestamp(stat.st_mtime, dt.timezone.utc).replace(tzinfo=None).isoformat()
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
        handled[name] = fp
    new_cursor = json.dumps({"handled": handled, "pending": waiting}, sort_keys=True)
    skip = None if requests else (f"{len(waiting)} extract(s) still being written" if waiting
                                  else "No new hospital extracts")
    return requests, new_quarters, new_cursor, skip


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
