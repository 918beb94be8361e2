"""The great-expectations suite of submission-level expectations, generated from the specification.

- completeness: every mandatory field is filled on at least 95% of the rows it applies to (by
  event type and client type, from the spec's applicability);
- code quality: at most 5% of a coded field is `Invalid and not mapped`;
- dates: event start dates lie between ten years before the reporting period and the day received;
- uniqueness: events (person, type, start date, service component, review reason) are unique on
  99% of rows.

How it runs: each expectation is a "mostly" threshold on one council's file. DuckDB counts, for
every submission of a batch in one scan, the rows each expectation applies to and the rows that
break it (the same domains and tests as GX's ExpectColumnValuesToNotBeNull, ...NotBeInSet,
...ToBeBetween and ExpectCompoundColumnsToBeUnique: nulls only fail completeness, and rows whose key
is all blank are not duplicates). Great-expectations then judges that profile, one row per
submission, in one validation, and names the submissions over each threshold. Running GX's pandas
engine once per council instead cost about 0.75 s per call in metric-graph building alone, the
largest cost of a national quarter.

GX is imported lazily (it costs seconds to import). Results are reduced to counts and percentages
here: the profile holds no submitted value, and neither does anything that leaves this module.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import duckdb
import pyarrow as pa

from cld_pipeline.spec import load_spec

COMPLETENESS, VALID_CODES, DATES_IN_RANGE, UNIQUE = 0.95, 0.95, 0.99, 0.99
DATE_LOOKBACK_DAYS = 3653   # ten years before the reporting period
UNIQUE_KEY = ("la_person_unique_identifier", "event_type_cleaned", "event_start_date", "service_component_cleaned",
              "review_reason_cleaned")


@dataclass(frozen=True)
class Expectation:
    name: str            # "complete:Gender", ... (what the check metadata and tests name)
    gx_class: str        # the GX expectation whose semantics the counts follow
    applies_sql: str     # the rows it applies to (its domain), over validated rows `e` and bounds `b`
    breaks_sql: str      # a row of the domain that breaks it
    mostly: float


def _quoted(values) -> str:
    return ", ".join("'" + str(v).replace("'", "''") + "'" for v in values)


def suite() -> list[Expectation]:
    """Every expectation, from the spec."""
    spec = load_spec()
    out: list[Expectation] = []
    for f in spec.fields:
        if not f.cld:
            continue
        column = f"e.{f.column}_cleaned" if f.type == "coded" else f"e.{f.column}"
        if f.mandatory == "always":
            conditions = []
            if f.applies_to.event_types:
                conditions.append(f"e.event_type_cleaned IN ({_quoted(f.applies_to.event_types)})")
            if f.applies_to.client_types:
                conditions.append(f"e.client_type_cleaned IN ({_quoted(f.applies_to.client_types)})")
            out.append(Expectation(f"complete:{f.name}", "ExpectColumnValuesToNotBeNull",
                                   " AND ".join(conditions) or "true", f"{column} IS NULL", COMPLETENESS))
        if f.type == "coded":
            out.append(Expectation(f"valid_codes:{f.name}", "ExpectColumnValuesToNotBeInSet", "true",
                                   f"{column} = {_quoted([spec.derived.invalid_value])}", VALID_CODES))
    out.append(Expectation("dates_in_range:Event_Start_Date", "ExpectColumnValuesToBeBetween", "true",
                           "e.event_start_date NOT BETWEEN b.earliest_start AND b.received_date", DATES_IN_RANGE))
    # Counted by grouping on the key (see profile): every row of a key seen more than once breaks it.
    out.append(Expectation("unique:events", "ExpectCompoundColumnsToBeUnique", "true", "", UNIQUE))
    return out


def profile(con: duckdb.DuckDBPyConnection, events: Path) -> pa.Table:
    """Per submission of `events` (validated rows; their bounds from `submission_file`): for each
    expectation i, `rows_i` it applies to and `unexpected_i` that break it. One pass, set-based."""
    expectations = suite()
    key = ", ".join(UNIQUE_KEY)
    all_blank = " AND ".join(f"{c} IS NULL" for c in UNIQUE_KEY)
    counts = ",\n".join(
        f"count(*) AS rows_{i}, any_value(coalesce(d.duplicated_rows, 0)) AS unexpected_{i}" if not x.breaks_sql else
        f"count(*) FILTER (WHERE {x.applies_sql}) AS rows_{i}, "
        f"count(*) FILTER (WHERE ({x.applies_sql}) AND coalesce({x.breaks_sql}, false)) AS unexpected_{i}"
        for i, x in enumerate(expectations))
    return con.sql(f"""
        WITH b AS (
            SELECT submission_id, received_date,
                   coalesce(reporting_period_start, received_date) - INTERVAL {DATE_LOOKBACK_DAYS} DAY AS earliest_start
            FROM submission_file
        ), d AS (
            SELECT submission_id, sum(n) AS duplicated_rows FROM (
                SELECT submission_id, count(*) AS n FROM read_parquet('{events}') WHERE NOT ({all_blank})
                GROUP BY submission_id, {key} HAVING count(*) > 1)
            GROUP BY submission_id
        )
        SELECT e.submission_id, {counts}
        FROM read_parquet('{events}') e JOIN b USING (submission_id) LEFT JOIN d USING (submission_id)
        GROUP BY e.submission_id ORDER BY e.submission_id""").to_arrow_table()


@lru_cache(maxsize=1)
def _context():
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    logging.getLogger("great_expectations").setLevel(logging.ERROR)
    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False)
    batch = context.data_sources.add_pandas("cld").add_dataframe_asset("submission_profile") \
        .add_batch_definition_whole_dataframe("batch")
    return context, batch


def run_expectations(con: duckdb.DuckDBPyConnection, events: Path, submission_ids: list[str]) -> dict[str, list[dict]]:
    """The suite for every submission of a batch: per submission and expectation the rows it applied
    to, the unexpected rows, the percentage and success. Never any value."""
    import great_expectations as gx
    import great_expectations.expectations as gxe
    import pandas as pd

    expectations = suite()
    counts = profile(con, events).to_pylist()
    shares = pd.DataFrame({"submission_id": [c["submission_id"] for c in counts], **{
        f"unexpected_share_{i}": [c[f"unexpected_{i}"] / c[f"rows_{i}"] if c[f"rows_{i}"] else 0.0 for c in counts]
        for i in range(len(expectations))}})
    _, batch_definition = _context()   # GX wants its context before a suite is built
    gx_suite = gx.ExpectationSuite(name="cld_submission")
    for i, x in enumerate(expectations):
        gx_suite.add_expectation(gxe.ExpectColumnValuesToBeBetween(
            column=f"unexpected_share_{i}", min_value=0, max_value=1 - x.mostly + 1e-12,
            meta={"name": x.name, "follows": x.gx_class}))
    failing: dict[str, set[str]] = {x.name: set() for x in expectations}
    if len(shares):
        result = batch_definition.get_batch(batch_parameters={"dataframe": shares}).validate(
            gx_suite, result_format={"result_format": "COMPLETE", "unexpected_index_column_names": ["submission_id"]})
        for r in result.results:
            failing[r.expectation_config.meta["name"]] = {
                u["submission_id"] for u in (r.result or {}).get("unexpected_index_list") or []}
    out: dict[str, list[dict]] = {}
    by_id = {c["submission_id"]: c for c in counts}
    for sid in submission_ids:
        c = by_id.get(sid)
        out[sid] = []
        for i, x in enumerate(expectations):
            rows, unexpected = (c[f"rows_{i}"], c[f"unexpected_{i}"]) if c else (0, 0)
            out[sid].append({"expectation": x.name, "rows": rows, "unexpected": unexpected,
                             "unexpected_percent": round(100 * unexpected / rows, 2) if rows else 0.0,
                             "success": sid not in failing[x.name]})
    return out
