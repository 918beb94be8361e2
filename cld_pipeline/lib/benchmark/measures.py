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
            SELECT la_code, person_id,
                   CASE WHEN count(DISTINCT service_type_cleaned) = 1 THEN any_value(service_type_cleaned) END AS st,
                   CASE WHEN count(DISTINCT coalesce(service_component_cleaned, '')) = 1
                        THEN any_value(service_component_cleaned) END AS sc
            FROM (SELECT *, dense_rank() OVER (PARTITION BY la_code, person_id ORDER BY
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
               CASE WHEN x.{acc} <> {a['unknown']} THEN x.{acc}
                    WHEN s.st = {svc['lts_nursing']} THEN {a['nursing_home']}
                    WHEN s.st = {svc['lts_residential']} THEN {a['care_home']}
                    WHEN s.sc = {comp['shared_lives']} THEN {a['shared_lives']}
                    WHEN s.sc = {comp['extra_care']} THEN {a['sheltered_housing']}
                    WHEN s.sc = {comp['supported_living']} THEN {a['supported_accommodation']}
                    WHEN s.st = {svc['lts_community']} AND s.sc = {comp['home_support']} THEN {a['presumed_home']}
                    WHEN s.st = {svc['lts_community']} THEN {a['presumed_community']}
                    WHEN s.st = {svc['lts_prison']} THEN {a['prison']}
                    ELSE {a['unknown']} END AS accommodation_status,
               x.{acc} <> {a['unknown']} AS accommodation_known
        FROM birth b
        JOIN {acc}_pick x USING (la_code, person_id)
        JOIN gender_cleaned_pick g USING (la_code, person_id)
        JOIN primary_support_reason_cleaned_pick p USING (la_code, person_id)
        LEFT JOIN latest_service s USING (la_code, person_id)"""


# --- ASCOF 2A ---------------------------------------------------------------------------------------

def ascof_2a_sql(joined: str = "joined", persons: str = "persons") -> str:
    """Reablement (ST-Max) clusters ending in the year, of new clients, classified by their sequel."""
    o = {k: value("event_outcome", k) for k in (
        "nfa_deceased", "admitted_hospital", "nfa_ended_planned", "continuation", "progress_services",
        "progress_assessment", "progress_reablement", "release1_only")}
    invalid = "'" + load_spec().derived.invalid_value + "'"
    unusable = f"{o['continuation']}, {o['progress_services']}, {o['progress_assessment']}, " \
               f"{o['progress_reablement']}, {o['release1_only']}, {invalid}"
    usable_rank = f"CASE WHEN outcome IN ({unusable}) OR outcome IS NULL THEN rk + 100 ELSE rk END"
    st = {k: value("service_type", k) for k in ("st_max", "st_other", "st_low_level", *LONG_TERM)}
    st_res = values("service_component", ("st_residential", "st_nursing"))
    equipment = value("service_component", "equipment")
    denominator = ", ".join([*(st[k] for k in LONG_TERM), st["st_low_level"], st["st_other"],
                             f"'{ST_RESIDENTIAL_OR_NURSING}'",
                             values("event_outcome", ("nfa_information", "nfa_ended_planned", "nfa_moved", "nfa_other",
                                                      "nfa_no_services", "nfa_ended_other", "nfa_other_service"))])
    not_numerator = ", ".join([*(st[k] for k in LONG_TERM), f"'{ST_RESIDENTIAL_OR_NURSING}'"])
    return f"""
        WITH stmax AS (
            SELECT la_code, person_id, event_start_date AS s, coalesce(der_event_end_date, {OPEN_END}) AS e,
                   event_outcome_cleaned AS outcome, event_outcome_hierarchy AS rk,
                   submission_id || lpad(CAST(row_number AS VARCHAR), 10, '0') AS rid
            FROM {joined}
            WHERE {_is_service()} AND service_type_cleaned = {st['st_max']} AND {_service_user()}
        ), flagged AS (
            SELECT *, CASE WHEN max(e) OVER w IS NULL OR date_diff('day', max(e) OVER w, s) > 7 THEN 1 ELSE 0 END AS new
            FROM stmax WINDOW w AS (PARTITION BY la_code, person_id ORDER BY s, e, rk, rid DESC
                                    ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING)
        ), numbered AS (
            SELECT *, sum(new) OVER (PARTITION BY la_code, person_id ORDER BY s, e, rk, rid DESC) AS cluster FROM flagged
        ), clusters AS (
            SELECT la_code, person_id, cluster, min(s) AS cs, max(e) AS ce,
                   arg_min(outcome, (-date_diff('day', DATE '2000-01-01', e), rk, rid)) AS outcome
            FROM numbered GROUP BY ALL
        ), eligible AS (
            SELECT c.*, {_age('c.ce', 'p.birth_year', 'p.birth_month')} AS age, p.date_of_death
            FROM clusters c JOIN {persons} p USING (la_code, person_id)
            WHERE c.ce BETWEEN $period_start AND $period_end
              AND coalesce({_age('c.ce', 'p.birth_year', 'p.birth_month')} >= 18, true)
              AND NOT coalesce(p.date_of_death < c.cs, false)
              AND NOT EXISTS (
                  SELECT 1 FROM {joined} j WHERE j.la_code = c.la_code AND j.person_id = c.person_id AND {_is_service()}
                     AND j.service_type_cleaned IN ({', '.join(st[k] for k in LONG_TERM)}) AND j.event_start_date < c.cs
                     AND (j.der_event_end_date IS NULL OR j.der_event_end_date > c.cs
                          OR date_diff('day', j.der_event_end_date, c.cs) < 91))
        ), next_service AS (
            SELECT c.la_code, c.person_id, c.cluster,
                   arg_min(CASE WHEN j.service_type_cleaned = {st['st_other']} AND j.service_component_cleaned IN ({st_res})
                                THEN '{ST_RESIDENTIAL_OR_NURSING}' ELSE j.service_type_cleaned END,
                           ({rank_of('service_type', 'j.service_type_cleaned', 99)},
                            CASE WHEN j.service_component_cleaned IN ({st_res}) THEN 0 ELSE 1 END)) AS next_type
            FROM eligible c JOIN {joined} j ON j.la_code = c.la_code AND j.person_id = c.person_id AND {_is_service()}
             AND j.service_type_cleaned <> {st['st_max']}
             AND j.service_type_cleaned NOT IN ({values('service_type', CARER_SUPPORT)})
             AND j.event_start_date >= c.cs AND coalesce(j.der_event_end_date, {OPEN_END}) > c.ce
             AND j.event_start_date <= c.ce + 7
            GROUP BY ALL
        ), candidates AS (
            SELECT la_code, person_id, cluster, outcome, rk FROM (
                SELECT c.la_code, c.person_id, c.cluster, c.outcome, {rank_of('event_outcome', 'c.outcome')} AS rk
                FROM eligible c
                UNION ALL
                SELECT c.la_code, c.person_id, c.cluster, j.event_outcome_cleaned, j.event_outcome_hierarchy
                FROM eligible c JOIN {joined} j ON j.la_code = c.la_code AND j.person_id = c.person_id
                 AND NOT ({_is_service()}) AND j.event_start_date BETWEEN c.ce AND c.ce + 7
                 AND j.event_outcome_cleaned <> {o['nfa_ended_planned']}
                UNION ALL
                SELECT c.la_code, c.person_id, c.cluster, j.event_outcome_cleaned, j.event_outcome_hierarchy
                FROM eligible c JOIN {joined} j ON j.la_code = c.la_code AND j.person_id = c.person_id
                 AND ({is_event('assessment', 'j.event_type_cleaned')} OR {is_event('review', 'j.event_type_cleaned')})
                 AND j.event_start_date >= c.cs AND j.der_event_end_date <= c.ce
                 AND date_diff('day', j.der_event_end_date, c.ce) < 14)
        ), best AS (
            SELECT la_code, person_id, cluster, arg_min(outcome, {usable_rank}) AS outcome, min({usable_rank}) AS r
            FROM candidates GROUP BY ALL
        ), equipment AS (
            SELECT DISTINCT c.la_code, c.person_id, c.cluster FROM eligible c JOIN {joined} j
              ON j.la_code = c.la_code AND j.person_id = c.person_id AND {_is_service()}
             AND j.service_component_cleaned = {equipment} AND j.event_start_date >= c.cs
             AND coalesce(j.der_event_end_date, {OPEN_END}) <= c.ce
        ), sequel AS (
            SELECT c.*,
                   CASE WHEN c.date_of_death <= c.ce + 7 THEN {o['nfa_deceased']}
                        WHEN c.outcome = {o['admitted_hospital']} THEN c.outcome
                        WHEN n.next_type IS NOT NULL THEN n.next_type
                        WHEN b.r < 100 THEN b.outcome
                        WHEN q.cluster IS NOT NULL THEN {st['st_low_level']}
                        ELSE c.outcome END AS final_outcome
            FROM eligible c
            LEFT JOIN next_service n USING (la_code, person_id, cluster)
            LEFT JOIN best b USING (la_code, person_id, cluster)
            LEFT JOIN equipment q USING (la_code, person_id, cluster)
        ), classified AS (
            SELECT *, final_outcome IN ({denominator}) AS in_den,
                   final_outcome IN ({denominator}) AND final_outcome NOT IN ({not_numerator}) AS in_num
            FROM sequel
        )
        SELECT la_code, '2A' AS measure, grp AS measure_group,
               count(*) FILTER (WHERE in_num) AS numerator, count(*) FILTER (WHERE in_den) AS denominator
        FROM (SELECT *, unnest(list_filter(['{TOTAL}', {_band('age')}], lambda x: x IS NOT NULL)) AS grp FROM classified)
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

def ascof_2e_sql(joined: str = "joined", persons: str = "persons") -> str:
    """Long-term support clients living at home or with family (settled accommodation)."""
    lts = values("service_type", LONG_TERM)
    settled = ", ".join("'" + v.value.replace("'", "''") + "'" for v in load_spec().code_list("accommodation_status").values
                        + load_spec().code_list("accommodation_status").derived_values if v.attrs.get("settled") == 1)
    male, female = value("gender", "male"), value("gender", "female")
    ld = value("primary_support_reason", "learning_disability")
    return f"""
        WITH clients AS (
            SELECT j.la_code, j.person_id,
                   max(least(coalesce(j.der_event_end_date, $period_end), $period_end)) AS at_day
            FROM {joined} j
            WHERE {_is_service()} AND j.service_type_cleaned IN ({lts}) AND {_service_user('j.client_type_cleaned')}
              AND j.event_start_date <= $period_end AND coalesce(j.der_event_end_date, $period_end) >= $period_start
            GROUP BY ALL
        ), people AS (
            SELECT c.la_code, c.person_id, {_band(_age('c.at_day', 'p.birth_year', 'p.birth_month'))} AS band,
                   p.accommodation_status IN ({settled}) AS settled, p.gender_cleaned, p.primary_support_reason_cleaned
            FROM clients c JOIN {persons} p USING (la_code, person_id)
            WHERE NOT coalesce(p.date_of_death < $period_start, false)
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


def ascof_2e_excluded_sql(joined: str = "joined", persons: str = "persons") -> str:
    """People whose accommodation is unknown, invalid or inferred (DHSC's LA_PBI_ASCOF_Excl)."""
    lts = values("service_type", LONG_TERM)
    return f"""
        SELECT p.la_code, count(DISTINCT p.person_id) AS people
        FROM {persons} p WHERE NOT p.accommodation_known AND EXISTS (
            SELECT 1 FROM {joined} j WHERE j.la_code = p.la_code AND j.person_id = p.person_id AND {_is_service()}
               AND j.service_type_cleaned IN ({lts}) AND j.event_start_date <= $period_end
               AND coalesce(j.der_event_end_date, $period_end) >= $period_start)
        GROUP BY ALL"""


# --- ASCOF 3D ---------------------------------------------------------------------------------------

def ascof_3d_sql(joined: str = "joined", persons: str = "persons") -> str:
    """Self-directed support and direct payments: clients (1a, 2a) at year end, carers (1b, 2b) in year."""
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
              AND j.event_start_date <= $period_end AND coalesce(j.der_event_end_date, $period_end) >= $period_end
              AND NOT coalesce(p.date_of_death <= $period_end, false)
        ), ranked AS (
            SELECT *, CASE WHEN st IN ({st['lts_community']}, {st['lts_prison']})
                           AND dm0 IN ({dm['direct_payment']}, {dm['managed_budget']}, {dm['commissioned']})
                           THEN dm0 ELSE '' END AS dm,
                   CASE WHEN st = {st['lts_nursing']} THEN 1 WHEN st = {st['lts_residential']} THEN 2
                        WHEN st = {st['lts_community']} THEN CASE dm0 WHEN {dm['direct_payment']} THEN 3
                             WHEN {dm['managed_budget']} THEN 4 WHEN {dm['commissioned']} THEN 5 ELSE 6 END
                        ELSE CASE dm0 WHEN {dm['managed_budget']} THEN 7 WHEN {dm['commissioned']} THEN 8 ELSE 9 END
                   END AS rk
            FROM client_services
        ), clients AS (
            SELECT r.la_code, r.person_id, min(r.rk) AS best, any_value(p.birth_year) AS birth_year,
                   any_value(p.birth_month) AS birth_month
            FROM ranked r JOIN {persons} p USING (la_code, person_id) GROUP BY ALL
        ), client_groups AS (
            SELECT *, unnest(list_filter(['{TOTAL}', {_band(_age('$period_end'))}], lambda x: x IS NOT NULL)) AS grp
            FROM clients WHERE best BETWEEN 3 AND 6 AND coalesce({_age('$period_end')} >= 18, true)
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
            WHERE j.client_type_cleaned IN ({carers})
              AND j.event_start_date <= $period_end AND coalesce(j.der_event_end_date, $period_end) >= $period_start
              AND NOT coalesce(p.date_of_death < $period_start, false)
              AND ((j.service_type_cleaned IS NULL AND j.event_outcome_cleaned = {info})
                   OR j.service_type_cleaned IN ({st['carer_direct']}, {st['carer_involving']})
                   OR ((({is_event('assessment', 'j.event_type_cleaned')}) OR ({is_event('review', 'j.event_type_cleaned')}))
                       AND j.service_type_cleaned IS NULL))
        ), carers AS (
            SELECT la_code, person_id, min(rk) AS best, max(make_date(birth_year, birth_month, 1)) AS youngest
            FROM carer_events WHERE rk IS NOT NULL GROUP BY ALL
        ), carer_groups AS (
            SELECT *, unnest(list_filter(['{TOTAL}', {_band("CAST(floor(date_diff('day', youngest, $period_end) / 365.25) AS INTEGER)")}],
                                         lambda x: x IS NOT NULL)) AS grp
            FROM carers
        )
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


# --- waiting times (section 4, provisional method v1.1) -------------------------------------------

def waits_sql(joined: str = "joined") -> str:
    """One row per counted request: days to first response (request_to_assessment: the first
    assessment, or the service/request overrides), from response to service, and to first service."""
    o = {k: value("event_outcome", k) for k in ("progress_reablement", "progress_assessment", "progress_services",
                                               "continuation", "release1_only")}
    assessments = values("assessment_type", ("short_term", "long_term"))
    lts = values("service_type", LONG_TERM)
    short = values("service_type", ("st_max", "st_other"))
    all_services = values("service_type", (*LONG_TERM, "st_max", "st_low_level", "st_other"))
    request, assessment, service = is_event("request"), is_event("assessment"), is_event("service")
    grouped_excluded = ", ".join(f"'{g}'" for g in ("NFA", load_spec().code_list("event_outcome").entry(
        load_spec().code_list("event_outcome").value("admitted_hospital")).group))
    return f"""
        WITH base AS (
            SELECT * FROM {joined} WHERE age_at_event_start >= 25 AND person_id IS NOT NULL
        ), requests AS (
            SELECT r.* FROM base r
            WHERE {request} AND {_service_user('r.client_type_cleaned')} AND r.event_start_date >= DATE '2023-04-01'
              AND coalesce({group_of('event_outcome', 'r.event_outcome_cleaned')} NOT IN ({grouped_excluded}), true)
              AND NOT EXISTS (
                  SELECT 1 FROM {joined} s WHERE s.la_code = r.la_code AND s.person_id = r.person_id AND {service}
                     AND s.event_start_date < r.event_start_date
                     AND ((s.service_type_cleaned IN ({lts}) AND (s.der_event_end_date IS NULL
                           OR s.der_event_end_date >= r.event_start_date - INTERVAL 12 MONTH))
                       OR (s.service_type_cleaned IN ({short}) AND (s.der_event_end_date IS NULL
                           OR s.der_event_end_date >= r.event_start_date - INTERVAL 3 MONTH))))
        ), events AS (
            SELECT la_code, person_id, event_start_date AS s, 0 AS kind, event_outcome_cleaned AS outcome,
                   der_conversation, received_at, row_number, age_at_event_start AS age FROM requests
            UNION ALL
            SELECT la_code, person_id, event_start_date, 1, event_outcome_cleaned, der_conversation, received_at,
                   row_number, age_at_event_start FROM base
            WHERE {assessment} AND assessment_type_cleaned IN ({assessments})
            UNION ALL
            SELECT la_code, person_id, event_start_date, 2, event_outcome_cleaned, der_conversation, received_at,
                   row_number, age_at_event_start FROM base
            WHERE {service} AND service_type_cleaned IN ({all_services})
        ), ordered AS (
            SELECT *, row_number() OVER (PARTITION BY la_code, person_id
                                         ORDER BY s, kind, received_at DESC, row_number DESC) AS ord,
                   outcome IN ({o['progress_reablement']}, {o['progress_assessment']}, {o['progress_services']},
                               {o['continuation']}, {o['release1_only']}) AS request_progress,
                   outcome IN ({o['progress_reablement']}, {o['progress_services']}, {o['continuation']}) AS to_service
            FROM events
            WHERE (la_code, person_id) IN (SELECT la_code, person_id FROM requests)
        ), blocks AS (   -- consecutive assessments form a block that indicates progress if any member does
            SELECT *, bool_or(to_service) OVER (PARTITION BY la_code, person_id, block) AS block_to_service
            FROM (SELECT *, sum(CASE WHEN kind = 1 AND previous_kind = 1 THEN 0 ELSE 1 END)
                                OVER (PARTITION BY la_code, person_id ORDER BY ord ROWS UNBOUNDED PRECEDING) AS block
                  FROM (SELECT *, lag(kind) OVER (PARTITION BY la_code, person_id ORDER BY ord) AS previous_kind
                        FROM ordered))
        ), firsts AS (
            SELECT r.la_code, r.person_id, r.ord, r.s AS request_start, r.der_conversation, r.request_progress, r.age,
                   min(a.ord) AS a_ord, min(v.ord) AS v_ord
            FROM blocks r
            LEFT JOIN blocks a ON a.la_code = r.la_code AND a.person_id = r.person_id AND a.kind = 1 AND a.ord > r.ord
            LEFT JOIN blocks v ON v.la_code = r.la_code AND v.person_id = r.person_id AND v.kind = 2 AND v.ord > r.ord
            WHERE r.kind = 0 GROUP BY ALL
        ), responses AS (
            SELECT f.*, a.s AS a_start, a.block_to_service, v.s AS v_start, v.age AS v_age, a.age AS a_age,
                   CASE WHEN f.request_start < DATE '2025-07-01' AND f.der_conversation AND f.request_progress
                             AND (a.s IS NULL OR a.s > f.request_start) THEN 'request'
                        WHEN v.ord IS NOT NULL AND (a.ord IS NULL OR v.ord < a.ord) THEN 'service'
                        WHEN a.ord IS NOT NULL THEN 'assessment' END AS response
            FROM firsts f
            LEFT JOIN blocks a ON a.la_code = f.la_code AND a.person_id = f.person_id AND a.ord = f.a_ord
            LEFT JOIN blocks v ON v.la_code = f.la_code AND v.person_id = f.person_id AND v.ord = f.v_ord
        ), claimed AS (   -- method step 8: drop requests overlapping an earlier one's follow-up
            SELECT *, max(greatest(coalesce(a_ord, 0), coalesce(v_ord, 0))) OVER w AS prev_follow_up,
                   list(a_ord) OVER w AS prev_a, list(v_ord) OVER w AS prev_v
            FROM responses WINDOW w AS (PARTITION BY la_code, person_id ORDER BY ord
                                        ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING)
        )
        SELECT la_code, person_id, request_start,
               CASE response WHEN 'request' THEN request_start WHEN 'service' THEN v_start ELSE a_start END AS response_start,
               CASE response WHEN 'service' THEN v_age WHEN 'assessment' THEN a_age ELSE age END AS response_age,
               CASE WHEN response = 'assessment' AND NOT block_to_service THEN NULL ELSE v_start END AS service_start,
               v_age AS service_age, response
        FROM claimed
        WHERE response IS NOT NULL
          AND NOT coalesce(prev_follow_up > ord, false)
          AND NOT coalesce(list_contains(prev_a, a_ord) OR list_contains(prev_v, v_ord), false)"""
