"""`make run` on an empty data folder: generates a quarter, then serves the Dagster UI with our assets."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from .conftest import ARTIFACTS, browse

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(url: str, body: dict | None = None, timeout: float = 5.0) -> tuple[int, bytes]:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return response.status, response.read()


@pytest.mark.slow
def test_make_run_serves_the_ui(tmp_path):
    port = free_port()
    env = {**os.environ, "CLD_DATA_DIR": str(tmp_path / "data"), "PORT": str(port)}
    env.pop("DAGSTER_HOME", None)
    log = (tmp_path / "make-run.log").open("wb")
    proc = subprocess.Popen(["make", "--no-print-directory", "run"], cwd=ROOT, env=env, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 240
        while True:
            assert proc.poll() is None, (tmp_path / "make-run.log").read_text()
            try:
                status, body = get(f"{base}/server_info")
                if status == 200:
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, "the UI did not come up in time"
            time.sleep(1)
        assert "dagster_webserver_version" in json.loads(body)
        status, page = get(base + "/")
        assert status == 200 and b"<html" in page.lower()
        query = {"query": "{ assetNodes { assetKey { path } } }"}
        for _ in range(60):  # the code location may still be loading
            status, body = get(f"{base}/graphql", query)
            nodes = json.loads(body).get("data", {}).get("assetNodes") or []
            if nodes:
                break
            time.sleep(1)
        assert {"/".join(n["assetKey"]["path"]) for n in nodes} >= {"reference/local_authorities"}
        landing = tmp_path / "data" / "landing"
        archive = tmp_path / "data" / "archive"
        arrived = len(list(landing.glob("*.csv"))) + (len(list(archive.iterdir())) if archive.exists() else 0)
        assert arrived >= 153, "make run generated a national quarter"
        assert (tmp_path / "data" / "dagster_home" / "dagster.yaml").exists()

        # What an operator sees, in a real browser: the five layers in the asset graph, and the
        # partition status of the quarter the sensor registered on its own.
        graph = browse(f"{base}/asset-groups", ARTIFACTS / "dagster-asset-graph.png")
        assert all(group in graph for group in ("raw", "validated", "pseudonymised", "linked", "benchmark"))
        deadline = time.monotonic() + 120
        while True:
            partitions = browse(f"{base}/assets/pseudonymised/events?view=partitions")
            if "2026-Q3" in partitions:
                break
            assert time.monotonic() < deadline, "the landing sensor did not register the quarter"
            time.sleep(5)
        browse(f"{base}/assets/pseudonymised/events?view=partitions", ARTIFACTS / "dagster-quarter-partitions.png")
        assert (ARTIFACTS / "dagster-asset-graph.png").stat().st_size > 20_000
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()
