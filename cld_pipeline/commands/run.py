"""`cld-pipeline run`: process the landing folder headlessly through the sensor's own asset graph.

The hospital and landing sensors' decision functions plan the runs (files present are taken as
complete, with no wait for settling and no per-tick cap), quarters are registered as dynamic
partitions, and each run executes in this process against the Dagster instance under
`$DAGSTER_HOME`, so the UI shows the same runs, partitions and metadata as if the daemon had started
them. Afterwards the quarters that changed get their linked and benchmark tables rebuilt, as the
automation sensor would under the daemon.

Recovery comes from the ledgers, not from the landing folder: before and after the landing folder
is processed, every accepted submission whose chain (raw -> validated -> pseudonymised) is not whole
is finished from its archived copy, whatever stopped it (a kill, a full disk, a crash), and runs that
an earlier killed `run` left "started" are marked failed. The command exits non-zero, naming them,
while any chain is still incomplete. Two `run`s at once queue on a lock file, one after the other.
"""

from __future__ import annotations

import fcntl
import json
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

import dagster as dg

from cld_pipeline import environment, settings
from cld_pipeline.defs.operations.audit import sync_dagster


HEADLESS_TAG = "cld/headless"


def prepare_instance() -> dg.DagsterInstance:
    """The Dagster instance of this environment (environment.prepare_dagster_home)."""
    environment.prepare_dagster_home()
    return dg.DagsterInstance.get()


def headless_tags() -> dict[str, str]:
    """Who and why, for the audit log."""
    from cld_pipeline.lib.privacy.audit import current_actor

    return {"cld/actor": current_actor(), "cld/purpose": "cld-pipeline run (headless processing of the landing folder)",
            HEADLESS_TAG: "true"}


@dataclass
class RunSummary:
    accepted: list[dict] = field(default_factory=list)
    duplicates: list[dict] = field(default_factory=list)
    quarantined: list[dict] = field(default_factory=list)
    failed: list[dict] = field(default_factory=list)
    linked: list[dict] = field(default_factory=list)
    recovered: list[str] = field(default_factory=list)     # partitions finished from the ledger
    deferred: list[str] = field(default_factory=list)      # files left in landing/ behind a failure
    incomplete: list[str] = field(default_factory=list)    # chains still not whole at the end

    @property
    def ok(self) -> bool:
        return not self.failed and not self.incomplete and not self.deferred

    def as_dict(self) -> dict:
        return {"accepted": len(self.accepted), "duplicates": len(self.duplicates),
                "quarantined": len(self.quarantined), "failed": len(self.failed),
                "quarter_builds": [f"{e['layer']} {e['quarter']}" for e in self.linked],
                "recovered": self.recovered, "incomplete": self.incomplete, "deferred": self.deferred,
                "files": self.accepted + self.duplicates + self.quarantined + self.failed}


def process_landing(instance: dg.DagsterInstance | None = None, log=print) -> RunSummary:
    from cld_pipeline.definitions import defs as load_defs

    with run_lock(log):   # before the instance: two processes must not create its storage at once
        instance = instance or prepare_instance()
        defs = load_defs()
        summary = RunSummary()
        _fail_abandoned_runs(instance, log)
        _recover(defs, instance, summary, log)
        _process_arrivals(defs, instance, summary, log)
        _recover(defs, instance, summary, log)
        _rebuild_quarters(defs, instance, summary, log)
        summary.incomplete = [str(g) for g in chain_gaps()]
        for gap in summary.incomplete:
            log(f"INCOMPLETE {gap}")
        sync_audit(instance)
        return summary


