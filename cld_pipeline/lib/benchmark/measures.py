"""Benchmark measures (domain/outputs-and-measures.md) as DuckDB SQL over DHSC's main tables.

Relations used: `single` and `joined` (lib/benchmark/dhsc.py main tables), `persons` (latest person details,
method 7), `population` (la_code, pop_18_64, pop_65_plus, pop_18_plus); parameters `$period_start`
and `$period_end` (the 12-month year). Every ASCOF builder returns LA-level rows
(la_code, measure, measure_group, numerator, denominator); region and England are sums of LA
numerators and denominators (never averages of rates). Values are computed after disclosure control
(lib/privacy/disclosure.py) from the rounded parts, with DHSC's rounding.
"""

from __future__ import annotations

from cld_pipeline.lib.benchmark.dhsc import OPEN_END, group_of, is_event, rank_of, value, values
from cld_pipeline.spec import load_spec

# ASCOF 2A relabels "other short term" with a short-term residential or nursing component.
ST_RESIDENTIAL_OR_NURSING = "Short term support: Residential or Nursing care"
LONG_TERM = ("lts_nursing", "lts_residential", "lts_community", "lts_prison")
CARER_SUPPORT = ("carer_direct", "carer_involving")
AGE_18_64, AGE_65_PLUS, TOTAL = "18 to 64", "65 and above", "Total"


def _age(at: str, birth_year: str = "birth_year", birth_month: str = "birth_month") -> str:
    return f"CAST(floor(date_diff('day', make_date({birth_year}, {birth_month}, 1), {at}) / 365.25) AS INTEGER)"


def _band(age: str) -> str:
    return f"CASE WHEN {age} BETWEEN 18 AND 64 THEN '{AGE_18_64}' WHEN {age} >= 65 THEN '{AGE_65_PLUS}' END"


def _service_user(col: str = "client_type_cleaned") -> str:
    return f"{col} = {value('client_type', 'service_user')}"


def _is_service() -> str:
    return is_event("service")


# --- latest person details (dhsc-method.md 7) ------------------------------------------------------

def persons_sql(joined: str = "joined") -> str:
    """One row per LA and person: latest known accommodation (inferred from the latest service when
    unknown), gender, primary support reason, birth year and month, date of death."""
    acc, unknown_acc = "accommodation_status_cleaned", (value("accommodation_status", "unknown"),)
    invalid = "'" + load_spec().derived.invalid_value + "'"
    svc = {k: value("service_type", k) for k in LONG_TERM}
    comp = {k: value("service_component", k) for k in ("shared_lives", "supported_living", "extra_care", "home_support")}
    a = {k: value("accommodation_status", k) for k in ("nursing_home", "care_home", "shared_lives", "sheltered_housing",
                                                        "supported_accommodation", "presumed_home",
                                                        "presumed_community", "prison", "unknown")}

    def latest_known(column: str, unknown: tuple[str, ...], conflict: str) -> str:
        known = f"coalesce({column} NOT IN ({', '.join(unknown)}, {invalid}), false)"
        return f"""
            {column}_pick AS (
                SELECT la_code, person_id, CASE WHEN count(DISTINCT coalesce({column}, '')) > 1 THEN {conflict}
                                                ELSE coalesce(any_value({column}), {conflict}) END AS {column}
                FROM (SELECT la_code, person_id, {column}, dense_rank() OVER (PARTITION BY la_code, person_id
                          ORDER BY {known} DESC, ref_period_end DESC, coalesce(der_event_end_date, {OPEN_END}) DESC,
                                   event_start_date DESC) AS rk
                      FROM {joined}) WHERE rk = 1
                GROUP BY la_code, person_id)"""

    comp_order = f"CASE WHEN service_component_cleaned IN ({', '.join(comp.values())}) THEN 0 ELSE 1 END"
    return f"""
        WITH {latest_known(acc, unknown_acc, a['unknown'])},
        {latest_known('gender_cleaned', (value('gender', 'unknown'),), value('gender', 'unknown'))},
        {latest_known('primary_support_reason_cleaned', (value('primary_support_reason', 'support_to_carer'),), "'Unknown'")},
        latest_service AS (
            -- DHSC: the one useful type (ranked) and the one useful component among the latest services
            SELECT la_code, person_id,
                   CASE WHEN count(DISTINCT service_type_cleaned) FILTER (WHERE type_rank < 99) = 1
                        THEN any_value(service_type_cleaned) FILTER (WHERE type_rank < 99) END AS st,
                   CASE WHEN count(DISTINCT service_component_cleaned) FILTER (WHERE {comp_order} = 0) = 1
                        THEN any_value(service_component_cleaned) FILTER (WHERE {comp_order} = 0) END AS sc
            FROM (SELECT *, {rank_of('service_type', 'service_type_cleaned', 99)} AS type_rank,
                         dense_rank() OVER (PARTITION BY la_code, person_id ORDER BY
                      coalesce(der_event_end_date, {OPEN_END}) DESC, {rank_of('service_type', 'service_type_cleaned', 99)},
                      {comp_order}, event_start_date DESC) AS rk
                  FROM {joined} WHERE {_is_service()})
            WHERE rk = 1 GROUP BY la_code, person_id
        ),
        birth AS (   -- known birth first, then the latest reference period, then the earliest birth
            SELECT la_code, person_id, arg_min(birth_year, k) AS birth_year, arg_min(birth_month, k) AS birth_month,
                   max(date_of_death) AS date_of_death
            FROM (SELECT la_code, person_id, birth_year, birth_month, date_of_death,
                         (birth_year IS NULL, -date_diff('day', DATE '2000-01-01', ref_period_end),
                          make_date(birth_year, birth_month, 1)) AS k FROM {joined})
            GROUP BY la_code, person_id
        )
        SELECT b.la_code, b.person_id, b.birth_year, b.birth_month, b.date_of_death, g.gender_cleaned,
               p.primary_support_reason_cleaned,
               CASE WHEN x.{acc} NOT IN ({a['unknown']}, {invalid}) THEN x.{acc}   -- DHSC: invalid is Unknown
                    WHEN s.st = {svc['lts_nursing']} THEN {a['nursing_home']}
                    WHEN s.st = {svc['lts_residential']} THEN {a['care_home']}
                    WHEN s.sc = {comp['shared_lives']} THEN {a['shared_lives']}
                    WHEN s.sc = {comp['extra_care']} THEN {a['sheltered_housing']}
                    WHEN s.sc = {comp['supported_living']} THEN {a['supported_accommodation']}
                    WHEN s.st = {svc['lts_community']} AND s.sc = {comp['home_support']} THEN {a['presumed_home']}
                    WHEN s.st = {svc['lts_community']} THEN {a['presumed_community']}
                    WHEN s.st = {svc['lts_prison']} THEN {a['prison']}
                    ELSE {a['unknown']} END AS accommodation_status,
               x.{acc} NOT IN ({a['unknown']}, {invalid}) AS accommodation_known
        FROM birth b
        JOIN {acc}_pick x USING (la_code, person_id)
        JOIN gender_cleaned_pick g USING (la_code, person_id)
        JOIN primary_support_reason_cleaned_pick p USING (la_code, person_id)
        LEFT JOIN latest_service s USING (la_code, person_id)"""


