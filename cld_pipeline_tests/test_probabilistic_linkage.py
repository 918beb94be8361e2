"""Probabilistic linkage: planted pairs with each kind of noise are found, near-twins are not
joined, reviewers' decisions override the model, the model holds no identifier, and on a generated
collection processed end to end the links are precise against the generator's truth, reach the
analysts only as tokens, and a re-run (or a run killed mid-way) leaves the tables a clean run gives."""

from __future__ import annotations

import datetime as dt
import json
import random
import shutil
import stat

import duckdb
import pytest

from cld_pipeline.lib.linkage import probabilistic as pl
from cld_pipeline.lib.linkage.evaluation import evaluate
from cld_pipeline.lib.linkage.person_links import ensure_tables
from cld_pipeline.lib.linkage.review import ReviewError, record_decisions

from .conftest import PIPELINE_KEY, environment

AREAS = ("AB", "CD", "EF", "GH")
UNITS = "ABDEFGHJLNPQRSTUWXYZ"


def _postcode(rng: random.Random, area: str | None = None, district: int | None = None, sector: int | None = None) -> str:
    return (f"{area or rng.choice(AREAS)}{district if district is not None else rng.randint(1, 20)} "
            f"{sector if sector is not None else rng.randint(0, 9)}{rng.choice(UNITS)}{rng.choice(UNITS)}")


def _population(n_patients: int = 6000, n_labelled: int = 3000, seed: int = 5):
    """Patients, and council people with a recorded NHS number (half of them in hospital), as the
    training and held-out labels; 5% of the labelled people's records differ in one way."""
    rng = random.Random(seed)
    patients = []
    for i in range(n_patients):
        dob = dt.date(1925, 1, 1) + dt.timedelta(days=rng.randint(0, 80 * 365))
        patients.append([i + 1, f"{9990000000 + i}", dob, rng.choice(["male", "female"]), _postcode(rng)])
    people = []
    for j in range(n_labelled):
        if rng.random() < 0.5:
            _, nhs, dob, sex, postcode = patients[rng.randrange(n_patients)]
            moved = rng.random()
            if moved < 0.03:     # moved within the sector
                postcode = postcode[:-2] + rng.choice(UNITS) + rng.choice(UNITS)
            elif moved < 0.05:   # moved within the district
                outward, inward = postcode.split(" ")
                postcode = f"{outward} {(int(inward[0]) + 1) % 10}{inward[1:]}"
        else:   # not in hospital
            nhs, dob, sex, postcode = (f"{9980000000 + j}", dt.date(1925, 1, 1) + dt.timedelta(days=rng.randint(0, 80 * 365)),
                                       rng.choice(["male", "female"]), _postcode(rng))
        people.append([j + 1, dob, sex, postcode, "train" if j % 2 else "holdout", nhs])
    return rng, patients, people


def _load(con: duckdb.DuckDBPyConnection, patients, people) -> None:
    con.execute("CREATE OR REPLACE TABLE patients (record_id BIGINT, nhs_number VARCHAR, dob DATE, sex VARCHAR, "
                "postcode VARCHAR)")
    con.executemany("INSERT INTO patients VALUES (?, ?, ?, ?, ?)", patients)
    con.execute("CREATE OR REPLACE TABLE sc_people (record_id BIGINT, dob DATE, sex VARCHAR, postcode VARCHAR, "
                "role VARCHAR, nhs_number VARCHAR)")
    con.executemany("INSERT INTO sc_people VALUES (?, ?, ?, ?, ?, ?)", people)