@contextmanager
def run_lock(log):
    """One `cld-pipeline run` at a time per data folder: a second waits for the first (the kernel
    releases the lock when a process dies, so a killed run never blocks the next)."""
    path = settings.data_dir() / ".cld-pipeline-run.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log("waiting   another cld-pipeline run is processing this data folder; this one starts when it ends")
            fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _fail_abandoned_runs(instance: dg.DagsterInstance, log) -> None:
    """Runs that a killed `cld-pipeline run` left started: with the run lock held, no process of
    ours is executing them, so they are marked failed (the UI then shows the truth, and the
    partitions are no longer "in progress")."""
    started = instance.get_runs(filters=dg.RunsFilter(
        statuses=[dg.DagsterRunStatus.STARTED, dg.DagsterRunStatus.STARTING, dg.DagsterRunStatus.NOT_STARTED],
        tags={HEADLESS_TAG: "true"}))
    for run in started:
        instance.report_run_failed(run, "The cld-pipeline run process that executed this run ended before it "
                                        "finished (killed or crashed); its work is finished from the ledger.")
        log(f"abandoned run {run.run_id[:8]} ({run.job_name}) marked failed")


def _ledgers() -> tuple[list, list]:
    """(current accepted submissions with their validated verdict, chain gaps), from both zones' ledgers."""
    from cld_pipeline.defs.resources import LockedDuckDBResource
    from cld_pipeline.lib.ingest import chain

    with LockedDuckDBResource(database=str(settings.identifiable_db_path())).get_connection() as con:
        state = chain.processor_state(con)
    if not state:
        return [], []
    with LockedDuckDBResource(database=str(settings.analytics_db_path())).get_connection() as con:
        done = chain.pseudonymised_submissions(con)
    return state, chain.gaps(state, done)


def chain_gaps() -> list:
    """Accepted submissions whose chain is not whole."""
    return _ledgers()[1]


def _stale_in_dagster(instance: dg.DagsterInstance) -> set[tuple[str, str]]:
    """(LA, quarter) partitions whose latest raw materialisation is newer than their later layers':
    the data may be whole, but a run stopped before Dagster recorded it."""
    from cld_pipeline.defs.operations.recovery import stopped_short
    from cld_pipeline.defs.partitions import submission_partitions

    out = set()
    for key in stopped_short(instance):
        parts = submission_partitions.get_partition_key_from_str(key).keys_by_dimension
        out.add((parts["la"], parts["quarter"]))
    return out


def _recover(defs, instance: dg.DagsterInstance, summary: RunSummary, log) -> None:
    """Finish every accepted submission whose chain is incomplete, from its archived copy."""
    state, gaps = _ledgers()
    # A partition that failed earlier in this run is not tried again until the next run.
    tried = {(e.get("la"), e.get("quarter")) for e in summary.failed}
    gaps = [g for g in gaps if (g.la_code, g.quarter) not in tried]
    todo = {(g.la_code, g.quarter) for g in gaps}
    # An unusable submission (most rows rejected) ends at the validated layer by design.
    current = {(g.la_code, g.quarter) for g in gaps} | {(la, q) for la, q, _, usable in state if usable}
    todo |= (_stale_in_dagster(instance) & current) - tried
    if not todo:
        return
    for gap in gaps:
        log(f"recover   {gap}")
    entries = [{"file": f"{quarter} x {la} (recovered)", "la": la, "quarter": quarter, "recovered": True}
               for la, quarter in sorted(todo, key=lambda p: (p[1], p[0]))]
    summary.accepted.extend(entries)
    _process_batches(defs, instance, entries, summary, log)
    summary.recovered.extend(f"{e['quarter']} x {e['la']}" for e in entries if e in summary.accepted)


