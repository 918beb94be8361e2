"""Health-linked layer: hospital extract ingestion, deterministic linkage against the generator's
truth, each linked metric at its window boundaries, and the analysts' ad hoc cohort asset."""

from __future__ import annotations

import datetime as dt
import os
from pathlib import Path

import dagster as dg
import duckdb
import pytest

from cld_pipeline.defs.health.sensors import hospital_sensor, plan_hospital
from cld_pipeline.defs.linked.adhoc import cohort_linkage
from cld_pipeline.defs.linked.assets import EPISODE_COLUMNS, build_linked_tables, quarter_period
from cld_pipeline.defs.resources import LockedDuckDBResource
from cld_pipeline.lib.linkage.tables import _values
from cld_pipeline.spec import load_spec

from .conftest import environment

QUARTER = "2026-Q1"          # period 2025-04-01 .. 2026-03-31
D = dt.date(2025, 9, 1)      # a discharge day well inside it


# --- generated data whose true links are known ----------------------------------------------------

def _truth_pairs(data_dir: Path, quarter: str):
    """(linked pairs, true pairs, per-LA true people/linked) for one quarter, tokens mapped to the
    generator's person through the processor zone (validated rows -> LA person id -> truth)."""
    synthetic = data_dir / "synthetic"
    start, end = quarter_period(quarter)
    ident = duckdb.connect(str(data_dir / "identifiable.duckdb"), read_only=True)
    ident.execute(f"ATTACH '{data_dir / 'analytics.duckdb'}' AS a (READ_ONLY)")
    ident.execute(f"""CREATE TEMP TABLE row_person AS
        SELECT p.person_id AS token, p.person_id_source, p.link_method, p.la_code, t.person
        FROM validated.events v JOIN raw.submissions s USING (submission_id)
        JOIN a.pseudonymised.events p ON p.submission_id = v.submission_id AND p.row_number = v.row_number
        JOIN read_parquet('{synthetic / 'truth_people.parquet'}') t
          ON t.la_code = s.la_code AND t.la_person_id = v.la_person_unique_identifier
        WHERE p.quarter = '{quarter}'""")
    ident.execute(f"""CREATE TEMP TABLE held_spells AS
        WITH latest AS (SELECT * FROM validated.hospital_episodes QUALIFY row_number() OVER (
                            PARTITION BY spell_id ORDER BY quarter DESC, last_episode_in_spell DESC) = 1)
        SELECT DISTINCT h.spell_id, t.person FROM latest h
        JOIN read_parquet('{synthetic / 'truth_spells.parquet'}') t USING (spell_id)
        WHERE h.admission_date <= DATE '{end}' AND coalesce(h.discharge_date, DATE '{end}') >= DATE '{start}'""")
    ambiguous = ident.execute("SELECT count(*) FROM (SELECT token FROM row_person GROUP BY token "
                              "HAVING count(DISTINCT person) > 1)").fetchall()[0][0]
    assert ambiguous == 0, "a token never stands for two people"
    # Deterministic links only (the probabilistic ones have their own tests against the truth).
    linked = set(ident.execute("SELECT DISTINCT l.person_id, l.spell_id, r.person, s.person FROM "
                               "a.linked.person_spells l JOIN (SELECT DISTINCT token, person FROM row_person) r "
                               "ON r.token = l.person_id JOIN held_spells s USING (spell_id) "
                               f"WHERE l.quarter = '{quarter}' AND l.link_method = 'nhs_number'").fetchall())
    true_pairs = set(ident.execute("SELECT DISTINCT r.token, s.spell_id FROM row_person r JOIN held_spells s "
                                   "USING (person) WHERE r.link_method = 'nhs_number'").fetchall())
    per_la = {la: (people, linked_people) for la, people, linked_people in ident.execute("""
        SELECT la_code, count(DISTINCT token),
               count(DISTINCT token) FILTER (WHERE link_method <> 'none'
                                             AND person IN (SELECT person FROM held_spells))
        FROM row_person GROUP BY la_code""").fetchall()}
    rates = {la: (people, linked_people, rate) for la, people, linked_people, rate in ident.execute(
        f"SELECT la_code, people, people_linked, match_rate FROM a.linked.match_rates WHERE quarter = '{quarter}'"
    ).fetchall()}
    ident.close()
    return linked, true_pairs, per_la, rates


