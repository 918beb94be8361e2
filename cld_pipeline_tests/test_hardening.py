"""Faults, hostile input and privacy under failure (the hardening issue), each finding tested.

1. A run killed at any moment, or stopped by a full disk, is finished by the next run from the
   ledgers: every table equals a clean run's.
2. Hostile files are refused one by one while the good ones land; the sensor keeps ticking.
3. No submitted value reaches Dagster's storage, alerts, stdout or reports, even from a failure.
4. Everything the processor zone writes is owner-only.
5-9. Erasure matching on normalised identifiers, reasons without identifiers, confined run-config
   paths, the pipeline's own clock, concurrent runs, a missing archive, analysts' connections.
"""

from __future__ import annotations

import datetime as dt
import errno
import gzip
import hashlib
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import dagster as dg
import duckdb
import pytest

from cld_pipeline.synthetic import GeneratorConfig, generate
from cld_pipeline_tests.conftest import PIPELINE_KEY, environment, occurrences

BIN = Path(sys.executable).parent
ROOT = Path(__file__).resolve().parents[1]
# One quarter of three councils, with defects, resubmissions and a hospital extract: small enough
# to run several times, rich enough to pass every layer. The councils are neighbours in the
# partition order, so a batch covers them in one run.
SMALL = GeneratorConfig(scale="tiny", quarters=1, seed=41, la_codes=("111", "112", "113"), resubmission_share=0.5)
VOLATILE = ("_at", "seconds", "run_id", "report_html", "report_csv")


@pytest.fixture(scope="module")
def collection(tmp_path_factory) -> Path:
    source = tmp_path_factory.mktemp("hardening-source")
    generate(SMALL, source, progress=False)
    return source


def fresh(collection: Path, target: Path) -> Path:
    """A data folder holding only the collection's landing folder (modification times kept)."""
    shutil.copytree(collection / "landing", target / "landing", copy_function=shutil.copy2)
    return target


def env_for(data: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CLD_")}
    env.update(CLD_DATA_DIR=str(data), DAGSTER_HOME=str(data / "dagster_home"), CLD_PSEUDO_KEY=PIPELINE_KEY,
               CLD_ENVIRONMENT="production", PYTHONUNBUFFERED="1")
    return env


def cli(data: Path, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "cld-pipeline"), *args], env=env_for(data), capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)


def fingerprint(data: Path) -> dict[str, str]:
    """Every table of both zones, as a digest of its sorted rows, leaving out columns that say when
    or how long (they differ between any two runs) and the audit log (which records the runs)."""
    out = {}
    for zone in ("identifiable", "analytics"):
        with duckdb.connect(str(data / f"{zone}.duckdb"), read_only=True) as con:
            tables = con.execute("SELECT table_schema, table_name FROM information_schema.tables WHERE "
                                 "table_catalog = current_database() AND table_schema NOT IN ('audit')").fetchall()
            for schema, table in tables:
                columns = [c for (c,) in con.execute(
                    "SELECT column_name FROM information_schema.columns WHERE table_schema = ? AND table_name = ? "
                    "AND table_catalog = current_database() ORDER BY ordinal_position", [schema, table]).fetchall()
                    if not c.endswith(VOLATILE)]
                listed = ", ".join(f'"{c}"' for c in columns)
                rows = con.execute(f'SELECT {listed} FROM "{schema}"."{table}" ORDER BY ALL').fetchall()
                out[f"{zone}:{schema}.{table}"] = hashlib.sha256(repr(rows).encode()).hexdigest()[:16] + f" ({len(rows)})"
    return out


def differences(a: dict, b: dict) -> list[str]:
    return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))


@pytest.fixture(scope="module")
def clean_run(collection, tmp_path_factory) -> tuple[Path, dict[str, str]]:
    data = fresh(collection, tmp_path_factory.mktemp("clean"))
    done = cli(data, "run")
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return data, fingerprint(data)


# --- 1. crash recovery -------------------------------------------------------------------------

