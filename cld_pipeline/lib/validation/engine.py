"""Validate one submission: prepare in DuckDB, judge with the pandera row rules, check the submission
with the great-expectations suite, all over bounded chunks.

Works on Parquet files in a scratch folder (the raw rows are exported first), so the processor
zone's database is locked only to read the raw rows and to write the results. Memory is bounded by
the chunk size, not by the size of the file.
"""

from __future__ import annotations

import datetime as dt
import time
from dataclasses import dataclass, field
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from cld_pipeline.lib.validation.prepare import mapping_table, prepare_sql
from cld_pipeline.lib.validation.rules import FATAL, row_rules
from cld_pipeline.spec import load_spec

CHUNK_ROWS = 100_000


@dataclass
class SubmissionContext:
    submission_id: str
    la_code: str
    quarter: str
    received_date: dt.date
    expected_field_count: int
    reporting_period_start: dt.date | None
    reporting_period_end: dt.date | None


@dataclass
class ValidationResult:
    raw_rows: int
    accepted_rows: int
    rejected_rows: int
    rejections: Path
    dq_flags: Path
    events: Path
    derived_period: tuple[dt.date | None, dt.date | None]
    seconds: dict[str, float] = field(default_factory=dict)
    rule_counts: dict[str, int] = field(default_factory=dict)       # "rule|field" -> rows
    expectations: list[dict] = field(default_factory=list)          # counts only, never values
    schema_failures: int = 0


def validated_columns() -> list[str]:
    """SELECT list of `validated.events` over the prepared rows: typed CLD fields and cleaned codes."""
    spec = load_spec()
    out = ["submission_id", "row_number", "file_la_code AS la_code_of_file"]
    for f in spec.fields:
        if not f.cld:
            continue  # names are dropped here: they never go further than the raw layer
        c = f.column
        if f.type == "coded":
            out += [c, f"{c}_cleaned"]
        elif f.type == "date":
            out.append(f"{c}__date AS {c}")
        elif f.type == "integer":
            out.append(f"CAST(round({c}__number) AS INTEGER) AS {c}")
        elif f.type == "decimal":
            out.append(f"{c}__number AS {c}")
        elif f.type == "nhs_number":
            out.append(f"CASE WHEN {c}__valid THEN {c}__digits END AS {c}")
        else:
            out.append(c)
    out.append("age_at_event_start")
    return out


def _connect(work: Path) -> duckdb.DuckDBPyConnection:
    con = duckdb.connect()
    con.execute("SET threads = 2")
    con.execute("SET memory_limit = '2GB'")
    con.execute(f"SET temp_directory = '{work / 'spill'}'")
    return con


