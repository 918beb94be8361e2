"""DHSC's processing method on the worked examples of domain/dhsc-method.md, with their numbers."""

from __future__ import annotations

import datetime as dt

import duckdb
from cld_pipeline.lib.benchmark import dhsc
from cld_pipeline.lib.privacy.pseudonymise import PseudoKey, la_message, nhs_message, person_token_sql, token
from cld_pipeline.lib.validation.engine import derived_reporting_periods

D = dt.date


def _lit(key_list: str, key: str) -> str:
    return dhsc.value(key_list, key).strip("'").replace("''", "'")


REQUEST, ASSESSMENT, SERVICE, REVIEW = (_lit("event_type", k) for k in ("request", "assessment", "service", "review"))

ROW_COLUMNS = {
    "submission_id": "VARCHAR", "row_number": "BIGINT", "la_code": "VARCHAR", "person_id": "VARCHAR",
    "event_type_cleaned": "VARCHAR", "event_start_date": "DATE", "event_end_date": "DATE", "date_of_death": "DATE",
    "client_type_cleaned": "VARCHAR", "event_outcome_cleaned": "VARCHAR", "request_route_of_access_cleaned": "VARCHAR",
    "assessment_type_cleaned": "VARCHAR", "service_type_cleaned": "VARCHAR", "service_component_cleaned": "VARCHAR",
    "delivery_mechanism_cleaned": "VARCHAR", "unit_cost": "DOUBLE", "cost_frequency_unit_type_cleaned": "VARCHAR",
    "planned_units_per_week": "DOUBLE", "der_conversation": "BOOLEAN", "review_reason_cleaned": "VARCHAR",
    "ethnicity_cleaned": "VARCHAR", "birth_year": "INTEGER", "birth_month": "INTEGER",
}


def rows_table(con, rows: list[dict]) -> None:
    con.execute(f"CREATE OR REPLACE TABLE rows ({', '.join(f'{c} {t}' for c, t in ROW_COLUMNS.items())})")
    for i, r in enumerate(rows, start=1):
        full = {"row_number": i, "la_code": "123", "client_type_cleaned": "Service user", "der_conversation": False,
                "birth_year": 1950, "birth_month": 7, **r}
        con.execute(f"INSERT INTO rows BY NAME SELECT {', '.join(f'?::{ROW_COLUMNS[c]} AS {c}' for c in full)}",
                    list(full.values()))


def ledger_table(con, files: list[tuple]) -> None:
    con.execute("CREATE OR REPLACE TABLE ledger (submission_id VARCHAR, la_code VARCHAR, received_at TIMESTAMP, "
                "derived_period_start DATE, derived_period_end DATE)")
    con.executemany("INSERT INTO ledger VALUES (?, ?, ?, ?, ?)", files)


# --- 1. derived reporting period -------------------------------------------------------------------

def derived_reporting_period(con, path, received: D):
    con.execute("CREATE OR REPLACE TABLE submission_file AS SELECT 's' AS submission_id, ?::DATE AS received_date",
                [received])
    return derived_reporting_periods(con, path)["s"]


def _period_rows(tmp_path, months: dict[str, tuple[int, int]], extra: list[tuple[str | None, str]] = ()):
    rows = []
    types = [REQUEST, ASSESSMENT, SERVICE, REVIEW]
    for month, (n, n_types) in months.items():
        for i in range(n):
            rows.append((f"{month}-15", types[i % n_types]))
    rows += list(extra)
    con = duckdb.connect()
    con.execute("CREATE TABLE r (submission_id VARCHAR DEFAULT 's', event_end_date VARCHAR, event_type VARCHAR)")
    con.executemany("INSERT INTO r (event_end_date, event_type) VALUES (?, ?)", rows)
    con.execute(f"COPY r TO '{tmp_path / 'raw.parquet'}' (FORMAT parquet)")
    return con, tmp_path / "raw.parquet"