KILL_POINTS = {   # after which line of `cld-pipeline run`'s progress the process is killed
    "while landing": lambda line, seen: line.startswith("raw ") and seen["raw"] == 2,
    "while validating": lambda line, seen: line.startswith("raw ") and seen["raw"] == seen["expected_raw"],
    "while building the quarter": lambda line, seen: line.startswith("linked "),
}


@pytest.mark.slow
@pytest.mark.parametrize("point", list(KILL_POINTS))
def test_a_killed_run_is_finished_by_the_next_one(point, collection, clean_run, tmp_path):
    clean_data, expected = clean_run
    data = fresh(collection, tmp_path / "data")
    seen = {"raw": 0, "expected_raw": len(list((collection / "landing").glob("*.csv")))}
    process = subprocess.Popen([str(BIN / "cld-pipeline"), "run"], env=env_for(data), stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, cwd=ROOT, start_new_session=True)
    killed = False
    for line in process.stdout:
        seen["raw"] += line.startswith("raw ")
        if KILL_POINTS[point](line, seen):
            time.sleep(0.5)   # well inside the next step
            os.killpg(process.pid, signal.SIGKILL)
            killed = True
            break
    process.wait(timeout=120)
    assert killed, f"the run ended before the kill point ({point})"
    rerun = cli(data, "run")
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-2000:]
    assert differences(fingerprint(data), expected) == []
    # The killed run's runs are no longer "started" in Dagster.
    with environment(DAGSTER_HOME=str(data / "dagster_home")):
        instance = dg.DagsterInstance.get()
        stuck = instance.get_runs(filters=dg.RunsFilter(statuses=[dg.DagsterRunStatus.STARTED]))
        instance.dispose()
    assert stuck == []


@pytest.mark.slow
def test_a_full_disk_fails_the_run_and_the_next_run_after_freeing_it_is_whole(collection, clean_run, tmp_path,
                                                                                monkeypatch):
    import cld_pipeline.defs.pseudonymise.assets as pseudonymise_assets
    from cld_pipeline.commands.run import prepare_instance, process_landing

    _, expected = clean_run
    data = fresh(collection, tmp_path / "data")
    real = pseudonymise_assets.replace_slice
    calls = {"n": 0}

    def disk_full(con, table, *args, **kwargs):
        if table == "pseudonymised.events":
            calls["n"] += 1
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(con, table, *args, **kwargs)

    lines = []
    with environment(**{k: v for k, v in env_for(data).items() if k.startswith(("CLD_", "DAGSTER"))}):
        monkeypatch.setattr(pseudonymise_assets, "replace_slice", disk_full)
        full = process_landing(prepare_instance(), log=lines.append)
        monkeypatch.undo()
        assert calls["n"] >= 1 and not full.ok
        assert full.incomplete and all("not yet pseudonymised" in gap for gap in full.incomplete)
        assert any("ENOSPC" in str(f.get("error")) for f in full.failed), full.failed
        # The disk is freed: the next run finishes what the ledger says is missing.
        again = process_landing(prepare_instance(), log=lines.append)
    assert again.ok and again.recovered, ([f.get("error") for f in again.failed], again.incomplete)
    assert differences(fingerprint(data), expected) == []