def _planted(rng: random.Random, patients, people):
    """People to link (no NHS number) planted with each kind of noise, and near-twins: the same
    date of birth and district as a patient, a different person."""
    planted, twins = {}, {}
    base = 100_000
    candidates = [p for p in patients if p[2].day <= 12 and p[2].day != p[2].month]
    by_dob: dict = {}
    for p in patients:
        by_dob.setdefault(p[2], []).append(p)
    unique = [p for p in candidates if len(by_dob[p[2]]) == 1]
    kinds = ["exact", "day_month_swap", "digit_error", "sex_unrecorded", "moved_in_sector", "moved_in_district"]
    for n, kind in enumerate(kinds * 3):
        record_id, nhs, dob, sex, postcode = unique[n]
        outward, inward = postcode.split(" ")
        if kind == "day_month_swap":
            dob = dt.date(dob.year, dob.day, dob.month)
        elif kind == "digit_error":
            dob = dob.replace(year=dob.year - dob.year % 10 + (dob.year % 10 + 1) % 10)
        elif kind == "sex_unrecorded":
            sex = None
        elif kind == "moved_in_sector":
            postcode = f"{outward} {inward[0]}{'ZZ' if inward[1:] != 'ZZ' else 'YY'}"
        elif kind == "moved_in_district":
            postcode = f"{outward} {(int(inward[0]) + 1) % 10}{inward[1:]}"
        planted[base + n] = (record_id, kind)
        people.append([base + n, dob, sex, postcode, "unlabelled", None])
    # Near-twins: a second patient born the same day, of the same sex, in the same district (another
    # sector). The council's record of the first must link to the first, not the twin; a council
    # person of the other sex with that birth date and district, who is neither, joins nobody.
    for n, (record_id, nhs, dob, sex, postcode) in enumerate(unique[40:52]):
        outward, inward = postcode.split(" ")
        twin_id = len(patients) + 1
        patients.append([twin_id, f"{9970000000 + n}", dob, sex,
                         f"{outward} {(int(inward[0]) + 5) % 10}{rng.choice(UNITS)}{rng.choice(UNITS)}"])
        twins[base + 500 + n] = (record_id, twin_id)
        people.append([base + 500 + n, dob, sex, postcode, "unlabelled", None])
        other_sex = "female" if sex == "male" else "male"
        twins[base + 600 + n] = (None, twin_id)
        people.append([base + 600 + n, dob, other_sex, f"{outward} {(int(inward[0]) + 3) % 10}ZZ", "unlabelled", None])
    # Moved to another district of the area: the model alone cannot tell (clerical review can).
    record_id, nhs, dob, sex, postcode = unique[60]
    outward, inward = postcode.split(" ")
    far = {base + 700: record_id}
    people.append([base + 700, dob, sex, f"{outward[:2]}{int(outward[2:]) % 20 + 1} {inward}", "unlabelled", None])
    return planted, twins, far


@pytest.fixture(scope="module")
def fitted():
    rng, patients, people = _population()
    planted, twins, far = _planted(rng, patients, people)
    con = duckdb.connect()
    _load(con, patients, people)
    model = pl.train(con)
    pl.link(con, model)
    links = {sc: (patient, decision) for sc, patient, decision in con.execute(
        "SELECT sc_record_id, patient_record_id, decision FROM links").fetchall()}
    return con, model, links, planted, twins, patients, far


def test_planted_pairs_with_each_kind_of_noise_are_found(fitted):
    _, model, links, planted, _, _, _ = fitted
    missed = {kind: sc for sc, (patient, kind) in planted.items() if links.get(sc) != (patient, "linked")}
    assert not missed, missed
    assert model.metrics["holdout_precision"] >= pl.TARGET_PRECISION
    assert model.metrics["holdout_recall"] >= 0.95
    assert model.threshold in pl.CANDIDATE_THRESHOLDS


def test_near_twins_same_birth_date_and_district_are_not_joined(fitted):
    _, _, links, _, twins, _, _ = fitted
    for sc, (person, twin) in twins.items():
        patient, decision = links.get(sc, (None, None))
        if person is not None:
            assert (patient, decision) == (person, "linked"), "the right one of two twins"
        else:
            assert decision != "linked", "a near-twin of the other sex joins nobody"


