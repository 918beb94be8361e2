"""Benchmark measures on the worked examples of domain/outputs-and-measures.md, with their numbers.
Each example goes through the whole DHSC main-table method first (lib/benchmark/dhsc.py), as the asset does."""

from __future__ import annotations

import datetime as dt

import duckdb

from cld_pipeline.lib.benchmark import dhsc, measures

from .test_dhsc_method import ROW_COLUMNS, SERVICE, REQUEST, ASSESSMENT, _lit

COLUMNS = {**ROW_COLUMNS, "accommodation_status_cleaned": "VARCHAR", "gender_cleaned": "VARCHAR",
           "primary_support_reason_cleaned": "VARCHAR", "age_at_event_start": "INTEGER"}
YEAR = (dt.date(2024, 4, 1), dt.date(2025, 3, 31))


def build(rows: list[dict], year=YEAR, populations=(200_000, 50_000)) -> duckdb.DuckDBPyConnection:
    """The joined main table and person details of one LA ('123') and one file covering `year`."""
    con = duckdb.connect()
    con.execute(f"CREATE TABLE rows ({', '.join(f'{c} {t}' for c, t in COLUMNS.items())})")
    for i, r in enumerate(rows, start=1):
        full = {"submission_id": "A", "row_number": i, "la_code": "123", "client_type_cleaned": "Service user",
                "der_conversation": False, "birth_year": 1950, "birth_month": 1, "age_at_event_start": 70,
                "gender_cleaned": _lit("gender", "female"), **r}
        con.execute(f"INSERT INTO rows BY NAME SELECT {', '.join(f'?::{COLUMNS[c]} AS {c}' for c in full)}",
                    list(full.values()))
    selection = (f"SELECT 'A' AS submission_id, TIMESTAMP '{year[1] + dt.timedelta(days=40)}' AS received_at, "
                 f"DATE '{year[0] - dt.timedelta(days=365)}' AS ref_period_start, DATE '{year[1]}' AS ref_period_end")
    con.execute(f"CREATE TABLE joined AS {dhsc.main_table_sql(selection, single=False)}")
    con.execute(f"CREATE TABLE persons AS {measures.persons_sql()}")
    con.execute("CREATE TABLE population AS SELECT '123' AS la_code, ?::BIGINT AS pop_18_64, ?::BIGINT AS pop_65_plus",
                list(populations))
    return con


def run(con, sql: str, year=YEAR) -> dict:
    got = con.execute(f"SELECT measure, measure_group, numerator, denominator FROM ({sql})",
                      {"period_start": year[0], "period_end": year[1]}).fetchall()
    return {(m, g): (n, d) for m, g, n, d in got}


def service(person, start, end, key, component=None, **extra):
    return {"person_id": person, "event_type_cleaned": SERVICE, "event_start_date": start, "event_end_date": end,
            "service_type_cleaned": _lit("service_type", key),
            "service_component_cleaned": _lit("service_component", component) if component else None, **extra}


def outcome(key):
    return _lit("event_outcome", key)


def test_ascof_2a_worked_example():
    rows = [service("A", "2024-05-01", "2024-05-20", "st_max", "reablement"),
            service("A", "2024-05-25", "2024-06-10", "st_max", "reablement"),
            service("A", "2024-06-14", None, "lts_community", "home_support"),
            service("B", "2024-07-01", "2024-07-28", "st_max", "reablement", event_outcome_cleaned=outcome("nfa_ended_planned")),
            service("C", "2024-08-01", "2024-08-20", "st_max", "reablement", date_of_death="2024-08-25"),
            service("D", "2024-03-01", "2024-08-15", "lts_community", "home_support"),
            service("D", "2024-09-01", "2024-09-30", "st_max", "reablement"),
            service("E", "2024-09-15", "2024-10-10", "st_max", "reablement", event_outcome_cleaned=outcome("continuation"))]
    got = run(build(rows), measures.ascof_2a_sql())
    assert got[("2A", "Total")] == (1, 2) and got[("2A", "65 and above")] == (1, 2)


def test_ascof_2b_2c_worked_example():
    lt_res = "lt_residential"
    rows = [service("P1", "2024-06-01", None, "lts_residential", lt_res, birth_year=1954, birth_month=1),
            service("P2", "2024-09-01", None, "lts_nursing", "lt_nursing", birth_year=1974, birth_month=1),
            service("P2", "2023-06-01", "2024-01-15", "lts_residential", lt_res, birth_year=1974, birth_month=1),
            service("P3", "2024-05-01", None, "lts_residential", lt_res, birth_year=1944, birth_month=1),
            service("P3", "2022-04-01", "2023-04-15", "lts_residential", lt_res, birth_year=1944, birth_month=1),
            service("P4", "2024-07-01", None, "lts_residential", lt_res, birth_year=1939, birth_month=1,
                    event_outcome_cleaned=outcome("nfa_self_funded")),
            service("P5", "2024-07-01", None, "lts_residential", "st_residential", birth_year=1994, birth_month=1),
            service("P6", "2024-08-01", None, "lts_residential", None, birth_year=1950, birth_month=1)]
    got = run(build(rows), measures.ascof_2bc_sql())
    assert got[("2C", "65 and above")] == (2, 50_000) and got[("2B", "18 to 64")] == (0, 200_000)
    assert round(2 / 50_000 * 100_000, 1) == 4.0