def test_derived_reporting_period_file_a_and_file_b(tmp_path):
    months = {"2025-03": (10, 2), **{f"2025-{m:02d}": (15, 4) for m in range(4, 11)},
              **{m: (16, 4) for m in ("2025-11", "2025-12", "2026-01", "2026-02")}, "2026-03": (18, 4),
              "2026-04": (3, 3), "2026-05": (5, 4)}
    con, path = _period_rows(tmp_path, months, [(None, REQUEST)] * 4)
    assert derived_reporting_period(con, path, D(2026, 5, 3)) == (D(2025, 4, 1), D(2026, 3, 31))
    b = {"2025-07": (17, 4), "2025-08": (16, 4), "2025-09": (16, 4), "2025-01": (1, 1)}
    con, path = _period_rows(tmp_path, b)
    assert derived_reporting_period(con, path, D(2025, 10, 20)) == (D(2025, 1, 1), D(2025, 9, 30))


def test_derived_reporting_periods_are_each_submissions_own_in_a_batch(tmp_path):
    """Two councils' files judged together: each month's 2% share is of its own file's rows."""
    con, path = _period_rows(tmp_path, {f"2025-{m:02d}": (20, 4) for m in range(1, 10)})
    con.execute(f"CREATE TABLE a AS SELECT * FROM '{path}'")
    con.execute("CREATE TABLE b AS SELECT 't' AS submission_id, '2025-09-15' AS event_end_date, event_type "
                "FROM a LIMIT 200")
    con.execute(f"COPY (SELECT * FROM a UNION ALL SELECT * FROM b) TO '{tmp_path / 'two.parquet'}' (FORMAT parquet)")
    con.execute("CREATE OR REPLACE TABLE submission_file AS SELECT * FROM (VALUES ('s', DATE '2025-10-20'), "
                "('t', DATE '2025-10-20')) v(submission_id, received_date)")
    periods = derived_reporting_periods(con, tmp_path / "two.parquet")
    assert periods == {"s": (D(2025, 1, 1), D(2025, 9, 30)), "t": (D(2025, 9, 1), D(2025, 9, 30))}


# --- 2. selecting submissions as of a date ---------------------------------------------------------

FILES = [("F1", "X", "2025-07-20", "2024-07-01", "2025-06-30"), ("F2", "X", "2025-10-15", "2024-10-01", "2025-09-30"),
         ("F3", "X", "2025-10-25", "2024-10-01", "2025-08-31"), ("F4", "X", "2026-01-20", "2025-01-01", "2025-12-31")]


def test_single_selection_as_of():
    con = duckdb.connect()
    ledger_table(con, FILES)
    params = {"period_start": D(2024, 10, 1), "period_end": D(2025, 9, 30)}
    pick = con.execute(dhsc.single_selection_sql(), {**params, "as_of": D(2025, 11, 5)}).fetchall()
    assert [r[1] for r in pick] == ["F2"]
    assert con.execute(dhsc.single_selection_sql(), {**params, "as_of": D(2025, 10, 10)}).fetchall() == []


def test_joined_selection_merges_consecutive_quarters():
    con = duckdb.connect()
    ledger_table(con, FILES)
    windows = dhsc.quarter_windows(D(2024, 7, 1), D(2025, 12, 31))
    got = con.execute(f"SELECT submission_id, ref_period_start, ref_period_end FROM ({dhsc.joined_selection_sql(windows)}) "
                      "ORDER BY 2", {"as_of": D(2026, 2, 5)}).fetchall()
    assert got == [("F1", D(2024, 7, 1), D(2024, 9, 30)), ("F3", D(2024, 10, 1), D(2024, 12, 31)),
                   ("F4", D(2025, 1, 1), D(2025, 12, 31))]


# --- 3. filtering to events in the period, end dates corrected by date of death ---------------------

