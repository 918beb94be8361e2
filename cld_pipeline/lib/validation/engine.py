"""Validate a batch of submissions (one, or a quarter's councils): prepare in DuckDB, judge with the
pandera row rules over bounded chunks (in worker processes when there is enough work), check each
submission with the great-expectations suite, and check the output schema.

Works on Parquet files in a scratch folder (the raw rows are exported first), so the processor
zone's database is locked only to read the raw rows and to write the results. Memory is bounded by
the chunk size and DuckDB's memory limit, not by the size of the batch.
"""

from __future__ import annotations

import datetime as dt
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from cld_pipeline.lib.validation.prepare import ROW_KEY_BASE, mapping_table, prepare_sql
from cld_pipeline.lib.validation.rules import FATAL, row_rules
from cld_pipeline.spec import load_spec

CHUNK_ROWS = 61_440   # rows per pandas frame: half a row group, so two workers stay well under a GiB each
ROW_GROUP_ROWS = 122_880   # DuckDB's default; the unit of parallel work for the pandas-bound steps


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
    flagged_rows: int = 0


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
        elif f.type in ("integer", "decimal"):
            # Out of range is a finding on the row (rule invalid_number) and blank here, never a
            # failed cast: a cast error would quote the value (an NHS number in a count column).
            lo = -1e18 if f.minimum is None else f.minimum
            hi = 1e18 if f.maximum is None else f.maximum
            number = f"CASE WHEN {c}__number BETWEEN {lo} AND {hi} THEN {c}__number END"
            out.append(f"TRY_CAST(round({number}) AS INTEGER) AS {c}" if f.type == "integer" else f"{number} AS {c}")
        elif f.type == "nhs_number":
            out.append(f"CASE WHEN {c}__valid THEN {c}__digits END AS {c}")
        else:
            out.append(c)
    out.append("age_at_event_start")
    return out


def _connect(work: Path) -> duckdb.DuckDBPyConnection:
    from cld_pipeline.settings import work_connection

    return work_connection(work)


@dataclass
class BatchValidation:
    """The results of a batch of submissions: one Parquet file per table for all of them (sorted by
    submission and row), and each submission's own counts in `results`."""

    results: dict[str, ValidationResult]
    rejections: Path
    dq_flags: Path
    events: Path
    prepared: Path
    schema_failures: int
    seconds: dict[str, float]


def validate_submission(raw_rows: Path, ctx: SubmissionContext, work: Path,
                        expectations: bool = True) -> ValidationResult:
    """One submission (`raw_rows`: Parquet of its raw.events rows); results are Parquet files in `work`."""
    batch = validate_submissions(raw_rows, [ctx], work, expectations)
    result = batch.results[ctx.submission_id]
    result.seconds = batch.seconds
    result.schema_failures = batch.schema_failures
    return result


