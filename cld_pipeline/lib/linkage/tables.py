"""Linkage of social care events to hospital spells on the shared person token, as DuckDB SQL.

Every builder returns a SELECT over two relations with the pseudonymised column names:
`care` (pseudonymised.events rows of one quarter) and `episodes` (pseudonymised.hospital_episodes),
with the reporting period as parameters `$period_start` and `$period_end`. Windows and exclusions
come from the specification (`linkage` in fields.yaml, `ascof_2d_excluded` in code lists), so the
asset layer and the tests on hand-made tables run exactly the same SQL.

Window conventions (domain/privacy.md 2.4, outputs-and-measures.md 3.3):
- a service "within N days of discharge" starts in [discharge - 7, discharge + N];
- 2D outcomes count on days [discharge, discharge + 84]; a readmission is an emergency admission
  after both the discharge and the reablement start, up to discharge + 84;
- "readmission within N days of a service start" is an emergency admission on days 1..N after it.
"""

from __future__ import annotations

from cld_pipeline.spec import load_spec


def _values(code_list: str, keys: tuple[str, ...]) -> str:
    cl = load_spec().code_list(code_list)
    return ", ".join(f"'{cl.value(k)}'" for k in keys)


def _flagged(code_list: str, attr: str) -> str:
    cl = load_spec().code_list(code_list)
    return ", ".join(f"'{v.value}'" for v in cl.values if v.attrs.get(attr)) or "NULL"


def _group(code_list: str, group: str) -> str:
    cl = load_spec().code_list(code_list)
    return ", ".join(f"'{v.value}'" for v in cl.values if v.group == group) or "NULL"


def service_value(key: str) -> str:
    return _values("service_type", (key,))


def event_value(key: str) -> str:
    return _values("event_type", (key,))


LONG_TERM = ("lts_nursing", "lts_residential", "lts_community", "lts_prison")
CARE_HOME_OR_PRISON = ("lts_nursing", "lts_residential", "lts_prison")
RESIDENTIAL_OR_NURSING = ("lts_nursing", "lts_residential")


def spells_sql(episodes: str = "episodes") -> str:
    """One row per hospital spell: its last episode in the latest extract that holds it (a spell
    open at one quarter's end appears again, discharged, in the next), with linkage flags."""
    lk = load_spec().linkage
    tf_excluded = ", ".join(f"'{c}'" for c in lk.excluded_treatment_functions)
    tf_prefix = " OR ".join(f"starts_with(treatment_function_code, '{p}')" for p in lk.excluded_treatment_function_prefixes)
    return f"""
        SELECT *,
               management_type IN ({_group('management_type', 'emergency')}) AS emergency_admission,
               (discharge_date IS NOT NULL AND admission_date <= discharge_date
                AND admission_date >= DATE '{lk.earliest_admission}'
                AND coalesce(admission_method NOT IN ({_flagged('admission_method', 'ascof_2d_excluded')}), true)
                AND coalesce(discharge_method NOT IN ({_flagged('discharge_method', 'ascof_2d_excluded')}), true)
                AND coalesce(discharge_destination NOT IN ({_flagged('discharge_destination', 'ascof_2d_excluded')}), true)
                AND NOT coalesce(treatment_function_code IN ({tf_excluded}) OR {tf_prefix}, false))
                   AS qualifying_discharge
        FROM (
            SELECT * FROM {episodes}
            QUALIFY row_number() OVER (PARTITION BY spell_id ORDER BY extract_quarter DESC,
                                       last_episode_in_spell DESC, row_number DESC) = 1
        )"""


def people_sql(care: str = "care") -> str:
    """Social care people of the quarter, per LA: latest age band, ethnicity group, token source."""
    ethnicity = load_spec().code_list("ethnicity")
    groups = " ".join(f"WHEN '{v.value}' THEN '{v.group}'" for v in ethnicity.values)
    return f"""
        SELECT quarter, la_code, person_id,
               arg_max(person_id_source, event_start_date) AS person_id_source,
               -- a person is linked by NHS number when any row of theirs is, else by the probabilistic link
               CASE WHEN bool_or(link_method = 'nhs_number') THEN 'nhs_number'
                    WHEN bool_or(link_method = 'probabilistic') THEN 'probabilistic' ELSE 'none' END AS link_method,
               CASE WHEN NOT bool_or(link_method = 'nhs_number') THEN max(match_probability) END AS match_probability,
               coalesce(arg_max(gender_cleaned, event_start_date), 'Unknown') AS sex,
               arg_max(age_band, event_start_date) AS age_band,
               coalesce(CASE arg_max(ethnicity_cleaned, event_start_date) {groups} END, 'Unknown') AS ethnicity_group
        FROM {care} WHERE person_id IS NOT NULL GROUP BY ALL"""