def _process_arrivals(defs, instance: dg.DagsterInstance, summary: RunSummary, log) -> None:
    from cld_pipeline.defs.health.sensors import plan_hospital
    from cld_pipeline.defs.ingest.sensors import plan_landing
    from cld_pipeline.defs.partitions import hospital_quarter_partitions, quarter_partitions, submission_partition_key

    cursors: dict[str, str | None] = {"cld": None, "hospital": None}
    while True:
        # Hospital extracts first, so that linkage runs after social care finds them loaded.
        known = set(instance.get_dynamic_partitions(hospital_quarter_partitions.name))
        requests, new_quarters, cursors["hospital"], _ = plan_hospital(cursors["hospital"], settle=0,
                                                                       known_quarters=known)
        if new_quarters:
            instance.add_dynamic_partitions(hospital_quarter_partitions.name, sorted(new_quarters))
        known = set(instance.get_dynamic_partitions(quarter_partitions.name))
        cld_requests, new_quarters, cursors["cld"], _ = plan_landing(cursors["cld"], settle=0, max_files=10_000,
                                                                     known_quarters=known)
        requests += cld_requests
        if not requests:
            return
        if new_quarters:
            instance.add_dynamic_partitions(quarter_partitions.name, sorted(new_quarters))
        # Two or more files of social care in one pass: land each in its own raw run, then validate
        # and pseudonymise the councils of a quarter together in one set-based run (as a quarter's
        # backfill does). A council with several files in the pass has them taken in arrival order,
        # one per wave, so each is validated while it is current, as under the sensor. A single
        # file keeps its own end-to-end run.
        ingest = [r for r in requests if r.job_name == "ingest_submission_job"]
        if len(ingest) < 2:
            for request in requests:
                _execute(defs, instance, request, summary, log, raw_only=False)
            continue
        for request in requests:
            if request.job_name != "ingest_submission_job":
                _execute(defs, instance, request, summary, log, raw_only=False)
        waves: list[list[dg.RunRequest]] = []
        seen: dict[str, int] = {}
        for request in ingest:
            wave = seen[request.partition_key] = seen.get(request.partition_key, -1) + 1
            if wave == len(waves):
                waves.append([])
            waves[wave].append(request)
        blocked: set[str] = set()
        for wave in waves:
            # A council's later file waits (in landing/) while its earlier one's chain is broken, so
            # that the next run finishes the earlier one first and superseded rows reach the history
            # exactly as in a run without the fault.
            for request in [r for r in wave if str(r.partition_key) in blocked]:
                summary.deferred.append(request.tags["cld/file"])
                log(f"deferred  {request.tags['cld/file']}: waits until this council's earlier file is processed")
            wave = [r for r in wave if str(r.partition_key) not in blocked]
            failed_before = len(summary.failed)
            landed = [e for e in (_execute(defs, instance, r, summary, log, raw_only=True) for r in wave)
                      if e is not None]
            _process_batches(defs, instance, landed, summary, log)
            blocked |= {str(submission_partition_key(e["la"], e["quarter"])) for e in summary.failed[failed_before:]
                        if e.get("la") and e.get("quarter")}
            blocked |= {str(r.partition_key) for r in wave
                        if r.tags["cld/file"] in {e["file"] for e in summary.failed[failed_before:]}}


def _execute(defs, instance: dg.DagsterInstance, request: dg.RunRequest, summary: RunSummary, log,
             raw_only: bool) -> dict | None:
    """Run one planned request in this process; returns the summary entry of a landed file."""
    job = defs.resolve_job_def(request.job_name)
    started = time.perf_counter()
    result = job.execute_in_process(
        run_config=request.run_config, instance=instance, partition_key=request.partition_key,
        tags={**request.tags, **headless_tags()}, raise_on_error=False,
        asset_selection=RAW_ASSETS if raw_only else None)
    file_name = request.tags["cld/file"]
    entry = {"file": file_name, "run_id": result.run_id, "seconds": round(time.perf_counter() - started, 2),
             "la": request.tags.get("cld/la"), "quarter": request.tags.get("cld/quarter")}
    if request.job_name in ("quarantine_job", "quarantine_hospital_job"):
        entry["reason"] = request.tags.get("cld/refused")
        summary.quarantined.append(entry)
        log(f"refused   {file_name}: {entry['reason']} (see quarantine/{file_name}.error.json)")
    elif not result.success:
        failure = _failure_message(result)
        entry["error"] = failure
        if "refused and moved to quarantine" in failure:
            summary.quarantined.append(entry)
            log(f"refused   {file_name}: {failure}")
        else:
            summary.failed.append(entry)
            log(f"FAILED    {file_name}: {failure}")
    elif not result.get_asset_materialization_events():
        summary.duplicates.append(entry)
        log(f"duplicate {file_name}")
    else:
        summary.accepted.append(entry)
        where = f"{entry['quarter']} x {entry['la']}" if entry["la"] else f"hospital {entry['quarter']}"
        log(f"{'raw' if raw_only else 'landed':<9} {file_name} -> {where} in {entry['seconds']} s")
        return entry
    return None


