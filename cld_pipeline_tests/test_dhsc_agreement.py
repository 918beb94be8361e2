"""Agreement with DHSC's own SQL (DataS-DHSC/ASC-CLD-LA-Dashboard) at the boundaries it draws.

Each test is a small hand-made case on one side of a line DHSC's T-SQL draws, with the lines quoted
(ASCOF procedures at e6f5749, waiting times v1.1 at 9bee728). Every case goes through the whole main
table method first, as the benchmark asset does (test_measures.build).
"""

from __future__ import annotations

import datetime as dt

from cld_pipeline.lib.benchmark import measures
from cld_pipeline.spec import load_spec

from .test_dhsc_method import ASSESSMENT, REQUEST, REVIEW, _lit
from .test_measures import YEAR, build, outcome, run, service

INVALID = load_spec().derived.invalid_value


def review(person, start, end, out, **extra):
    return {"person_id": person, "event_type_cleaned": REVIEW, "event_start_date": start, "event_end_date": end,
            "event_outcome_cleaned": outcome(out) if out else None, **extra}


def assessment(person, start, end, out, kind="long_term", **extra):
    return {"person_id": person, "event_type_cleaned": ASSESSMENT, "event_start_date": start, "event_end_date": end,
            "assessment_type_cleaned": _lit("assessment_type", kind),
            "event_outcome_cleaned": outcome(out) if out else None, **extra}


def reablement(person, start, end, out, **extra):
    return service(person, start, end, "st_max", "reablement", event_outcome_cleaned=outcome(out) if out else None, **extra)


def sequels(rows) -> dict:
    """person -> (sequel type, final outcome, in denominator, in numerator) of their one cluster."""
    con = build(rows)
    got = con.execute(f"SELECT person_id, sequel_type, final_outcome, in_denominator, in_numerator "
                      f"FROM ({measures.ascof_2a_clusters_sql()})", {"period_start": YEAR[0], "period_end": YEAR[1]})
    return {p: rest for p, *rest in got.fetchall()}


# --- 1. ASCOF 2A, step 4 ----------------------------------------------------------------------------

def test_2a_sequel_window_takes_events_started_in_the_cluster_and_running_past_its_end():
    """DHSC #RankedEvents:
        WHERE Event_Start_Date >= ST_Max_Cluster_Start
          AND Der_Event_End_Date > ST_Max_Cluster_End
          AND DATEDIFF(DAY, ST_Max_Cluster_End, Event_Start_Date) <= 7;
    A review that began during reablement and ended after it gives the sequel (4b); one starting
    on day 7 after the end counts, one on day 8 does not, one ending on the cluster's last day is nested."""
    rows = [reablement("IN", "2024-06-01", "2024-06-30", "continuation"),
            review("IN", "2024-06-20", "2024-07-03", "nfa_information"),
            reablement("DAY7", "2024-06-01", "2024-06-30", "continuation"),
            review("DAY7", "2024-07-07", "2024-07-07", "nfa_information"),
            reablement("DAY8", "2024-06-01", "2024-06-30", "continuation"),
            review("DAY8", "2024-07-08", "2024-07-08", "nfa_information"),
            reablement("NESTED", "2024-06-01", "2024-06-30", "continuation"),
            review("NESTED", "2024-06-05", "2024-06-30", "nfa_moved")]
    got = sequels(rows)
    info = outcome("nfa_information")
    assert got["IN"] == ["4b", info, True, True]
    assert got["DAY7"] == ["4b", info, True, True]
    assert got["DAY8"] == ["6", outcome("continuation"), False, False]
    # Nested and ending within the last 13 days: the nested review's outcome (4c).
    assert got["NESTED"] == ["4c", outcome("nfa_moved"), True, True]


def test_2a_nested_assessments_give_the_last_ending_outcome_not_the_best():
    """DHSC #Nested_Assessments_Reviews: LAST_VALUE(Sequel_Event_Outcome) OVER (... ORDER BY
    Der_Event_End_Date ASC, COALESCE(Event_Outcome_Hierarchy, 999) DESC, Der_unique_record_id ASC ...)
    over assessments and reviews with DATEDIFF(DAY, Der_Event_End_Date, ST_Max_Cluster_End) < 14 and
    Event_Outcome_Hierarchy < 100. The later 'support declined' wins over the earlier, better-ranked
    'information and advice'; an assessment ending 14 days before the end is too early."""
    rows = [reablement("P", "2024-06-01", "2024-06-30", "continuation"),
            assessment("P", "2024-06-20", "2024-06-25", "nfa_information"),
            assessment("P", "2024-06-22", "2024-06-28", "nfa_declined"),
            reablement("EARLY", "2024-06-01", "2024-06-30", "continuation"),
            assessment("EARLY", "2024-06-02", "2024-06-16", "nfa_information")]
    got = sequels(rows)
    assert got["P"] == ["4c", outcome("nfa_declined"), False, False]
    assert got["EARLY"] == ["6", outcome("continuation"), False, False]


