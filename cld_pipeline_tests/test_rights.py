"""Data-subject rights, retention, audit and access separation, on generated data run end to end.

Each test works on its own copy of the processed tiny collection (`pseudonymised_pipeline`), through
the same entry points as `cld-pipeline rights|audit|retention`.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import shutil
from pathlib import Path

import duckdb
import pytest
from hypothesis import given, settings as hsettings, strategies as st

from cld_pipeline.lib.privacy import rights
from cld_pipeline_tests.conftest import PIPELINE_KEY, environment, occurrences

pytestmark = pytest.mark.filterwarnings("ignore::dagster.BetaWarning", "ignore::dagster.PreviewWarning")


@pytest.fixture
def data_copy(pseudonymised_pipeline, tmp_path):
    source = pseudonymised_pipeline[0]
    target = tmp_path / "data"
    shutil.copytree(source, target, ignore=shutil.ignore_patterns("*.lock"))
    with environment(CLD_DATA_DIR=str(target), DAGSTER_HOME=str(target / "dagster_home"), CLD_PSEUDO_KEY=PIPELINE_KEY,
                     CLD_ENVIRONMENT="production", CLD_ACTOR="test-handler"):
        yield target


def query(path: Path, sql: str, params=None) -> list[tuple]:
    con = duckdb.connect(str(path), read_only=str(path) != ":memory:")
    try:
        return con.execute(sql, params or []).fetchall()
    finally:
        con.close()


def tables(path: Path) -> dict[str, list[tuple[str, str]]]:
    rows = query(path, """SELECT '"' || table_schema || '"."' || table_name || '"', list((column_name, data_type))
                          FROM information_schema.columns c JOIN information_schema.tables t
                          USING (table_catalog, table_schema, table_name) WHERE t.table_type = 'BASE TABLE' GROUP BY ALL""")
    return {t: cols for t, cols in rows}


def holding(path: Path, values: set[str], columns: set[str] | None = None) -> dict[str, int]:
    """Rows of any table whose text columns (or just `columns`) equal one of `values`: written
    independently of the code under test."""
    con = duckdb.connect(str(path), read_only=True)
    found = {}
    try:
        for table, cols in tables(path).items():
            text = [c for c, t in cols if t == "VARCHAR" and (columns is None or c in columns)]
            if text:
                where = " OR ".join(f'"{c}" IN (SELECT unnest(?::VARCHAR[]))' for c in text)
                n = con.execute(f"SELECT count(*) FROM {table} WHERE {where}", [sorted(values)] * len(text)).fetchall()[0][0]
                if n:
                    found[table] = n
    finally:
        con.close()
    return found


def person_with_history(data: Path) -> tuple[str, str, str]:
    """An NHS-numbered person with rows in two submissions and a hospital episode: (NHS, LA, LA id)."""
    return query(data / "identifiable.duckdb", """
        SELECT v.nhs_number, any_value(v.la_code_of_file), any_value(v.la_person_unique_identifier)
        FROM validated.events v WHERE v.nhs_number IN (SELECT nhs_number FROM validated.hospital_episodes)
          AND v.la_person_unique_identifier IS NOT NULL
        GROUP BY 1 HAVING count(DISTINCT submission_id) > 1 ORDER BY count(*) DESC, 1 LIMIT 1""")[0]


def tokens_of(messages: set[str]) -> set[str]:
    from cld_pipeline.lib.privacy.pseudonymise import PseudoKey, parse_key, token

    key = PseudoKey(parse_key(PIPELINE_KEY), "1")
    return {token(key, m) for m in messages}


def run_right(action: str, **who) -> dict:
    from cld_pipeline.commands import rights as subject_rights
    from cld_pipeline.commands.run import prepare_instance

    person = rights.parse_person(who.get("nhs"), who.get("la"), who.get("person_id"))
    request_id = subject_rights.lodge(action, person, "test-handler", f"case {action} T1")
    return subject_rights.carry_out(request_id, prepare_instance(), log=lambda *_: None)


def submitted_rows(data: Path, nhs: str) -> tuple[set[tuple[str, int]], set[str]]:
    """From the archived original files (not the pipeline's tables): (file, row number) of every row
    with this NHS number, or with an LA person id that rows with this number carry, and those ids."""
    from cld_pipeline.lib.ingest.submission_files import inspect_and_read

    files = query(data / "identifiable.duckdb", "SELECT file_name, sha256, la_code, received_at FROM raw.submissions "
                                                "WHERE status IN ('accepted', 'superseded')")
    parsed = []
    for name, sha, la, received in files:
        _, records = inspect_and_read(data / "archive" / sha, received=received.date())
        parsed.append((name, la, records.to_pylist()))
    ids = {(la, r["la_person_unique_identifier"].strip()) for name, la, rs in parsed for r in rs
           if (r["nhs_number"] or "").replace(" ", "").replace("-", "") == nhs and (r["la_person_unique_identifier"] or "").strip()}
    rows = {(name, r["row_number"]) for name, la, rs in parsed for r in rs
            if (r["nhs_number"] or "").replace(" ", "").replace("-", "") == nhs
            or (la, (r["la_person_unique_identifier"] or "").strip()) in ids}
    return rows, {i for _, i in ids}


def test_copy_returns_exactly_the_persons_rows(data_copy):
    nhs, _, _ = person_with_history(data_copy)
    expected, _ = submitted_rows(data_copy, nhs)
    summary = run_right("copy", nhs=nhs)
    folder = data_copy / Path(summary["copy"]).parent
    got = {(r[0], r[1]) for r in query(":memory:", f"SELECT file_name, row_number FROM read_csv('{folder}/raw.events.csv')")}
    assert got == expected and len(expected) > 10
    accepted = query(data_copy / "identifiable.duckdb", "SELECT count(*) FROM validated.events WHERE "
                     "(submission_id, row_number) IN (SELECT (submission_id, row_number) FROM "
                     f"read_csv('{folder}/raw.events.csv'))")[0][0]
    assert summary["rows"]["validated.events"] == accepted
    assert summary["rows"]["pseudonymised.events"] == accepted        # every accepted row, pseudonymised
    assert summary["rows"]["validated.hospital_episodes"] >= 1 and "linked.person_spells" in summary["rows"]
    page = (folder / "copy.html").read_text(encoding="utf-8")
    assert "raw.events" in page and nhs in page                       # readable, for the request handler
    # The copy is an export: audited, with no identifier in the log.
    log = query(data_copy / "identifiable.duckdb", "SELECT action, detail FROM audit.log")
    assert {"rights:copy", "export"} <= {a for a, _ in log}
    assert nhs not in json.dumps(log, default=str)


def test_erase_removes_the_person_everywhere_and_keeps_them_out(data_copy):
    from cld_pipeline.commands.run import prepare_instance, process_landing

    identifiable, analytics = data_copy / "identifiable.duckdb", data_copy / "analytics.duckdb"
    nhs, la, _ = person_with_history(data_copy)
    _, la_ids = submitted_rows(data_copy, nhs)
    messages = {f"nhs:{nhs}"} | {f"la:{la}:{i}" for i in la_ids}
    tokens = tokens_of(messages)
    assert holding(analytics, tokens), "the person is in the analysts' zone before erasure"
    other_las = query(identifiable, "SELECT * FROM benchmark_unsuppressed.activity WHERE geography_level = 'LA' "
                                    "AND geography_code <> ? ORDER BY ALL", [la])

    summary = run_right("erase", nhs=nhs)
    assert summary["verification"] == {} and not summary["rebuild_failed"]
    assert summary["partitions"] and summary["hospital_quarters"]
    id_columns = {"nhs_number", "la_person_unique_identifier", "adult_1_linked_person_id", "adult_2_linked_person_id",
                  "adult_3_linked_person_id"}
    for db in (identifiable, analytics):
        assert holding(db, {nhs}) == {}
        assert holding(db, tokens) == {}
    # The council's person id, in the person's own council's rows (other councils may use the same id).
    for table in ("raw.events", "validated.events"):
        where = " OR ".join(f"trim({c}) IN (SELECT unnest(?::VARCHAR[]))" for c in sorted(id_columns - {"nhs_number"}))
        assert query(identifiable, f"SELECT count(*) FROM {table} JOIN raw.submissions s USING (submission_id) "
                                   f"WHERE s.la_code = ? AND ({where})", [la] + [sorted(la_ids)] * 4)[0][0] == 0
    # Nor in any rebuilt output: reports and dashboards.
    pages = [p.read_bytes() for p in (data_copy / "reports").rglob("*") if p.is_file()]
    assert occurrences({nhs, *tokens}, pages) == set()
    # Nor in Dagster's storage (run config carries only the request id).
    stored = [p.read_bytes() for p in (data_copy / "dagster_home").rglob("*") if p.is_file()]
    assert occurrences({nhs}, stored) == set()
    # Benchmark figures of other councils do not move.
    assert query(identifiable, "SELECT * FROM benchmark_unsuppressed.activity WHERE geography_level = 'LA' "
                               "AND geography_code <> ? ORDER BY ALL", [la]) == other_las

    # The council resubmits a file that still contains the person: they do not come back.
    name, sha, received = query(identifiable, "SELECT file_name, sha256, received_at FROM raw.submissions WHERE "
                                              "la_code = ? AND status = 'accepted' ORDER BY quarter DESC LIMIT 1", [la])[0]
    original = (data_copy / "archive" / sha).read_text(encoding="utf-8-sig")
    header, rest = original.split("\n", 1)
    assert nhs in rest
    (data_copy / "landing" / name).write_text(header.lower() + "\n" + rest, encoding="utf-8")   # new bytes, same rows
    landed = process_landing(prepare_instance(), log=lambda *_: None)
    assert landed.ok and [e["file"] for e in landed.accepted] == [name]
    suppressed = query(identifiable, "SELECT suppressed_rows, row_count FROM raw.submissions WHERE file_name = ? "
                                     "AND status = 'accepted'", [name])[0]
    assert suppressed[0] == sum(1 for line in rest.splitlines() if nhs in line) and suppressed[0] > 0
    for db in (identifiable, analytics):
        assert holding(db, {nhs}) == {} and holding(db, tokens) == {}
    assert query(identifiable, "SELECT count(*) FROM rights.pending")[0][0] == 0
    conservation = query(identifiable, """SELECT s.row_count - s.suppressed_rows, count(*) FROM raw.events e
        JOIN raw.submissions s USING (submission_id) WHERE s.file_name = ? AND s.status = 'accepted' GROUP BY ALL""",
                         [name])[0]
    assert conservation[0] == conservation[1]


def test_restrict_withholds_and_unrestrict_restores(data_copy):
    identifiable, analytics = data_copy / "identifiable.duckdb", data_copy / "analytics.duckdb"
    # An LA-id person who also appears in a superseded submission (events_history).
    la, person_id = query(identifiable, """SELECT s.la_code, e.la_person_unique_identifier FROM raw.events e
        JOIN raw.submissions s USING (submission_id) WHERE s.status = 'superseded' AND e.la_person_unique_identifier
        IS NOT NULL AND coalesce(trim(e.nhs_number), '') = '' GROUP BY ALL ORDER BY count(*) DESC, 1, 2 LIMIT 1""")[0]
    messages = rights.resolve(duckdb.connect(str(identifiable), read_only=True),
                              rights.Person(la_code=la, la_person_id=person_id))
    tokens = tokens_of(messages)
    fingerprint = ("SELECT count(*), sum(hash(person_id, submission_id, row_number, event_start_date)) "
                   "FROM pseudonymised.events")
    before = query(analytics, fingerprint), query(analytics, "SELECT count(*) FROM pseudonymised.events_history")
    assert holding(analytics, tokens)

    summary = run_right("restrict", la=la, person_id=person_id)
    assert summary["verification"] == {} and not summary["rebuild_failed"]
    assert holding(analytics, tokens) == {}                         # absent from every analytical output
    stored = query(identifiable, "SELECT count(*), count(*) FILTER (WHERE processing_restricted) FROM validated.events "
                                 "WHERE la_code_of_file = ? AND la_person_unique_identifier = ?", [la, person_id])[0]
    assert stored[0] > 0 and stored[0] == stored[1]                 # still stored, flagged
    assert query(identifiable, "SELECT count(*) FROM raw.events WHERE la_person_unique_identifier = ?", [person_id])[0][0]

    run_right("unrestrict", la=la, person_id=person_id)
    assert (query(analytics, fingerprint), query(analytics, "SELECT count(*) FROM pseudonymised.events_history")) == before
    assert query(identifiable, "SELECT count(*) FILTER (WHERE processing_restricted) FROM validated.events")[0][0] == 0
    actions = [a for (a,) in query(identifiable, "SELECT action FROM audit.log WHERE action LIKE 'rights:%' ORDER BY seq")]
    assert actions == ["rights:restrict", "rights:restrict:verified", "rights:unrestrict"]


def test_correction_by_resubmission_supersedes_and_rebuilds(data_copy):
    """Rectification: the council resubmits a corrected row; every layer follows the new file."""
    from cld_pipeline.commands.run import prepare_instance, process_landing

    identifiable, analytics = data_copy / "identifiable.duckdb", data_copy / "analytics.duckdb"
    name, sha, la, quarter, old_id = query(identifiable, "SELECT file_name, sha256, la_code, quarter, submission_id "
                                                         "FROM raw.submissions WHERE status = 'accepted' ORDER BY 1 LIMIT 1")[0]
    import csv
    import io

    from cld_pipeline.spec import load_spec

    row, current = query(identifiable, "SELECT row_number, ethnicity_cleaned FROM validated.events WHERE submission_id = ? "
                                       "AND ethnicity_cleaned IS NOT NULL ORDER BY row_number LIMIT 1", [old_id])[0]
    corrected = next(v for v in load_spec().codes_for("Ethnicity").value_strings if v != current)
    records = list(csv.reader(io.StringIO((data_copy / "archive" / sha).read_text(encoding="utf-8-sig"))))
    col = [h.strip().lower() for h in records[0]].index("ethnicity")
    records[row][col] = corrected                           # the council's correction
    out = io.StringIO()
    csv.writer(out, lineterminator="\n").writerows(records)
    (data_copy / "landing" / name).write_text(out.getvalue(), encoding="utf-8")
    assert process_landing(prepare_instance(), log=lambda *_: None).ok
    new_id = query(identifiable, "SELECT submission_id FROM raw.submissions WHERE la_code = ? AND quarter = ? AND "
                                 "status = 'accepted'", [la, quarter])[0][0]
    assert new_id != old_id
    assert query(identifiable, "SELECT status FROM raw.submissions WHERE submission_id = ?", [old_id])[0][0] == "superseded"
    assert query(analytics, "SELECT ethnicity_cleaned FROM pseudonymised.events WHERE submission_id = ? AND "
                            "row_number = ?", [new_id, row]) == [(corrected,)]
    assert query(analytics, "SELECT count(*) FROM pseudonymised.events WHERE submission_id = ?", [old_id])[0][0] == 0
    assert query(analytics, "SELECT count(*) FROM dhsc.single_submissions WHERE submission_id = ? AND "
                            "benchmark_quarter = ?", [new_id, quarter])[0][0] > 0


def test_audit_log_records_actions_and_detects_tampering(data_copy):
    from cld_pipeline.commands.cli import main
    from cld_pipeline.lib.privacy import audit

    nhs, _, _ = person_with_history(data_copy)
    run_right("copy", nhs=nhs)
    assert main(["audit", "--verify"]) == 0
    con = duckdb.connect(str(data_copy / "identifiable.duckdb"))
    try:
        kinds = {a for (a,) in con.execute("SELECT DISTINCT action FROM audit.log").fetchall()}
        assert {"run", "materialisation", "rights:copy", "export"} <= kinds
        who = con.execute("SELECT DISTINCT actor FROM audit.log WHERE action = 'rights:copy'").fetchall()
        assert who == [("test-handler",)]
        text = json.dumps(con.execute("SELECT * FROM audit.log").fetchall(), default=str)
        assert nhs not in text and not (tokens_of({f"nhs:{nhs}"}) & set(text.split('"')))
        assert audit.verify(con) is None
        con.execute("UPDATE audit.log SET actor = 'someone else' WHERE seq = 3")
        assert audit.verify(con) == 3
    finally:
        con.close()
    with pytest.raises(rights.RightsError, match="identifier"):
        rights.check_free_text("--reason", f"patient {nhs}")


def test_retention_destroys_everything_after_the_agreement_ends(data_copy, capsys):
    from cld_pipeline.commands.cli import main
    from cld_pipeline.lib.privacy import retention

    assert main(["linkage", "review-export", "--quarter", "2026-Q3"]) == 0   # identifiable pairs on disk
    before = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in retention.planned()}
    assert any(p.name == "identifiable.duckdb" for p in before) and any(p.parent.name == "archive" for p in before)
    assert {p.parent.name for p in before if "linkage" in p.parts} == {"models", "review"}
    yesterday = str(dt.date.today() - dt.timedelta(days=1))
    assert main(["retention"]) == 0                                   # before expiry: nothing goes
    with environment(CLD_DSA_EXPIRES_ON=yesterday):
        capsys.readouterr()
        assert main(["retention", "--dry-run"]) == 0
        listing = json.loads(capsys.readouterr().out)
        assert {str(data_copy / p) for p in listing["would_destroy"]} == {str(p) for p in before}
        assert all(p.exists() for p in before)                        # the dry run deletes nothing
        assert main(["retention"]) == 0
        assert [p for p in before if p.exists()] == []
        assert not (data_copy / "identifiable.duckdb").exists() and not (data_copy / "archive").exists()
        certificate = json.loads(next((data_copy / "destruction").glob("certificate-*.json")).read_text())
        recorded = {data_copy / f["path"]: f["sha256"] for f in certificate["files"]}
        assert recorded.keys() == before.keys()
        # Identical checksums, except the processor zone's, which gained the retention audit entry.
        changed = {p.name for p in before if recorded[p] != before[p]}
        assert changed <= {"identifiable.duckdb"}
        assert certificate["dsa_expired_on"] == yesterday and certificate["key_material"]["production_keys"] != "none configured"
        audit_copy = data_copy / certificate["audit_log"]["path"]
        assert "retention:destroy" in audit_copy.read_text()
        assert main(["run", "--quiet"]) == 2                          # no new data under an ended agreement


def test_no_analytical_asset_can_read_the_processor_zone(data_copy):
    from cld_pipeline.analyst import connect
    from cld_pipeline.definitions import defs as load_defs

    graph = load_defs().resolve_asset_graph()
    # Pseudonymisation and the probabilistic linkage (which must compare identifiers) are the processor's own steps.
    processor_groups = {"raw", "validated", "pseudonymised", "probabilistic_linkage"}
    for key in graph.get_all_asset_keys():
        node = graph.get(key)
        if node.group_name not in processor_groups:
            assert "identifiable_db" not in node.assets_def.required_resource_keys, key
    with connect() as con:
        assert con.execute("SELECT count(*) FROM pseudonymised.events").fetchall()[0][0] > 0
        for sql in ("CREATE TABLE analyst.mine AS SELECT 1", f"ATTACH '{data_copy / 'identifiable.duckdb'}' AS i",
                    f"SELECT * FROM read_csv('{next((data_copy / 'archive').iterdir())}')",
                    "SET enable_external_access = true"):
            with pytest.raises(duckdb.Error):
                con.execute(sql)
    with pytest.raises(PermissionError):
        with connect(data_copy / "identifiable.duckdb"):
            pass
    from cld_pipeline.defs.resources import LockedDuckDBResource

    for name, mode in (("identifiable.duckdb", 0o600), ("analytics.duckdb", 0o640)):
        with LockedDuckDBResource(database=str(data_copy / name)).get_connection():
            pass
        assert (data_copy / name).stat().st_mode & 0o777 == mode


@hsettings(max_examples=60, deadline=None)
@given(digits=st.from_regex(r"[0-9]{10}", fullmatch=True),
       seps=st.lists(st.sampled_from(["", " ", "-"]), min_size=11, max_size=11),
       la=st.sampled_from(["318", "ab1"]), person=st.from_regex(r"[A-Za-z0-9.\-]{1,12}", fullmatch=True),
       pad=st.sampled_from(["", " ", "  "]))
def test_register_matching_in_sql_equals_the_python_token(digits, seps, la, person, pad):
    """What the register stores (Python) is what the write points compute in SQL, whatever the
    spacing of the submitted NHS number or LA person id."""
    from cld_pipeline.lib.privacy.pseudonymise import PseudoKey, parse_key

    key = PseudoKey(parse_key(PIPELINE_KEY), "1")
    submitted = pad + "".join(s + d for s, d in zip(seps, digits)) + seps[-1] + pad
    con = duckdb.connect()
    rights.ensure_schema(con)
    con.execute("INSERT INTO rights.register VALUES ('R', 'erase', 'nhs', '1', ?, now(), NULL, NULL), "
                "('R', 'erase', 'la', '1', ?, now(), NULL, NULL)",
                [rights.register_token(key, "nhs:" + digits), rights.register_token(key, f"la:{la.upper()}:{person}")])
    m = rights.matcher(con, [key], rights.SUPPRESSING)
    nhs_hit, la_hit, other = con.execute(
        f"SELECT {m.matches([rights.nhs_message_sql('$nhs')])}, {m.matches([rights.la_message_sql('$la', '$pid')])}, "
        f"{m.matches([rights.nhs_message_sql('$other')])}",
        {**m.params, "nhs": submitted, "la": f" {la} ", "pid": pad + person + pad,
         "other": str((int(digits) + 1) % 10**10).zfill(10)}).fetchall()[0]
    assert nhs_hit and la_hit and not other