def test_the_model_json_holds_no_date_of_birth_postcode_or_nhs_number(fitted):
    _, model, _, _, _, patients, _ = fitted
    text = model.to_json()
    assert not [p for p in patients if p[1] in text or str(p[2]) in text or p[4] in text]
    from cld_pipeline.lib.privacy.identifiers import IDENTIFIER_SHAPED
    assert not IDENTIFIER_SHAPED.search(text)
    assert json.loads(text)["splink"]["link_type"] == "link_only"


def test_reviewers_decisions_override_the_model(fitted):
    con, model, links, planted, _, _, far = fitted
    linked_sc = next(iter(planted))
    # the far mover: scored, not linked by the model (a queued pair is always a scored one)
    twin_sc, twin_patient = next(iter(far.items()))
    assert links.get(twin_sc, (None, None))[1] != "linked"
    con.execute("CREATE OR REPLACE TEMP TABLE review_labels (sc_record_id BIGINT, patient_record_id BIGINT, "
                "is_match BOOLEAN)")
    con.execute("INSERT INTO review_labels VALUES (?, ?, false), (?, ?, true)",
                [linked_sc, links[linked_sc][0], twin_sc, twin_patient])
    try:
        pl.link(con, model)
        after = {sc: (patient, decision) for sc, patient, decision in con.execute(
            "SELECT sc_record_id, patient_record_id, decision FROM links").fetchall()}
        assert after.get(linked_sc, (None, None)) != (links[linked_sc][0], "linked"), "a rejected pair never links"
        assert after[twin_sc] == (twin_patient, "linked"), "a confirmed pair always links"
    finally:
        con.execute("DELETE FROM review_labels")
        pl.link(con, model)


def test_recording_a_review_names_row_and_field_and_never_the_value(tmp_path):
    con = duckdb.connect()
    ensure_tables(con)
    con.execute("INSERT INTO linkage.review_queue (quarter, pair_id, reason, la_code, la_person_id, nhs_number) "
                "VALUES ('2026-Q3', 'p1', 'near_threshold', '101', 'A1', '9990000001')")
    bad = tmp_path / "review.csv"
    bad.write_text("pair_id,decision\np1,match\np2,maybe-9990000001\n", encoding="utf-8")
    with pytest.raises(ReviewError) as err:
        record_decisions(con, bad, "reviewer")
    assert "row 3, field decision" in str(err.value) and "9990000001" not in str(err.value)
    assert con.execute("SELECT count(*) FROM linkage.review_decisions").fetchall()[0][0] == 0, "all or nothing"
    good = tmp_path / "review_ok.csv"
    good.write_text("pair_id,decision\np1,non_match\n", encoding="utf-8")
    assert record_decisions(con, good, "reviewer") == {"match": 0, "non_match": 1, "undecided": 0}
    assert con.execute("SELECT la_code, la_person_id, nhs_number, is_match, reviewer FROM linkage.review_decisions"
                       ).fetchall() == [("101", "A1", "9990000001", False, "reviewer")]


# --- end to end, on the shared processed collection ------------------------------------------------