def test_2a_cluster_outcome_is_used_only_when_nothing_else_is_usable():
    """DHSC #Has_Usable_Stmax_EO_Only: clusters WHERE NOT EXISTS (... #Has_Future_Events_In_Window ...)
    AND ST_Max_Cluster_Event_Outcome_Hierarchy < 100; #Has_Usable_Future_NonServices_Only keeps
    window rows with Event_Type != 'Service'. A window holding only an unranked service (here
    'Invalid and not mapped', Service_Hierarchy 99: never a sequel) blocks the cluster's own outcome
    from step 4, so a nested assessment decides (4c), or else step 6 falls back to the cluster's
    outcome."""
    invalid_service = {**service("X", "2024-07-02", "2024-07-20", "st_other"), "service_type_cleaned": INVALID}
    rows = [reablement("BLOCKED", "2024-06-01", "2024-06-30", "nfa_information"),
            {**invalid_service, "person_id": "BLOCKED"},
            assessment("BLOCKED", "2024-06-25", "2024-06-29", "nfa_declined"),
            reablement("FALLBACK", "2024-06-01", "2024-06-30", "nfa_information"),
            {**invalid_service, "person_id": "FALLBACK"},
            reablement("OWN", "2024-06-01", "2024-06-30", "nfa_information"),
            assessment("OWN", "2024-06-25", "2024-06-29", "nfa_declined")]
    got = sequels(rows)
    info = outcome("nfa_information")
    assert got["BLOCKED"] == ["4c", outcome("nfa_declined"), False, False]
    assert got["FALLBACK"] == ["6", info, True, True]
    assert got["OWN"] == ["4a", info, True, True]      # the better of own (10) and nested (12); 4a before 4c


def test_2a_cluster_outcome_tie_break_uses_the_penalised_hierarchy():
    """DHSC #REF_Event_Outcome_Hierarchy_UTC adds 100 to 'Continuation of support or services',
    'Progress to ...', 'Release 1 ...' and 'Invalid and not mapped'; the cluster outcome is
    LAST_VALUE(...) ORDER BY Der_Event_End_Date ASC, COALESCE(Event_Outcome_Hierarchy, 999) DESC,
    Der_unique_record_id ASC. Two reablement rows ending the same day: 'support ended as planned'
    (14) beats 'continuation' (5 + 100)."""
    # Different components: two unique events (one record per event would otherwise be kept first).
    rows = [reablement("P", "2024-06-01", "2024-06-30", "continuation"),
            {**reablement("P", "2024-06-01", "2024-06-30", "nfa_ended_planned"), "service_component_cleaned": None}]
    assert sequels(rows)["P"] == ["4a", outcome("nfa_ended_planned"), True, True]


def test_2a_services_in_the_window_are_service_users_and_not_ending_before_they_start():
    """DHSC #ASCOF2A_Build_Temp: WHERE Client_Type_Cleaned = 'Service User' ... AND
    (Der_Event_End_Date >= Event_Start_Date OR Der_Event_End_Date IS NULL). A long-term service
    recorded for the person as an unpaid carer, or ending before it starts, is not a sequel."""
    carer = _lit("client_type", "unpaid_carer")
    rows = [reablement("CARER", "2024-06-01", "2024-06-30", "nfa_ended_planned"),
            service("CARER", "2024-07-02", None, "lts_community", "home_support", client_type_cleaned=carer),
            reablement("BACKWARDS", "2024-06-01", "2024-06-30", "nfa_ended_planned"),
            service("BACKWARDS", "2024-07-05", "2024-07-03", "lts_community", "home_support"),
            reablement("SERVICE", "2024-06-01", "2024-06-30", "nfa_ended_planned"),
            service("SERVICE", "2024-07-05", None, "st_other", "st_residential")]
    got = sequels(rows)
    planned = outcome("nfa_ended_planned")
    assert got["CARER"] == ["4a", planned, True, True]
    assert got["BACKWARDS"] == ["4a", planned, True, True]
    assert got["SERVICE"] == ["3", measures.ST_RESIDENTIAL_OR_NURSING, True, False]


def test_2a_death_and_hospital_come_first():
    """DHSC steps 1 and 2: DATEDIFF(DAY, ST_Max_Cluster_End, Der_Date_of_Death) <= 7 gives 'NFA:
    Deceased'; a cluster outcome of 'Admitted to hospital' is its own sequel. Neither is in the
    denominator. A death on day 8 is not step 1."""
    rows = [reablement("DIED7", "2024-06-01", "2024-06-30", "nfa_ended_planned", date_of_death="2024-07-07"),
            reablement("DIED8", "2024-06-01", "2024-06-30", "nfa_ended_planned", date_of_death="2024-07-08"),
            reablement("HOSP", "2024-06-01", "2024-06-30", "admitted_hospital")]
    got = sequels(rows)
    assert got["DIED7"] == ["1", outcome("nfa_deceased"), False, False]
    assert got["DIED8"][0] == "4a"
    assert got["HOSP"] == ["2", outcome("admitted_hospital"), False, False]