RAW_ASSETS = [dg.AssetKey(["raw", "submissions"]), dg.AssetKey(["raw", "events"])]
BATCH_ASSETS = [dg.AssetKey(["validated", "events"]), dg.AssetKey(["validated", "rejections"]),
                dg.AssetKey(["validated", "dq_flags"]), dg.AssetKey(["pseudonymised", "events"])]
# Dagster's run tags for a run over a range of partitions (what a single-run backfill sets).
RANGE_START, RANGE_END = "dagster/asset_partition_range_start", "dagster/asset_partition_range_end"


def la_blocks(la_codes: set[str]) -> list[list[str]]:
    """The councils as runs of neighbours in the partition order: a range of a multi-partitioned
    asset covers every LA between its ends, so each block is one run with no LA that did not submit."""
    from cld_pipeline.defs.partitions import la_partitions

    order = la_partitions.get_partition_keys()
    blocks: list[list[str]] = []
    previous = None
    for i, la in enumerate(order):
        if la in la_codes:
            if previous is not None and previous == i - 1:
                blocks[-1].append(la)
            else:
                blocks.append([la])
            previous = i
    return blocks


def _process_batches(defs, instance: dg.DagsterInstance, landed: list[dict], summary: RunSummary, log) -> None:
    """Validate and pseudonymise the landed partitions, one run per quarter and block of councils."""
    from cld_pipeline.defs.partitions import submission_partition_key

    job = defs.resolve_job_def("ingest_submission_job")
    for quarter in sorted({e["quarter"] for e in landed}):
        entries = [e for e in landed if e["quarter"] == quarter]
        for block in la_blocks({e["la"] for e in entries}):
            started = time.perf_counter()
            tags = {RANGE_START: str(submission_partition_key(block[0], quarter)),
                    RANGE_END: str(submission_partition_key(block[-1], quarter)),
                    "cld/quarter": quarter, "cld/las": str(len(block)), **headless_tags()}
            result = job.execute_in_process(instance=instance, asset_selection=BATCH_ASSETS, tags=tags,
                                            raise_on_error=False)
            seconds = round(time.perf_counter() - started, 2)
            in_block = [e for e in entries if e["la"] in set(block)]
            for e in in_block:
                e["batch_run_id"] = result.run_id
            if result.success:
                log(f"batch     {quarter}: {len(block)} council(s) {block[0]}..{block[-1]} validated and "
                    f"pseudonymised in {seconds} s")
            elif len(block) > 1 and not _machine_fault(result):
                # One council's failure must not fail its neighbours: each is run on its own.
                log(f"batch     {quarter} {block[0]}..{block[-1]} failed: running its {len(block)} councils one by one")
                for e in in_block:
                    _process_batches(defs, instance, [e], summary, log)
            else:
                error = _failure_message(result)
                where = block[0] if len(block) == 1 else f"{block[0]}..{block[-1]} ({len(block)} councils)"
                log(f"FAILED    {quarter} x {where}: {error}")
                for e in in_block:
                    summary.accepted.remove(e)
                    summary.failed.append({**e, "error": error})


def _rebuild_quarters(defs, instance: dg.DagsterInstance, summary: RunSummary, log) -> None:
    """Rebuild the quarter-level layers of every quarter that changed (all of them when a hospital
    extract arrived): what the automation sensor does under the daemon. Linked tables need hospital
    data; the benchmark follows them."""
    from cld_pipeline.defs.partitions import hospital_quarter_partitions, quarter_partitions

    landed = summary.accepted
    hospital_held = bool(instance.get_dynamic_partitions(hospital_quarter_partitions.name))
    hospital_changed = any(not e.get("la") for e in landed)
    quarters = (set(instance.get_dynamic_partitions(quarter_partitions.name)) if hospital_changed
                else {e["quarter"] for e in landed})
    quarters |= stale_quarters(instance, hospital_held)   # a run stopped before or while building them
    # A quarter with a council's chain still incomplete waits: its tables would only be rebuilt again.
    waiting = {g.quarter for g in chain_gaps()}
    for quarter in sorted(quarters & waiting):
        log(f"waiting   {quarter}: linked and benchmark tables wait until every council's submission is processed")
    quarters -= waiting
    jobs = ["benchmark_quarter_job"]
    if hospital_held:
        jobs.insert(0, "linked_quarter_job")
    for quarter in sorted(quarters):
        for name in jobs:
            _run_quarter_job(defs.resolve_job_def(name), instance, quarter, summary, log)