def test_links_are_precise_against_the_truth_and_reach_analysts_only_as_tokens(pseudonymised_pipeline):
    data_dir, _, _, summary = pseudonymised_pipeline
    ident = duckdb.connect(str(data_dir / "identifiable.duckdb"), read_only=True)
    for quarter in ("2026-Q2", "2026-Q3"):
        result = evaluate(ident, data_dir / "synthetic" / "truth_people.parquet", quarter)["total"]
        assert result["findable"] >= 50, result
        assert result["precision"] >= 0.995 and result["recall"] >= 0.9, (quarter, result)
    model_file = data_dir / "linkage" / "models" / "2026-Q3.json"
    assert stat.S_IMODE(model_file.stat().st_mode) == 0o600
    ident.execute(f"ATTACH '{data_dir / 'analytics.duckdb'}' AS a (READ_ONLY)")
    methods = dict(ident.execute("SELECT link_method, count(*) FROM a.pseudonymised.events GROUP BY ALL").fetchall())
    assert set(methods) == {"nhs_number", "probabilistic", "none"}, methods
    assert ident.execute("""SELECT count(*) FROM a.pseudonymised.events WHERE (link_method = 'probabilistic')
                            <> (match_probability IS NOT NULL)""").fetchall()[0][0] == 0
    # A probabilistic row carries the hospital patient's token, and the pipeline's own token function agrees.
    from cld_pipeline.lib.privacy.pseudonymise import PseudoKey, parse_key, token
    key = PseudoKey(parse_key(PIPELINE_KEY))
    rows = ident.execute("""
        SELECT e.person_id, l.nhs_number FROM a.pseudonymised.events e
        JOIN validated.events v ON v.submission_id = e.submission_id AND v.row_number = e.row_number
        JOIN raw.submissions s ON s.submission_id = e.submission_id
        JOIN linkage.person_links l ON l.quarter = e.quarter AND l.la_code = s.la_code
             AND l.la_person_id = trim(v.la_person_unique_identifier)
        WHERE e.link_method = 'probabilistic' LIMIT 200""").fetchall()
    assert rows and all(person == token(key, "nhs:" + nhs) for person, nhs in rows)
    rates = ident.execute("SELECT sum(people_linked_probabilistic), sum(people_without_nhs_number) "
                          "FROM a.linked.match_rates WHERE quarter = '2026-Q3'").fetchall()[0]
    assert 0 < rates[0] <= rates[1]
    bias = ident.execute("SELECT breakdown, count(*) FROM a.linked.linkage_bias WHERE quarter = '2026-Q3' "
                         "AND geography = 'England' GROUP BY ALL").fetchall()
    assert {b for b, _ in bias} == {"total", "age_band", "sex", "ethnicity_group"}
    assert ident.execute("SELECT count(DISTINCT link_method) FROM a.linked.person_spells").fetchall()[0][0] >= 2
    tables = {r[0] for r in ident.execute("SELECT table_schema FROM information_schema.tables "
                                          "WHERE table_catalog = 'a'").fetchall()}
    assert "linkage" not in tables, "the review queue and links stay in the processor zone"
    ident.close()


def _fingerprint(data_dir) -> tuple:
    con = duckdb.connect(str(data_dir / "analytics.duckdb"), read_only=True)
    con.execute(f"ATTACH '{data_dir / 'identifiable.duckdb'}' AS i (READ_ONLY)")
    out = (
        con.execute("SELECT submission_id, row_number, person_id, link_method, round(match_probability, 6) "
                    "FROM pseudonymised.events ORDER BY ALL").fetchall(),
        con.execute("SELECT quarter, la_code, la_person_id, nhs_number, link_method, round(match_probability, 6) "
                    "FROM i.linkage.person_links ORDER BY ALL").fetchall(),
        con.execute("SELECT * EXCLUDE (match_rate) FROM linked.match_rates ORDER BY ALL").fetchall(),
    )
    con.close()
    return out


def test_a_rerun_and_a_run_killed_midway_leave_the_tables_of_a_clean_run(pseudonymised_pipeline, monkeypatch,
                                                                          tmp_path):
    from cld_pipeline.commands.run import prepare_instance
    from cld_pipeline.definitions import defs as load_defs
    from cld_pipeline.lib.linkage import step

    data_dir = tmp_path / "data"    # a copy: the shared collection stays as it was
    shutil.copytree(pseudonymised_pipeline[0], data_dir, ignore=shutil.ignore_patterns("*.lock"))
    before = _fingerprint(data_dir)
    with environment(CLD_DATA_DIR=str(data_dir), DAGSTER_HOME=str(data_dir / "dagster_home"),
                     CLD_PSEUDO_KEY=PIPELINE_KEY, CLD_ENVIRONMENT="production"):
        instance = prepare_instance()
        job = load_defs().resolve_job_def("linked_quarter_job")
        real = step.apply_to_analysts_zone

        def killed(con, scratch, quarter):
            # the processor zone has committed, the analysts' zone is half re-keyed, then the process dies
            con.execute("UPDATE pseudonymised.events SET person_id = 'stale', link_method = 'none' "
                        "WHERE quarter = ? AND link_method = 'probabilistic'", [quarter])
            raise RuntimeError("killed")

        monkeypatch.setattr(step, "apply_to_analysts_zone", killed)
        assert not job.execute_in_process(instance=instance, partition_key="2026-Q3", raise_on_error=False).success
        monkeypatch.setattr(step, "apply_to_analysts_zone", real)
        assert job.execute_in_process(instance=instance, partition_key="2026-Q3", raise_on_error=False).success
    assert _fingerprint(data_dir) == before