def test_the_recovery_sensor_finishes_a_partition_left_after_its_raw_layer(collection, tmp_path):
    """Under the daemon: a partition whose raw layer landed in a run that then ended (here a raw-only
    run, as `cld-pipeline run` makes before its batch) gets one run of its later layers."""
    from cld_pipeline.commands.run import RAW_ASSETS
    from cld_pipeline.definitions import defs as load_defs
    from cld_pipeline.defs.ingest.sensors import plan_landing
    from cld_pipeline.defs.operations.recovery import LATER, chain_recovery_sensor

    data = fresh(collection, tmp_path / "data")
    with environment(**{k: v for k, v in env_for(data).items() if k.startswith(("CLD_", "DAGSTER"))}):
        with dg.instance_for_test() as instance:
            assert isinstance(chain_recovery_sensor(dg.build_sensor_context(instance=instance)), dg.SkipReason)
            requests, quarters, _, _ = plan_landing(None, settle=0)
            instance.add_dynamic_partitions("quarter", sorted(quarters))
            request = next(r for r in requests if r.partition_key)
            landed = load_defs().resolve_job_def("ingest_submission_job").execute_in_process(
                run_config=request.run_config, instance=instance, partition_key=request.partition_key,
                asset_selection=RAW_ASSETS)
            assert landed.success
            [recovery] = chain_recovery_sensor(dg.build_sensor_context(instance=instance))
            assert str(recovery.partition_key) == str(request.partition_key)
            assert recovery.asset_selection == LATER and recovery.run_key.startswith("recover:")
            finished = load_defs().resolve_job_def("ingest_submission_job").execute_in_process(
                instance=instance, partition_key=recovery.partition_key, asset_selection=recovery.asset_selection)
            assert finished.success
            assert isinstance(chain_recovery_sensor(dg.build_sensor_context(instance=instance)), dg.SkipReason)


def test_a_failure_inside_a_connection_leaves_the_database_closed(tmp_path):
    """dagster-duckdb closes its connection only on success; ours closes it on any error too, so a
    failed step never leaves the database file held by this process."""
    from cld_pipeline.defs.resources import LockedDuckDBResource

    database = tmp_path / "zone.duckdb"
    with pytest.raises(OSError):
        with LockedDuckDBResource(database=str(database)).get_connection() as con:
            con.execute("CREATE TABLE t AS SELECT 1 AS x")
            raise OSError(errno.ENOSPC, "No space left on device")
    with duckdb.connect(str(database), read_only=True) as con:   # refused while the other is open
        assert con.execute("SELECT x FROM t").fetchall() == [(1,)]


# --- 2. hostile files --------------------------------------------------------------------------

def _hostile(landing: Path, header: str, row: str) -> dict[str, str]:
    """Each hostile file beside the good ones, and the refusal expected for it."""
    with (landing / "long_line.csv").open("wb") as fh:             # 50 MB and no newline
        block = b"x" * (1 << 20)
        for _ in range(50):
            fh.write(block)
    (landing / "big_field.csv").write_text(header + "\n" + row + "\n" + row.replace(",", ',"' + "y" * (1 << 20) + '",', 1)
                                           + "\n" + row + ",surplus,values\n", encoding="utf-8")
    os.mkfifo(landing / "y.csv")
    (landing / "utf16.csv").write_bytes((header + "\n" + row + "\n").encode("utf-16"))
    (landing / "gzipped.csv").write_bytes(gzip.compress((header + "\n" + row + "\n").encode()))
    (landing / "..x.csv").write_text(header + "\n" + row + "\n", encoding="utf-8")
    return {"long_line.csv": "line_too_long", "big_field.csv": "line_too_long", "y.csv": "not_a_regular_file",
            "utf16.csv": "utf16_file", "gzipped.csv": "gzip_file", "..x.csv": "unsafe_file_name"}


def _first_record(landing: Path) -> tuple[str, str]:
    good = sorted(landing.glob("*.csv"))[0]
    with good.open(encoding="utf-8-sig") as fh:
        return fh.readline().rstrip("\r\n"), fh.readline().rstrip("\r\n")