def test_deterministic_linkage_is_exact_and_match_rates_are_the_truth(pseudonymised_pipeline):
    data_dir, _, _, summary = pseudonymised_pipeline
    assert summary.linked, "cld-pipeline run rebuilt the linked tables"
    for quarter in ("2026-Q2", "2026-Q3"):
        linked, true_pairs, per_la, rates = _truth_pairs(data_dir, quarter)
        assert len(true_pairs) > 500
        precision = sum(token_person == spell_person for _, _, token_person, spell_person in linked) / len(linked)
        linked_pairs = {(token, spell) for token, spell, _, _ in linked}
        recall = len(true_pairs & linked_pairs) / len(true_pairs)
        assert precision == 1.0 and recall == 1.0, (quarter, precision, recall)
        assert per_la.keys() == rates.keys()
        for la, (people, people_linked) in per_la.items():
            assert rates[la][:2] == (people, people_linked), la
            assert rates[la][2] == pytest.approx(people_linked / people)


def test_hospital_extracts_land_with_row_conservation_and_no_identifiers(pseudonymised_pipeline):
    data_dir, _, hospital, _ = pseudonymised_pipeline
    with duckdb.connect(str(data_dir / "identifiable.duckdb"), read_only=True) as con:
        received = con.execute("SELECT sum(row_count) FROM raw.hospital_extracts WHERE status = 'accepted'"
                               ).fetchall()[0][0]
        accepted = con.execute("SELECT count(*) FROM validated.hospital_episodes").fetchall()[0][0]
        rejected = con.execute("SELECT count(DISTINCT (extract_id, row_number)) FROM validated.hospital_rejections"
                               ).fetchall()[0][0]
    assert received == len(hospital) == accepted + rejected
    with duckdb.connect(str(data_dir / "analytics.duckdb"), read_only=True) as con:
        columns = {c for (c,) in con.execute("SELECT column_name FROM information_schema.columns WHERE "
                                             "table_name = 'hospital_episodes'").fetchall()}
        assert con.execute("SELECT count(*) FROM pseudonymised.hospital_episodes").fetchall()[0][0] == accepted
    assert not columns & {"nhs_number", "date_of_birth", "postcode"}
    assert {"person_id", "birth_year", "postcode_district", "spell_id"} <= columns
    assert not list((data_dir / "landing" / "health").glob("*.csv")), "landed extracts leave the inbox"


# --- validation of a hand-made extract ------------------------------------------------------------

HEADER = [f.name for f in load_spec().hospital_fields]


def _extract(path: Path, rows: list[dict]) -> Path:
    import csv
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=HEADER)
        writer.writeheader()
        writer.writerows(rows)
    return path


GOOD = {"NHS_Number": "9434765919", "Date_of_Birth": "1940-05-17", "Sex": "2", "Postcode": "LS1 4AP",
        "Spell_ID": "X1", "Last_Episode_In_Spell": "1", "Admission_Date": "2026-01-02",
        "Discharge_Date": "2026-01-09", "Discharge_Ready_Date": "2026-01-08", "Admission_Method": "21",
        "Discharge_Method": "1", "Discharge_Destination": "19", "Management_Type": "EM",
        "Treatment_Function_Code": "300"}