# --- ASCOF 2A (DHSC Create_ASCOF_2A_2425_Onwards.sql) ----------------------------------------------

UNABLE_TO_CLASSIFY = ("continuation", "progress_services", "progress_assessment", "progress_reablement", "release1_only")
ASCOF_2A_DENOMINATOR_ONLY = (*LONG_TERM,)
ASCOF_2A_NUMERATOR_OUTCOMES = ("nfa_information", "nfa_ended_planned", "nfa_moved", "nfa_other", "nfa_no_services",
                               "nfa_ended_other", "nfa_other_service")


def _outcome_hierarchy(col: str) -> str:
    """DHSC's #REF_Event_Outcome_Hierarchy_UTC: the outcome's rank, +100 for the outcomes that cannot
    classify a sequel (and 'Invalid and not mapped'), 999 for a blank or unranked outcome."""
    invalid = "'" + load_spec().derived.invalid_value + "'"
    return (f"CASE WHEN {col} IN ({values('event_outcome', UNABLE_TO_CLASSIFY)}, {invalid}) "
            f"THEN coalesce({rank_of('event_outcome', col, 'NULL')} + 100, 999) "
            f"ELSE {rank_of('event_outcome', col, 999)} END")


def ascof_2a_clusters_sql(joined: str = "joined", persons: str = "persons") -> str:
    """One row per ST-Max cluster ending in the year, of a new client: its age band, DHSC's sequel
    type (1 deceased, 2 admitted to hospital, 3 a service, 4a/4b/4c an outcome of the cluster, of a
    following non-service event or of a nested assessment or review, 5 equipment, 6 unable to
    classify) and final outcome, and whether it counts in the denominator and numerator."""
    spec = load_spec()
    invalid = "'" + spec.derived.invalid_value + "'"
    st = {k: value("service_type", k) for k in ("st_max", "st_other", "st_low_level", *LONG_TERM)}
    st_res = values("service_component", ("st_residential", "st_nursing"))
    service, assessment, review = is_event("service", "event_type"), is_event("assessment", "event_type"), \
        is_event("review", "event_type")
    ended_planned = value("event_outcome", "nfa_ended_planned")
    # Hierarchy value -> outcome, for step 4's minimum (the ranks below 100 are unique in the spec).
    by_rank = " ".join(f"WHEN {v.rank} THEN '{v.value.replace(chr(39), chr(39) * 2)}'"
                       for v in spec.code_list("event_outcome").values if v.rank is not None)
    service_rank = f"coalesce({rank_of('service_type', 'service_type', 'NULL')}, 99)"
    denominator = ", ".join([*(st[k] for k in LONG_TERM), st["st_low_level"], st["st_other"], f"'{ST_RESIDENTIAL_OR_NURSING}'",
                             values("event_outcome", ASCOF_2A_NUMERATOR_OUTCOMES)])
    numerator = ", ".join([st["st_low_level"], st["st_other"], values("event_outcome", ASCOF_2A_NUMERATOR_OUTCOMES)])
    return f"""
        WITH build AS (   -- service users' events with a start, ending on or after it; open ends far in the future
            SELECT la_code, person_id, event_type_cleaned AS event_type, event_start_date AS s,
                   coalesce(der_event_end_date, {OPEN_END}) AS e, service_type_cleaned AS service_type,
                   service_component_cleaned AS service_component,
                   coalesce(event_outcome_cleaned, {invalid}) AS outcome, {_outcome_hierarchy('event_outcome_cleaned')} AS h,
                   row_number() OVER (ORDER BY received_at, submission_id, row_number) AS rid   -- load order
            FROM {joined}
            WHERE {_service_user()} AND person_id IS NOT NULL AND event_start_date IS NOT NULL
              AND coalesce(der_event_end_date >= event_start_date, true)
        ), stmax AS (
            SELECT *, max(e) OVER (PARTITION BY la_code, person_id ORDER BY s, e, h, rid DESC
                                   ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING) AS previous_end
            FROM build WHERE {service} AND service_type = {st['st_max']}
        ), numbered AS (
            SELECT *, sum(CASE WHEN date_diff('day', previous_end, s) <= 7 THEN 0 ELSE 1 END)
                          OVER (PARTITION BY la_code, person_id ORDER BY s, e, h, rid DESC) AS cluster
            FROM stmax
        ), clusters AS (   -- the cluster's outcome: its last-ending event's, then the best, then the last loaded
            SELECT la_code, person_id, cluster, min(s) AS cs, max(e) AS ce,
                   arg_max(outcome, (e, -h, rid)) AS c_outcome, arg_max(h, (e, -h, rid)) AS c_h
            FROM numbered GROUP BY ALL
        ), eligible AS (
            SELECT c.*, {_age('c.ce', 'p.birth_year', 'p.birth_month')} AS age, p.date_of_death AS dod
            FROM clusters c LEFT JOIN {persons} p USING (la_code, person_id)
            WHERE c.ce BETWEEN $period_start AND $period_end
              AND coalesce({_age('c.ce', 'p.birth_year', 'p.birth_month')} >= 18, true)
              AND coalesce(p.date_of_death >= c.cs, true)
        ), around AS (   -- the person's other events (the cluster's own ST-Max rows left out)
            SELECT c.la_code, c.person_id, c.cluster, c.cs, c.ce, b.*
            FROM eligible c JOIN build b USING (la_code, person_id)
            WHERE NOT ({service} AND b.service_type = {st['st_max']} AND b.s BETWEEN c.cs AND c.ce)
        ), new_clients AS (   -- no long-term support started before and ending within 91 days of the start
            SELECT c.* FROM eligible c WHERE NOT EXISTS (
                SELECT 1 FROM around a WHERE a.la_code = c.la_code AND a.person_id = c.person_id AND a.cluster = c.cluster
                   AND a.service_type IN ({', '.join(st[k] for k in LONG_TERM)}) AND a.s < c.cs
                   AND date_diff('day', a.e, c.cs) < 91)
        ), step1 AS (
            SELECT la_code, person_id, cluster, {value('event_outcome', 'nfa_deceased')} AS final_outcome, '1' AS sequel_type
            FROM new_clients WHERE date_diff('day', ce, dod) <= 7
        ), step2 AS (
            SELECT la_code, person_id, cluster, c_outcome, '2' FROM new_clients
            WHERE c_outcome = {value('event_outcome', 'admitted_hospital')}
              AND (la_code, person_id, cluster) NOT IN (SELECT (la_code, person_id, cluster) FROM step1)
        ), remaining AS (
            SELECT * FROM new_clients WHERE (la_code, person_id, cluster) NOT IN
                (SELECT (la_code, person_id, cluster) FROM step1 UNION ALL SELECT (la_code, person_id, cluster) FROM step2)
        ), window_rows AS (   -- started in the cluster and running past its end, or starting within 7 days after it
            SELECT a.*, {service_rank} AS service_rank
            FROM around a JOIN remaining r USING (la_code, person_id, cluster)
            WHERE a.s >= a.cs AND a.e > a.ce AND date_diff('day', a.ce, a.s) <= 7
            QUALIFY a.s < coalesce(min(CASE WHEN a.service_type = {st['st_max']} THEN a.s END)
                                   OVER (PARTITION BY a.la_code, a.person_id, a.cluster), {OPEN_END})
        ), step3 AS (   -- a service: the highest in the hierarchy, short-term residential or nursing first
            SELECT la_code, person_id, cluster,
                   arg_min(CASE WHEN service_type = {st['st_other']} AND service_component IN ({st_res})
                                THEN '{ST_RESIDENTIAL_OR_NURSING}' ELSE service_type END,
                           (service_rank, CASE WHEN service_component IN ({st_res}) THEN 1 ELSE 2 END)) AS final_outcome,
                   '3' AS sequel_type
            FROM window_rows GROUP BY ALL HAVING min(service_rank) <> 99
        ), step4_pool AS (
            SELECT * FROM remaining WHERE (la_code, person_id, cluster) NOT IN (SELECT (la_code, person_id, cluster) FROM step3)
        ), nested AS (   -- events starting and ending inside the cluster, ending after its first day
            SELECT a.* FROM around a JOIN step4_pool r USING (la_code, person_id, cluster)
            WHERE a.s >= a.cs AND a.e > a.cs AND a.e <= a.ce
        ), sources AS (
            -- 4a: the cluster's own usable outcome when nothing follows it
            SELECT la_code, person_id, cluster, c_h AS h, 1 AS source FROM step4_pool r
            WHERE c_h < 100 AND NOT EXISTS (SELECT 1 FROM window_rows w WHERE w.la_code = r.la_code
                                            AND w.person_id = r.person_id AND w.cluster = r.cluster)
            UNION ALL   -- 4a and 4b: following non-service events (not 'support ended as planned')
            SELECT DISTINCT r.la_code, r.person_id, r.cluster, unnest([r.c_h, CASE WHEN w.h < 100 THEN w.h END]),
                   unnest([1, 2])
            FROM step4_pool r JOIN window_rows w USING (la_code, person_id, cluster)
            WHERE (r.c_h < 100 OR w.h < 100) AND w.outcome <> {ended_planned} AND NOT coalesce({service.replace('event_type', 'w.event_type')}, true)
            UNION ALL   -- 4c: the last-ending usable assessment or review ending in the cluster's last 13 days
            SELECT la_code, person_id, cluster, arg_max(h, (e, -h, rid)), 3 FROM nested
            WHERE ({assessment} OR {review}) AND date_diff('day', e, ce) < 14 AND h < 100
            GROUP BY ALL
        ), step4 AS (
            SELECT la_code, person_id, cluster, CASE min(h) {by_rank} END AS final_outcome,
                   '4' || chr(96 + CAST(arg_min(source, (h, source)) AS INTEGER)) AS sequel_type
            FROM sources WHERE h IS NOT NULL GROUP BY ALL
        ), step5 AS (
            SELECT DISTINCT la_code, person_id, cluster, {st['st_low_level']} AS final_outcome, '5' AS sequel_type
            FROM nested WHERE {service} AND service_component = {value('service_component', 'equipment')}
              AND (la_code, person_id, cluster) NOT IN (SELECT (la_code, person_id, cluster) FROM step4)
        ), assigned AS (
            SELECT * FROM step1 UNION ALL SELECT * FROM step2 UNION ALL SELECT * FROM step3
            UNION ALL SELECT * FROM step4 UNION ALL SELECT * FROM step5
        )
        SELECT c.la_code, c.person_id, c.cluster, {_band('c.age')} AS age_band,
               coalesce(a.sequel_type, '6') AS sequel_type, coalesce(a.final_outcome, c.c_outcome) AS final_outcome,
               coalesce(a.final_outcome, c.c_outcome) IN ({denominator}) AS in_denominator,
               coalesce(a.final_outcome, c.c_outcome) IN ({numerator}) AS in_numerator
        FROM new_clients c LEFT JOIN assigned a USING (la_code, person_id, cluster)"""


