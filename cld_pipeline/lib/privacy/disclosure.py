"""Statistical disclosure control for everything shared with councils (domain/privacy.md 3.1).

The NHS England secondary-care rule, applied to every geography:
- a count of 0 stays 0; 1 to 7 is suppressed (NULL, shown `*`); anything else is rounded to the
  nearest 5 (half away from zero, though integer counts never tie);
- totals are rounded from their own raw values, so tables need not add up;
- rates and percentages are computed from the rounded parts, and suppressed when a part is;
- medians and percentiles are suppressed when based on fewer than 8 people;
- secondary suppression: where a group of cells adds up to a total (breakdown values of one
  geography, the LAs of one region, the regions of England), a single suppressed cell would be
  recoverable by subtraction, so the next smallest cell of that group, or else the total, is
  suppressed too, repeated until stable.
Unsuppressed figures never leave the processor zone.
"""

from __future__ import annotations

import duckdb

SMALLEST_SHOWN = 8
ROUND_TO = 5


def count_sql(expr: str) -> str:
    """A count after primary suppression and rounding."""
    return (f"CASE WHEN {expr} IS NULL THEN NULL WHEN {expr} = 0 THEN 0 WHEN {expr} < {SMALLEST_SHOWN} THEN NULL "
            f"ELSE CAST(round(CAST({expr} AS DECIMAL(18, 1)) / {ROUND_TO}) * {ROUND_TO} AS BIGINT) END")


def rate_sql(numerator: str, denominator: str, scale: float = 100.0, digits: int = 1) -> str:
    """A rate from already-rounded parts: NULL when either part is suppressed or the denominator is 0."""
    return (f"CASE WHEN {numerator} IS NULL OR {denominator} IS NULL OR {denominator} = 0 THEN NULL "
            f"ELSE round(CAST({numerator} AS DECIMAL(18, 6)) * {scale} / {denominator}, {digits}) END")


def statistic_sql(expr: str, people: str) -> str:
    """A median or percentile, shown only when at least 8 people are behind it."""
    return f"CASE WHEN {people} >= {SMALLEST_SHOWN} THEN {expr} END"


def secondary_suppression(con: duckdb.DuckDBPyConnection, table: str, raw: str, shown: str,
                          groups: list[tuple[list[str], str]], order: list[str], max_rounds: int = 30) -> int:
    """Suppress more cells of `table` (column `shown`, raw values in `raw`) until no group has exactly
    one suppressed non-zero cell. A group is (grouping columns, filter): the cells that add up to a
    total *together with that total's own cell*, so that when no other part can hide the lone cell,
    the total is suppressed instead. Ties between equally small cells go to the first in `order`
    (columns that identify a cell), so the same data always hides the same cells.
    Returns the number of cells suppressed here."""
    con.execute(f"ALTER TABLE {table} ADD COLUMN IF NOT EXISTS _rid BIGINT")
    con.execute(f"""UPDATE {table} SET _rid = o.rn FROM (
                        SELECT rowid AS r, row_number() OVER (ORDER BY {', '.join(order)}) AS rn FROM {table}) o
                    WHERE {table}.rowid = o.r""")
    total = 0
    for _ in range(max_rounds):
        changed = 0
        for cols, where in groups:
            keys = ", ".join(cols)
            match = " AND ".join(f"t.{c} IS NOT DISTINCT FROM g.{c}" for c in cols)
            n = con.execute(f"""
                UPDATE {table} SET {shown} = NULL WHERE _rid IN (
                    SELECT arg_min(t._rid, (t.{raw}, t._rid)) FROM (SELECT * FROM {table} WHERE {where}) t
                    JOIN (SELECT {keys} FROM {table} WHERE {where} GROUP BY ALL
                          HAVING count(*) FILTER (WHERE {shown} IS NULL AND {raw} > 0) = 1) g ON {match}
                    WHERE t.{shown} IS NOT NULL AND t.{raw} > 0
                    GROUP BY {', '.join('g.' + c for c in cols)})""").fetchall()
            changed += n[0][0] if n else 0
        total += changed
        if not changed:
            break
    con.execute(f"ALTER TABLE {table} DROP COLUMN _rid")
    return total