def test_hospital_rules_reject_with_reasons_and_the_sensor_partitions_by_name(tmp_path):
    rows = [GOOD,
            {**GOOD, "Spell_ID": "X2", "NHS_Number": "9434765918"},                   # check digit
            {**GOOD, "Spell_ID": "X3", "Discharge_Date": "2025-12-30"},               # before admission
            {**GOOD, "Spell_ID": "X4", "Admission_Method": "77", "Sex": ""},          # code list, mandatory
            {**GOOD, "Spell_ID": "X5", "Admission_Date": "31/02/2026"},               # not a date
            {**GOOD, "Spell_ID": "X6", "Discharge_Ready_Date": "2026-01-20"}]         # flag only
    landing = tmp_path / "landing" / "health"
    _extract(landing / "hospital_extract_2026-Q1.csv", rows)
    (landing / "extract_without_quarter.csv").write_text(",".join(HEADER) + "\n", encoding="utf-8")
    old = 1_600_000_000
    for p in landing.iterdir():
        os.utime(p, (old, old))
    with environment(CLD_DATA_DIR=str(tmp_path), DAGSTER_HOME=str(tmp_path / "dh")):
        requests, quarters, cursor, _ = plan_hospital(None)
        assert quarters == {"2026-Q1"}
        by_job = {r.job_name: r for r in requests}
        assert by_job["ingest_hospital_job"].partition_key == "2026-Q1"
        assert "quarantine_hospital_job" in by_job
        assert plan_hospital(cursor)[0] == [], "an arrival is requested once"
        instance = dg.DagsterInstance.ephemeral()
        result = hospital_sensor(dg.build_sensor_context(instance=instance))
        assert len(result.run_requests) == 2 and result.dynamic_partitions_requests

        from cld_pipeline.definitions import defs
        d = defs()
        instance.add_dynamic_partitions("hospital_quarter", ["2026-Q1"])
        job = d.resolve_job_def("ingest_hospital_job")
        run = job.execute_in_process(run_config=by_job["ingest_hospital_job"].run_config, instance=instance,
                                     partition_key="2026-Q1")
        assert run.success
        refused = d.resolve_job_def("quarantine_hospital_job").execute_in_process(
            run_config=by_job["quarantine_hospital_job"].run_config, instance=instance, raise_on_error=False)
        assert not refused.success
    assert (tmp_path / "quarantine" / "health" / "extract_without_quarter.csv.error.json").exists()
    with duckdb.connect(str(tmp_path / "identifiable.duckdb"), read_only=True) as con:
        rejections = set(con.execute("SELECT row_number, field, rule FROM validated.hospital_rejections").fetchall())
        flags = set(con.execute("SELECT row_number, rule FROM validated.hospital_dq_flags").fetchall())
        accepted = [r for (r,) in con.execute("SELECT row_number FROM validated.hospital_episodes ORDER BY 1").fetchall()]
    assert rejections == {(2, "NHS_Number", "invalid_nhs_number"), (3, "Discharge_Date", "discharge_before_admission"),
                          (4, "Admission_Method", "not_in_code_list"), (4, "Sex", "mandatory_blank"),
                          (5, "Admission_Date", "invalid_date")}
    assert flags == {(3, "ready_outside_spell"), (6, "ready_outside_spell")}
    assert accepted == [1, 6]


# --- each linked metric at its window boundaries --------------------------------------------------

SERVICE = "Service"