def test_confirmed_review_pairs_are_labels_for_the_next_model():
    rng, patients, people = _population(n_patients=3000, n_labelled=1600, seed=9)
    _, _, far = _planted(rng, patients, people)
    con = duckdb.connect()
    _load(con, patients, people)
    sc, patient = next(iter(far.items()))
    con.execute("CREATE TEMP TABLE review_labels (sc_record_id BIGINT, patient_record_id BIGINT, is_match BOOLEAN)")
    con.execute("INSERT INTO review_labels VALUES (?, ?, true)", [sc, patient])
    model = pl.train(con)
    pl.link(con, model)
    assert con.execute("SELECT patient_record_id, decision, match_probability FROM links WHERE sc_record_id = ?",
                       [sc]).fetchall() == [(patient, "linked", 1.0)]


def test_the_review_sample_and_the_model_reveal_nobody_outside_the_processor_zone(pseudonymised_pipeline):
    """The identifier scan, extended to the linkage: the review queue's dates of birth, postcodes,
    NHS numbers and LA person ids are nowhere in the analysts' zone, Dagster's storage (event log,
    metadata, compute logs) or the reports; the model files hold no identifier of anybody."""
    from .conftest import occurrences

    data_dir = pseudonymised_pipeline[0]
    ident = duckdb.connect(str(data_dir / "identifiable.duckdb"), read_only=True)
    queued = ident.execute("""SELECT nhs_number, la_person_id, council_dob, hospital_dob, council_postcode,
                                     hospital_postcode FROM linkage.review_queue""").fetchall()
    assert queued, "the tiny collection queues pairs for review"
    wanted = set()
    for nhs, pid, council_dob, hospital_dob, council_pc, hospital_pc in queued:
        wanted |= {nhs, pid, council_pc, hospital_pc}
        for day in (council_dob, hospital_dob):
            wanted |= {day.isoformat(), day.strftime("%d/%m/%Y")}
    wanted = {w for w in wanted if w and len(w) >= 6}
    everybody = {d.isoformat() for (d,) in ident.execute(
        "SELECT DISTINCT date_of_birth FROM validated.hospital_episodes WHERE date_of_birth IS NOT NULL "
        "UNION SELECT DISTINCT date_of_birth FROM validated.events WHERE date_of_birth IS NOT NULL").fetchall()}
    everybody |= {n for (n,) in ident.execute("SELECT DISTINCT nhs_number FROM validated.hospital_episodes "
                                              "WHERE nhs_number IS NOT NULL").fetchall()}
    ident.close()
    with duckdb.connect(str(data_dir / "analytics.duckdb"), read_only=True) as con:
        cells = set()
        for schema, table, column in con.execute("SELECT table_schema, table_name, column_name FROM "
                                                 "information_schema.columns WHERE table_catalog = current_database()"
                                                 ).fetchall():
            cells |= {v for (v,) in con.execute(f'SELECT DISTINCT CAST("{column}" AS VARCHAR) FROM '
                                                f'"{schema}"."{table}"').fetchall() if v}
    assert not wanted & cells
    files = [p for root in (data_dir / "dagster_home", data_dir / "reports") for p in root.rglob("*") if p.is_file()]
    leaked = occurrences({w for w in wanted if not (w.isdigit() and len(w) < 10)}, [p.read_bytes() for p in files])
    assert not leaked
    models = list((data_dir / "linkage" / "models").glob("*.json"))
    assert models and not occurrences(everybody, [p.read_text(encoding="utf-8") for p in models])