def validate_submissions(raw_rows: Path, contexts: list[SubmissionContext], work: Path,
                         expectations: bool = True) -> BatchValidation:
    """Validate many submissions set-based: `raw_rows` is Parquet of their raw.events rows, sorted by
    submission and row. Typing and mapping run once in DuckDB over all of them, the pandera row
    rules over bounded chunks that cross submissions, the output schema likewise; only the
    great-expectations suite runs per submission, because its thresholds judge one council's file."""
    from cld_pipeline.lib.validation.expectations import run_expectations

    work.mkdir(parents=True, exist_ok=True)
    ids = [c.submission_id for c in contexts]
    seconds: dict[str, float] = {}
    t = time.perf_counter()
    con = _connect(work)
    con.register("code_map", mapping_table())
    con.register("submission_file", pa.table({
        "submission_id": ids, "submission_index": pa.array(range(len(ids)), pa.int64()),
        "la_code": [c.la_code for c in contexts],
        "received_date": pa.array([c.received_date for c in contexts], pa.date32()),
        "expected_field_count": pa.array([c.expected_field_count for c in contexts], pa.int32()),
        "reporting_period_start": pa.array([c.reporting_period_start for c in contexts], pa.date32())}))
    prepared = work / "prepared.parquet"
    # No ORDER BY: sorting millions of wide rows under the memory limit spilled for minutes at national
    # scale, and nothing downstream needs the order (rows are named by their row key).
    con.execute(f"COPY ({prepare_sql(f'read_parquet({str(raw_rows)!r})')}) "
                f"TO '{prepared}' (FORMAT parquet, ROW_GROUP_SIZE {ROW_GROUP_ROWS})")
    raw_counts = dict(con.execute(f"SELECT submission_id, count(*) FROM read_parquet('{raw_rows}') "
                                  "GROUP BY ALL").fetchall())
    seconds["prepare_sql"] = time.perf_counter() - t

    # Row rules (pandera checks) over bounded chunks (Parquet row groups), in parallel when worth it.
    t = time.perf_counter()
    rules = row_rules()
    groups = pq.ParquetFile(prepared).metadata.num_row_groups
    pool = _pool(groups)
    try:
        failing: dict[int, list[np.ndarray]] = {i: [] for i in range(len(rules))}
        for part in _map(pool, _rule_failures, [(prepared, g) for g in range(groups)]):
            for i, keys in part.items():
                failing[i].append(keys)
        seconds["pandera"] = time.perf_counter() - t
        t = time.perf_counter()
        rejected = np.unique(np.concatenate([np.concatenate(failing[i]) for i, r in enumerate(rules)
                                             if r.severity == FATAL and failing[i]] or [np.array([], np.int64)]))
        id_array = np.array(ids, dtype=object)
        rejections, flags = [], []
        counts: dict[str, dict[str, int]] = {sid: {} for sid in ids}
        flagged_keys = []
        for i, rule in enumerate(rules):
            if not failing[i]:
                continue
            keys = np.concatenate(failing[i])
            if rule.severity != FATAL:
                keys = keys[~np.isin(keys, rejected)]   # flags describe rows that are kept
                flagged_keys.append(keys)
            if keys.size == 0:
                continue
            index, numbers = np.divmod(keys, ROW_KEY_BASE)
            for position, n in zip(*np.unique(index, return_counts=True)):
                counts[ids[position]][rule.check.name] = int(n)
            (rejections if rule.severity == FATAL else flags).append(pa.table({
                "submission_id": pa.array(id_array[index], pa.string()),
                "row_number": pa.array(numbers, pa.int64()),
                "field": pa.array([rule.field] * keys.size),
                "rule": pa.array([rule.rule] * keys.size),
                "message": pa.array([rule.message] * keys.size),
            }))
        empty = pa.table({"submission_id": pa.array([], pa.string()), "row_number": pa.array([], pa.int64()),
                          "field": pa.array([], pa.string()), "rule": pa.array([], pa.string()),
                          "message": pa.array([], pa.string())})
        paths = {}
        for name, tables in (("rejections", rejections), ("dq_flags", flags)):
            paths[name] = work / f"{name}.parquet"
            con.register("findings", pa.concat_tables(tables) if tables else empty)
            con.execute(f"COPY (SELECT * FROM findings ORDER BY submission_id, row_number) TO '{paths[name]}' "
                        "(FORMAT parquet)")
            con.unregister("findings")
        rejected_by = _per_submission(rejected, ids)
        flagged = np.unique(np.concatenate(flagged_keys)) if flagged_keys else np.array([], np.int64)
        flagged_by = _per_submission(flagged, ids)
        con.register("rejected_rows", pa.table({"row_key": pa.array(rejected, pa.int64())}))
        events = work / "events.parquet"
        con.execute(f"""COPY (SELECT {', '.join(validated_columns())} FROM read_parquet('{prepared}')
                              ANTI JOIN rejected_rows USING (row_key))
                        TO '{events}' (FORMAT parquet, ROW_GROUP_SIZE {ROW_GROUP_ROWS})""")
        accepted = dict(con.execute(f"SELECT submission_id, count(*) FROM read_parquet('{events}') "
                                    "GROUP BY ALL").fetchall())
        derived = derived_reporting_periods(con, raw_rows)
        seconds["write_results"] = time.perf_counter() - t

        # Submission-level expectations: DuckDB profiles every council's file, GX judges the profile.
        t = time.perf_counter()
        suites = run_expectations(con, events, ids) if expectations else {sid: [] for sid in ids}
        results: dict[str, ValidationResult] = {}
        for ctx in contexts:
            sid = ctx.submission_id
            results[sid] = ValidationResult(
                raw_rows=raw_counts.get(sid, 0), accepted_rows=accepted.get(sid, 0), rejected_rows=rejected_by[sid],
                rejections=paths["rejections"], dq_flags=paths["dq_flags"], events=events,
                derived_period=derived.get(sid, (None, None)), rule_counts=counts[sid], flagged_rows=flagged_by[sid],
                expectations=suites[sid])
        seconds["great_expectations"] = time.perf_counter() - t

        # The output schema (pandera) over bounded chunks of every accepted row.
        t = time.perf_counter()
        schema_groups = pq.ParquetFile(events).metadata.num_row_groups
        schema_failures = sum(_map(pool, _schema_failures, [(events, g) for g in range(schema_groups)]))
        seconds["pandera"] += time.perf_counter() - t
    finally:
        if pool is not None:
            pool.shutdown()
    con.close()
    return BatchValidation(results=results, rejections=paths["rejections"], dq_flags=paths["dq_flags"],
                           events=events, prepared=prepared, schema_failures=schema_failures,
                           seconds={k: round(v, 3) for k, v in seconds.items()})