def _care_and_episodes(con, care: list[dict], spells: list[dict]) -> None:
    cols = {"submission_id": "VARCHAR", "row_number": "BIGINT", "la_code": "VARCHAR", "quarter": "VARCHAR",
            "person_id": "VARCHAR", "person_id_source": "VARCHAR", "event_type_cleaned": "VARCHAR",
            "event_start_date": "DATE", "event_end_date": "DATE", "service_type_cleaned": "VARCHAR",
            "service_component_cleaned": "VARCHAR", "client_type_cleaned": "VARCHAR", "date_of_death": "DATE",
            "age_band": "VARCHAR", "ethnicity_cleaned": "VARCHAR", "gender_cleaned": "VARCHAR",
            "link_method": "VARCHAR", "match_probability": "DOUBLE"}   # link_method NULL: from person_id_source
    con.execute(f"CREATE TABLE care_in ({', '.join(f'{c} {t}' for c, t in cols.items())})")
    for i, row in enumerate(care, start=1):
        full = {"submission_id": "s1", "row_number": i, "la_code": "999", "quarter": QUARTER,
                "person_id_source": "nhs", "event_type_cleaned": SERVICE,
                "client_type_cleaned": _values("client_type", ("service_user",)).strip("'"),
                "age_band": "75 to 84", **row}
        con.execute(f"INSERT INTO care_in BY NAME SELECT {', '.join('?::' + cols[c] + ' AS ' + c for c in full)}",
                    list(full.values()))
    ecols = EPISODE_COLUMNS   # the columns the linkage reads, as the asset declares them
    con.execute(f"CREATE TABLE episodes_in ({', '.join(f'{c} {t}' for c, t in ecols.items())})")
    for i, row in enumerate(spells, start=1):
        full = {"extract_quarter": QUARTER, "row_number": i, "spell_id": f"H{i}", "last_episode_in_spell": 1,
                "admission_method": "21", "discharge_method": "1", "discharge_destination": "19",
                "management_type": "EL", "treatment_function_code": "300", "age_at_admission": 80,
                "age_at_discharge": 80, **row}
        con.execute(f"INSERT INTO episodes_in BY NAME SELECT {', '.join('?::' + ecols[c] + ' AS ' + c for c in full)}",
                    list(full.values()))


def _service(person: str, start: dt.date, key: str = "lts_community", **extra) -> dict:
    return {"person_id": person, "event_start_date": start,
            "service_type_cleaned": _values("service_type", (key,)).strip("'"), **extra}


def _discharge(person: str, day: dt.date, **extra) -> dict:
    return {"person_id": person, "admission_date": day - dt.timedelta(days=5), "discharge_date": day,
            "discharge_ready_date": day - dt.timedelta(days=2), **extra}


def _build(care, spells) -> duckdb.DuckDBPyConnection:
    con = duckdb.connect()
    _care_and_episodes(con, care, spells)
    build_linked_tables(con, QUARTER, care_source="care_in", episodes_source="episodes_in")
    return con


def test_discharge_to_care_windows_at_day_7_and_day_28():
    offsets = {"a": 7, "b": 8, "c": 28, "d": 29, "e": -7, "f": -8}
    care = [_service(p, D + dt.timedelta(days=n)) for p, n in offsets.items()]
    con = _build(care, [_discharge(p, D) for p in offsets])
    got = {p: (days, w7, w28) for p, days, w7, w28 in con.execute(
        "SELECT person_id, days_to_service, within_7_days, within_28_days FROM discharge_to_care").fetchall()}
    assert got == {"a": (7, True, True), "b": (8, False, True), "c": (28, False, True), "d": (29, False, False),
                   "e": (-7, True, True), "f": (None, False, False)}
    ready = con.execute("SELECT days_from_ready_to_service FROM discharge_to_care WHERE person_id = 'a'").fetchall()
    assert ready == [(9,)]


def test_reablement_outcomes_at_day_84():
    st_max = dict(service_component_cleaned=_values("service_component", ("reablement",)).strip("'"))
    people = ["readmit84", "readmit85", "died84", "died85", "care84", "clean"]
    care = [_service(p, D + dt.timedelta(days=1), "st_max", event_end_date=D + dt.timedelta(days=30), **st_max)
            for p in people]
    care.append(_service("care84", D + dt.timedelta(days=84), "lts_residential"))
    care[people.index("died84")]["date_of_death"] = D + dt.timedelta(days=84)
    care[people.index("died85")]["date_of_death"] = D + dt.timedelta(days=85)
    spells = [_discharge(p, D) for p in people]
    spells += [{"person_id": "readmit84", "admission_date": D + dt.timedelta(days=84), "discharge_date": None,
                "management_type": "EM"},
               {"person_id": "readmit85", "admission_date": D + dt.timedelta(days=85), "discharge_date": None,
                "management_type": "EM"}]
    con = _build(care, spells)
    got = {p: (died, readmitted, care_home) for p, died, readmitted, care_home in con.execute(
        "SELECT person_id, died, readmitted, entered_long_term_care FROM reablement_outcomes").fetchall()}
    assert got == {"readmit84": (False, True, False), "readmit85": (False, False, False),
                   "died84": (True, False, False), "died85": (False, False, False),
                   "care84": (False, False, True), "clean": (False, False, False)}
    part1 = con.execute("SELECT numerator, denominator, value FROM ascof_2d WHERE measure = '2D-1'").fetchall()
    assert part1 == [(3, 6, 50.0)]


