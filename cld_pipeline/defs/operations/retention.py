"""`retention_job` and its daily schedule: destroy the data once the data sharing agreement ends.

Before the expiry date (`CLD_DSA_EXPIRES_ON`) the job only reports how long is left; after it, the
scheduled run destroys everything lib/privacy/retention.py lists and writes the destruction certificate.
`dry_run` lists what would go and deletes nothing (`cld-pipeline retention --dry-run`).
"""

import datetime as dt

import dagster as dg

from cld_pipeline.defs.resources import LockedDuckDBResource
from cld_pipeline.lib.privacy import audit, retention


class RetentionConfig(dg.Config):
    dry_run: bool = True
    today: str = ""     # ISO date to judge expiry by (tests and rehearsals); empty = today


@dg.op(description="Destroy the data folder's data once the data sharing agreement has expired, and write the "
                   "destruction certificate (dry run: list only).", out=dg.Out(dict))
def destroy_expired_data(context: dg.OpExecutionContext, config: RetentionConfig, identifiable_db: LockedDuckDBResource):
    today = dt.date.fromisoformat(config.today) if config.today else dt.date.today()
    dsa = retention.agreement()

    def export_audit(path):
        with identifiable_db.get_connection() as con:
            audit.append(con, "retention:destroy", dsa.dsa_id, {"expired_on": str(dsa.expires_on),
                         "files": len(retention.planned())}, purpose="data sharing agreement ended", run_id=context.run_id)
            audit.ensure_schema(con)
            con.execute(f"COPY (SELECT * FROM audit.log ORDER BY seq) TO '{path}' (HEADER)")

    if not dsa.expired(today):
        context.log.info(f"{dsa.dsa_id} runs until {dsa.expires_on}: {(dsa.expires_on - today).days} day(s) left; "
                         "nothing destroyed.")
    result = retention.destroy(dry_run=config.dry_run, today=today, audit_export=export_audit)
    if not result.get("destroyed", True):
        context.log.info(f"{'Dry run: ' if config.dry_run else ''}{len(result['would_destroy'])} file(s), "
                         f"{result['bytes']} bytes would be destroyed once {dsa.dsa_id} has expired.")
    else:
        context.log.info(f"Destroyed {result['file_count']} file(s), {result['bytes']} bytes; certificate "
                         f"{result['certificate_path']}")
    # The run's output is stored by Dagster: counts and the certificate's path, not the file list.
    return {k: v for k, v in result.items() if k not in ("files", "would_destroy")}


@dg.job(tags={"cld/layer": "retention"}, description="Destroy the data when the data sharing agreement has ended "
        "(config dry_run: true lists only).")
def retention_job():
    destroy_expired_data()


retention_schedule = dg.ScheduleDefinition(
    name="retention_schedule", job=retention_job, cron_schedule="0 2 * * *", execution_timezone="Europe/London",
    run_config={"ops": {"destroy_expired_data": {"config": {"dry_run": False}}}},
    default_status=dg.DefaultScheduleStatus.RUNNING,
    description="Daily: once CLD_DSA_EXPIRES_ON has passed, destroy the data and write the certificate.")