def ascof_2a_sql(joined: str = "joined", persons: str = "persons") -> str:
    """Short-term support (ST-Max) of new clients with no further request for long-term support."""
    return f"""
        SELECT la_code, '2A' AS measure, grp AS measure_group,
               count(*) FILTER (WHERE in_numerator) AS numerator, count(*) FILTER (WHERE in_denominator) AS denominator
        FROM (SELECT *, unnest(list_filter(['{TOTAL}', age_band], lambda x: x IS NOT NULL)) AS grp
              FROM ({ascof_2a_clusters_sql(joined, persons)}))
        GROUP BY ALL"""


def ascof_2a_outcomes_sql(joined: str = "joined", persons: str = "persons") -> str:
    """DHSC's 2A breakdown: clusters by age group, sequel type and final outcome."""
    return f"""
        SELECT la_code, grp AS age_group, sequel_type, final_outcome, in_denominator, in_numerator, count(*) AS clusters
        FROM (SELECT *, unnest(list_filter(['{TOTAL}', age_band], lambda x: x IS NOT NULL)) AS grp
              FROM ({ascof_2a_clusters_sql(joined, persons)}))
        GROUP BY ALL"""


# --- ASCOF 2B / 2C ----------------------------------------------------------------------------------

def ascof_2bc_sql(joined: str = "joined", persons: str = "persons", population: str = "population") -> str:
    """New permanent admissions to residential and nursing care per 100,000 (18-64: 2B, 65+: 2C)."""
    care = values("service_type", ("lts_residential", "lts_nursing"))
    self_funded = value("event_outcome", "nfa_self_funded")
    return f"""
        WITH services AS (
            SELECT j.la_code, j.person_id, j.event_start_date AS s, j.der_event_end_date AS e, j.event_outcome_cleaned,
                   j.row_number, p.birth_year, p.birth_month
            FROM {joined} j JOIN {persons} p USING (la_code, person_id)
            WHERE {_is_service()} AND j.service_type_cleaned IN ({care}) AND {_service_user('j.client_type_cleaned')}
              AND p.birth_year IS NOT NULL AND NOT coalesce(p.date_of_death < $period_start, false)
              AND (j.service_component_cleaned ILIKE '%residential%' OR j.service_component_cleaned ILIKE '%nursing%')
              AND NOT (j.service_component_cleaned ILIKE '%short%')
        ), admissions AS (
            SELECT a.*, {_band(_age('a.s'))} AS band FROM services a
            WHERE a.s BETWEEN $period_start AND $period_end AND a.event_outcome_cleaned IS DISTINCT FROM {self_funded}
              AND {_age('a.s')} >= 18
              AND NOT EXISTS (SELECT 1 FROM services b WHERE b.la_code = a.la_code AND b.person_id = a.person_id
                              AND b.s < a.s AND (b.e IS NULL OR date_diff('day', b.e, a.s) < 365))
        ), people AS (SELECT la_code, person_id, min(band) AS band FROM admissions GROUP BY ALL)
        SELECT p.la_code, m.measure, m.band AS measure_group, count(x.person_id) AS numerator,
               CASE m.band WHEN '{AGE_18_64}' THEN p.pop_18_64 ELSE p.pop_65_plus END AS denominator
        FROM {population} p
        CROSS JOIN (VALUES ('2B', '{AGE_18_64}'), ('2C', '{AGE_65_PLUS}')) m(measure, band)
        LEFT JOIN people x ON x.la_code = p.la_code AND x.band = m.band
        GROUP BY ALL"""