def test_reablement_links_within_minus_7_to_plus_3_days_and_clusters_merge_within_7_days():
    st_max = dict(service_component_cleaned=_values("service_component", ("reablement",)).strip("'"))
    start = D + dt.timedelta(days=1)
    care = [_service("p", start, "st_max", event_end_date=start + dt.timedelta(days=10), **st_max),
            _service("p", start + dt.timedelta(days=17), "st_max", event_end_date=start + dt.timedelta(days=30), **st_max)]
    # cluster start relative to the discharge D: the discharge must fall in [start - 7, start + 3]
    for person, days in {"y": -3, "w": -4, "z": 7, "q": 8}.items():
        care.append(_service(person, D + dt.timedelta(days=days), "st_max", **st_max))
    spells = [_discharge("p", D - dt.timedelta(days=3)), _discharge("p", D)]
    spells += [_discharge(person, D, admission_date=D - dt.timedelta(days=10)) for person in "ywzq"]
    con = _build(care, spells)
    rows = con.execute("SELECT person_id, discharge_date FROM reablement_outcomes ORDER BY 1").fetchall()
    assert rows == [("p", D), ("y", D), ("z", D)], "the latest discharge wins; w and q fall outside the window"
    clusters = con.execute("SELECT services FROM reablement_outcomes WHERE person_id = 'p'").fetchall()
    assert clusters == [(2,)], "a gap of exactly 7 days still merges the two services"


def test_emergency_readmission_windows_at_day_30_and_day_91():
    start = D
    offsets = {"r30": 30, "r31": 31, "r91": 91, "r92": 92, "same_day": 0}
    care = [_service(p, start) for p in offsets]
    spells = [{"person_id": p, "admission_date": start + dt.timedelta(days=n), "discharge_date": None,
               "management_type": "EM"} for p, n in offsets.items()]
    spells.append({"person_id": "r92", "admission_date": start + dt.timedelta(days=10), "discharge_date": None,
                   "management_type": "EL"})   # planned: not a readmission
    con = _build(care, spells)
    got = {p: (w30, w91) for p, w30, w91 in con.execute(
        "SELECT person_id, readmitted_within_30_days, readmitted_within_91_days FROM readmissions").fetchall()}
    assert got == {"r30": (True, True), "r31": (False, True), "r91": (False, True), "r92": (False, False),
                   "same_day": (False, False)}


# --- the analysts' ad hoc cohort -------------------------------------------------------------------

