"""DHSC's main tables (domain/dhsc-method.md), as DuckDB SQL over pseudonymised rows.

Inputs are two relations with the analysts' zone column names:
- `ledger`: one row per received submission (`submission_id`, `la_code`, `received_at`,
  `derived_period_start`, `derived_period_end`): the files that could be chosen;
- `rows`: pseudonymised events of those submissions (current and superseded ones).

Steps (numbers as in the method): 2 choose files as of a date (single: one 12-month file per LA;
joined: one per LA per quarter, consecutive quarters of one file merged), 3 stack, correct end dates
with the date of death and keep events in their reference period, 4 derived fields (person id is
the token: NHS number first, else LA and LA person id; rows with neither are dropped), 4.4 the DHSC
unique event reference, 5 crop open services not seen in the next reference period (joined), 6 keep
one record per unique event, 4.3 ages. SQL Server semantics are reproduced on purpose: NULLs sort
first on ascending keys, string comparisons are exact on the cleaned values.
"""

from __future__ import annotations

import datetime as dt

from cld_pipeline.spec import load_spec

OPEN_END = "DATE '9999-01-01'"


def _quote(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def value(code_list: str, key: str) -> str:
    """SQL literal of a code value, by its key."""
    return _quote(load_spec().code_list(code_list).value(key))


def values(code_list: str, keys) -> str:
    return ", ".join(value(code_list, k) for k in keys)


def group_of(code_list: str, expr: str, default: str = "NULL") -> str:
    """CASE mapping a cleaned value to its group in the spec."""
    cl = load_spec().code_list(code_list)
    whens = " ".join(f"WHEN {_quote(v.value)} THEN {_quote(v.group)}" for v in cl.values + cl.derived_values
                     if v.group is not None)
    return f"CASE {expr} {whens} ELSE {default} END"


def rank_of(code_list: str, expr: str, default: int | str = 999) -> str:
    """CASE mapping a cleaned value to its rank in the spec (`default` for unranked values, NULL too)."""
    cl = load_spec().code_list(code_list)
    whens = " ".join(f"WHEN {_quote(v.value)} THEN {v.rank}" for v in cl.values + cl.derived_values
                     if v.rank is not None)
    return f"CASE {expr} {whens} ELSE {default} END"


def is_event(key: str, column: str = "event_type_cleaned") -> str:
    return f"{column} = {value('event_type', key)}"


def quarter_windows(start: dt.date, end: dt.date) -> list[tuple[dt.date, dt.date]]:
    """Consecutive 3-month windows from `start` to `end`."""
    out = []
    q = start
    while q <= end:
        nxt = dt.date(q.year + (q.month + 2) // 12, (q.month + 2) % 12 + 1, 1)
        out.append((q, min(nxt - dt.timedelta(days=1), end)))
        q = nxt
    return out


def _eligible(window_start: str, window_end: str, ledger: str) -> str:
    """Files covering the window, received after it closed and by the as-of date ($as_of):
    the latest per LA (method 2)."""
    return f"""
        SELECT * FROM {ledger}
        WHERE derived_period_start <= {window_start} AND derived_period_end >= {window_end}
          AND received_at > {window_end} AND CAST(received_at AS DATE) <= $as_of
        QUALIFY row_number() OVER (PARTITION BY la_code ORDER BY received_at DESC, submission_id DESC) = 1"""


def single_selection_sql(ledger: str = "ledger") -> str:
    """One file per LA covering the whole 12-month window [$period_start, $period_end]."""
    return f"""SELECT la_code, submission_id, received_at, $period_start AS ref_period_start,
                      $period_end AS ref_period_end
               FROM ({_eligible('$period_start', '$period_end', ledger)})"""


def joined_selection_sql(windows: list[tuple[dt.date, dt.date]], ledger: str = "ledger") -> str:
    """One file per LA per quarter window; consecutive quarters won by the same file become one
    reference period (only consecutive ones: the method's min/max merge could overlap another file)."""
    per_window = " UNION ALL ".join(
        f"SELECT la_code, submission_id, received_at, DATE '{s}' AS q_start, DATE '{e}' AS q_end, {i} AS q "
        f"FROM ({_eligible(f'DATE {_quote(str(s))}', f'DATE {_quote(str(e))}', ledger)})"
        for i, (s, e) in enumerate(windows))
    return f"""
        WITH won AS ({per_window}),
        islands AS (SELECT *, q - row_number() OVER (PARTITION BY la_code, submission_id ORDER BY q) AS island
                    FROM won)
        SELECT la_code, submission_id, any_value(received_at) AS received_at, min(q_start) AS ref_period_start,
               max(q_end) AS ref_period_end
        FROM islands GROUP BY la_code, submission_id, island"""


def stacked_sql(selection: str, rows: str = "rows") -> str:
    """Method 3: the chosen files' rows with their reference period, the end date corrected with the
    date of death, kept when the event falls in the period; method 4.2: rows without a person dropped."""
    service = is_event("service", "r.event_type_cleaned")
    der_end = """CASE WHEN r.date_of_death BETWEEN r.event_start_date AND r.event_end_date THEN r.date_of_death
                      WHEN r.event_end_date IS NULL AND r.date_of_death > r.event_start_date THEN r.date_of_death
                      ELSE r.event_end_date END"""
    return f"""
        SELECT r.*, s.ref_period_start, s.ref_period_end, s.received_at, r.event_end_date AS event_end_date_raw,
               {der_end} AS der_event_end_date
        FROM {rows} r JOIN ({selection}) s USING (submission_id)
        WHERE r.person_id IS NOT NULL
          AND r.event_start_date <= s.ref_period_end
          AND CASE WHEN {service} THEN coalesce({der_end} >= s.ref_period_start, true)
                   ELSE {der_end} BETWEEN s.ref_period_start AND s.ref_period_end END
          AND (r.date_of_death IS NULL OR (r.date_of_death >= s.ref_period_start
                                           AND r.date_of_death >= r.event_start_date))"""


def _identifying(single: bool) -> list[str]:
    """Method 4.4's identifying fields, in its sort order, on cleaned values (the newer method)."""
    service, request, assessment = is_event("service"), is_event("request"), is_event("assessment")
    keys = ["event_start_date", f"CASE WHEN NOT {service} THEN der_event_end_date END", "client_type_cleaned",
            "person_id", "event_type_cleaned", f"CASE WHEN {request} THEN request_route_of_access_cleaned END",
            f"CASE WHEN {assessment} THEN assessment_type_cleaned END",
            f"CASE WHEN {service} THEN service_type_cleaned END", f"CASE WHEN {service} THEN service_component_cleaned END"]
    if single:
        keys += [f"CASE WHEN {service} THEN {k} END" for k in (
            "delivery_mechanism_cleaned", "CAST(round(unit_cost, 2) AS VARCHAR)", "cost_frequency_unit_type_cleaned",
            "CAST(round(planned_units_per_week, 2) AS VARCHAR)")]
    return keys


def unique_events_sql(stacked: str, single: bool) -> str:
    """Methods 4.4, 5 and 6: the unique event reference, cropping (joined), then one record per
    unique event (latest reference period, open or latest end, best outcome, conversation, latest loaded)."""
    order = ", ".join(f"{k} ASC NULLS FIRST" for k in _identifying(single))
    service = is_event("service")
    ref = f"la_code || '_' || dense_rank() OVER (PARTITION BY la_code ORDER BY {order})"
    if single:
        cropped = "SELECT *, false AS cropped FROM refs"
    else:
        cropped = f"""
            SELECT r.* REPLACE (CASE WHEN crop THEN r.ref_period_end ELSE r.der_event_end_date END AS der_event_end_date),
                   crop AS cropped
            FROM (SELECT r.*,
                         ({service} AND r.ref_period_end < latest.ref_end
                          AND (r.der_event_end_date IS NULL OR r.der_event_end_date > r.ref_period_end)
                          AND NOT EXISTS (SELECT 1 FROM refs n WHERE n.la_code = r.la_code
                                          AND n.der_unique_event_ref = r.der_unique_event_ref
                                          AND n.ref_period_start = r.ref_period_end + 1)) AS crop
                  FROM refs r JOIN (SELECT la_code, max(ref_period_end) AS ref_end FROM refs GROUP BY la_code) latest
                    USING (la_code)) r"""
    return f"""
        WITH refs AS (SELECT *, {ref} AS der_unique_event_ref,
                             {rank_of('event_outcome', 'event_outcome_cleaned', 'NULL')} AS event_outcome_hierarchy
                      FROM {stacked}),
        cropped AS ({cropped})
        SELECT * FROM cropped
        QUALIFY row_number() OVER (
            PARTITION BY der_unique_event_ref
            ORDER BY ref_period_end DESC, coalesce(der_event_end_date, {OPEN_END}) DESC,
                     coalesce(event_outcome_hierarchy, 999) ASC, der_conversation DESC NULLS LAST,
                     received_at DESC, row_number DESC) = 1"""


def derived_fields_sql(unique: str) -> str:
    """Method 4.1 groupings and 4.3 ages (at the corrected end, or the reference period end for open
    services, after cropping); costs dropped from the joined table by the caller."""
    spec = load_spec()
    birth = "make_date(birth_year, birth_month, 1)"
    at = "coalesce(der_event_end_date, ref_period_end)"
    latest = f"CAST(floor(date_diff('day', {birth}, {at}) / 365.25) AS INTEGER)"
    bands = " ".join(f"WHEN {latest} BETWEEN {b.min} AND {b.max} THEN {_quote(b.label)}" for b in spec.derived.age_bands)
    working = " ".join(f"WHEN {latest} BETWEEN {b.min} AND {b.max} THEN {_quote(b.label)}"
                       for b in spec.derived.working_age_bands)
    unknown = _quote(spec.derived.unknown_age_band)
    return f"""
        SELECT *,
               {group_of('service_type', 'service_type_cleaned')} AS service_type_grouped,
               {group_of('ethnicity', 'ethnicity_cleaned')} AS ethnicity_grouped,
               {group_of('event_outcome', 'event_outcome_cleaned')} AS event_outcome_grouped,
               {group_of('review_reason', 'review_reason_cleaned')} AS review_type,
               {latest} AS der_latest_age,
               CASE {bands} ELSE {unknown} END AS der_age_band,
               CASE {working} ELSE {unknown} END AS der_working_age_band
        FROM {unique}"""


COST_COLUMNS = ("unit_cost", "cost_frequency_unit_type_cleaned", "planned_units_per_week")


def main_table_sql(selection: str, rows: str = "rows", single: bool = True) -> str:
    sql = derived_fields_sql(f"({unique_events_sql(f'({stacked_sql(selection, rows)})', single)})")
    if not single:
        sql = f"SELECT * EXCLUDE ({', '.join(COST_COLUMNS)}) FROM ({sql})"
    return sql