# --- ASCOF 2E ---------------------------------------------------------------------------------------

def _ascof_2e_people(joined: str, persons: str) -> str:
    """DHSC's 2E cohort: long-term support clients in the year, alive at its start, aged 18 or over
    or of unknown age, with their latest (or inferred) accommodation."""
    lts = values("service_type", LONG_TERM)
    settled = ", ".join("'" + v.value.replace("'", "''") + "'" for v in load_spec().code_list("accommodation_status").values
                        + load_spec().code_list("accommodation_status").derived_values if v.attrs.get("settled") == 1)
    return f"""
        WITH clients AS (
            SELECT j.la_code, j.person_id,
                   max(least(coalesce(j.der_event_end_date, $period_end), $period_end)) AS at_day
            FROM {joined} j
            WHERE {_is_service()} AND j.service_type_cleaned IN ({lts}) AND {_service_user('j.client_type_cleaned')}
              AND coalesce(j.der_event_end_date >= j.event_start_date, true)
              AND j.event_start_date <= $period_end AND coalesce(j.der_event_end_date, $period_end) >= $period_start
            GROUP BY ALL
        )
        SELECT c.la_code, c.person_id, {_age('c.at_day', 'p.birth_year', 'p.birth_month')} AS age,
               {_band(_age('c.at_day', 'p.birth_year', 'p.birth_month'))} AS band, p.accommodation_status,
               p.accommodation_status IN ({settled}) AS settled, p.gender_cleaned, p.primary_support_reason_cleaned
        FROM clients c JOIN {persons} p USING (la_code, person_id)
        WHERE NOT coalesce(p.date_of_death < $period_start, false)
          AND coalesce({_age('c.at_day', 'p.birth_year', 'p.birth_month')} >= 18, true)"""


