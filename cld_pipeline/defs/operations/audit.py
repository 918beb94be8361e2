"""`audit_sensor`: copies every finished run and its materialisations into the audit log.

The audit log lives in the processor zone (`audit.log` in identifiable.duckdb, see lib/audit.py);
Dagster's own event log is the source, so runs started by sensors, schedules, backfills, the UI and
the CLI are recorded alike. CLI commands sync too, so the log is complete without the daemon.
"""

import dagster as dg

from cld_pipeline.defs.resources import LockedDuckDBResource
from cld_pipeline.lib import audit, retention


@dg.sensor(minimum_interval_seconds=60, default_status=dg.DefaultSensorStatus.RUNNING,
           description="Records finished runs and their materialisations in the audit log (processor zone).")
def audit_sensor(context: dg.SensorEvaluationContext, identifiable_db: LockedDuckDBResource):
    if retention.destroyed():
        return dg.SkipReason("The data was destroyed at the end of the data sharing agreement; nothing to record.")
    with identifiable_db.get_connection() as con:
        added = audit.sync_dagster(context.instance, con)
    return dg.SkipReason(f"{added} audit entr{'y' if added == 1 else 'ies'} added")