def person_spells_sql(care: str = "care", spells: str = "spells") -> str:
    """Each social care person (per LA) with every hospital spell of theirs that overlaps the
    reporting period."""
    return f"""
        SELECT p.quarter, p.la_code, p.person_id, p.link_method, p.match_probability, s.spell_id, s.admission_date, s.discharge_date,
               s.discharge_ready_date, s.admission_method, s.management_type, s.emergency_admission,
               s.discharge_destination, s.age_at_admission
        FROM ({people_sql(care)}) p
        JOIN {spells} s ON s.person_id = p.person_id
        WHERE s.admission_date <= $period_end AND coalesce(s.discharge_date, $period_end) >= $period_start"""


def match_rates_sql(care: str = "care", person_spells: str = "person_spells", by: str | None = None) -> str:
    """People, people linked to at least one spell, and the rate, per LA (and `by` a column of the
    people table, e.g. age_band or ethnicity_group). People whose token comes from an LA person id
    (no valid NHS number) link only through the probabilistic linkage: counted separately."""
    group = f", {by}" if by else ""
    return f"""
        SELECT p.quarter, p.la_code{group}, count(*) AS people,
               count(*) FILTER (WHERE l.person_id IS NOT NULL) AS people_linked,
               count(*) FILTER (WHERE l.person_id IS NOT NULL) / count(*) AS match_rate,
               count(*) FILTER (WHERE p.link_method <> 'nhs_number') AS people_without_nhs_number,
               count(*) FILTER (WHERE l.person_id IS NOT NULL AND p.link_method = 'probabilistic')
                   AS people_linked_probabilistic
        FROM ({people_sql(care)}) p
        LEFT JOIN (SELECT DISTINCT la_code, person_id FROM {person_spells}) l USING (la_code, person_id)
        GROUP BY ALL ORDER BY ALL"""


def linkage_bias_sql(care: str = "care") -> str:
    """Who the probabilistic linkage finds, among people without a valid NHS number: per LA and for
    England, in total and by age band, sex and ethnicity group, how many link to a hospital patient
    and the share left unmatched (a linkage that misses some groups more than others biases every
    linked figure about them)."""
    people = f"(SELECT * FROM ({people_sql(care)}) WHERE link_method <> 'nhs_number')"
    parts = []
    for breakdown, column in (("total", "'total'"), ("age_band", "age_band"), ("sex", "sex"),
                              ("ethnicity_group", "ethnicity_group")):
        parts.append(f"""
            SELECT quarter, coalesce(la_code, 'England') AS geography, '{breakdown}' AS breakdown,
                   {column} AS breakdown_value, count(*) AS people_without_nhs_number,
                   count(*) FILTER (WHERE link_method = 'probabilistic') AS people_linked_probabilistic,
                   count(*) FILTER (WHERE link_method = 'probabilistic') / count(*) AS match_rate,
                   count(*) FILTER (WHERE link_method <> 'probabilistic') / count(*) AS unmatched_share
            FROM {people} GROUP BY GROUPING SETS ((quarter, la_code, {column}), (quarter, {column}))""")
    return " UNION ALL ".join(parts)


def _services(care: str) -> str:
    return f"""SELECT * FROM {care} WHERE event_type_cleaned = {event_value('service')}
               AND person_id IS NOT NULL AND event_start_date IS NOT NULL"""