@pytest.mark.slow
def test_hostile_files_are_refused_one_by_one_and_the_rest_land(collection, tmp_path):
    from cld_pipeline.defs.ingest.sensors import landing_sensor

    data = fresh(collection, tmp_path / "data")
    landing = data / "landing"
    good = sorted(p.name for p in landing.glob("*.csv"))
    expected = _hostile(landing, *_first_record(landing))
    # The sensor ticks over all of them, twice, without raising or blocking on the pipe.
    with environment(CLD_DATA_DIR=str(data), CLD_SETTLE_SECONDS="0"):
        with dg.instance_for_test() as instance:
            first = landing_sensor(dg.build_sensor_context(instance=instance))
            refused = {r.tags["cld/file"]: r.tags.get("cld/refused") for r in first.run_requests}
            assert {n: refused.get(n) for n in expected} == expected
            assert sorted(n for n, reason in refused.items() if reason is None) == good
            landing_sensor(dg.build_sensor_context(instance=instance, cursor=first.cursor))
    done = cli(data, "run", timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    summary = json.loads(done.stdout[done.stdout.index("{"):])
    landed = sorted(f["file"] for f in summary["files"] if f.get("la"))
    refused = sorted(f["file"] for f in summary["files"] if f.get("reason") or "refused" in str(f.get("error")))
    assert landed == good and refused == sorted(expected) and summary["failed"] == 0
    for name, reason in expected.items():
        report = json.loads((data / "quarantine" / f"{name}.error.json").read_text())
        assert report["reason"] == reason and report["message"]
        kept = data / "quarantine" / name
        assert kept.is_file() if name != "y.csv" else not (kept.exists() or kept.is_symlink())   # a pipe is removed
    assert not [p for p in landing.rglob("*") if not p.is_dir()], "nothing sits in landing/ for ever"
    with duckdb.connect(str(data / "identifiable.duckdb"), read_only=True) as con:
        statuses = dict(con.execute("SELECT file_name, status FROM raw.submissions").fetchall())
    assert {statuses[n] for n in expected} == {"quarantined"}


def test_refusal_messages_name_the_line_not_the_content(tmp_path):
    from cld_pipeline.lib.ingest.submission_files import SubmissionRefused, inspect_submission

    path = tmp_path / "x.csv"
    path.write_bytes(b"LA_Code,NHS_Number\n714,9992455527\n714," + b"9" * 70_000 + b"\n")
    with pytest.raises(SubmissionRefused) as refused:
        inspect_submission(path)
    assert refused.value.reason == "line_too_long" and "Line 3" in refused.value.message
    assert "9992455527" not in refused.value.message and "999" not in refused.value.message


# --- 3. no value in logs, alerts, stdout or reports ---------------------------------------------

NHS_IN_COUNT = "9434765919"   # a valid NHS number, typed into an integer column
DOB_SWAPPED = "1937-05-14"


def _with_nhs_in_a_count(path: Path) -> None:
    lines = path.read_text(encoding="utf-8-sig").splitlines()
    header = lines[0].split(",")
    column = next(i for i, h in enumerate(header) if h.replace("_", " ").lower() == "no of adults being cared for")
    row = lines[1].split(",")
    row[column] = NHS_IN_COUNT
    lines[1] = ",".join(row)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def _with_swapped_headers(path: Path, target: Path) -> None:
    """Date of birth and reporting period end swapped in the header: every row's period end is
    then a date of birth (the most common one a fixed value here)."""
    lines = path.read_text(encoding="utf-8-sig").splitlines()
    header = lines[0].split(",")
    dob = next(i for i, h in enumerate(header) if h.replace("_", " ").lower() == "date of birth")
    end = next(i for i, h in enumerate(header) if h.replace("_", " ").lower() == "reporting period end date")
    header[dob], header[end] = header[end], header[dob]
    rows = []
    for line in lines[1:]:
        cells = line.split(",")
        cells[dob] = DOB_SWAPPED      # the column now headed Reporting_Period_End_Date
        rows.append(",".join(cells))
    target.write_text(",".join(header) + "\n" + "\n".join(rows) + "\n", encoding="utf-8")


@pytest.mark.slow
def test_no_submitted_value_reaches_logs_alerts_stdout_or_reports(collection, tmp_path, monkeypatch):
    from cld_pipeline.commands.run import prepare_instance, process_landing
    from cld_pipeline.defs.operations.alerts import build_alert, write_alert
    from cld_pipeline.lib.validation import engine

    data = fresh(collection, tmp_path / "data")
    files = sorted((data / "landing").glob("*.csv"))
    _with_nhs_in_a_count(files[0])
    _with_swapped_headers(files[1], data / "landing" / "swapped.csv")
    header, rest = files[2].read_text(encoding="utf-8-sig").split("\n", 1)
    resubmission = header.lower() + "\n" + rest      # new bytes, same rows: it will be validated again
    secret = "Zq7-SECRET-VALUE-Zq7"
    real = engine.validated_columns

    def exploding():   # a forced failure inside validation whose message quotes a value
        raise ValueError(f"could not convert {secret!r} in No_of_adults_being_cared_for")

    printed = []
    with environment(**{k: v for k, v in env_for(data).items() if k.startswith(("CLD_", "DAGSTER"))}):
        summary = process_landing(prepare_instance(), log=printed.append)    # the NHS number and the swap
        assert [e["file"] for e in summary.quarantined] == ["swapped.csv"] and not summary.failed, summary.failed
        assert "1937" not in summary.quarantined[0].get("error", "")
        (data / "landing" / "again.csv").write_text(resubmission, encoding="utf-8")
        monkeypatch.setattr(engine, "validated_columns", exploding)
        forced = process_landing(prepare_instance(), log=printed.append)
        monkeypatch.setattr(engine, "validated_columns", real)
        assert forced.failed
        error = forced.failed[0]["error"]
        assert "ValueError" in error and "withheld" in error and secret not in error
        instance = dg.DagsterInstance.get()
        failed_runs = [r for r in instance.get_runs(filters=dg.RunsFilter(statuses=[dg.DagsterRunStatus.FAILURE]))
                       if r.job_name == "ingest_submission_job"]
        assert failed_runs
        for run in failed_runs:   # what run_failure_alerts writes for each
            failures = []
            for entry in instance.all_logs(run.run_id, of_type=dg.DagsterEventType.STEP_FAILURE):
                failure = entry.dagster_event.step_failure_data
                failures.append((entry.step_key, failure.user_failure_data.description if failure.user_failure_data
                                 else failure.error.message))
            alert = build_alert(run, failures, "run failed")
            assert alert["quarter"] and alert["la"] and alert["file"], alert
            write_alert(alert)
        # Bad data is not retried: the failing step had one attempt.
        retried = [e for run in failed_runs
                   for e in instance.all_logs(run.run_id, of_type=dg.DagsterEventType.STEP_UP_FOR_RETRY)]
        assert retried == []
        instance.dispose()
    places = [p for root in ("dagster_home", "alerts", "reports") for p in (data / root).rglob("*") if p.is_file()]
    places += list((data / "quarantine").glob("*.error.json"))
    haystacks = [p.read_bytes() for p in places] + ["\n".join(printed)]
    assert len(places) > 20
    assert occurrences({NHS_IN_COUNT, DOB_SWAPPED, secret}, haystacks) == set()


@pytest.mark.slow
def test_one_councils_failure_never_fails_its_neighbours(collection, tmp_path, monkeypatch):
    """A batch over three neighbouring councils in which one council's data makes validation raise:
    the batch is split, the other two are validated and pseudonymised, the one fails alone."""
    import cld_pipeline.defs.validate.assets as validate_assets
    from cld_pipeline.commands.run import prepare_instance, process_landing

    data = fresh(collection, tmp_path / "data")
    first: dict[str, Path] = {}
    for path in sorted((data / "landing").glob("*.csv")):    # one file per council: one wave, one batch
        if path.name.split("_")[2] in first:
            path.unlink()
        else:
            first[path.name.split("_")[2]] = path
    real = validate_assets.validate_submissions

    def fails_for_112(raw_rows, contexts, work, *args, **kwargs):
        if any(c.la_code == "112" for c in contexts):
            raise RuntimeError("row 7 holds 9434765919")
        return real(raw_rows, contexts, work, *args, **kwargs)

    monkeypatch.setattr(validate_assets, "validate_submissions", fails_for_112)
    lines = []
    with environment(**{k: v for k, v in env_for(data).items() if k.startswith(("CLD_", "DAGSTER"))}):
        summary = process_landing(prepare_instance(), log=lines.append)
    assert any("one by one" in line for line in lines), lines
    assert sorted(e["la"] for e in summary.failed) == ["112"]
    assert "9434765919" not in summary.failed[0]["error"] and "RuntimeError" in summary.failed[0]["error"]
    with duckdb.connect(str(data / "analytics.duckdb"), read_only=True) as con:
        done = {la for (la,) in con.execute("SELECT DISTINCT la_code FROM pseudonymised.events").fetchall()}
    assert done == {"111", "113"}


# --- 4. owner-only files -----------------------------------------------------------------------

def test_everything_the_processor_zone_writes_is_owner_only(clean_run):
    data, _ = clean_run
    loose = []
    for path in [data, *data.rglob("*")]:
        if path.is_symlink():
            continue
        mode = stat.S_IMODE(path.lstat().st_mode)
        relative = path.relative_to(data)
        if path == data:
            allowed = 0o750
        elif relative.parts[0].startswith("analytics.duckdb"):
            allowed = 0o640
        else:
            allowed = 0o700 if path.is_dir() else 0o600
        if mode & ~allowed:
            loose.append(f"{relative} {oct(mode)}")
    assert loose == []
    assert (data / "archive").exists() and any((data / "dagster_home").rglob("*"))


def test_rights_copies_and_quarantine_are_owner_only_too(tmp_path):
    from cld_pipeline.lib.privacy.file_modes import secure_data_folder

    data = tmp_path / "data"
    (data / "rights" / "R-1").mkdir(parents=True)
    (data / "rights" / "R-1" / "copy.html").write_text("x")
    os.chmod(data / "rights" / "R-1" / "copy.html", 0o644)
    os.chmod(data / "rights", 0o755)
    (data / "analytics.duckdb").write_bytes(b"")
    old = os.umask(0o022)
    try:
        secure_data_folder(data)
        (data / "quarantine").mkdir()
        (data / "quarantine" / "new.csv").write_text("x")
    finally:
        os.umask(old)
    assert stat.S_IMODE((data / "rights" / "R-1" / "copy.html").stat().st_mode) == 0o600
    assert stat.S_IMODE((data / "rights").stat().st_mode) == 0o700
    assert stat.S_IMODE((data / "quarantine" / "new.csv").stat().st_mode) == 0o600   # the umask of the process
    assert stat.S_IMODE((data / "analytics.duckdb").stat().st_mode) == 0o640


# --- 5. erasure is not undone by a resubmission with variant identifiers ------------------------

def test_suppression_matches_every_variant_of_the_identifiers():
    from cld_pipeline.lib.privacy import rights
    from cld_pipeline.lib.privacy.pseudonymise import PseudoKey, parse_key

    key = PseudoKey(parse_key(PIPELINE_KEY), "1")
    con = duckdb.connect()
    rights.ensure_schema(con)
    rights.register(con, "R", "erase", {"nhs:9434765919", "la:714:AB-12/x"}, [key])
    m = rights.matcher(con, [key], rights.SUPPRESSING)
    hit = lambda sql, **p: con.execute(f"SELECT {m.matches([sql])}", {**m.params, **p}).fetchall()[0][0]  # noqa: E731
    for nhs in ("9434765919", "943 476 5919", "943-476-5919", "943.476.5919", " 943 476 5919 "):
        assert hit(rights.nhs_message_sql("$v"), v=nhs), nhs
    for person_id in ("AB-12/x", "ab-12/x", " AB-12/X ", "Ab-12/X"):
        assert hit(rights.la_message_sql("$la", "$v"), la=" 714", v=person_id), person_id
    assert not hit(rights.la_message_sql("$la", "$v"), la="313", v="AB-12/x")       # another council's person
    assert not hit(rights.nhs_message_sql("$v"), v="9434765918")


# --- 6. reasons never carry identifiers into the audit log -------------------------------------

@pytest.mark.parametrize("reason", [
    "Jane Smith asked for erasure SAR-2026-0042",
    "SAR-2026-0042 postcode SW1A 1AA",
    "SAR-2026-0042 SW1A1AA",
    "SAR-2026-0042 born 1937-05-14",
    "SAR-2026-0042 born 14/05/1937",
    "SAR-2026-0042 born 14 May 1937",
    "SAR-2026-0042 999.245.5527",
    "SAR-2026-0042 NHS9992455527",
    "SAR-999-962-6971 erasure",          # an NHS number split across a reference
    "DSR/1946/09/15 erasure",            # a date of birth as a reference
    "SAR-150946 erasure",
    "ICO1946 09 15",
    "erasure",                           # no case reference
])
def test_a_reason_that_could_hold_an_identifier_is_refused(reason):
    from cld_pipeline.lib.privacy import rights

    with pytest.raises(rights.RightsError) as refused:
        rights.check_reason(reason)
    for word in reason.split():
        if any(c.isdigit() for c in word) and not word.startswith("SAR"):
            assert word not in str(refused.value)


@pytest.mark.parametrize("reason", ["SAR-2026-0042 subject access request", "DSR/2026/17 erasure under article 17",
                                    "ICO-12345 objection", "case erase T1"])
def test_a_case_reference_with_plain_words_is_accepted(reason):
    from cld_pipeline.lib.privacy import rights

    assert rights.check_reason(reason) == reason


# --- 7. run config cannot write outside the data folder ----------------------------------------

@pytest.mark.parametrize("name", ["../../escaped.csv", "/tmp/escaped-absolute.csv", "a/../../escaped2.csv",
                                  "innocent.csv"])
def test_run_config_paths_are_confined_to_their_folder(tmp_path, name):
    from cld_pipeline.definitions import defs as load_defs

    data = tmp_path / "deep" / "data"
    outside = {tmp_path / "escaped.csv.error.json", Path("/tmp/escaped-absolute.csv.error.json"),
               tmp_path / "deep" / "escaped2.csv.error.json", tmp_path / "escaped2.csv.error.json"}
    Path("/tmp/escaped-absolute.csv.error.json").unlink(missing_ok=True)   # left by code before this fix
    with environment(CLD_DATA_DIR=str(data), CLD_PSEUDO_KEY=PIPELINE_KEY, CLD_ENVIRONMENT="production"):
        defs = load_defs()
        with dg.instance_for_test() as instance:
            refused = defs.resolve_job_def("quarantine_job").execute_in_process(
                run_config={"ops": {"quarantine_file": {"config": {"file_name": name, "reason": "x", "message": "y"}}}},
                instance=instance, raise_on_error=False)
            assert not refused.success
            instance.add_dynamic_partitions("quarter", ["2026-Q3"])
            landed = defs.resolve_job_def("ingest_submission_job").execute_in_process(
                run_config={"ops": {"raw_submission": {"config": {"file_name": name, "sha256": "../../etc/passwd"}}}},
                instance=instance, partition_key=dg.MultiPartitionKey({"la": "714", "quarter": "2026-Q3"}),
                raise_on_error=False)
            assert not landed.success
    assert not [p for p in outside if p.exists()]
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert all(data in p.parents for p in written), written


# --- 8. the pipeline's own clock -----------------------------------------------------------------

def test_a_file_stamped_in_the_future_is_received_now_and_its_period_refused(tmp_path, collection):
    from cld_pipeline.defs.ingest.sensors import plan_landing

    data = tmp_path / "data"
    (data / "landing").mkdir(parents=True)
    source = sorted((collection / "landing").glob("*.csv"))[0]
    header, *rows = source.read_text(encoding="utf-8-sig").splitlines()
    end = header.split(",").index(next(h for h in header.split(",") if h.replace("_", " ").lower()
                                       == "reporting period end date"))
    start = header.split(",").index(next(h for h in header.split(",") if h.replace("_", " ").lower()
                                         == "reporting period start date"))
    out = []
    for row in rows:
        cells = row.split(",")
        cells[start], cells[end] = "2098-10-01", "2099-09-30"
        out.append(",".join(cells))
    target = data / "landing" / "future.csv"
    target.write_text(header + "\n" + "\n".join(out) + "\n", encoding="utf-8")
    stamp = dt.datetime(2100, 1, 1, tzinfo=dt.timezone.utc).timestamp()
    os.utime(target, (stamp, stamp))
    with environment(CLD_DATA_DIR=str(data)):
        requests, quarters, _, _ = plan_landing(None, settle=0)
    assert quarters == set()
    [request] = requests
    assert request.tags["cld/refused"] == "impossible_reporting_period"
    received = dt.datetime.fromisoformat(request.run_config["ops"]["quarantine_file"]["config"]["received_at"])
    assert received <= dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)