def ascof_2e_sql(joined: str = "joined", persons: str = "persons") -> str:
    """Long-term support clients living at home or with family (settled accommodation)."""
    male, female = value("gender", "male"), value("gender", "female")
    ld = value("primary_support_reason", "learning_disability")
    return f"""
        WITH people AS ({_ascof_2e_people(joined, persons)}
        ), grouped AS (
            SELECT *, unnest(list_filter(['{TOTAL}', CASE gender_cleaned WHEN {male} THEN 'Male'
                                                        WHEN {female} THEN 'Female' END], lambda x: x IS NOT NULL)) AS sex
            FROM people WHERE band IS NOT NULL
        )
        SELECT la_code, '2E' AS measure, band || ': ' || sex AS measure_group,
               count(*) FILTER (WHERE settled) AS numerator, count(*) AS denominator
        FROM grouped GROUP BY ALL
        UNION ALL
        SELECT la_code, '2E-LD', '{AGE_18_64}: ' || sex, count(*) FILTER (WHERE settled), count(*)
        FROM grouped WHERE band = '{AGE_18_64}' AND primary_support_reason_cleaned = {ld} GROUP BY ALL"""


UNKNOWN_ACCOMMODATION = "Accommodation status unknown or invalid"
UNKNOWN_DELIVERY = "Unknown or invalid delivery mechanism, or unable to deduce from service component"


def ascof_exclusions_sql(joined: str = "joined", persons: str = "persons") -> str:
    """DHSC's LA_PBI_ASCOF_Excl: people in a measure's cohort whose accommodation (2E, 2E-LD) or
    delivery mechanism (3D clients and carers) is unknown, invalid or only inferred. People of
    unknown age are counted here although the measure leaves them out, as DHSC does."""
    a = values("accommodation_status", ("unknown", "presumed_home", "presumed_community"))
    ld = value("primary_support_reason", "learning_disability")
    return f"""
        WITH people AS ({_ascof_2e_people(joined, persons)})
        SELECT la_code, '2E' AS measure, '{UNKNOWN_ACCOMMODATION}' AS reason, count(DISTINCT person_id) AS people
        FROM people WHERE accommodation_status IN ({a}) GROUP BY ALL
        UNION ALL
        SELECT la_code, '2E-LD', '{UNKNOWN_ACCOMMODATION}', count(DISTINCT person_id)
        FROM people WHERE accommodation_status IN ({a}) AND band = '{AGE_18_64}' AND primary_support_reason_cleaned = {ld}
        GROUP BY ALL
        UNION ALL
        SELECT la_code, CASE who WHEN 'client' THEN '3D (clients)' ELSE '3D (carers)' END, '{UNKNOWN_DELIVERY}',
               count(DISTINCT person_id)
        FROM ({_ascof_3d_ranked(joined, persons)}) WHERE unknown_delivery GROUP BY ALL"""