def test_events_in_period_and_death_corrected_end_dates():
    con = duckdb.connect()
    cases = {  # id: (type, start, end, date of death) -> expected der end or None when dropped
        "a": (REQUEST, "2024-12-20", "2025-01-05", None), "b": (ASSESSMENT, "2025-03-20", "2025-04-02", None),
        "c": (REVIEW, "2025-02-01", None, None), "d": (SERVICE, "2024-06-01", None, None),
        "e": (SERVICE, "2025-04-01", None, None), "f": (SERVICE, "2024-01-01", "2024-12-31", None),
        "g": (SERVICE, "2024-11-01", None, "2024-12-15"), "h": (SERVICE, "2025-01-10", "2025-06-30", "2025-02-14"),
        "i": (REQUEST, "2025-02-01", "2025-02-10", "2025-01-20"), "j": (ASSESSMENT, "2025-03-01", "2025-03-31", "2025-03-15"),
        "k": (SERVICE, "2025-02-01", None, "2025-02-01"), "l": (SERVICE, None, None, None)}
    rows_table(con, [{"submission_id": "A", "person_id": p, "event_type_cleaned": t, "event_start_date": s,
                      "event_end_date": e, "date_of_death": dod} for p, (t, s, e, dod) in cases.items()])
    selection = "SELECT 'A' AS submission_id, TIMESTAMP '2025-05-01' AS received_at, DATE '2025-01-01' AS " \
                "ref_period_start, DATE '2025-03-31' AS ref_period_end"
    kept = dict(con.execute(f"SELECT person_id, der_event_end_date FROM ({dhsc.stacked_sql(selection)})").fetchall())
    assert kept == {"a": D(2025, 1, 5), "d": None, "h": D(2025, 2, 14), "j": D(2025, 3, 15), "k": None}


# --- 4.3 ages, 4.4 unique events, 5 cropping, 6 de-duplication (joined worked example) --------------

def test_joined_deduplication_worked_example():
    con = duckdb.connect()
    lts_c, lts_r, st_max = (_lit("service_type", k) for k in ("lts_community", "lts_residential", "st_max"))
    home, res, reab = (_lit("service_component", k) for k in ("home_support", "lt_residential", "reablement"))
    community = _lit("request_route_of_access", "community")
    long_term = _lit("assessment_type", "long_term")
    outcome = {rank: v for v in __import__("cld_pipeline.spec", fromlist=["x"]).load_spec()
               .code_list("event_outcome").values for rank in [v.rank]}
    rec = {  # record: (file, type, person, start, end, extras, outcome rank, conversation)
        101: ("A", SERVICE, "X", "2024-10-01", None, {"service_type_cleaned": lts_c, "service_component_cleaned": home}, None, False),
        201: ("B", SERVICE, "X", "2024-10-01", None, {"service_type_cleaned": lts_c, "service_component_cleaned": home}, None, False),
        102: ("A", SERVICE, "Y", "2024-12-01", None, {"service_type_cleaned": lts_r, "service_component_cleaned": res}, None, False),
        103: ("A", SERVICE, "W", "2025-02-01", "2025-05-15", {"service_type_cleaned": st_max, "service_component_cleaned": reab}, 14, False),
        104: ("A", REQUEST, "Z", "2025-03-01", "2025-03-10", {"request_route_of_access_cleaned": community}, 10, False),
        105: ("A", REQUEST, "Z", "2025-03-01", "2025-03-10", {"request_route_of_access_cleaned": community}, 2, False),
        106: ("B", ASSESSMENT, "V", "2025-04-01", "2025-04-20", {"assessment_type_cleaned": long_term}, 4, False),
        107: ("B", ASSESSMENT, "V", "2025-04-01", "2025-04-20", {"assessment_type_cleaned": long_term}, 4, True),
        108: ("B", REVIEW, "U", "2025-05-01", "2025-05-02", {}, 5, False),
        109: ("B", REVIEW, "U", "2025-05-01", "2025-05-02", {}, 5, False),
    }
    rows_table(con, [{"submission_id": f, "row_number": r, "person_id": p, "event_type_cleaned": t, "event_start_date": s,
                      "event_end_date": e, "der_conversation": conv,
                      "event_outcome_cleaned": outcome[rank].value if rank else None, **extra}
                     for r, (f, t, p, s, e, extra, rank, conv) in rec.items()])
    selection = ("SELECT 'A' AS submission_id, TIMESTAMP '2025-04-20' AS received_at, DATE '2025-01-01' AS ref_period_start, "
                 "DATE '2025-03-31' AS ref_period_end UNION ALL SELECT 'B', TIMESTAMP '2025-07-20', DATE '2025-04-01', "
                 "DATE '2025-06-30'")
    con.execute(f"CREATE TABLE main AS {dhsc.main_table_sql(selection, single=False)}")
    kept = dict(con.execute("SELECT row_number, der_event_end_date FROM main").fetchall())
    assert set(kept) == {201, 102, 103, 105, 107, 109}
    assert kept[102] == D(2025, 3, 31) and kept[103] == D(2025, 3, 31) and kept[201] is None
    refs = dict(con.execute("SELECT person_id, der_unique_event_ref FROM main").fetchall())
    assert refs == {"X": "123_1", "Y": "123_2", "W": "123_3", "Z": "123_4", "V": "123_5", "U": "123_6"}
    assert "unit_cost" not in [c[0] for c in con.execute("DESCRIBE main").fetchall()]


