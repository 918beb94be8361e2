"""Data-subject rights as a Dagster job, and the rebuild jobs that follow them.

`rights_job` applies one lodged request (copy, restrict, unrestrict, object, erase) by its request
id: identifiers never go into run config, tags or logs, because Dagster's run storage is not the
processor zone. Requests are lodged with `cld-pipeline rights ...`, which then runs this job and the
rebuild in-process; an operator can re-launch a lodged request from the UI's launchpad, and the job
then starts a backfill of the affected partitions for the daemon. Either way the affected partitions
are marked stale by the materialisations the job reports on the layers it changed.
"""

import json
import shutil

import time

import dagster as dg
from dagster._core.execution.backfill import PartitionBackfill   # the UI's own way to create a backfill
from dagster._core.utils import make_new_backfill_id

from cld_pipeline import settings
from cld_pipeline.defs.health.assets import PSEUDONYMISED_EPISODES, VALIDATED_EPISODES
from cld_pipeline.defs.ingest.assets import RAW_EVENTS
from cld_pipeline.defs.partitions import QUARTER_GROUPS, submission_partition_key
from cld_pipeline.defs.pseudonymise.assets import EVENTS as PSEUDONYMISED_EVENTS
from cld_pipeline.defs.resources import LockedDuckDBResource, PseudonymisationKey
from cld_pipeline.defs.validate.assets import DQ_FLAGS, EVENTS as VALIDATED_EVENTS, REJECTIONS
from cld_pipeline.lib.privacy import audit, rights
from cld_pipeline.lib.ingest import raw_store
from cld_pipeline.lib.privacy import rights_actions as actions
from cld_pipeline.lib.privacy.pseudonymise import KeyError_
from cld_pipeline.lib.warehouse import transaction

SUBMISSION_REBUILD = [VALIDATED_EVENTS, REJECTIONS, DQ_FLAGS, PSEUDONYMISED_EVENTS]


class RightsRequest(dg.Config):
    """A request lodged with `cld-pipeline rights`: only its id, never the person's identifiers."""

    request_id: str
    rebuild: str = "backfill"   # "backfill": start a backfill of the affected partitions; "none": the caller rebuilds


def apply_request(request_id: str, identifiable_db: LockedDuckDBResource, analytics_db: LockedDuckDBResource,
                  ring, run_id: str | None = None, log=None) -> dict:
    """Carry out a lodged request in both zones; returns its summary (no identifiers)."""
    scratch = settings.new_scratch("rights-")
    folder = settings.data_dir() / "rights" / request_id
    try:
        with identifiable_db.get_connection() as icon:
            raw_store.ensure_schema(icon)
            action, person = rights.pending(icon, request_id)
            actor, reason = icon.execute("SELECT requested_by, reason FROM rights.requests WHERE request_id = ?",
                                         [request_id]).fetchall()[0]
            messages = rights.resolve(icon, person)
            tokens = rights.person_tokens(messages, ring)
            affected = actions.find_person_rows(icon, messages)
            counts: dict[str, int] = {}
            released = []
            if action == "copy":
                counts = actions.export_processor_rows(icon, folder)
                if icon.execute("SELECT count(*) FROM information_schema.schemata WHERE schema_name = ?",
                                [actions.HELD_SCHEMA]).fetchall()[0][0]:
                    counts |= actions.export_token_rows(icon, tokens, folder, schema=actions.HELD_SCHEMA)
            elif action in rights.SUPPRESSING:
                with transaction(icon):
                    rights.register(icon, request_id, action, messages, ring)
                    actions.erase_in_processor_zone(icon, affected)
            elif action == "restrict":
                with transaction(icon):
                    rights.register(icon, request_id, action, messages, ring)
                    actions.restrict_in_processor_zone(icon, ring, affected)
            else:   # unrestrict
                with transaction(icon):
                    lifted = rights.lift(icon, request_id, messages, ring)
                    actions.restrict_in_processor_zone(icon, ring, affected)
                    released = actions.release(icon, tokens, scratch)
                affected.count("rights.register (lifted)", lifted)
        with analytics_db.get_connection() as acon:
            if action == "copy":
                counts |= actions.export_token_rows(acon, tokens, folder)
            elif action == "unrestrict":
                actions.put_back(acon, released, affected)
            else:
                to_hold = actions.export_for_hold(acon, tokens, scratch) if action == "restrict" else []
                if to_hold:
                    with identifiable_db.get_connection() as icon:
                        actions.hold(icon, request_id, to_hold)
                actions.act_in_analytics(acon, action, tokens, affected)
        affected.quarters |= {quarter for _, quarter in affected.partitions}
        summary = {"request_id": request_id, "action": action, **affected.as_dict()}
        if action == "copy":
            page = actions.write_copy_page(folder, request_id, counts)
            summary.update({"copy": str(page.relative_to(settings.data_dir())), "rows": counts})
        with identifiable_db.get_connection() as icon:
            with transaction(icon):
                icon.execute("DELETE FROM rights.pending WHERE request_id = ?", [request_id])
                icon.execute("UPDATE rights.requests SET status = 'applied', applied_at = now(), summary = ? "
                             "WHERE request_id = ?", [json.dumps(summary), request_id])
                audit.append(icon, f"rights:{action}", request_id, summary, actor, reason, run_id)
                if action == "copy":
                    audit.append(icon, "export", summary["copy"], {"request_id": request_id, "rows": counts},
                                 actor, reason, run_id)
        return summary
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def launch_rebuild_backfills(instance: dg.DagsterInstance, summary: dict, request_id: str) -> list[str]:
    """After a rights request (launched from the UI): backfills that rebuild the LA partitions and
    hospital quarters it touched, and the linked and benchmark tables downstream of them."""
    from cld_pipeline.definitions import defs as load_defs

    asset_graph = load_defs().resolve_asset_graph()
    downstream = sorted((k for k in asset_graph.get_all_asset_keys() if asset_graph.get(k).group_name in QUARTER_GROUPS),
                        key=lambda k: k.to_user_string())
    plans = []
    if summary["partitions"]:
        names = [str(submission_partition_key(la, quarter))
                 for quarter, la in (p.split(" x ") for p in summary["partitions"])]
        plans.append((names, SUBMISSION_REBUILD + downstream))
    if summary["hospital_quarters"]:
        plans.append((summary["hospital_quarters"], [PSEUDONYMISED_EPISODES]))
    ids = []
    for names, selection in plans:
        backfill = PartitionBackfill.from_asset_partitions(
            backfill_id=make_new_backfill_id(), asset_graph=asset_graph, partition_names=names,
            asset_selection=selection, backfill_timestamp=time.time(),
            tags={"cld/rights_request": request_id, "cld/backfill": "rights"}, dynamic_partitions_store=instance,
            all_partitions=False, title=f"Rights request {request_id}: rebuild", description="Launched by rights_job",
            run_config=None)
        instance.add_backfill(backfill)
        ids.append(backfill.backfill_id)
    return ids