def test_ascof_2e_worked_example():
    acc = {k: _lit("accommodation_status", k) for k in ("care_home", "unknown")}
    owner = __import__("cld_pipeline.spec", fromlist=["x"]).load_spec().code_list("accommodation_status").values[0].value
    rows = [service("P1", "2024-01-01", None, "lts_community", "home_support", gender_cleaned=_lit("gender", "male"),
                    accommodation_status_cleaned=owner),
            service("P2", "2024-01-01", None, "lts_residential", "lt_residential", accommodation_status_cleaned=acc["care_home"]),
            service("P3", "2024-01-01", None, "lts_community", "home_support", accommodation_status_cleaned=acc["unknown"])]
    con = build(rows)
    got = run(con, measures.ascof_2e_sql())
    assert got[("2E", "65 and above: Total")] == (2, 3)
    assert got[("2E", "65 and above: Male")] == (1, 1) and got[("2E", "65 and above: Female")] == (1, 2)
    # P3's accommodation is only presumed (at home, from home support): DHSC counts it as an exclusion too.
    excluded = con.execute(f"SELECT la_code, measure, people FROM ({measures.ascof_exclusions_sql()}) "
                           "WHERE measure LIKE '2E%'", {"period_start": YEAR[0], "period_end": YEAR[1]}).fetchall()
    assert excluded == [("123", "2E", 1)]


def test_ascof_3d_worked_example():
    dm = {k: _lit("delivery_mechanism", k) for k in ("direct_payment", "managed_budget", "commissioned")}
    carer = _lit("client_type", "unpaid_carer")
    rows = [service("P1", "2024-01-01", None, "lts_community", "home_support", delivery_mechanism_cleaned=dm["direct_payment"]),
            service("P2", "2024-01-01", None, "lts_community", "home_support", delivery_mechanism_cleaned=dm["commissioned"]),
            service("P3", "2024-01-01", None, "lts_community", "direct_payment"),
            service("P4", "2024-01-01", None, "lts_nursing", "lt_nursing"),
            service("P4", "2024-01-01", None, "lts_community", "home_support", delivery_mechanism_cleaned=dm["direct_payment"]),
            service("P5", "2024-01-01", None, "lts_community", "home_support"),
            service("P6", "2024-01-01", None, "lts_community", "home_support", delivery_mechanism_cleaned=dm["managed_budget"]),
            service("C1", "2024-06-01", None, "carer_direct", "carer_respite", client_type_cleaned=carer,
                    delivery_mechanism_cleaned=dm["direct_payment"]),
            service("C2", "2024-06-01", None, "carer_direct", "carer_respite", client_type_cleaned=carer,
                    delivery_mechanism_cleaned=dm["commissioned"]),
            {"person_id": "C3", "event_type_cleaned": ASSESSMENT, "event_start_date": "2024-06-01",
             "event_end_date": "2024-06-05", "client_type_cleaned": carer, "event_outcome_cleaned": outcome("nfa_information")},
            service("C4", "2024-06-01", None, "carer_direct", "carer_respite", client_type_cleaned=carer)]
    got = run(build(rows), measures.ascof_3d_sql())
    assert got[("3D-1a", "Total")] == (3, 5) and got[("3D-2a", "Total")] == (2, 5)
    assert got[("3D-1b", "Total")] == (1, 2) and got[("3D-2b", "Total")] == (1, 2)


def test_waiting_times_worked_example():
    year = (dt.date(2024, 7, 1), dt.date(2025, 6, 30))
    lt_assessment = _lit("assessment_type", "long_term")

    def request(person, start, out=None, **extra):
        return {"person_id": person, "event_type_cleaned": REQUEST, "event_start_date": start, "event_end_date": start,
                "event_outcome_cleaned": outcome(out) if out else None, **extra}

    def assessment(person, start, out, **extra):
        return {"person_id": person, "event_type_cleaned": ASSESSMENT, "event_start_date": start, "event_end_date": start,
                "assessment_type_cleaned": lt_assessment, "event_outcome_cleaned": outcome(out), **extra}

    rows = [request("P", "2025-04-02", "progress_assessment"), assessment("P", "2025-04-20", "progress_services"),
            service("P", "2025-05-15", None, "lts_community", "home_support"),
            request("Q", "2025-05-01", "progress_reablement"), service("Q", "2025-05-04", "2025-05-30", "st_max", "reablement"),
            request("S", "2025-04-10", "progress_assessment"), assessment("S", "2025-04-15", "nfa_declined"),
            service("S", "2025-06-01", None, "lts_community", "home_support"),
            request("R", "2025-04-03", "nfa_information"), assessment("R", "2025-04-04", "progress_services")]
    con = build(rows, year)
    waits = con.execute(f"SELECT person_id, date_diff('day', request_start, response_start), "
                        f"date_diff('day', request_start, service_start) FROM ({measures.waits_sql()}) ORDER BY 1").fetchall()
    assert waits == [("P", 18, 43), ("Q", 3, 3), ("S", 5, None)]
    part1, part2 = con.execute(f"""SELECT quantile_cont(date_diff('day', request_start, response_start), 0.5),
        quantile_cont(date_diff('day', request_start, service_start), 0.5) FROM ({measures.waits_sql()})""").fetchall()[0]
    assert (part1, part2) == (5, 23)


def test_a_second_request_pointing_at_the_same_assessment_is_dropped():
    lt_assessment = _lit("assessment_type", "long_term")
    rows = [{"person_id": "P", "event_type_cleaned": REQUEST, "event_start_date": d, "event_end_date": d,
             "event_outcome_cleaned": outcome("progress_assessment")} for d in ("2025-04-02", "2025-04-03")]
    rows.append({"person_id": "P", "event_type_cleaned": ASSESSMENT, "event_start_date": "2025-04-20",
                 "event_end_date": "2025-04-20", "assessment_type_cleaned": lt_assessment,
                 "event_outcome_cleaned": outcome("progress_services")})
    con = build(rows, (dt.date(2024, 7, 1), dt.date(2025, 6, 30)))
    assert con.execute(f"SELECT request_start FROM ({measures.waits_sql()})").fetchall() == [(dt.date(2025, 4, 2),)]
