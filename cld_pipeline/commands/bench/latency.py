"""`cld-pipeline bench --latency`: from a file landing to its pseudonymised partition, with the daemon.

A fresh data folder and Dagster instance; `dagster-daemon run` as in production (landing sensor every
5 s, a file taken once settled for 3 s, each run launched in its own process). The median-sized
council files of a bench scale arrive one at a time (written beside the folder, then renamed in, as
a transfer tool does); each latency is from the rename to the `pseudonymised/events`
materialisation of that council's partition. The system is left idle between arrivals (the
quarter-level tables the automation sensor rebuilds after each file finish first).
"""

from __future__ import annotations

import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

from cld_pipeline.environment import INSTANCE_PROFILES, PROJECT_ROOT as ROOT


def _wait(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if result := predicate():
            return result
        time.sleep(0.25)
    raise RuntimeError(f"timed out waiting for {what}")


def measure(source: Path, work: Path, arrivals: int = 3) -> dict:
    import dagster as dg

    from cld_pipeline.lib.ingest.submission_files import inspect_submission

    files = sorted((source / "landing").glob("*.csv"), key=lambda f: f.stat().st_size)
    middle = len(files) // 2
    chosen = files[middle - arrivals // 2: middle - arrivals // 2 + arrivals]
    shutil.rmtree(work, ignore_errors=True)
    (work / "landing").mkdir(parents=True)
    home = work / "dagster_home"
    home.mkdir()
    shutil.copyfile(INSTANCE_PROFILES["local"], home / "dagster.yaml")
    env = {**os.environ, "CLD_DATA_DIR": str(work), "DAGSTER_HOME": str(home), "CLD_ENVIRONMENT": "development"}
    env.pop("CLD_PSEUDO_KEY", None)
    daemon = subprocess.Popen([str(Path(sys.executable).parent / "dagster-daemon"), "run", "-w", "workspace.yaml"],
                              cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)
    os.environ["DAGSTER_HOME"] = str(home)
    instance = dg.DagsterInstance.get()
    results = []
    try:
        _wait(lambda: instance.get_daemon_heartbeats().get("SENSOR"), 120, "the daemon's sensors")
        for path in chosen:
            facts = inspect_submission(path)
            partition = f"{facts.la_code}|{facts.quarter}"
            staged = work / f".{path.name}.part"
            shutil.copyfile(path, staged)
            os.replace(staged, work / "landing" / path.name)
            arrived = time.time()

            def landed(partition=partition, arrived=arrived):
                records = instance.fetch_materializations(dg.AssetRecordsFilter(
                    asset_key=dg.AssetKey(["pseudonymised", "events"]), asset_partitions=[partition],
                    after_timestamp=arrived), limit=1).records
                return records[0].timestamp if records else None

            done = _wait(landed, 300, f"{path.name} to be pseudonymised")
            results.append({"file": path.name, "rows": sum(1 for _ in path.open(encoding="utf-8-sig")) - 1,
                            "bytes": path.stat().st_size, "seconds": round(done - arrived, 1)})
            print(f"latency: {path.name} pseudonymised {results[-1]['seconds']} s after it landed", flush=True)
            _wait(lambda: not instance.get_runs(filters=dg.RunsFilter(statuses=[
                dg.DagsterRunStatus.QUEUED, dg.DagsterRunStatus.NOT_STARTED, dg.DagsterRunStatus.STARTING,
                dg.DagsterRunStatus.STARTED])), 600, "the system to be idle")
            time.sleep(6)   # let the sensors' next ticks pass before the next arrival
    finally:
        os.killpg(daemon.pid, signal.SIGTERM)
        try:
            daemon.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(daemon.pid, signal.SIGKILL)
        instance.dispose()
    seconds = [r["seconds"] for r in results]
    return {"arrivals": results, "median_seconds": statistics.median(seconds), "target_seconds": 30,
            "settle_seconds": float(os.environ.get("CLD_SETTLE_SECONDS", "3")), "sensor_interval_seconds": 5}
