"""The great-expectations suite of submission-level expectations, generated from the specification.

- completeness: every mandatory field is filled on at least 95% of the rows it applies to (by
  event type and client type, from the spec's applicability);
- code quality: at most 5% of a coded field is `Invalid and not mapped`;
- dates: event start dates lie between ten years before the reporting period and the day received;
- uniqueness: events (person, type, start date, service component, review reason) are unique on
  99% of rows.

GX is imported lazily (it costs seconds to import). Results are reduced to counts and percentages
here: GX results carry sample values, which must never reach Dagster's event log or metadata.
"""

from __future__ import annotations

import datetime as dt
import logging
from functools import lru_cache
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from cld_pipeline.spec import load_spec

CHUNK_ROWS = 250_000
COMPLETENESS, VALID_CODES, DATES_IN_RANGE, UNIQUE = 0.95, 0.95, 0.99, 0.99


def suite_definition(ctx) -> list[tuple[str, str, dict]]:
    """(name, expectation class, keyword arguments) for every expectation, from the spec."""
    spec = load_spec()
    out: list[tuple[str, str, dict]] = []
    for f in spec.fields:
        if not f.cld:
            continue
        column = f"{f.column}_cleaned" if f.type == "coded" else f.column
        if f.mandatory == "always":
            conditions = []
            if f.applies_to.event_types:
                conditions.append(" | ".join(f'event_type_cleaned=="{v}"' for v in f.applies_to.event_types))
            if f.applies_to.client_types:
                conditions.append(" | ".join(f'client_type_cleaned=="{v}"' for v in f.applies_to.client_types))
            kwargs = {"column": column, "mostly": COMPLETENESS}
            if conditions:
                kwargs.update(row_condition=" & ".join(f"({c})" for c in conditions), condition_parser="pandas")
            out.append((f"complete:{f.name}", "ExpectColumnValuesToNotBeNull", kwargs))
        if f.type == "coded":
            out.append((f"valid_codes:{f.name}", "ExpectColumnValuesToNotBeInSet",
                        {"column": column, "value_set": [spec.derived.invalid_value], "mostly": VALID_CODES}))
    start = (ctx.reporting_period_start or ctx.received_date) - dt.timedelta(days=3653)
    out.append(("dates_in_range:Event_Start_Date", "ExpectColumnValuesToBeBetween",
                {"column": "event_start_date", "min_value": dt.datetime.combine(start, dt.time()),
                 "max_value": dt.datetime.combine(ctx.received_date, dt.time()), "mostly": DATES_IN_RANGE}))
    out.append(("unique:events", "ExpectCompoundColumnsToBeUnique",
                {"column_list": ["la_person_unique_identifier", "event_type_cleaned", "event_start_date",
                                 "service_component_cleaned", "review_reason_cleaned"], "mostly": UNIQUE}))
    return out


@lru_cache(maxsize=1)
def _context():
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    logging.getLogger("great_expectations").setLevel(logging.ERROR)
    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False)
    batch = context.data_sources.add_pandas("cld").add_dataframe_asset("validated_events") \
        .add_batch_definition_whole_dataframe("chunk")
    return context, batch


def build_suite(ctx):
    import great_expectations as gx
    import great_expectations.expectations as gxe

    definition = suite_definition(ctx)
    suite = gx.ExpectationSuite(name="cld_submission")
    for name, cls, kwargs in definition:
        suite.add_expectation(getattr(gxe, cls)(**kwargs, meta={"name": name}, result_format="BASIC"))
    return definition, suite


def run_expectations(events: pa.Table | Path, ctx) -> list[dict]:
    """Evaluate the suite over one submission's accepted rows (a table, or a Parquet file of them)
    chunk by chunk and combine: returns per expectation the rows it applied to, the unexpected rows,
    the percentage and success. Never any value."""
    _, batch_definition = _context()
    definition, suite = build_suite(ctx)
    totals = {name: [0, 0, kwargs["mostly"]] for name, _, kwargs in definition}
    if isinstance(events, Path):
        events = pq.read_table(events)
    for start in range(0, events.num_rows, CHUNK_ROWS):
        frame = _frame(events.slice(start, CHUNK_ROWS))
        result = batch_definition.get_batch(batch_parameters={"dataframe": frame}).validate(suite)
        for r in result.results:
            name = r.expectation_config.meta["name"]
            counts = r.result or {}
            totals[name][0] += int(counts.get("element_count", 0) or 0)
            totals[name][1] += int(counts.get("unexpected_count", 0) or 0)
    out = []
    for name, (elements, unexpected, mostly) in totals.items():
        share = unexpected / elements if elements else 0.0
        out.append({"expectation": name, "rows": elements, "unexpected": unexpected,
                    "unexpected_percent": round(100 * share, 2), "success": share <= 1 - mostly + 1e-12})
    return out


def _frame(table: pa.Table):
    """Text as categoricals: GX's pandas metrics run about five times faster on them."""
    import pyarrow.compute as pc

    columns = [pc.dictionary_encode(c) if pa.types.is_string(c.type) or pa.types.is_large_string(c.type) else c
               for c in table.columns]
    return pa.table(columns, names=table.column_names).to_pandas(date_as_object=False)