def test_single_submission_keeps_both_unit_costs_and_ages_follow_dhsc():
    con = duckdb.connect()
    lts_c = _lit("service_type", "lts_community")
    base = {"submission_id": "A", "person_id": "P", "event_type_cleaned": SERVICE, "event_start_date": "2025-01-01",
            "service_type_cleaned": lts_c, "birth_year": 1950, "birth_month": 7}
    rows_table(con, [{**base, "unit_cost": 20.0, "event_end_date": "2025-06-30"},
                     {**base, "unit_cost": 25.0, "event_end_date": "2025-06-30"},
                     {**base, "unit_cost": 20.004, "event_end_date": "2025-06-30"}])
    selection = ("SELECT 'A' AS submission_id, TIMESTAMP '2025-08-01' AS received_at, DATE '2024-07-01' AS "
                 "ref_period_start, DATE '2025-06-30' AS ref_period_end")
    got = con.execute(f"SELECT unit_cost, der_latest_age FROM ({dhsc.main_table_sql(selection)}) ORDER BY 1").fetchall()
    assert got == [(20.004, 74), (25.0, 74)], "20 and 20.004 are one service; 25 another; born 1950-07 is 74"
    rows_table(con, [{**base, "event_end_date": "2025-07-01"}])
    selection = selection.replace("2025-06-30", "2025-07-31")
    assert con.execute(f"SELECT der_latest_age FROM ({dhsc.main_table_sql(selection)})").fetchall() == [(75,)]


def test_combined_person_id_prefers_the_nhs_number_then_la_id_and_drops_rows_with_neither():
    """Method 4.2 on the pseudonymised token: NHS number first, else LA code and LA person id."""
    key = PseudoKey(b"k" * 32)
    ipad, opad = key.pads
    con = duckdb.connect()
    sql = person_token_sql("n", "la", "pid")
    cases = [("9434765919", "123", "P1"), (None, "123", "P3"), (None, "123", None)]
    got = [con.execute(f"SELECT {sql} FROM (SELECT $n::VARCHAR AS n, $la::VARCHAR AS la, $pid::VARCHAR AS pid)",
                       {"ipad": ipad, "opad": opad, "n": n, "la": la, "pid": pid}).fetchall()[0][0]
           for n, la, pid in cases]
    assert got == [token(key, nhs_message("9434765919")), token(key, la_message("123", "P3")), None]
    rows_table(con, [{"submission_id": "A", "person_id": p, "event_type_cleaned": REQUEST,
                      "event_start_date": "2025-01-02", "event_end_date": "2025-01-03"} for p in ("T1", None)])
    selection = ("SELECT 'A' AS submission_id, TIMESTAMP '2025-05-01' AS received_at, DATE '2025-01-01' AS "
                 "ref_period_start, DATE '2025-03-31' AS ref_period_end")
    assert con.execute(f"SELECT person_id FROM ({dhsc.stacked_sql(selection)})").fetchall() == [("T1",)]