# --- 9. concurrent runs, a missing archive, analysts' connections, a request for nobody -----------

@pytest.mark.slow
def test_two_runs_at_once_are_serialised_and_both_succeed(collection, clean_run, tmp_path):
    _, expected = clean_run
    data = fresh(collection, tmp_path / "data")
    results = []
    threads = [threading.Thread(target=lambda: results.append(cli(data, "run"))) for _ in range(2)]
    for t in threads:
        t.start()
        time.sleep(1)
    for t in threads:
        t.join()
    assert [r.returncode for r in results] == [0, 0], [r.stderr[-1500:] for r in results]
    assert any("waiting" in r.stdout for r in results)
    assert differences(fingerprint(data), expected) == []


def test_a_missing_archive_is_named_with_the_fix(clean_run, tmp_path):
    source, _ = clean_run
    data = tmp_path / "data"
    shutil.copytree(source, data, ignore=shutil.ignore_patterns("*.lock"))
    with duckdb.connect(str(data / "identifiable.duckdb"), read_only=True) as con:
        submission, la, quarter, sha = con.execute("SELECT submission_id, la_code, quarter, sha256 FROM raw.submissions "
                                                   "WHERE status = 'accepted' ORDER BY ALL LIMIT 1").fetchall()[0]
    (data / "archive" / sha).unlink()
    from cld_pipeline.definitions import defs as load_defs

    with environment(**{k: v for k, v in env_for(data).items() if k.startswith(("CLD_", "DAGSTER"))}):
        instance = dg.DagsterInstance.get()
        result = load_defs().resolve_job_def("ingest_submission_job").execute_in_process(
            instance=instance, partition_key=dg.MultiPartitionKey({"la": la, "quarter": quarter}), raise_on_error=False)
        instance.dispose()
    from cld_pipeline.commands.run import _failure_message

    message = _failure_message(result)
    assert not result.success and submission in message and f"archive/{sha}" in message and "Restore" in message


