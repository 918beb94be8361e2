"""Ingestion: the landing sensor, raw submissions and events, quarantine, concurrency and faults."""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import dagster as dg
import duckdb
import pytest

from cld_pipeline.defs.ingest.sensors import landing_sensor
from cld_pipeline.defs.partitions import submission_partition_key
from cld_pipeline.commands.run import prepare_instance, process_landing
from cld_pipeline.synthetic import DefectRates, GeneratorConfig, generate

from .conftest import environment, read_submission
from .test_submission_files import record, write

OLD = time.time() - 3600  # an arrival that has long settled


@pytest.fixture
def data_dir(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("CLD_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "dagster_home"))
    (tmp_path / "landing").mkdir()
    return tmp_path


def landed(path: Path, mtime: float = OLD) -> Path:
    os.utime(path, (mtime, mtime))
    return path


def submission(landing: Path, name: str, la: str = "714", end: str = "2026-09-30", rows: int = 3,
               mtime: float = OLD, **values) -> Path:
    start = (dt.date.fromisoformat(end) + dt.timedelta(days=1)).replace(year=int(end[:4]) - 1).isoformat()
    recs = [record(LA_Code=la, Reporting_Period_End_Date=end, Reporting_Period_Start_Date=start,
                   LA_Person_Unique_Identifier=f"P{i}", **values) for i in range(rows)]
    return landed(write(landing / name, recs), mtime)


def tick(instance, cursor=None):
    result = landing_sensor(dg.build_sensor_context(instance=instance, cursor=cursor))
    return result, result.cursor


def identifiable(data_dir: Path) -> duckdb.DuckDBPyConnection:
    return duckdb.connect(str(data_dir / "identifiable.duckdb"), read_only=True)


# --- the sensor ----------------------------------------------------------------------------------------


def test_sensor_requests_one_run_per_new_file_with_tags(data_dir):
    path = submission(data_dir / "landing", "a.csv")
    with dg.instance_for_test() as instance:
        result, cursor = tick(instance)
        [request] = result.run_requests
        assert request.job_name == "ingest_submission_job"
        assert request.partition_key == submission_partition_key("714", "2026-Q3")
        assert request.tags["cld/la"] == "714" and request.tags["cld/quarter"] == "2026-Q3"
        assert request.tags["cld/file"] == "a.csv" and len(request.tags["cld/sha256"]) == 64
        assert request.run_config["ops"]["raw_submission"]["config"]["file_name"] == "a.csv"
        assert [r.partition_keys for r in result.dynamic_partitions_requests] == [["2026-Q3"]]
        # The same file on the next tick, or after a restart with the stored cursor: nothing new.
        again, cursor2 = tick(instance, cursor)
        assert not again.run_requests and "No new files" in again.skip_reason.skip_message
        with dg.instance_for_test() as restarted:
            assert not tick(restarted, cursor2)[0].run_requests
        # The same name with new content is a new arrival.
        landed(path, OLD + 60)
        assert len(tick(instance, cursor)[0].run_requests) == 1


def test_two_files_at_once_are_two_runs(data_dir):
    submission(data_dir / "landing", "a.csv", la="714")
    submission(data_dir / "landing", "b.csv", la="906", end="2026-06-30")
    with dg.instance_for_test() as instance:
        result, _ = tick(instance)
        assert sorted(str(r.partition_key) for r in result.run_requests) == ["714|2026-Q3", "906|2026-Q2"]
        assert sorted(result.dynamic_partitions_requests[0].partition_keys) == ["2026-Q2", "2026-Q3"]


def test_a_file_still_being_written_waits_until_it_settles(data_dir):
    path = submission(data_dir / "landing", "growing.csv", mtime=time.time())
    (data_dir / "landing" / "upload.csv.part").write_text("partial")
    (data_dir / "landing" / ".growing.csv.Xy12Zq").write_text("partial")   # rsync's temporary name
    with dg.instance_for_test() as instance:
        first, cursor = tick(instance)
        assert not first.run_requests and "still being written" in first.skip_reason.skip_message
        with path.open("a") as fh:                       # it grew: still not settled
            fh.write(",".join(record().values()) + "\n")
        second, cursor = tick(instance, cursor)
        assert not second.run_requests
        third, _ = tick(instance, cursor)                # unchanged since the last tick: settled
        assert [r.tags["cld/file"] for r in third.run_requests] == ["growing.csv"]


def test_hundreds_of_files_are_taken_a_bounded_number_per_tick(data_dir, monkeypatch):
    monkeypatch.setenv("CLD_SENSOR_MAX_FILES", "2")
    for i, la in enumerate(["714", "906", "503", "104", "111"]):
        submission(data_dir / "landing", f"f{i}.csv", la=la)
    with dg.instance_for_test() as instance:
        seen, cursor = [], None
        for _ in range(3):
            result, cursor = tick(instance, cursor)
            assert len(result.run_requests) <= 2
            seen += [r.tags["cld/file"] for r in result.run_requests]
        assert sorted(seen) == [f"f{i}.csv" for i in range(5)]


def test_a_renamed_duplicate_and_a_resubmission(data_dir):
    landing = data_dir / "landing"
    first = submission(landing, "first.csv", mtime=OLD)
    shutil.copyfile(first, landing / "renamed.csv")
    landed(landing / "renamed.csv", OLD + 10)
    submission(landing, "resubmitted.csv", rows=4, mtime=OLD + 20)      # same LA and quarter, newer
    with dg.instance_for_test() as instance:
        result, _ = tick(instance)
        shas = {r.tags["cld/file"]: r.tags["cld/sha256"] for r in result.run_requests}
        assert shas["first.csv"] == shas["renamed.csv"] != shas["resubmitted.csv"]
        assert {str(r.partition_key) for r in result.run_requests} == {"714|2026-Q3"}
    summary = process_landing(prepare_instance(), log=lambda *_: None)
    assert [e["file"] for e in summary.duplicates] == ["renamed.csv"] and summary.ok
    with identifiable(data_dir) as con:
        ledger = dict(con.execute("SELECT file_name, status FROM raw.submissions").fetchall())
        assert ledger == {"first.csv": "superseded", "renamed.csv": "duplicate", "resubmitted.csv": "accepted"}
        counts = dict(con.execute("""SELECT s.file_name, count(e.row_number) FROM raw.submissions s
                                     LEFT JOIN raw.events e USING (submission_id) GROUP BY 1""").fetchall())
        assert counts == {"first.csv": 3, "renamed.csv": 0, "resubmitted.csv": 4}
    assert not list(landing.glob("*.csv")), "landed files leave the landing folder"
    assert len(list((data_dir / "archive").iterdir())) == 2, "one archived original per distinct file"


def test_refused_files_start_a_quarantine_run(data_dir):
    (data_dir / "landing" / "empty.csv").write_bytes(b"")
    landed(data_dir / "landing" / "empty.csv")
    with dg.instance_for_test() as instance:
        [request] = tick(instance)[0].run_requests
        assert request.job_name == "quarantine_job" and request.tags["cld/refused"] == "empty_file"


# --- landing a batch: accepted files and every refusal reason ----------------------------------------------

REFUSALS = {
    "binary_file": lambda p: p.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00binary"),
    "not_utf8": lambda p: p.write_bytes("LA_Code,Last_Name\n714,Jos\u00e9\n".encode("cp1252")),
    "empty_file": lambda p: p.write_bytes(b""),
    "missing_columns": lambda p: p.write_text("LA_Code,Event_Type\n714,Request\n"),
    "no_majority_la": lambda p: write(p, [record(LA_Code=c) for c in ("714", "906", "503")]),
    "unknown_la_code": lambda p: write(p, [record(LA_Code="998")]),
    "missing_reporting_period": lambda p: write(p, [record(Reporting_Period_End_Date="")]),
    "impossible_reporting_period": lambda p: write(p, [record(Reporting_Period_End_Date="2031-03-31")]),
    "file_outside_landing": lambda p: os.symlink(p.parent.parent / "outside.csv", p),
}


@pytest.fixture(scope="module")
def refused_batch(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("batch")
    landing = data_dir / "landing"
    landing.mkdir()
    write(data_dir / "outside.csv", [record()])
    for reason, make in REFUSALS.items():
        make(landing / f"{reason}.csv")
        if not (landing / f"{reason}.csv").is_symlink():
            landed(landing / f"{reason}.csv")
    submission(landing, "good_a.csv", la="714")
    submission(landing, "good_b.csv", la="906")
    originals = {p.name: p.read_bytes() for p in landing.iterdir() if not p.is_symlink()}
    with environment(CLD_DATA_DIR=str(data_dir), DAGSTER_HOME=str(data_dir / "dagster_home")):
        summary = process_landing(prepare_instance(), log=lambda *_: None)
    return data_dir, summary, originals


@pytest.mark.parametrize("reason", sorted(REFUSALS))
def test_each_refusal_reason_quarantines_only_that_file(refused_batch, reason):
    data_dir, summary, originals = refused_batch
    name = f"{reason}.csv"
    quarantined = data_dir / "quarantine"
    error = json.loads((quarantined / f"{name}.error.json").read_text())
    assert error["reason"] == reason and error["message"] and error["file_name"] == name
    if reason == "file_outside_landing":   # a link holds no submission: removed, never kept in quarantine/
        assert not (quarantined / name).is_symlink()
    else:
        assert (quarantined / name).exists()
    assert not (data_dir / "landing" / name).exists() and not (data_dir / "landing" / name).is_symlink()
    if reason == "file_outside_landing":
        assert error["sha256"] is None, "a link out of the folder is never followed, so nothing is archived"
    else:
        assert (data_dir / "archive" / error["sha256"]).read_bytes() == originals[name]
    with identifiable(data_dir) as con:
        [(status, text, sid)] = con.execute(
            "SELECT status, error, submission_id FROM raw.submissions WHERE file_name = ?", [name]).fetchall()
        assert status == "quarantined" and reason in text
        assert con.execute("SELECT count(*) FROM raw.events WHERE submission_id = ?", [sid]).fetchall()[0][0] == 0
    assert name in {e["file"] for e in summary.quarantined}


def test_the_batch_good_files_landed(refused_batch):
    data_dir, summary, originals = refused_batch
    assert summary.ok and {e["file"] for e in summary.accepted} == {"good_a.csv", "good_b.csv"}
    with identifiable(data_dir) as con:
        rows = con.execute("""SELECT s.file_name, s.row_count, count(*) FROM raw.submissions s
                              JOIN raw.events e USING (submission_id) GROUP BY ALL ORDER BY 1""").fetchall()
    assert rows == [("good_a.csv", 3, 3), ("good_b.csv", 3, 3)]
    for name in ("good_a.csv", "good_b.csv"):
        assert any(p.read_bytes() == originals[name] for p in (data_dir / "archive").iterdir())


# --- a generated national-like batch: conservation, rebuild, privacy -----------------------------------------


@pytest.fixture(scope="module")
def generated_landing(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("generated")
    manifest = generate(GeneratorConfig(scale="tiny", quarters=2, seed=5, hospital=False, resubmission_share=0.2),
                        data_dir, progress=False)
    rows = {f["file_name"]: read_submission(data_dir / "landing" / f["file_name"]) for f in manifest["files"]}
    with environment(CLD_DATA_DIR=str(data_dir), DAGSTER_HOME=str(data_dir / "dagster_home")):
        instance = prepare_instance()
        summary = process_landing(instance, log=lambda *_: None)
        yield data_dir, manifest, rows, summary, instance


def test_every_submitted_row_is_kept_as_text(generated_landing):
    data_dir, manifest, rows, summary, _ = generated_landing
    assert summary.ok and len(summary.accepted) == len(manifest["files"])
    with identifiable(data_dir) as con:
        ledger = {r[0]: r[1:] for r in con.execute(
            "SELECT file_name, submission_id, row_count, status FROM raw.submissions").fetchall()}
        for f in manifest["files"]:
            sid, count, status = ledger[f["file_name"]]
            assert count == f["rows"]
            stored = con.execute("""SELECT row_number, nhs_number, event_start_date, ethnicity, event_reference
                                    FROM raw.events WHERE submission_id = ? ORDER BY row_number""", [sid]).fetchall()
            assert [r[0] for r in stored] == list(range(1, f["rows"] + 1))
            source = rows[f["file_name"]]
            for (number, nhs, start, ethnicity, reference) in stored[:: max(1, len(stored) // 50)]:
                row = source[number - 1]
                assert (nhs or "", start or "", ethnicity or "", reference or "") == (
                    row["NHS_Number"], row["Event_Start_Date"], row["Ethnicity"], row["Event_Reference"])
        statuses = [s for _, _, s in ledger.values()]
        resubmitted = sum(1 for f in manifest["files"] if f["version"] == 2)
        assert statuses.count("superseded") == resubmitted > 0


def test_rematerialising_a_partition_rebuilds_it_identically_from_the_archive(generated_landing):
    data_dir, manifest, _, _, instance = generated_landing
    from cld_pipeline.definitions import defs

    f = manifest["files"][0]
    key = submission_partition_key(f["la_code"], f["quarter"])
    with identifiable(data_dir) as con:
        before = con.execute("SELECT * FROM raw.events ORDER BY submission_id, row_number").fetchall()
        ledger_before = con.execute("SELECT * EXCLUDE (loaded_at) FROM raw.submissions ORDER BY 1").fetchall()
    job = defs().resolve_job_def("ingest_submission_job")
    for _ in range(2):
        assert job.execute_in_process(instance=instance, partition_key=key).success
    with identifiable(data_dir) as con:
        assert con.execute("SELECT * FROM raw.events ORDER BY submission_id, row_number").fetchall() == before
        assert con.execute("SELECT * EXCLUDE (loaded_at) FROM raw.submissions ORDER BY 1").fetchall() == ledger_before


def test_no_identifier_reaches_the_event_log(generated_landing):
    data_dir, manifest, rows, _, instance = generated_landing
    secrets = set()
    for file_rows in rows.values():
        for r in file_rows[:200]:
            secrets |= {r["NHS_Number"], r["Date_of_Birth"], r["Postcode"], r.get("Last_Name", "")}
    secrets -= {""}
    text = []
    for run in instance.get_runs():
        for entry in instance.all_logs(run.run_id):
            text.append(entry.message or "")
            if entry.dagster_event is not None:
                text.append(repr(entry.dagster_event.event_specific_data))
        text.append(json.dumps(run.tags))
    blob = "\n".join(text)
    assert len(blob) > 10_000
    leaked = [s for s in secrets if s in blob]
    assert not leaked, leaked[:5]


# --- concurrency and faults ---------------------------------------------------------------------------

RUN_ONE = textwrap.dedent("""
    import json, sys
    from cld_pipeline.definitions import defs
    from cld_pipeline.commands.run import prepare_instance
    import dagster as dg
    request = json.loads(sys.argv[1])
    # The raw layer only: this test is about writers contending for the database, and the later
    # layers' CPU work would only slow 24 processes on 2 cores.
    result = defs().resolve_job_def("ingest_submission_job").execute_in_process(
        instance=prepare_instance(), run_config=request["run_config"], tags=request["tags"],
        partition_key=dg.MultiPartitionKey(request["partition"]), raise_on_error=False,
        asset_selection=[dg.AssetKey(["raw", "submissions"]), dg.AssetKey(["raw", "events"])])
    sys.exit(0 if result.success else 1)
""")


@pytest.mark.slow
def test_twenty_submissions_at_once_all_land_without_lock_errors(tmp_path):
    manifest = generate(GeneratorConfig(scale="tiny", quarters=4, seed=9, hospital=False, resubmission_share=0,
                                        defects=DefectRates().scaled(0)), tmp_path, progress=False)
    assert len(manifest["files"]) >= 20
    env = {**os.environ, "CLD_DATA_DIR": str(tmp_path), "DAGSTER_HOME": str(tmp_path / "dagster_home")}
    with environment(CLD_DATA_DIR=env["CLD_DATA_DIR"], DAGSTER_HOME=env["DAGSTER_HOME"]):
        instance = prepare_instance()
        result = landing_sensor(dg.build_sensor_context(instance=instance))
        for request in result.dynamic_partitions_requests:
            instance.add_dynamic_partitions("quarter", list(request.partition_keys))
    assert len(result.run_requests) == len(manifest["files"])
    procs = [subprocess.Popen([sys.executable, "-c", RUN_ONE, json.dumps({
        "run_config": r.run_config, "tags": r.tags, "partition": r.partition_key.keys_by_dimension})],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for r in result.run_requests]
    outputs = [p.communicate(timeout=600)[0].decode() for p in procs]
    failed = [o[-2000:] for p, o in zip(procs, outputs) if p.returncode != 0]
    assert not failed, failed[0]
    assert not any("lock" in o.lower() and "error" in o.lower() for o in outputs)
    with duckdb.connect(str(tmp_path / "identifiable.duckdb"), read_only=True) as con:
        rows = con.execute("""SELECT count(*), sum(row_count), count(*) FILTER (WHERE status = 'accepted')
                              FROM raw.submissions""").fetchall()[0]
        events = con.execute("SELECT count(*) FROM raw.events").fetchall()[0][0]
    assert rows == (len(manifest["files"]), manifest["rows"], len(manifest["files"]))
    assert events == manifest["rows"]


KILLED_RUN = textwrap.dedent("""
    import os, signal
    import cld_pipeline.lib.ingest.raw_store as raw_store
    calls = {"n": 0}
    real_commit = raw_store.commit
    def commit_then_die(con):
        calls["n"] += 1
        if calls["n"] == int(os.environ["KILL_AT_COMMIT"]):
            os.kill(os.getpid(), signal.SIGKILL)   # killed with the transaction written but not committed
        real_commit(con)
    raw_store.commit = commit_then_die
    from cld_pipeline.commands.run import process_landing
    process_landing(log=lambda *_: None)
""")


def test_a_run_killed_mid_write_reruns_to_exactly_a_clean_run(tmp_path):
    config = GeneratorConfig(scale="tiny", quarters=1, seed=21, hospital=False, resubmission_share=0)
    clean, faulty = tmp_path / "clean", tmp_path / "faulty"
    generate(config, clean, progress=False)
    generate(config, faulty, progress=False)

    def env_for(d: Path, **extra):
        return {**os.environ, "CLD_DATA_DIR": str(d), "DAGSTER_HOME": str(d / "dagster_home"), **extra}

    killed = subprocess.run([sys.executable, "-c", KILLED_RUN], env=env_for(faulty, KILL_AT_COMMIT="3"),
                            capture_output=True, timeout=300)
    assert killed.returncode == -9, killed.stderr.decode()[-2000:]
    for d in (faulty, clean):
        done = subprocess.run([sys.executable, "-m", "cld_pipeline.commands.cli", "run", "--quiet"], env=env_for(d),
                              capture_output=True, timeout=300)
        assert done.returncode == 0, done.stdout.decode()[-2000:] + done.stderr.decode()[-2000:]

    def tables(d: Path):
        with duckdb.connect(str(d / "identifiable.duckdb"), read_only=True) as con:
            return (con.execute("SELECT * FROM raw.events ORDER BY submission_id, row_number").fetchall(),
                    con.execute("SELECT * EXCLUDE (loaded_at, archive_path) FROM raw.submissions ORDER BY 1").fetchall())

    events, ledger = tables(faulty)
    assert (events, ledger) == tables(clean)
    assert len(ledger) == 6 and {r[10] for r in ledger} == {"accepted"}