def discharge_to_care_sql(care: str = "care", spells: str = "spells") -> str:
    """For each discharge in the period of a person known to social care: the next social care event
    and service (starting no earlier than 7 days before discharge), the days to it from discharge
    and from the discharge-ready date, and whether it started within 7 and 28 days."""
    lk = load_spec().linkage
    back = lk.service_lookback_days
    windows = ", ".join(f"coalesce(days_to_service <= {n}, false) AS within_{n}_days" for n in lk.service_windows_days)
    return f"""
        WITH known AS (SELECT DISTINCT person_id FROM {care} WHERE person_id IS NOT NULL),
        discharges AS (
            SELECT s.* FROM {spells} s JOIN known USING (person_id)
            WHERE s.discharge_date BETWEEN $period_start AND $period_end
        ),
        next_service AS (
            SELECT d.spell_id, arg_min(c.event_start_date, (c.event_start_date, c.row_number)) AS start_date,
                   arg_min(c.service_type_cleaned, (c.event_start_date, c.row_number)) AS service_type,
                   arg_min(c.la_code, (c.event_start_date, c.row_number)) AS la_code
            FROM discharges d JOIN ({_services(care)}) c
              ON c.person_id = d.person_id AND c.event_start_date >= d.discharge_date - {back}
            GROUP BY d.spell_id
        ),
        next_event AS (
            SELECT d.spell_id, arg_min(c.event_type_cleaned, (c.event_start_date, c.row_number)) AS event_type,
                   min(c.event_start_date) AS start_date,
                   arg_min(c.la_code, (c.event_start_date, c.row_number)) AS la_code
            FROM discharges d JOIN {care} c
              ON c.person_id = d.person_id AND c.event_start_date >= d.discharge_date - {back}
            GROUP BY d.spell_id
        ),
        latest_la AS (   -- where the person was last known, for discharges followed by nothing
            SELECT person_id, arg_max(la_code, (event_start_date, row_number)) AS la_code FROM {care}
            WHERE person_id IS NOT NULL GROUP BY person_id
        ),
        long_term AS (
            SELECT d.spell_id,
                   bool_or(c.service_type_cleaned IN ({_values('service_type', LONG_TERM)})) AS any_long_term,
                   bool_or(c.service_type_cleaned IN ({_values('service_type', CARE_HOME_OR_PRISON)})) AS care_home
            FROM discharges d JOIN ({_services(care)}) c
              ON c.person_id = d.person_id AND c.event_start_date <= d.admission_date
             AND coalesce(c.event_end_date, DATE '9999-12-31') >= d.admission_date
            GROUP BY d.spell_id
        )
        SELECT $quarter AS quarter, d.person_id,
               coalesce(ns.la_code, ne.la_code, ll.la_code) AS la_code,
               d.spell_id, d.admission_date, d.discharge_date, d.discharge_ready_date, d.age_at_discharge,
               d.discharge_destination, d.qualifying_discharge,
               coalesce(lt.any_long_term, false) AS in_long_term_support_at_admission,
               coalesce(lt.care_home, false) AS in_care_home_or_prison_at_admission,
               ne.event_type AS next_event_type, ne.start_date AS next_event_start_date,
               ns.start_date AS next_service_start_date, ns.service_type AS next_service_type,
               date_diff('day', d.discharge_date, ns.start_date) AS days_to_service,
               date_diff('day', d.discharge_ready_date, ns.start_date) AS days_from_ready_to_service,
               {windows},
               d.discharge_date + {max(lk.service_windows_days)} <= $period_end AS follow_up_complete
        FROM discharges d
        LEFT JOIN next_service ns USING (spell_id)
        LEFT JOIN next_event ne USING (spell_id)
        LEFT JOIN latest_la ll USING (person_id)
        LEFT JOIN long_term lt USING (spell_id)
        ORDER BY la_code, d.discharge_date, d.spell_id"""