# --- ASCOF 3D ---------------------------------------------------------------------------------------

def _ascof_3d_ranked(joined: str, persons: str) -> str:
    """One row per person of 3D's cohorts: `who` client (long-term support open at the period end,
    alive then: a death on the last day still counts, as DHSC keeps Date_of_Death_Latest >= the
    period end) or carer (support in the year, alive at its start), the best-ranked support
    (clients: 1 nursing, 2 residential, 3-6 community by direct payment, managed budget,
    commissioned, unknown; 7-9 prison; carers: 1 direct payment ... 4 unknown delivery mechanism,
    5 information only, 6 no direct support), age at the period end (the youngest record for carers),
    and whether the delivery mechanism is unknown (DHSC's exclusion count)."""
    st = {k: value("service_type", k) for k in (*LONG_TERM, *CARER_SUPPORT)}
    dm = {k: value("delivery_mechanism", k) for k in ("direct_payment", "managed_budget", "commissioned")}
    dp_component = value("service_component", "direct_payment")
    info = value("event_outcome", "nfa_information")
    carers = values("client_type", ("unpaid_carer", "carer_by_association"))
    return f"""
        WITH client_services AS (
            SELECT j.la_code, j.person_id, j.service_type_cleaned AS st, j.service_component_cleaned AS sc,
                   CASE WHEN j.service_component_cleaned = {dp_component} THEN {dm['direct_payment']}
                        ELSE j.delivery_mechanism_cleaned END AS dm0
            FROM {joined} j JOIN {persons} p USING (la_code, person_id)
            WHERE {_is_service()} AND {_service_user('j.client_type_cleaned')}
              AND j.service_type_cleaned IN ({values('service_type', LONG_TERM)})
              AND coalesce(j.der_event_end_date >= j.event_start_date, true)
              AND j.event_start_date <= $period_end AND coalesce(j.der_event_end_date, $period_end) >= $period_end
              AND coalesce(p.date_of_death >= $period_end, true)
        ), ranked AS (
            SELECT *, CASE WHEN st = {st['lts_nursing']} THEN 1 WHEN st = {st['lts_residential']} THEN 2
                           WHEN st = {st['lts_community']} THEN CASE dm0 WHEN {dm['direct_payment']} THEN 3
                                WHEN {dm['managed_budget']} THEN 4 WHEN {dm['commissioned']} THEN 5 ELSE 6 END
                           ELSE CASE dm0 WHEN {dm['managed_budget']} THEN 7 WHEN {dm['commissioned']} THEN 8 ELSE 9 END
                      END AS rk
            FROM client_services
        ), clients AS (
            SELECT r.la_code, r.person_id, min(r.rk) AS best,
                   {_age('$period_end', 'any_value(p.birth_year)', 'any_value(p.birth_month)')} AS age
            FROM ranked r JOIN {persons} p USING (la_code, person_id) GROUP BY ALL
        ), carer_events AS (
            SELECT j.la_code, j.person_id, j.birth_year, j.birth_month,
                   CASE WHEN j.service_type_cleaned = {st['carer_direct']} THEN
                            CASE WHEN j.delivery_mechanism_cleaned = {dm['direct_payment']}
                                      OR j.service_component_cleaned = {dp_component} THEN 1
                                 WHEN j.delivery_mechanism_cleaned = {dm['managed_budget']}
                                      AND j.service_component_cleaned <> {dp_component} THEN 2
                                 WHEN j.delivery_mechanism_cleaned = {dm['commissioned']}
                                      AND j.service_component_cleaned <> {dp_component} THEN 3
                                 WHEN coalesce(j.delivery_mechanism_cleaned, '') NOT IN
                                      ({dm['managed_budget']}, {dm['commissioned']}) THEN 4 END
                        WHEN j.service_type_cleaned IS NULL AND j.event_outcome_cleaned = {info} THEN 5
                        ELSE 6 END AS rk
            FROM {joined} j JOIN {persons} p USING (la_code, person_id)
            WHERE j.client_type_cleaned IN ({carers}) AND coalesce(j.der_event_end_date >= j.event_start_date, true)
              AND j.event_start_date <= $period_end AND coalesce(j.der_event_end_date, $period_end) >= $period_start
              AND NOT coalesce(p.date_of_death < $period_start, false)
              AND ((j.service_type_cleaned IS NULL AND j.event_outcome_cleaned = {info})
                   OR j.service_type_cleaned IN ({st['carer_direct']}, {st['carer_involving']})
                   OR ((({is_event('assessment', 'j.event_type_cleaned')}) OR ({is_event('review', 'j.event_type_cleaned')}))
                       AND j.service_type_cleaned IS NULL))
        ), carers AS (
            SELECT la_code, person_id, min(rk) AS best,
                   CAST(floor(date_diff('day', max(make_date(birth_year, birth_month, 1)), $period_end) / 365.25)
                        AS INTEGER) AS age
            FROM carer_events WHERE rk IS NOT NULL GROUP BY ALL
        )
        SELECT la_code, person_id, 'client' AS who, best, age, best = 6 AS unknown_delivery
        FROM clients WHERE coalesce(age >= 18, true)
        UNION ALL
        SELECT la_code, person_id, 'carer', best, age, best = 4 FROM carers WHERE coalesce(age >= 18, true)"""


