"""`audit_sensor`: copies every finished run and its materialisations into the audit log.

The audit log lives in the processor zone (`audit.log` in identifiable.duckdb, see lib/privacy/audit.py);
Dagster's own event log is the source, so runs started by sensors, schedules, backfills, the UI and
the CLI are recorded alike. CLI commands sync too, so the log is complete without the daemon.
"""

import datetime as dt

import dagster as dg
import duckdb

from cld_pipeline.defs.resources import LockedDuckDBResource
from cld_pipeline.lib.privacy import audit, retention


@dg.sensor(minimum_interval_seconds=60, default_status=dg.DefaultSensorStatus.RUNNING,
           description="Records finished runs and their materialisations in the audit log (processor zone).")
def audit_sensor(context: dg.SensorEvaluationContext, identifiable_db: LockedDuckDBResource):
    if retention.destroyed():
        return dg.SkipReason("The data was destroyed at the end of the data sharing agreement; nothing to record.")
    with identifiable_db.get_connection() as con:
        added = sync_dagster(context.instance, con)
    return dg.SkipReason(f"{added} audit entr{'y' if added == 1 else 'ies'} added")


def sync_dagster(instance, con: duckdb.DuckDBPyConnection) -> int:
    """Append one entry per finished run and per materialisation it made, for runs not yet
    recorded; returns the entries added."""
    audit.ensure_schema(con)
    recorded = {r[0] for r in con.execute("SELECT DISTINCT run_id FROM audit.log WHERE action = 'run'").fetchall()}
    since = con.execute("SELECT max(logged_at) FROM audit.log WHERE action = 'run'").fetchall()[0][0]
    statuses = [dg.DagsterRunStatus[s] for s in audit.FINISHED]
    filters = dg.RunsFilter(statuses=statuses,
                            updated_after=(since - dt.timedelta(days=1)).replace(tzinfo=dt.timezone.utc) if since else None)
    added = 0
    for record in sorted(instance.get_run_records(filters=filters), key=lambda r: r.create_timestamp):
        run = record.dagster_run
        if run.run_id in recorded:
            continue
        actor, purpose = audit.who(run.tags)
        ended = (record.end_time and dt.datetime.fromtimestamp(record.end_time, dt.timezone.utc)) or None
        tags = {k: v for k, v in run.tags.items() if k.startswith(("cld/", "dagster/partition", "dagster/backfill"))}
        for event in instance.all_logs(run.run_id, of_type=dg.DagsterEventType.ASSET_MATERIALIZATION):
            m = event.asset_materialization
            rows = m.metadata.get("dagster/row_count")
            audit.append(con, "materialisation", m.asset_key.to_user_string(),
                   {"partition": m.partition, "rows": rows.value if rows is not None else None}, actor, purpose,
                   run.run_id, dt.datetime.fromtimestamp(event.timestamp, dt.timezone.utc))
            added += 1
        audit.append(con, "run", run.job_name, {"status": run.status.value, "tags": tags}, actor, purpose, run.run_id, ended)
        added += 1
    return added