def validation_workers() -> int:
    """Processes for the pandas-bound steps (`CLD_VALIDATION_WORKERS`, default: one per core, at most 4)."""
    return max(1, int(os.environ.get("CLD_VALIDATION_WORKERS", min(os.cpu_count() or 1, 4))))


def _pool(row_groups: int):
    """A pool of worker processes when there is enough work to repay starting them (a second or two
    each, importing pandas and pandera); else None and the work runs here."""
    workers = validation_workers()
    enough = row_groups >= 4
    if "CLD_VALIDATION_WORKERS" in os.environ:   # set explicitly (tests, tuning): any parallel work
        enough = row_groups > 1
    if workers < 2 or not enough:
        return None
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    # spawn, not fork: this process holds DuckDB and Dagster threads.
    return ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"))


def _map(pool, fn, tasks: list) -> list:
    return list(pool.map(fn, tasks)) if pool is not None else [fn(task) for task in tasks]


def _rule_failures(task: tuple[Path, int]) -> dict[int, np.ndarray]:
    """Row keys failing each row rule in one row group of the prepared rows."""
    prepared, group = task
    rules = row_rules()
    out: dict[int, list[np.ndarray]] = {}
    for batch in pq.ParquetFile(prepared).iter_batches(batch_size=CHUNK_ROWS, row_groups=[group]):
        chunk = batch.to_pandas()
        keys = chunk["row_key"].to_numpy()
        for i, rule in enumerate(rules):
            passed = rule.check(chunk[list(rule.columns)]).check_output.to_numpy(dtype=bool, na_value=False)
            if not passed.all():
                out.setdefault(i, []).append(keys[~passed])
    return {i: np.concatenate(parts) for i, parts in out.items()}


def _schema_failures(task: tuple[Path, int]) -> int:
    from cld_pipeline.lib.validation.schema import validated_events_schema

    events, group = task
    schema = validated_events_schema()
    return sum(schema_failure_count(schema, batch.to_pandas())
               for batch in pq.ParquetFile(events).iter_batches(batch_size=CHUNK_ROWS, row_groups=[group]))


def _per_submission(keys: np.ndarray, ids: list[str]) -> dict[str, int]:
    """Distinct rows per submission, from row keys."""
    counts = np.bincount((keys // ROW_KEY_BASE).astype(np.int64), minlength=len(ids)) if keys.size else \
        np.zeros(len(ids), np.int64)
    return {sid: int(counts[i]) for i, sid in enumerate(ids)}


def schema_failure_count(schema, frame) -> int:
    """How many checks of the output schema fail (counts only: pandera's failure cases hold values,
    which must never leave this function)."""
    import pandera.pandas as pa_

    try:
        schema.validate(frame, lazy=True)
    except pa_.errors.SchemaErrors as err:
        return int(len(err.failure_cases))
    return 0


def derived_reporting_periods(con: duckdb.DuckDBPyConnection,
                              raw_rows: Path) -> dict[str, tuple[dt.date | None, dt.date | None]]:
    """DHSC's derived reporting period (dhsc-method.md 1a) of each submission in `raw_rows` (received
    dates from `submission_file`): months of event end dates before the import month qualify when
    they hold at least 2% of the file's rows and nearly the full mix of event types."""
    end = ("COALESCE(TRY_STRPTIME(trim(event_end_date), '%Y-%m-%d'), "
           "TRY_STRPTIME(trim(event_end_date), '%d/%m/%Y'))::DATE")
    # Event types are told by prefix, as in DHSC's newer method (V2): counting raw spellings would let one
    # row with a stray variant ("service ", "SERVICE") raise the bar every other month must meet.
    kind = " ".join(f"WHEN lower(trim(event_type)) LIKE '{t.lower()}%' THEN '{t}'"
                    for t in load_spec().code_list("event_type").value_strings)
    rows = con.execute(f"""
        WITH ended AS (
            SELECT r.submission_id, date_trunc('month', {end}) AS month, CASE {kind} END AS event_type
            FROM read_parquet('{raw_rows}') r JOIN submission_file f USING (submission_id)
            WHERE {end} < date_trunc('month', f.received_date)
        ), months AS (
            SELECT submission_id, month, count(*) AS n_month, count(DISTINCT event_type) AS types_month
            FROM ended GROUP BY ALL
        ), totals AS (
            SELECT submission_id, sum(n_month) AS n_file, max(types_month) AS types_file FROM months GROUP BY ALL
        )
        SELECT submission_id, min(month), last_day(max(month))
        FROM months JOIN totals USING (submission_id)
        WHERE n_file < 100 OR (100.0 * n_month / n_file >= 2 AND types_month >= types_file - 1)
        GROUP BY ALL
    """).fetchall()
    return {sid: (start.date() if start is not None and hasattr(start, "date") else start, end_)
            for sid, start, end_ in rows}