def stale_quarters(instance: dg.DagsterInstance, hospital_held: bool) -> set[str]:
    """Quarters whose linked or benchmark tables were last built before their newest pseudonymised
    partition (or hospital extract): a run stopped before it rebuilt them, or while it did."""
    from cld_pipeline.defs.partitions import submission_partitions

    def latest(key: dg.AssetKey) -> dict[str, int]:
        return instance.event_log_storage.get_latest_storage_id_by_partition(
            key, dg.DagsterEventType.ASSET_MATERIALIZATION)

    newest: dict[str, int] = {}
    for key, storage_id in latest(BATCH_ASSETS[3]).items():
        quarter = submission_partitions.get_partition_key_from_str(key).keys_by_dimension["quarter"]
        newest[quarter] = max(newest.get(quarter, -1), storage_id)
    hospital = max(latest(dg.AssetKey(["pseudonymised", "hospital_episodes"])).values(), default=-1)
    linked = latest(dg.AssetKey(["linked", "match_rates"]))
    built = latest(dg.AssetKey(["benchmark", "la_dashboards"]))
    stale = set()
    for quarter, storage_id in newest.items():
        linked_at = linked.get(quarter, -1)
        if hospital_held and linked_at < max(storage_id, hospital):
            stale.add(quarter)
        if built.get(quarter, -1) < max(storage_id, linked_at if hospital_held else -1):
            stale.add(quarter)
    return stale


def _run_quarter_job(job, instance: dg.DagsterInstance, quarter: str, summary: RunSummary, log) -> None:
    layer = job.name.removesuffix("_quarter_job")
    started = time.perf_counter()
    result = job.execute_in_process(instance=instance, partition_key=quarter, raise_on_error=False,
                                    tags={"cld/quarter": quarter, **headless_tags()})
    entry = {"file": f"{layer} {quarter}", "run_id": result.run_id, "quarter": quarter, "layer": layer,
             "seconds": round(time.perf_counter() - started, 2)}
    if result.success:
        summary.linked.append(entry)
        log(f"{layer:<9} {quarter} in {entry['seconds']} s")
    else:
        entry["error"] = _failure_message(result)
        summary.failed.append(entry)
        log(f"FAILED    {layer} {quarter}: {entry['error']}")


def sync_audit(instance: dg.DagsterInstance | None = None) -> None:
    """Copy the finished runs into the audit log (the audit sensor does this under the daemon)."""
    from cld_pipeline.defs.resources import LockedDuckDBResource

    with LockedDuckDBResource(database=str(settings.identifiable_db_path())).get_connection() as con:
        sync_dagster(instance or prepare_instance(), con)


def _machine_fault(result) -> bool:
    """The run failed for the machine (a full disk, memory), not for a council's data: splitting its
    councils into runs of their own would only fail each of them again."""
    from cld_pipeline.defs.errors import ENVIRONMENT_FAULT

    for event in result.all_events:
        data = event.step_failure_data if event.is_step_failure else None
        if data and data.user_failure_data:
            fault = data.user_failure_data.metadata.get("fault")
            if fault is not None and getattr(fault, "value", fault) == ENVIRONMENT_FAULT:
                return True
    return False


def _failure_message(result) -> str:
    for event in result.all_events:
        if event.is_step_failure and event.step_failure_data and event.step_failure_data.error:
            error = event.step_failure_data.error
            user = error.cause or error
            return (event.step_failure_data.user_failure_data.description
                    if event.step_failure_data.user_failure_data and event.step_failure_data.user_failure_data.description
                    else user.message.strip().splitlines()[0])
    return "run failed"


def main() -> int:
    summary = process_landing()
    print(json.dumps(summary.as_dict(), indent=2))
    return 0 if summary.ok else 1


if __name__ == "__main__":
    sys.exit(main())