# --- 2. ASCOF 2E -------------------------------------------------------------------------------------

def test_2e_invalid_accommodation_is_unknown_and_inferred_from_services():
    """DHSC Create_personal_details_table: CASE WHEN Accommodation_Status_Cleaned = 'Invalid and not
    mapped' ... THEN 'Unknown', then the 'Unknown' person's status is inferred from the latest
    service: Long term support: Community with 'Home support or domiciliary care' gives 'Unknown:
    Presumed at home' (settled for 2E), which LA_PBI_ASCOF_Excl counts too."""
    rows = [service("P", "2024-01-01", None, "lts_community", "home_support", accommodation_status_cleaned=INVALID),
            service("Q", "2024-01-01", None, "lts_residential", "lt_residential", accommodation_status_cleaned=INVALID)]
    con = build(rows)
    assert run(con, measures.ascof_2e_sql())[("2E", "65 and above: Total")] == (1, 2)
    people = con.execute("SELECT person_id, accommodation_status FROM persons ORDER BY 1").fetchall()
    assert people == [("P", _lit("accommodation_status", "presumed_home")),
                      ("Q", _lit("accommodation_status", "care_home"))]
    excluded = con.execute(f"SELECT measure, people FROM ({measures.ascof_exclusions_sql()}) WHERE measure = '2E'",
                           {"period_start": YEAR[0], "period_end": YEAR[1]}).fetchall()
    assert excluded == [("2E", 1)]


# --- 3. ASCOF 3D (clients) --------------------------------------------------------------------------

def test_3d_a_client_who_dies_on_the_last_day_of_the_period_counts():
    """DHSC Create_ASCOF_3D: AND (Date_of_Death_Latest >= @ReportingPeriodEndDate OR
    Date_of_Death_Latest IS NULL). Death on the period end: counted; the day before: not."""
    dp = _lit("delivery_mechanism", "direct_payment")
    end = str(YEAR[1])
    rows = [service("LAST", "2024-01-01", None, "lts_community", "home_support", delivery_mechanism_cleaned=dp,
                    date_of_death=end),
            service("BEFORE", "2024-01-01", None, "lts_community", "home_support", delivery_mechanism_cleaned=dp,
                    date_of_death=str(YEAR[1] - dt.timedelta(days=1)))]
    assert run(build(rows), measures.ascof_3d_sql())[("3D-2a", "Total")] == (1, 1)


def test_3d_unknown_delivery_mechanisms_are_counted_as_exclusions():
    """DHSC #OutputTable2 (LA_PBI_ASCOF_Excl): clients whose top-ranked service is Community with
    Delivery_Mechanism = '' and component not 'Direct payment'; carers whose top support is
    'Support Direct to Carer: Unknown Delivery Mech'."""
    carer = _lit("client_type", "unpaid_carer")
    rows = [service("C", "2024-01-01", None, "lts_community", "home_support"),
            service("D", "2024-01-01", None, "lts_community", "direct_payment"),
            service("K", "2024-06-01", None, "carer_direct", "carer_respite", client_type_cleaned=carer)]
    got = build(rows).execute(f"SELECT measure, people FROM ({measures.ascof_exclusions_sql()}) "
                              "WHERE measure LIKE '3D%' ORDER BY 1",
                              {"period_start": YEAR[0], "period_end": YEAR[1]}).fetchall()
    assert got == [("3D (carers)", 1), ("3D (clients)", 1)]


# --- 4. waiting times -------------------------------------------------------------------------------

def _request(person, start, out="progress_assessment", conversation=False, **extra):
    return {"person_id": person, "event_type_cleaned": REQUEST, "event_start_date": start, "event_end_date": start,
            "event_outcome_cleaned": outcome(out) if out else None, "der_conversation": conversation, **extra}


def waits(rows, year=(dt.date(2024, 4, 1), dt.date(2025, 6, 30))) -> list[tuple]:
    con = build(rows, year)
    return con.execute(f"""SELECT person_id, request_start, response,
                                  date_diff('day', request_start, response_start),
                                  date_diff('day', request_start, service_start)
                           FROM ({measures.waits_sql()}) ORDER BY 1, 2""").fetchall()


