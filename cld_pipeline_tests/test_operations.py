"""Operations: a failed partition raises an alert, the cause is fixed, `cld-pipeline backfill
--failed-only` launches a backfill that a real Dagster daemon executes, and the quarter ends whole."""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

import dagster as dg
import duckdb
from dagster._core.execution.backfill import BulkActionStatus

from cld_pipeline.defs.operations.alerts import build_alert, post_webhook
from cld_pipeline.synthetic import DefectRates, GeneratorConfig, generate

from .conftest import environment

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _daemon(env: dict) -> subprocess.Popen:
    return subprocess.Popen([str(BIN / "dagster-daemon"), "run", "-w", "workspace.yaml"], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)


def _stop(process: subprocess.Popen) -> None:
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)


def _wait(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = predicate()
        if result:
            return result
        time.sleep(2)
    raise AssertionError(f"timed out waiting for {what}")


def _cli(env: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "cld-pipeline"), *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)


def test_failure_alert_then_failed_only_backfill_through_the_daemon_completes_the_quarter(tmp_path):
    data = tmp_path / "data"
    generate(GeneratorConfig(scale="tiny", quarters=1, seed=23, la_codes=("313",), hospital=False,
                             defects=DefectRates().scaled(0.0), resubmission_share=0.0), data, progress=False)
    env = {k: v for k, v in os.environ.items() if k != "CLD_PSEUDO_KEY"}
    env.update(CLD_DATA_DIR=str(data), DAGSTER_HOME=str(data / "dagster_home"), CLD_ENVIRONMENT="production",
               CLD_SETTLE_SECONDS="0")
    (data / "dagster_home").mkdir()
    (data / "dagster_home" / "dagster.yaml").write_text((ROOT / "dagster.yaml").read_text())

    # 1. Production without the secret key: the submission lands and validates, pseudonymisation fails.
    daemon = _daemon(env)
    try:
        alert_file = _wait(lambda: sorted((data / "alerts").glob("*.json")) if (data / "alerts").exists() else None,
                           240, "the failure alert")[0]
    finally:
        _stop(daemon)
    alert = json.loads(alert_file.read_text())
    assert (alert["quarter"], alert["la"]) == ("2026-Q3", "313")
    assert alert["step"] == "pseudonymised__events" and "CLD_PSEUDO_KEY" in alert["error"]
    assert "--failed-only" in alert["what_to_do"]
    status = _cli(env, "backfill", "--quarter", "2026-Q3", "--status")
    assert status.returncode == 1 and json.loads(status.stdout)["failed"] == ["313"]

    # 2. The cause is fixed (the key is set), the daemon restarted, and the failed partition backfilled.
    env["CLD_PSEUDO_KEY"] = secrets.token_hex(32)
    daemon = _daemon(env)
    try:
        launched = _cli(env, "backfill", "--quarter", "2026-Q3", "--failed-only")
        assert launched.returncode == 0, launched.stderr
        backfill_id = launched.stdout.split()[1].rstrip(":")
        _wait(lambda: _cli(env, "backfill", "--quarter", "2026-Q3", "--status").returncode == 0, 300,
              "the quarter to be whole")
        with environment(DAGSTER_HOME=env["DAGSTER_HOME"]):
            instance = dg.DagsterInstance.get()
            done = _wait(lambda: (b := instance.get_backfill(backfill_id)) and b.status.value.startswith("COMPLETED")
                         and b, 300, "the backfill to complete")
            assert done.status == BulkActionStatus.COMPLETED_SUCCESS
            runs = instance.get_runs(filters=dg.RunsFilter(tags={"dagster/backfill": backfill_id}))
            assert runs and all(r.status == dg.DagsterRunStatus.SUCCESS for r in runs)
    finally:
        _stop(daemon)
    with duckdb.connect(str(data / "analytics.duckdb"), read_only=True) as con:
        assert con.execute("SELECT count(*) FROM pseudonymised.events WHERE la_code = '313'").fetchall()[0][0] > 1000
        assert con.execute("SELECT count(*) FROM benchmark.ascof WHERE quarter = '2026-Q3'").fetchall()[0][0] > 0


def test_alerts_name_the_partition_and_reach_a_webhook(tmp_path):
    import http.server
    import threading

    received = []

    class Hook(http.server.BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802
            received.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Hook)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    run = dg.DagsterRun(job_name="ingest_submission_job", run_id="abc12345-0000",
                        tags={"dagster/partition/la": "313", "dagster/partition/quarter": "2026-Q3", "cld/file": "x.csv"})
    alert = build_alert(run, [("validated_submission", "Validation failed\nTraceback ...")], "run failed")
    assert (alert["la"], alert["quarter"], alert["step"], alert["error"]) == ("313", "2026-Q3", "validated_submission",
                                                                              "Validation failed")
    post_webhook(alert, f"http://127.0.0.1:{server.server_port}/hook")
    server.shutdown()
    assert received and "313" in received[0]["text"] and received[0]["quarter"] == "2026-Q3"