def test_analysts_cannot_open_the_processor_zone_through_a_link_or_a_copy(clean_run, tmp_path):
    from cld_pipeline.analyst import connect

    source, _ = clean_run
    link = tmp_path / "innocent.duckdb"
    link.symlink_to(source / "identifiable.duckdb")
    hard = tmp_path / "hard.duckdb"
    os.link(source / "identifiable.duckdb", hard)
    copy = tmp_path / "copy.duckdb"
    shutil.copyfile(source / "identifiable.duckdb", copy)
    with environment(CLD_DATA_DIR=str(source)):
        for path in (link, hard, copy):
            with pytest.raises(PermissionError):
                with connect(path):
                    pass
        with connect() as con:
            assert con.execute("SELECT count(*) FROM pseudonymised.events").fetchall()[0][0] > 0


def test_a_rights_request_for_a_person_not_held_is_refused_as_a_likely_typo(clean_run, tmp_path):
    source, _ = clean_run
    data = tmp_path / "data"
    shutil.copytree(source, data, ignore=shutil.ignore_patterns("*.lock"))
    done = cli(data, "rights", "erase", "--nhs-number", "943 476 5919", "--reason", "SAR-2026-0042 erasure")
    assert done.returncode == 3 and "typo" in done.stderr and "943" not in done.stderr
    with duckdb.connect(str(data / "identifiable.duckdb"), read_only=True) as con:
        assert con.execute("SELECT count(*) FROM rights.requests").fetchall()[0][0] == 0