def test_ad_hoc_cohort_produces_the_table_its_config_asks_for(pseudonymised_pipeline):
    data_dir, _, _, _ = pseudonymised_pipeline
    analytics = str(data_dir / "analytics.duckdb")
    with duckdb.connect(analytics, read_only=True) as con:
        la = con.execute("SELECT la_code FROM pseudonymised.events WHERE quarter = '2026-Q3' GROUP BY 1 "
                         "ORDER BY count(*) DESC LIMIT 1").fetchall()[0][0]
    st_max = _values("service_type", ("st_max",)).strip("'")
    config = {"table_name": "stmax_older_people", "quarter": "2026-Q3", "la_codes": [la],
              "age_bands": ["75 to 84", "85 to 94"], "service_types": [st_max], "start_date": "2026-01-01",
              "end_date": "2026-06-30", "discharge_lookback_days": 14, "follow_up_days": 60}
    with environment(CLD_DATA_DIR=str(data_dir)):
        result = dg.materialize([cohort_linkage], resources={"analytics_db": LockedDuckDBResource(database=analytics)},
                                run_config={"ops": {"analyst__cohort_linkage": {"config": config}}})
    assert result.success
    metadata = result.asset_materializations_for_node("analyst__cohort_linkage")[0].metadata
    assert metadata["config"].value == config and metadata["table"].value == "analyst.stmax_older_people"
    with duckdb.connect(analytics, read_only=True) as con:
        table = con.execute("SELECT la_code, age_band, service_type, min(service_start_date), max(service_start_date), "
                            "count(*) FROM analyst.stmax_older_people GROUP BY ALL").fetchall()
        expected = con.execute("""SELECT count(*) FROM pseudonymised.events WHERE quarter = '2026-Q3' AND la_code = ?
            AND age_band IN ('75 to 84', '85 to 94') AND service_type_cleaned = ? AND event_type_cleaned = 'Service'
            AND event_start_date BETWEEN DATE '2026-01-01' AND DATE '2026-06-30'
            AND person_id IS NOT NULL""", [la, st_max]).fetchall()[0][0]
        windows_ok = con.execute("""SELECT bool_and(days_from_discharge BETWEEN -3 AND 14 OR NOT from_hospital),
            bool_and(days_to_first_emergency_admission BETWEEN 1 AND 60 OR days_to_first_emergency_admission IS NULL)
            FROM analyst.stmax_older_people""").fetchall()[0]
        registry = con.execute("SELECT quarter, rows FROM analyst.cohort_runs WHERE table_name = "
                               "'stmax_older_people'").fetchall()
    assert expected > 10
    assert {(r[0], r[2]) for r in table} == {(la, st_max)} and {r[1] for r in table} <= {"75 to 84", "85 to 94"}
    assert min(r[3] for r in table) >= dt.date(2026, 1, 1) and max(r[4] for r in table) <= dt.date(2026, 6, 30)
    assert sum(r[5] for r in table) == expected and windows_ok == (True, True)
    assert registry == [("2026-Q3", expected)]
    bad = dg.materialize([cohort_linkage], resources={"analytics_db": LockedDuckDBResource(database=analytics)},
                         run_config={"ops": {"analyst__cohort_linkage": {"config": {"age_bands": ["old"]}}}},
                         raise_on_error=False)
    assert not bad.success


def test_ascof_2d_worked_example_part_1_fifty_and_part_2_twenty_percent():
    """outputs-and-measures.md 3.3: 10 discharges of 65+ residents; two link to reablement, one of
    them followed by an emergency readmission: part 1 = 1/2 = 50.00 %, part 2 = 2/10 = 20.00 %."""
    st_max = dict(service_component_cleaned=_values("service_component", ("reablement",)).strip("'"))
    d1, d2 = dt.date(2025, 6, 10), dt.date(2025, 7, 1)
    care = [_service("c1", d1 + dt.timedelta(days=2), "st_max", **st_max),
            _service("c2", d2 + dt.timedelta(days=1), "st_max", **st_max)]
    care += [_service(f"o{i}", dt.date(2025, 5, 1), "st_low_level") for i in range(8)]   # known, no reablement
    spells = [_discharge("c1", d1), _discharge("c2", d2),
              {"person_id": "c2", "admission_date": dt.date(2025, 8, 15), "discharge_date": None,   # still in
               "management_type": "EM"}]
    spells += [_discharge(f"o{i}", dt.date(2025, 6, 1) + dt.timedelta(days=i)) for i in range(8)]
    con = _build(care, spells)
    got = dict(((m, (n, d, v)) for m, n, d, v in con.execute(
        "SELECT measure, numerator, denominator, value FROM ascof_2d").fetchall()))
    assert got == {"2D-1": (1, 2, 50.0), "2D-2": (2, 10, 20.0)}