def ascof_3d_sql(joined: str = "joined", persons: str = "persons") -> str:
    """Self-directed support and direct payments: clients (1a, 2a) at year end, carers (1b, 2b) in year."""
    return f"""
        WITH people AS (
            SELECT *, unnest(list_filter(['{TOTAL}', {_band('age')}], lambda x: x IS NOT NULL)) AS grp
            FROM ({_ascof_3d_ranked(joined, persons)})
        ), client_groups AS (SELECT * FROM people WHERE who = 'client' AND best BETWEEN 3 AND 6
        ), carer_groups AS (SELECT * FROM people WHERE who = 'carer')
        SELECT la_code, '3D-1a' AS measure, grp AS measure_group, count(*) FILTER (WHERE best IN (3, 4)) AS numerator,
               count(*) AS denominator FROM client_groups GROUP BY ALL
        UNION ALL
        SELECT la_code, '3D-2a', grp, count(*) FILTER (WHERE best = 3), count(*) FROM client_groups GROUP BY ALL
        UNION ALL
        SELECT la_code, '3D-1b', grp, count(*) FILTER (WHERE best IN (1, 2)), count(*) FILTER (WHERE best <= 3)
        FROM carer_groups GROUP BY ALL
        UNION ALL
        SELECT la_code, '3D-2b', grp, count(*) FILTER (WHERE best = 1), count(*) FILTER (WHERE best <= 3)
        FROM carer_groups GROUP BY ALL"""


# --- waiting times (DHSC waiting_times_method.sql v1.1; v1.1.4 computes the same) ------------------

WAIT_AGE_BANDS = ("25 to 64", "65 and above")   # DHSC's Modified_Working_Age_Band: 18 to 64 becomes 25 to 64


def _wait_band(col: str = "der_working_age_band") -> str:
    return f"CASE WHEN {col} = '{AGE_18_64}' THEN '{WAIT_AGE_BANDS[0]}' ELSE {col} END"


def wait_events_sql(joined: str = "joined") -> str:
    """DHSC stages 1.1 to 2.1: valid requests (service users aged 25 and over, from 2023-04-01, not
    already receiving support, outcome group not NFA or admitted to hospital: a blank outcome is
    dropped as SQL's NOT IN drops it) with the short and long term assessments and the services of
    people aged 25 and over; `kind` 0 request, 1 assessment, 2 service; `band` the event's own band."""
    assessments = values("assessment_type", ("short_term", "long_term"))
    lts = values("service_type", LONG_TERM)
    short = values("service_type", ("st_max", "st_other"))
    all_services = values("service_type", (*LONG_TERM, "st_max", "st_low_level", "st_other"))
    request, assessment, service = is_event("request"), is_event("assessment"), is_event("service")
    excluded_groups = ", ".join(f"'{g}'" for g in ("NFA", load_spec().code_list("event_outcome").entry(
        load_spec().code_list("event_outcome").value("admitted_hospital")).group))
    cols = ("la_code, person_id, event_start_date AS s, event_outcome_cleaned AS outcome, der_conversation, received_at, "
            f"row_number, assessment_type_cleaned, service_type_cleaned, {_wait_band()} AS band")
    return f"""
        WITH base AS (
            SELECT * FROM {joined} WHERE age_at_event_start >= 25 AND person_id IS NOT NULL
        ), requests AS (
            SELECT r.* FROM base r
            WHERE {request} AND {_service_user('r.client_type_cleaned')} AND r.event_start_date >= DATE '2023-04-01'
              AND {group_of('event_outcome', 'r.event_outcome_cleaned')} NOT IN ({excluded_groups})
              AND NOT EXISTS (
                  SELECT 1 FROM {joined} s WHERE s.la_code = r.la_code AND s.person_id = r.person_id AND {service}
                     AND s.event_start_date < r.event_start_date
                     AND ((s.service_type_cleaned IN ({lts}) AND (s.der_event_end_date IS NULL
                           OR s.der_event_end_date >= r.event_start_date - INTERVAL 12 MONTH))
                       OR (s.service_type_cleaned IN ({short}) AND (s.der_event_end_date IS NULL
                           OR s.der_event_end_date >= r.event_start_date - INTERVAL 3 MONTH))))
        )
        SELECT {cols}, 0 AS kind FROM requests
        UNION ALL
        SELECT {cols}, 1 FROM base WHERE {assessment} AND assessment_type_cleaned IN ({assessments})
        UNION ALL
        SELECT {cols}, 2 FROM base WHERE {service} AND service_type_cleaned IN ({all_services})"""


