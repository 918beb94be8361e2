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


def _backfill(env: dict, *args: str) -> list:
    """Launch `cld-pipeline backfill --quarter 2026-Q3 [args]`, wait for the daemon to complete it
    successfully, and return its runs."""
    launched = _cli(env, "backfill", "--quarter", "2026-Q3", *args)
    assert launched.returncode == 0, launched.stderr
    backfill_id = launched.stdout.split()[1].rstrip(":")
    with environment(DAGSTER_HOME=env["DAGSTER_HOME"]):
        instance = dg.DagsterInstance.get()
        done = _wait(lambda: (b := instance.get_backfill(backfill_id)) and b.status.value.startswith("COMPLETED")
                     and b, 400, "the backfill to complete")
        assert done.status == BulkActionStatus.COMPLETED_SUCCESS
        runs = instance.get_runs(filters=dg.RunsFilter(tags={"dagster/backfill": backfill_id}))
        instance.dispose()
    return runs


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
        runs = _backfill(env, "--failed-only")
        assert _cli(env, "backfill", "--quarter", "2026-Q3", "--status").returncode == 0   # the quarter is whole
        assert runs and all(r.status == dg.DagsterRunStatus.SUCCESS for r in runs)
    finally:
        _stop(daemon)
    with duckdb.connect(str(data / "analytics.duckdb"), read_only=True) as con:
        assert con.execute("SELECT count(*) FROM pseudonymised.events WHERE la_code = '313'").fetchall()[0][0] > 1000
        assert con.execute("SELECT count(*) FROM benchmark.ascof WHERE quarter = '2026-Q3'").fetchall()[0][0] > 0


def test_a_quarter_backfill_through_the_daemon_is_one_run_for_its_councils(tmp_path):
    """Three neighbouring councils' quarter, backfilled with the command: the daemon runs the
    per-submission layers of all three in one run over a range of partitions (single-run backfill
    policy), and the quarter-level tables after it."""
    from cld_pipeline.defs.partitions import la_partitions

    las = tuple(la_partitions.get_partition_keys()[:3])
    data = tmp_path / "data"
    generate(GeneratorConfig(scale="tiny", quarters=1, seed=29, la_codes=las, hospital=False,
                             defects=DefectRates().scaled(0.0), resubmission_share=0.0), data, progress=False)
    env = {**os.environ, "CLD_DATA_DIR": str(data), "DAGSTER_HOME": str(data / "dagster_home"),
           "CLD_PSEUDO_KEY": secrets.token_hex(32), "CLD_ENVIRONMENT": "production"}
    assert _cli(env, "run", "--quiet").returncode == 0
    daemon = _daemon(env)
    try:
        runs = _backfill(env)
        per_submission = [r for r in runs if dg.AssetKey(["validated", "events"]) in (r.asset_selection or set())]
        assert len(per_submission) == 1, [r.tags for r in runs]
        tags = per_submission[0].tags
        assert (tags["dagster/asset_partition_range_start"], tags["dagster/asset_partition_range_end"]) == (
            f"{las[0]}|2026-Q3", f"{las[-1]}|2026-Q3")
        assert all(r.status == dg.DagsterRunStatus.SUCCESS for r in runs)
    finally:
        _stop(daemon)


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


# --- the production instance on a real PostgreSQL server -------------------------------------------

def _postgres_bin() -> Path:
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"))
    if not found:
        subprocess.run(["apt-get", "update", "-qq"], check=True, capture_output=True, timeout=600)
        subprocess.run(["apt-get", "install", "-y", "-qq", "postgresql"], check=True, capture_output=True, timeout=1200,
                       env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
        found = sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"))
    return found[-1].parent


def _as_postgres(*cmd: str) -> subprocess.CompletedProcess:
    return subprocess.run(["runuser", "-u", "postgres", "--", *cmd], check=True, capture_output=True, text=True,
                          timeout=120)


def test_production_profile_runs_concurrently_on_a_real_postgresql(tmp_path):
    import pwd
    import socket
    import tempfile

    pg = _postgres_bin()
    root = Path(tempfile.mkdtemp(prefix="cld-pg-", dir="/tmp"))     # the postgres user must reach it
    user = pwd.getpwnam("postgres")
    os.chmod(root, 0o755)
    os.chown(root, user.pw_uid, user.pw_gid)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    _as_postgres(str(pg / "initdb"), "-D", str(root / "db"), "-U", "dagster", "--auth=trust")
    _as_postgres(str(pg / "pg_ctl"), "-D", str(root / "db"), "-l", str(root / "log"), "-w", "start",
                 "-o", f"-p {port} -k {root} -c listen_addresses=127.0.0.1")
    daemon = None
    try:
        _as_postgres(str(pg / "createdb"), "-h", "127.0.0.1", "-p", port, "-U", "dagster", "dagster")
        data = tmp_path / "data"
        generate(GeneratorConfig(scale="tiny", quarters=1, seed=29, la_codes=("313", "206", "108"), hospital=False,
                                 defects=DefectRates().scaled(0.0), resubmission_share=0.0), data, progress=False)
        env = {**os.environ, "CLD_DATA_DIR": str(data), "DAGSTER_HOME": str(data / "dagster_home"),
               "CLD_DAGSTER_PROFILE": "production", "CLD_PSEUDO_KEY": secrets.token_hex(32),
               "CLD_ENVIRONMENT": "production", "CLD_SETTLE_SECONDS": "0", "DAGSTER_PG_HOST": "127.0.0.1",
               "DAGSTER_PG_PORT": port, "DAGSTER_PG_USERNAME": "dagster", "DAGSTER_PG_PASSWORD": "unused-trust-auth",
               "DAGSTER_PG_DB": "dagster"}
        status = _cli(env, "backfill", "--quarter", "2026-Q3", "--status")        # also installs the profile
        assert "No file has been received" in status.stderr
        assert "postgres" in (data / "dagster_home" / "dagster.yaml").read_text()
        daemon = _daemon(env)
        with environment(**{k: env[k] for k in env if k.startswith(("DAGSTER_", "CLD_"))}):
            instance = dg.DagsterInstance.get()
            assert type(instance.run_storage).__name__ == "PostgresRunStorage"

            def ingested():
                runs = instance.get_runs(filters=dg.RunsFilter(job_name="ingest_submission_job"))
                finished = [r for r in runs if r.status in (dg.DagsterRunStatus.SUCCESS, dg.DagsterRunStatus.FAILURE)]
                return runs if len(finished) == 3 else None

            runs = _wait(ingested, 300, "three ingestion runs")
            assert all(r.status == dg.DagsterRunStatus.SUCCESS for r in runs)
            spans = sorted((instance.get_run_record_by_id(r.run_id).start_time,
                            instance.get_run_record_by_id(r.run_id).end_time) for r in runs)
            assert any(later[0] < earlier[1] for earlier, later in zip(spans, spans[1:])), "runs overlapped"
    finally:
        if daemon:
            _stop(daemon)
        subprocess.run(["runuser", "-u", "postgres", "--", str(pg / "pg_ctl"), "-D", str(root / "db"), "-m", "fast",
                        "stop"], capture_output=True, timeout=120)
        subprocess.run(["rm", "-rf", str(root)], check=False)
    with duckdb.connect(str(data / "analytics.duckdb"), read_only=True) as con:
        assert con.execute("SELECT count(DISTINCT la_code) FROM pseudonymised.events").fetchall()[0][0] == 3