def validate_submission(raw_rows: Path, ctx: SubmissionContext, work: Path,
                        expectations: bool = True) -> ValidationResult:
    """`raw_rows`: Parquet of the submission's raw.events rows. Results are Parquet files in `work`."""
    from cld_pipeline.lib.validation.expectations import run_expectations
    from cld_pipeline.lib.validation.schema import validated_events_schema

    work.mkdir(parents=True, exist_ok=True)
    seconds: dict[str, float] = {}
    t = time.perf_counter()
    con = _connect(work)
    con.register("code_map", mapping_table())
    con.register("submission_file", pa.table({
        "la_code": [ctx.la_code], "received_date": pa.array([ctx.received_date], pa.date32()),
        "expected_field_count": pa.array([ctx.expected_field_count], pa.int32())}))
    prepared = work / "prepared.parquet"
    con.execute(f"COPY ({prepare_sql(f'read_parquet({str(raw_rows)!r})')}) TO '{prepared}' (FORMAT parquet)")
    raw_count = con.execute(f"SELECT count(*) FROM read_parquet('{raw_rows}')").fetchall()[0][0]
    seconds["prepare_sql"] = time.perf_counter() - t

    # Row rules (pandera checks) over bounded chunks.
    t = time.perf_counter()
    rules = row_rules()
    failing: dict[int, list[np.ndarray]] = {i: [] for i in range(len(rules))}
    reader = pq.ParquetFile(prepared)
    for batch in reader.iter_batches(batch_size=CHUNK_ROWS):
        chunk = batch.to_pandas()
        numbers = chunk["row_number"].to_numpy()
        for i, rule in enumerate(rules):
            passed = rule.check(chunk[list(rule.columns)]).check_output.to_numpy(dtype=bool, na_value=False)
            if not passed.all():
                failing[i].append(numbers[~passed])
    seconds["pandera"] = time.perf_counter() - t

    t = time.perf_counter()
    rejected = np.unique(np.concatenate([np.concatenate(failing[i]) for i, r in enumerate(rules)
                                         if r.severity == FATAL and failing[i]] or [np.array([], np.int64)]))
    rejections, flags = [], []
    counts: dict[str, int] = {}
    for i, rule in enumerate(rules):
        if not failing[i]:
            continue
        numbers = np.concatenate(failing[i])
        if rule.severity != FATAL:
            numbers = numbers[~np.isin(numbers, rejected)]   # flags describe rows that are kept
        if numbers.size == 0:
            continue
        counts[rule.check.name] = int(numbers.size)
        (rejections if rule.severity == FATAL else flags).append(pa.table({
            "submission_id": pa.array([ctx.submission_id] * numbers.size),
            "row_number": pa.array(numbers, pa.int64()),
            "field": pa.array([rule.field] * numbers.size),
            "rule": pa.array([rule.rule] * numbers.size),
            "message": pa.array([rule.message] * numbers.size),
        }))
    empty = pa.table({"submission_id": pa.array([], pa.string()), "row_number": pa.array([], pa.int64()),
                      "field": pa.array([], pa.string()), "rule": pa.array([], pa.string()),
                      "message": pa.array([], pa.string())})
    paths = {}
    for name, tables in (("rejections", rejections), ("dq_flags", flags)):
        paths[name] = work / f"{name}.parquet"
        pq.write_table(pa.concat_tables(tables) if tables else empty, paths[name])
    con.register("rejected_rows", pa.table({"row_number": pa.array(rejected, pa.int64())}))
    events = work / "events.parquet"
    con.execute(f"""COPY (SELECT {', '.join(validated_columns())} FROM read_parquet('{prepared}')
                          ANTI JOIN rejected_rows USING (row_number) ORDER BY row_number)
                    TO '{events}' (FORMAT parquet)""")
    accepted = con.execute(f"SELECT count(*) FROM read_parquet('{events}')").fetchall()[0][0]
    derived = derived_reporting_period(con, raw_rows, ctx.received_date)
    seconds["write_results"] = time.perf_counter() - t

    # Submission-level expectations (great-expectations) and the output schema (pandera).
    t = time.perf_counter()
    expectations = run_expectations(events, ctx) if expectations else []
    seconds["great_expectations"] = time.perf_counter() - t
    t = time.perf_counter()
    schema = validated_events_schema(ctx)
    schema_failures = 0
    for batch in pq.ParquetFile(events).iter_batches(batch_size=CHUNK_ROWS):
        schema_failures += schema_failure_count(schema, batch.to_pandas())
    seconds["pandera"] += time.perf_counter() - t
    con.close()
    return ValidationResult(
        raw_rows=raw_count, accepted_rows=accepted, rejected_rows=int(rejected.size), rejections=paths["rejections"],
        dq_flags=paths["dq_flags"], events=events, derived_period=derived,
        seconds={k: round(v, 3) for k, v in seconds.items()}, rule_counts=counts, expectations=expectations,
        schema_failures=schema_failures)


def schema_failure_count(schema, frame) -> int:
    """How many checks of the output schema fail (counts only: pandera's failure cases hold values,
    which must never leave this function)."""
    import pandera.pandas as pa_

    try:
        schema.validate(frame, lazy=True)
    except pa_.errors.SchemaErrors as err:
        return int(len(err.failure_cases))
    return 0


def derived_reporting_period(con: duckdb.DuckDBPyConnection, raw_rows: Path,
                             received: dt.date) -> tuple[dt.date | None, dt.date | None]:
    """DHSC's derived reporting period (dhsc-method.md 1a): months of event end dates before the import
    month qualify when they hold at least 2% of the rows and nearly the full mix of event types."""
    end = ("COALESCE(TRY_STRPTIME(trim(event_end_date), '%Y-%m-%d'), "
           "TRY_STRPTIME(trim(event_end_date), '%d/%m/%Y'))::DATE")
    # Event types are told by prefix, as in DHSC's newer method (V2): counting raw spellings would let one
    # row with a stray variant ("service ", "SERVICE") raise the bar every other month must meet.
    kind = " ".join(f"WHEN lower(trim(event_type)) LIKE '{t.lower()}%' THEN '{t}'"
                    for t in load_spec().code_list("event_type").value_strings)
    row = con.execute(f"""
        WITH ended AS (
            SELECT date_trunc('month', {end}) AS month, CASE {kind} END AS event_type
            FROM read_parquet('{raw_rows}')
            WHERE {end} < date_trunc('month', ?::DATE)
        ), months AS (
            SELECT month, count(*) AS n_month, count(DISTINCT event_type) AS types_month FROM ended GROUP BY month
        ), totals AS (
            SELECT sum(n_month) AS n_file, max(types_month) AS types_file FROM months
        )
        SELECT min(month), last_day(max(month))
        FROM months, totals
        WHERE n_file < 100 OR (100.0 * n_month / n_file >= 2 AND types_month >= types_file - 1)
    """, [received]).fetchall()[0]
    return (row[0].date() if row[0] is not None and hasattr(row[0], "date") else row[0], row[1])