def reablement_clusters_sql(care: str = "care") -> str:
    """ST-Max reablement services of service users, merged per person and LA into clusters when the
    gap to the latest end so far is at most 7 days (open ends never close a cluster)."""
    lk = load_spec().linkage
    return f"""
        WITH r AS (
            SELECT la_code, person_id, event_start_date AS s, coalesce(event_end_date, DATE '9999-01-01') AS e,
                   row_number
            FROM ({_services(care)})
            WHERE service_type_cleaned = {service_value('st_max')}
              AND service_component_cleaned = {_values('service_component', ('reablement',))}
              AND client_type_cleaned = {_values('client_type', ('service_user',))}
        ), flagged AS (
            SELECT *, CASE WHEN s - max(e) OVER w > {lk.cluster_gap_days} OR max(e) OVER w IS NULL
                           THEN 1 ELSE 0 END AS starts_cluster
            FROM r WINDOW w AS (PARTITION BY la_code, person_id ORDER BY s, e, row_number
                                ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING)
        ), numbered AS (
            SELECT *, sum(starts_cluster) OVER (PARTITION BY la_code, person_id ORDER BY s, e, row_number) AS cluster
            FROM flagged
        )
        SELECT la_code, person_id, cluster, min(s) AS cluster_start,
               nullif(max(e), DATE '9999-01-01') AS cluster_end, count(*) AS services
        FROM numbered GROUP BY ALL"""


def reablement_outcomes_sql(care: str = "care", spells: str = "spells") -> str:
    """ASCOF 2D per reablement cluster linked to the latest qualifying 65+ discharge in
    [cluster start - 7, cluster start + 3] (admitted by the cluster start) in the period: death,
    emergency readmission and a new long-term residential or nursing service within 84 days."""
    lk = load_spec().linkage
    days = lk.outcome_days
    return f"""
        WITH clusters AS ({reablement_clusters_sql(care)}),
        in_care_home AS (
            SELECT c.person_id, c.event_start_date AS s, coalesce(c.event_end_date, DATE '9999-12-31') AS e
            FROM ({_services(care)}) c
            WHERE c.service_type_cleaned IN ({_values('service_type', CARE_HOME_OR_PRISON)})
        ),
        eligible AS (
            SELECT s.* FROM {spells} s
            WHERE s.qualifying_discharge AND s.age_at_discharge >= {lk.minimum_age}
              AND s.discharge_date BETWEEN $period_start AND $period_end
              AND NOT EXISTS (SELECT 1 FROM in_care_home h WHERE h.person_id = s.person_id
                              AND h.s <= s.admission_date AND h.e >= s.admission_date)
        ),
        linked AS (
            SELECT c.*, arg_max(d.spell_id, (d.discharge_date, d.spell_id)) AS spell_id,
                   max(d.discharge_date) AS discharge_date
            FROM clusters c JOIN eligible d ON d.person_id = c.person_id
             AND d.discharge_date BETWEEN c.cluster_start - {lk.link_days_before} AND c.cluster_start + {lk.link_days_after}
             AND d.admission_date <= c.cluster_start
            GROUP BY ALL
        ),
        deaths AS (SELECT person_id, max(date_of_death) AS date_of_death FROM {care}
                   WHERE date_of_death IS NOT NULL GROUP BY person_id)
        SELECT $quarter AS quarter, l.la_code, l.person_id, l.cluster_start, l.cluster_end, l.services,
               l.spell_id, l.discharge_date, d.age_at_discharge,
               coalesce(x.date_of_death BETWEEN l.discharge_date AND l.discharge_date + {days}, false) AS died,
               EXISTS (SELECT 1 FROM {spells} r WHERE r.person_id = l.person_id AND r.emergency_admission
                       AND r.admission_date > l.discharge_date AND r.admission_date > l.cluster_start
                       AND r.admission_date <= l.discharge_date + {days}) AS readmitted,
               EXISTS (SELECT 1 FROM ({_services(care)}) c WHERE c.person_id = l.person_id
                       AND c.service_type_cleaned IN ({_values('service_type', RESIDENTIAL_OR_NURSING)})
                       AND c.event_start_date BETWEEN l.discharge_date AND l.discharge_date + {days})
                   AS entered_long_term_care,
               l.discharge_date + {days} <= $period_end AS follow_up_complete
        FROM linked l JOIN {spells} d ON d.spell_id = l.spell_id
        LEFT JOIN deaths x ON x.person_id = l.person_id
        ORDER BY l.la_code, l.cluster_start, l.person_id"""


