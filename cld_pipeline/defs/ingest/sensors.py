"""`landing_sensor`: picks up each new file in `$CLD_DATA_DIR/landing` once and starts its run.

- A file is picked up when it is *settled*: not named like a partial download (`.tmp`, `.part`,
  hidden), and either last modified more than `CLD_SETTLE_SECONDS` ago or unchanged (size and
  modification time) since the previous tick.
- The cursor remembers which arrivals (name, size, modification time) were handled, and forgets a
  file once it has left the landing folder (landed files move to the archive, refused ones to
  quarantine), so it stays small and survives restarts. Run keys make a request idempotent.
- Work per tick is bounded (`CLD_SENSOR_MAX_FILES`, and a time budget well inside the 60 s tick
  limit): when hundreds of files arrive at once, the rest wait for the next tick.
- A file that can be partitioned starts `ingest_submission_job` for its quarter x LA with tags
  (LA, quarter, file, sha256); one that cannot starts `quarantine_job`, which fails with the reason.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import dagster as dg

from cld_pipeline import settings
from cld_pipeline.defs.ingest.jobs import ingest_submission_job
from cld_pipeline.defs.ingest.assets import quarantine_job
from cld_pipeline.defs.partitions import quarter_partitions, submission_partition_key
from cld_pipeline.lib.ingest.submission_files import (
    SubmissionRefused,
    check_name,
    inspect_submission,
    is_partial_name,
    received_time,
    unreadable,
)

TIME_BUDGET_SECONDS = 30.0


def settle_seconds() -> float:
    return float(os.environ.get("CLD_SETTLE_SECONDS", "3"))


def max_files_per_tick() -> int:
    return int(os.environ.get("CLD_SENSOR_MAX_FILES", "40"))


def _fingerprint(stat: os.stat_result) -> str:
    return f"{stat.st_size}:{stat.st_mtime_ns}"


def _arrivals(landing: Path) -> list[tuple[str, os.stat_result]]:
    """Candidate files in arrival order (modification time, then name)."""
    found = []
    if landing.is_dir():
        for entry in os.scandir(landing):
            if entry.name.lower().endswith(".csv") and not is_partial_name(entry.name) and not entry.is_dir():
                found.append((entry.name, entry.stat(follow_symlinks=False)))
    return sorted(found, key=lambda item: (item[1].st_mtime_ns, item[0]))


@dataclass
class Arrivals:
    """A folder's files against the cursor: `ready` are settled and not handled yet (arrival order);
    the caller marks in `handled` those it took, and `cursor()` carries the rest to the next tick."""

    ready: list[tuple[str, os.stat_result, str]]
    handled: dict[str, str]
    waiting: dict[str, str]

    def cursor(self) -> str:
        return json.dumps({"handled": self.handled, "pending": self.waiting}, sort_keys=True)


def scan_arrivals(folder: Path, cursor: str | None, now: float, settle: float) -> Arrivals:
    state = json.loads(cursor) if cursor else {}
    pending: dict[str, str] = state.get("pending", {})
    present = _arrivals(folder)
    names = {name for name, _ in present}
    handled = {n: fp for n, fp in state.get("handled", {}).items() if n in names}   # left the folder: forget
    ready, waiting = [], {}
    for name, stat in present:
        fp = _fingerprint(stat)
        if handled.get(name) == fp:
            continue
        # settle <= 0 (cld-pipeline run): every file present is complete, whatever its time stamp says.
        if settle <= 0 or now - stat.st_mtime >= settle or pending.get(name) == fp:
            ready.append((name, stat, fp))
        else:
            waiting[name] = fp
    return Arrivals(ready, handled, waiting)


def plan_landing(cursor: str | None, now: float | None = None, max_files: int | None = None,
                 settle: float | None = None, known_quarters: set[str] | None = None):
    """The sensor's decision, as plain data: (run requests, new quarters, new cursor, skip message)."""
    now = time.time() if now is None else now
    settle = settle_seconds() if settle is None else settle
    max_files = max_files_per_tick() if max_files is None else max_files
    landing = settings.landing_dir()
    arrivals = scan_arrivals(landing, cursor, now, settle)
    requests: list[dg.RunRequest] = []
    new_quarters: set[str] = set()
    started = time.monotonic()
    deferred = 0
    for name, stat, fp in arrivals.ready:
        if len(requests) >= max_files or time.monotonic() - started > TIME_BUDGET_SECONDS:
            deferred += 1
            continue
        received_at = received_time(stat.st_mtime, now)
        tags = {"cld/file": name[:200]}
        try:
            path = check_name(landing, name)
            facts = inspect_submission(path, received=received_at.date())
        except (SubmissionRefused, OSError) as problem:   # one bad file never stops the tick
            refusal = problem if isinstance(problem, SubmissionRefused) else unreadable(problem)
            requests.append(dg.RunRequest(
                job_name=quarantine_job.name, run_key=f"quarantine:{name}:{fp}",
                tags={**tags, "cld/refused": refusal.reason},
                run_config={"ops": {"quarantine_file": {"config": {
                    "file_name": name, "reason": refusal.reason, "message": refusal.message,
                    "received_at": received_at.isoformat()}}}}))
        else:
            if known_quarters is None or facts.quarter not in known_quarters:
                new_quarters.add(facts.quarter)
            requests.append(dg.RunRequest(
                job_name=ingest_submission_job.name, run_key=f"{name}:{facts.sha256}:{fp}",
                partition_key=submission_partition_key(facts.la_code, facts.quarter),
                tags={**tags, "cld/la": facts.la_code, "cld/quarter": facts.quarter, "cld/sha256": facts.sha256},
                run_config={"ops": {"raw_submission": {"config": {
                    "file_name": name, "sha256": facts.sha256, "received_at": received_at.isoformat()}}}}))
        arrivals.handled[name] = fp
    new_cursor = arrivals.cursor()
    skip = None
    if not requests:
        skip = (f"{len(arrivals.waiting)} file(s) still being written" if arrivals.waiting
                else "No new files in the landing folder")
    elif deferred:
        skip = f"{deferred} more file(s) left for the next tick"
    return requests, new_quarters, new_cursor, skip


@dg.sensor(
    name="landing_sensor",
    jobs=[ingest_submission_job, quarantine_job],
    minimum_interval_seconds=5,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Starts one run per new file in the landing folder (quarter x LA partition from the file's "
                "content), or a quarantine run for a file that cannot be processed.",
)
def landing_sensor(context: dg.SensorEvaluationContext) -> dg.SensorResult:
    known = set(context.instance.get_dynamic_partitions(quarter_partitions.name))
    requests, new_quarters, cursor, skip = plan_landing(context.cursor, known_quarters=known)
    if skip and requests:
        context.log.info(skip)
    return dg.SensorResult(
        run_requests=requests,
        dynamic_partitions_requests=[quarter_partitions.build_add_request(sorted(new_quarters))] if new_quarters else [],
        cursor=cursor,
        skip_reason=skip if not requests else None,
    )