@dg.op(description="Apply one lodged data-subject rights request (copy, restrict, unrestrict, object, erase) "
                   "in both zones; affected partitions are marked stale and rebuilt.",
       out=dg.Out(dict, description="What was touched: partitions, quarters, rows per table (no identifiers)."))
def apply_rights_request(context: dg.OpExecutionContext, config: RightsRequest, identifiable_db: LockedDuckDBResource,
                         analytics_db: LockedDuckDBResource, pseudonymisation_key: PseudonymisationKey):
    try:
        ring = pseudonymisation_key.load_ring()
    except KeyError_ as err:
        raise dg.Failure(description=f"Rights requests need the pseudonymisation key: {err}", allow_retries=False) from None
    try:
        summary = apply_request(config.request_id, identifiable_db, analytics_db, ring, context.run_id)
    except rights.RightsError as err:
        raise dg.Failure(description=str(err), allow_retries=False) from None
    action = summary["action"]
    context.log.info(f"{config.request_id} ({action}): {len(summary['partitions'])} LA partition(s), "
                     f"{len(summary['hospital_quarters'])} hospital quarter(s), quarters {summary['quarters']}")
    changed = [] if action == "copy" else [VALIDATED_EVENTS] + ([RAW_EVENTS] if action in rights.SUPPRESSING else [])
    meta = {"rights_request": config.request_id, "rights_action": action}
    for partition in summary["partitions"]:
        quarter, la = partition.split(" x ")
        for key in changed:
            yield dg.AssetMaterialization(asset_key=key, partition=str(submission_partition_key(la, quarter)),
                                          description=f"Rights request {config.request_id} ({action})", metadata=meta)
    if action != "copy":
        for quarter in summary["hospital_quarters"]:
            yield dg.AssetMaterialization(asset_key=VALIDATED_EPISODES, partition=quarter, metadata=meta,
                                          description=f"Rights request {config.request_id} ({action})")
    if config.rebuild == "backfill" and action != "copy":
        ids = launch_rebuild_backfills(context.instance, summary, config.request_id)
        context.log.info(f"backfills started for the rebuild: {', '.join(ids) or 'none needed'}")
    yield dg.Output(summary)


@dg.job(tags={"cld/layer": "rights"}, description="Apply a data-subject rights request lodged with "
        "`cld-pipeline rights` (launchpad config: its request id only).")
def rights_job():
    apply_rights_request()


rights_rebuild_job = dg.define_asset_job(
    "rights_rebuild_job", selection=dg.AssetSelection.assets(*SUBMISSION_REBUILD),
    description="Re-validate and re-pseudonymise one LA partition after a rights request.")
hospital_rebuild_job = dg.define_asset_job(
    "hospital_rebuild_job", selection=dg.AssetSelection.assets(PSEUDONYMISED_EPISODES),
    description="Re-pseudonymise one hospital quarter after a rights request.")
