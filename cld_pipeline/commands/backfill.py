"""`cld-pipeline backfill --quarter Q [--la L] [--failed-only]`: put a quarter right after a failure.

Creates a Dagster asset backfill in the instance under `$DAGSTER_HOME`, exactly as the UI's
"Launch backfill" does: the daemon (`make run`, or `dagster-daemon run` in production) executes it,
and its progress is on the UI's Backfills page. The selection is the per-submission chain
(raw, validated, pseudonymised) for the chosen LA partitions of the quarter, plus the quarter's
linked and benchmark tables downstream of them. With no `--la` and no `--failed-only`, every LA
that has sent a file for the quarter is rebuilt from the archived copy of its current submission.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import dagster as dg
from dagster._core.execution.backfill import PartitionBackfill   # the UI's own way to create a backfill
from dagster._core.storage.partition_status_cache import AssetPartitionStatus
from dagster._core.utils import make_new_backfill_id

from cld_pipeline.defs.partitions import QUARTER_GROUPS

SUBMISSION_CHAIN = [dg.AssetKey(k) for k in (["raw", "submissions"], ["raw", "events"], ["validated", "events"],
                                             ["validated", "rejections"], ["validated", "dq_flags"],
                                             ["pseudonymised", "events"])]


class BackfillRefused(RuntimeError):
    """Nothing to do, or the request names a quarter or LA that does not exist (plain words)."""


@dataclass
class QuarterStatus:
    quarter: str
    materialized: list[str]
    failed: list[str]
    in_progress: list[str]
    quarter_tables: dict[str, str] | None = None    # linked/benchmark asset -> status for the quarter

    @property
    def whole(self) -> bool:
        tables = self.quarter_tables or {}
        return not self.failed and not self.in_progress and all(v == "materialized" for v in tables.values())

    @property
    def received(self) -> list[str]:
        return sorted(set(self.materialized) | set(self.failed) | set(self.in_progress))


def quarter_status(instance: dg.DagsterInstance, quarter: str) -> QuarterStatus:
    """Per LA: the worst status across the submission chain (a partition is failed if any of its
    layers failed last time, in progress if any is running, materialised only if all are)."""
    from cld_pipeline.defs.partitions import la_partitions, submission_partition_key, submission_partitions

    if quarter not in instance.get_dynamic_partitions("quarter"):
        raise BackfillRefused(f"No file has been received for quarter {quarter}; known quarters: "
                              + (", ".join(sorted(instance.get_dynamic_partitions("quarter"))) or "none") + ".")
    keys = {str(submission_partition_key(la, quarter)): la for la in la_partitions.get_partition_keys()}
    per_asset = [instance.get_status_by_partition(asset, list(keys), submission_partitions) or {}
                 for asset in SUBMISSION_CHAIN]
    out = QuarterStatus(quarter, [], [], [])
    for key, la in keys.items():
        statuses = [s.get(key) for s in per_asset]
        if all(v is None for v in statuses):
            continue                                   # no file from this council for the quarter
        if AssetPartitionStatus.IN_PROGRESS in statuses:
            out.in_progress.append(la)
        elif all(v == AssetPartitionStatus.MATERIALIZED for v in statuses):
            out.materialized.append(la)
        else:                                          # a layer failed, or stopped short of the last one
            out.failed.append(la)
    from cld_pipeline.definitions import defs as load_defs
    from cld_pipeline.defs.partitions import quarter_partitions

    graph = load_defs().resolve_asset_graph()
    out.quarter_tables = {}
    for key in sorted(graph.get_all_asset_keys(), key=lambda k: k.to_user_string()):
        if graph.get(key).group_name in QUARTER_GROUPS:
            value = (instance.get_status_by_partition(key, [quarter], quarter_partitions) or {}).get(quarter)
            out.quarter_tables[key.to_user_string()] = value.value.lower() if value else "missing"
    return out


def launch_backfill(quarter: str, la: str | None = None, failed_only: bool = False,
                    instance: dg.DagsterInstance | None = None) -> tuple[str, list[str]]:
    """Create the backfill; returns its id and the LAs it covers."""
    from cld_pipeline.definitions import defs as load_defs
    from cld_pipeline.defs.partitions import submission_partition_key
    from cld_pipeline.commands.run import prepare_instance
    from cld_pipeline.reference import load_local_authorities

    instance = instance or prepare_instance()
    status = quarter_status(instance, quarter)
    if la is not None:
        council = load_local_authorities().get(la)
        if council is None:
            raise BackfillRefused(f"{la} is not one of the 153 councils' CLD or ONS codes.")
        las = [council.submission_code]
        if failed_only and las[0] not in status.failed:
            raise BackfillRefused(f"LA {las[0]} has no failed partition in {quarter}; nothing to backfill.")
    elif failed_only:
        las = status.failed
        if not las:
            raise BackfillRefused(f"No LA partition of {quarter} is failed; nothing to backfill.")
    else:
        las = status.received
        if not las:
            raise BackfillRefused(f"No LA partition of {quarter} has been processed yet; nothing to backfill.")
    asset_graph = load_defs().resolve_asset_graph()
    downstream = [k for k in asset_graph.get_all_asset_keys()
                  if asset_graph.get(k).group_name in QUARTER_GROUPS]
    backfill = PartitionBackfill.from_asset_partitions(
        backfill_id=make_new_backfill_id(), asset_graph=asset_graph,
        partition_names=[str(submission_partition_key(code, quarter)) for code in las],
        asset_selection=SUBMISSION_CHAIN + sorted(downstream, key=lambda k: k.to_user_string()),
        backfill_timestamp=time.time(),
        tags={"cld/quarter": quarter, "cld/backfill": "failed-only" if failed_only else "quarter",
              **({"cld/la": la} if la else {})},
        dynamic_partitions_store=instance, all_partitions=False,
        title=f"{quarter}: {'failed LA partitions' if failed_only else 'LA partitions'} ({len(las)})",
        description="Launched by cld-pipeline backfill", run_config=None)
    instance.add_backfill(backfill)
    return backfill.backfill_id, las


def daemon_is_running(instance: dg.DagsterInstance, within_seconds: float = 120) -> bool:
    beats = instance.get_daemon_heartbeats()
    beat = beats.get("BACKFILL")
    return bool(beat and time.time() - beat.timestamp < within_seconds)