def test_waits_overlap_uses_the_modified_orders():
    """DHSC stage 3.4 (v1.1):
        WHEN LAG(GREATEST(modified_next_assessment_order, modified_next_service_order)) OVER (
             PARTITION BY LA_Code, Der_NHS_LA_Combined_Person_ID ORDER BY request_event_order) > request_event_order
        THEN 1
    A conversation request before 2025-07-01 is its own first response (stage 3.1), so its modified
    order is its own: the next request, before the assessment, is not overlapping and gets its wait.
    Likewise a request whose assessment block did not progress loses its service (stage 3.3), so a
    later request is not blocked by that service."""
    rows = [_request("C", "2025-03-01", "progress_services", conversation=True),
            _request("C", "2025-03-05"), assessment("C", "2025-03-20", "2025-03-20", "progress_services"),
            _request("N", "2024-09-01"), assessment("N", "2024-09-20", "2024-09-20", "nfa_declined"),
            _request("N", "2024-10-01"), service("N", "2024-10-05", None, "st_low_level", "equipment")]
    d = dt.date
    assert waits(rows) == [("C", d(2025, 3, 1), "request", 0, None), ("C", d(2025, 3, 5), "assessment", 15, None),
                           ("N", d(2024, 9, 1), "assessment", 19, None), ("N", d(2024, 10, 1), "service", 4, 4)]


def test_waits_overlap_running_maximum_catches_a_repeated_response():
    """DHSC stage 3.4 (v1.1): WHEN modified_next_assessment_order <= max_modified_next_assessment_order_prev
    THEN 1. DHSC's worked case: R1, R2 (a conversation, its own response), R3, then one assessment:
    LAG gives R2's order only, but R3's assessment is R1's, so R3 is dropped; R1 waits 19 days."""
    rows = [_request("P", "2025-03-01", birth_year=1985), _request("P", "2025-03-05", "progress_reablement",
                                                                     conversation=True, birth_year=1985),
            _request("P", "2025-03-08", birth_year=1985),
            assessment("P", "2025-03-20", "2025-03-20", "progress_services", kind="short_term", birth_year=1985)]
    assert waits(rows) == [("P", dt.date(2025, 3, 1), "assessment", 19, None)]


def test_waits_drop_requests_with_a_blank_outcome():
    """DHSC stage 1.4: WHERE Event_Outcome_Grouped NOT IN ('NFA','Admitted to hospital'): a blank
    outcome has a NULL group, and NOT IN drops it; 'Invalid and not mapped' is kept."""
    rows = [_request("BLANK", "2025-03-01", None), assessment("BLANK", "2025-03-10", "2025-03-10", "progress_services"),
            {**_request("BAD", "2025-03-01"), "event_outcome_cleaned": INVALID},
            assessment("BAD", "2025-03-10", "2025-03-10", "progress_services")]
    assert [w[0] for w in waits(rows)] == ["BAD"]


def test_waits_quarterly_context_counts_events_before_people_without_requests_are_dropped():
    """DHSC stage 5.1 counts from #filtered_requests_assessments_and_services (stage 2.1), before
    stage 2.2 removes people with no valid request: an assessment of someone whose only request was
    NFA still counts, by its own quarter and band."""
    rows = [_request("A", "2025-02-01"), assessment("A", "2025-02-10", "2025-02-10", "progress_services"),
            _request("B", "2025-02-01", "nfa_information"), assessment("B", "2025-04-10", "2025-04-10", "nfa_declined")]
    con = build(rows, (dt.date(2024, 7, 1), dt.date(2025, 6, 30)))
    got = con.execute(f"SELECT statistical_quarter_start, age_band, requests, assessments, services "
                      f"FROM ({measures.wait_context_sql()}) ORDER BY 1").fetchall()
    assert got == [(dt.date(2025, 1, 1), "65 and above", 1, 1, 0), (dt.date(2025, 4, 1), "65 and above", 0, 1, 0)]


# --- 5. Event_Outcome_Hierarchy ---------------------------------------------------------------------

def test_event_outcome_hierarchy_is_null_for_invalid_and_999_only_when_sorting():
    """DHSC GetDerivedFields leaves Event_Outcome_Hierarchy NULL for 'Invalid and not mapped' (the
    mapping has no rank for it) and GetUniqueEvents orders by COALESCE(Event_Outcome_Hierarchy, 999):
    of two records of one event, the one with a ranked outcome is kept."""
    rows = [{**review("P", "2024-06-01", "2024-06-10", None), "event_outcome_cleaned": INVALID, "row_number": 2},
            {**review("P", "2024-06-01", "2024-06-10", "nfa_information"), "row_number": 1}]
    con = build(rows)
    assert con.execute("SELECT event_outcome_cleaned, event_outcome_hierarchy FROM joined").fetchall() == [
        (outcome("nfa_information"), 10)]
    con = build(rows[:1])
    assert con.execute("SELECT event_outcome_hierarchy FROM joined").fetchall() == [(None,)]