def test_erasure_removes_a_pair_from_review_files_already_exported(tmp_path, monkeypatch):
    from cld_pipeline.lib.linkage import review

    monkeypatch.setenv("CLD_DATA_DIR", str(tmp_path))
    con = duckdb.connect()
    ensure_tables(con)
    con.execute("""INSERT INTO linkage.review_queue (quarter, pair_id, reason, la_code, la_person_id, nhs_number)
                   VALUES ('2026-Q3', 'p1', 'near_threshold', '101', 'A1', '9990000001'),
                          ('2026-Q3', 'p2', 'near_threshold', '101', 'A2', '9990000002')""")
    path = review.default_path("2026-Q3")
    assert review.export_queue(con, "2026-Q3", path) == 2
    (path.parent / "notes.txt").write_text("not a review file")
    assert review.scrub_exports({"p1"}) == 1
    with path.open() as fh:
        assert [line.split(",")[0] for line in fh.read().splitlines()] == ["pair_id", "p2"]
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert review.scrub_exports({"p1"}) == 0 and review.scrub_exports(set()) == 0
    assert not list(path.parent.glob(".*partial"))


def test_a_store_pseudonymised_before_the_linkage_takes_resubmissions(pseudonymised_pipeline, tmp_path):
    """A database whose superseded rows (events_history) predate the linkage's columns: re-processing
    a partition moves rows into history without failing, and history gains the columns."""
    from cld_pipeline.commands.run import BATCH_ASSETS, prepare_instance
    from cld_pipeline.definitions import defs as load_defs
    from cld_pipeline.defs.partitions import submission_partition_key

    data_dir = tmp_path / "data"
    shutil.copytree(pseudonymised_pipeline[0], data_dir, ignore=shutil.ignore_patterns("*.lock"))
    with duckdb.connect(str(data_dir / "analytics.duckdb")) as con:
        con.execute("ALTER TABLE pseudonymised.events_history DROP COLUMN link_method")
        con.execute("ALTER TABLE pseudonymised.events_history DROP COLUMN match_probability")
        la, quarter = con.execute("SELECT la_code, quarter FROM pseudonymised.submissions ORDER BY ALL LIMIT 1"
                                  ).fetchall()[0]
    with environment(CLD_DATA_DIR=str(data_dir), DAGSTER_HOME=str(data_dir / "dagster_home"),
                     CLD_PSEUDO_KEY=PIPELINE_KEY, CLD_ENVIRONMENT="production"):
        instance = prepare_instance()
        result = load_defs().resolve_job_def("ingest_submission_job").execute_in_process(
            instance=instance, asset_selection=BATCH_ASSETS, raise_on_error=False,
            partition_key=str(submission_partition_key(la, quarter)))
        instance.dispose()
    assert result.success
    with duckdb.connect(str(data_dir / "analytics.duckdb"), read_only=True) as con:
        columns = {r[0] for r in con.execute("DESCRIBE pseudonymised.events_history").fetchall()}
    assert {"link_method", "match_probability"} <= columns


def test_a_retrained_model_on_the_same_people_is_the_same_to_the_last_bit(fitted):
    """A re-run (after a kill, or a second `cld-pipeline run`) trains again on two threads: the
    model's JSON, and so its id, and every link's probability must not move in their last bits.
    (The linkage step stores its inputs in record-id order; here, in the order they were loaded.)"""
    con, model, *_ = fitted
    first = con.execute("SELECT * FROM links ORDER BY ALL").fetchall()
    again = duckdb.connect(config={"threads": 2})
    for table in ("patients", "sc_people"):
        rows = con.sql(f"SELECT * FROM {table}").to_arrow_table()   # in stored order
        again.register("rows", rows)
        again.execute(f"CREATE TABLE {table} AS SELECT * FROM rows")
        again.unregister("rows")
    retrained = pl.train(again)
    pl.link(again, retrained)
    assert retrained.to_json() == model.to_json()
    assert again.execute("SELECT * FROM links ORDER BY ALL").fetchall() == first