def waits_sql(joined: str = "joined") -> str:
    """One row per counted request (DHSC stages 2.2 to 4.1): its first response (`response`
    'request' for a conversation-1 request before 2025-07-01, 'service' when a service comes before
    any assessment, else 'assessment') and its first service (none after an assessment block that
    does not progress to services), with their types and bands. A request whose follow-up overlaps
    an earlier request's (stage 3.4, on the modified orders) is not counted."""
    o = {k: value("event_outcome", k) for k in ("progress_reablement", "progress_assessment", "progress_services",
                                               "continuation", "release1_only")}
    return f"""
        WITH events AS ({wait_events_sql(joined)}
        ), ordered AS (
            SELECT *, row_number() OVER (PARTITION BY la_code, person_id
                                         ORDER BY s, kind, received_at DESC, row_number DESC) AS ord,
                   outcome IN ({o['progress_reablement']}, {o['progress_assessment']}, {o['progress_services']},
                               {o['continuation']}, {o['release1_only']}) AS request_progress,
                   outcome IN ({o['progress_reablement']}, {o['progress_services']}, {o['continuation']}) AS to_service
            FROM events
            WHERE (la_code, person_id) IN (SELECT la_code, person_id FROM events WHERE kind = 0)
        ), blocks AS (   -- stage 2.3b: a run of consecutive assessments progresses if any of them does
            SELECT *, bool_or(coalesce(to_service, false)) FILTER (WHERE kind = 1)
                          OVER (PARTITION BY la_code, person_id, block) AS block_to_service
            FROM (SELECT *, sum(CASE WHEN kind <> 1 THEN 1 ELSE 0 END)
                                OVER (PARTITION BY la_code, person_id ORDER BY ord ROWS UNBOUNDED PRECEDING) AS block
                  FROM ordered)
        ), nexts AS (   -- stage 2.4: the first assessment and the first service after each event
            SELECT *, min(CASE WHEN kind = 1 THEN ord END) OVER w AS a_ord, min(CASE WHEN kind = 2 THEN ord END) OVER w AS v_ord
            FROM blocks WINDOW w AS (PARTITION BY la_code, person_id ORDER BY ord
                                     ROWS BETWEEN 1 FOLLOWING AND UNBOUNDED FOLLOWING)
        ), linked AS (
            SELECT r.la_code, r.person_id, r.ord, r.s AS request_start, r.band AS request_band,
                   CASE WHEN r.s < DATE '2025-07-01' AND coalesce(r.der_conversation, false) AND r.request_progress
                             AND (a.s IS NULL OR r.s < a.s) THEN 'request'                       -- stage 3.1
                        WHEN v.ord IS NOT NULL AND (a.ord IS NULL OR a.ord > v.ord) THEN 'service'  -- stage 3.2
                        WHEN a.ord IS NOT NULL THEN 'assessment' END AS response,
                   a.ord AS a_ord, a.s AS a_start, a.band AS a_band, a.assessment_type_cleaned AS a_type,
                   a.block_to_service, v.ord AS v_ord, v.s AS v_start, v.band AS v_band, v.service_type_cleaned AS v_type
            FROM nexts r
            LEFT JOIN blocks a ON a.la_code = r.la_code AND a.person_id = r.person_id AND a.ord = r.a_ord
            LEFT JOIN blocks v ON v.la_code = r.la_code AND v.person_id = r.person_id AND v.ord = r.v_ord
            WHERE r.kind = 0
        ), modified AS (   -- DHSC's modified next assessment (first response) and next service (stage 3.3)
            SELECT *,
                   CASE response WHEN 'request' THEN ord WHEN 'service' THEN v_ord WHEN 'assessment' THEN a_ord END AS m_a,
                   CASE WHEN response = 'assessment' AND NOT block_to_service THEN NULL ELSE v_ord END AS m_s
            FROM linked
        ), flagged AS (   -- stage 3.4, token for token: greatest() ignores NULLs, comparisons with NULL never flag
            SELECT *,
                   coalesce(lag(greatest(m_a, m_s)) OVER w > ord, false)
                   OR coalesce(m_a <= coalesce(max(m_a) OVER earlier, 0), false)
                   OR coalesce(m_s <= coalesce(max(m_s) OVER earlier, 0), false) AS overlapping
            FROM modified
            WINDOW w AS (PARTITION BY la_code, person_id ORDER BY ord),
                   earlier AS (PARTITION BY la_code, person_id ORDER BY ord ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING)
        )
        SELECT la_code, person_id, request_start, response,
               CASE response WHEN 'request' THEN request_start WHEN 'service' THEN v_start ELSE a_start END AS response_start,
               CASE response WHEN 'request' THEN request_band WHEN 'service' THEN v_band ELSE a_band END AS response_band,
               CASE response WHEN 'assessment' THEN a_type END AS response_assessment_type,
               CASE WHEN m_s IS NOT NULL THEN v_start END AS service_start,
               CASE WHEN m_s IS NOT NULL THEN v_band END AS service_band,
               CASE WHEN m_s IS NOT NULL THEN v_type END AS service_type
        FROM flagged
        WHERE response IS NOT NULL AND NOT overlapping"""


def wait_context_sql(joined: str = "joined") -> str:
    """DHSC stage 5.1: requests, assessments and services behind the waits, by the event's own
    statistical quarter and band (before people without a valid request are dropped, as DHSC does)."""
    return f"""
        SELECT la_code, CAST(date_trunc('quarter', s) AS DATE) AS statistical_quarter_start, band AS age_band,
               count(*) FILTER (WHERE kind = 0) AS requests, count(*) FILTER (WHERE kind = 1) AS assessments,
               count(*) FILTER (WHERE kind = 2) AS services
        FROM ({wait_events_sql(joined)}) WHERE s >= DATE '2023-04-01' GROUP BY ALL"""