def ascof_2d_sql(outcomes: str = "reablement_outcomes", care: str = "care", spells: str = "spells") -> str:
    """Both parts of ASCOF 2D per LA. Part 1: linked clusters with no death, readmission or long-term
    care within 84 days / linked clusters. Part 2: qualifying 65+ discharges that link to reablement
    / qualifying 65+ discharges of people not in care homes or prison at admission, placed in the LA
    where the person is known to social care (a stand-in for the patient's upper-tier LA from an
    ONS postcode directory, which this pipeline does not hold)."""
    lk = load_spec().linkage
    return f"""
        WITH part1 AS (
            SELECT la_code, count(*) FILTER (WHERE NOT (died OR readmitted OR entered_long_term_care)) AS numerator,
                   count(*) AS denominator, count(*) FILTER (WHERE died) AS died,
                   count(*) FILTER (WHERE readmitted) AS readmitted,
                   count(*) FILTER (WHERE entered_long_term_care) AS entered_long_term_care
            FROM {outcomes} GROUP BY la_code
        ),
        home_la AS (SELECT person_id, arg_max(la_code, (event_start_date, row_number)) AS la_code FROM {care}
                    WHERE person_id IS NOT NULL GROUP BY person_id),
        in_care_home AS (
            SELECT person_id, event_start_date AS s, coalesce(event_end_date, DATE '9999-12-31') AS e
            FROM ({_services(care)}) WHERE service_type_cleaned IN ({_values('service_type', CARE_HOME_OR_PRISON)})
        ),
        discharges AS (
            SELECT h.la_code, s.spell_id FROM {spells} s JOIN home_la h USING (person_id)
            WHERE s.qualifying_discharge AND s.age_at_discharge >= {lk.minimum_age}
              AND s.discharge_date BETWEEN $period_start AND $period_end
              AND NOT EXISTS (SELECT 1 FROM in_care_home c WHERE c.person_id = s.person_id
                              AND c.s <= s.admission_date AND c.e >= s.admission_date)
        ),
        part2 AS (
            SELECT d.la_code, count(DISTINCT d.spell_id) FILTER (WHERE o.spell_id IS NOT NULL) AS numerator,
                   count(DISTINCT d.spell_id) AS denominator
            FROM discharges d LEFT JOIN (SELECT DISTINCT spell_id FROM {outcomes}) o USING (spell_id)
            GROUP BY d.la_code
        )
        SELECT $quarter AS quarter, la_code, '2D-1' AS measure, numerator, denominator,
               CASE WHEN denominator > 0 THEN round(100.0 * numerator / denominator, 2) END AS value,
               died, readmitted, entered_long_term_care FROM part1
        UNION ALL
        SELECT $quarter, la_code, '2D-2', numerator, denominator,
               CASE WHEN denominator > 0 THEN round(100.0 * numerator / denominator, 2) END,
               NULL, NULL, NULL FROM part2
        ORDER BY la_code, measure"""


def readmissions_sql(care: str = "care", spells: str = "spells") -> str:
    """For each service starting in the period: emergency admissions 1..30 and 1..91 days after it."""
    windows = load_spec().linkage.readmission_windows_days
    flags = ", ".join(f"coalesce(days_to_emergency_admission <= {n}, false) AS readmitted_within_{n}_days, "
                      f"c.event_start_date + {n} <= $period_end AS follow_up_{n}_complete" for n in windows)
    return f"""
        WITH services AS (SELECT * FROM ({_services(care)})
                          WHERE event_start_date BETWEEN $period_start AND $period_end),
        first_admission AS (
            SELECT c.submission_id, c.row_number, min(date_diff('day', c.event_start_date, s.admission_date)) AS days
            FROM services c JOIN {spells} s ON s.person_id = c.person_id AND s.emergency_admission
             AND s.admission_date > c.event_start_date AND s.admission_date <= c.event_start_date + {max(windows)}
            GROUP BY ALL
        )
        SELECT $quarter AS quarter, c.la_code, c.person_id, c.submission_id, c.row_number, c.event_start_date,
               c.service_type_cleaned AS service_type, c.age_band,
               c.days_to_emergency_admission, {flags}
        FROM (SELECT c.*, f.days AS days_to_emergency_admission FROM services c
              LEFT JOIN first_admission f USING (submission_id, row_number)) c
        ORDER BY c.la_code, c.event_start_date, c.submission_id, c.row_number"""
