"""Small DuckDB helpers shared by the asset layers."""

from __future__ import annotations

from contextlib import contextmanager

import duckdb
import pyarrow as pa


@contextmanager
def transaction(con: duckdb.DuckDBPyConnection):
    """BEGIN ... COMMIT, rolled back on any error (a killed run leaves the tables as they were)."""
    con.execute("BEGIN TRANSACTION")
    try:
        yield con
        con.execute("COMMIT")
    except BaseException:
        con.execute("ROLLBACK")
        raise


def table_exists(con: duckdb.DuckDBPyConnection, schema: str, table: str, catalog: str | None = None) -> bool:
    """Whether `schema.table` exists, in `catalog` when given, else in any attached database."""
    where = "table_schema = ? AND table_name = ?" + (" AND table_catalog = ?" if catalog else "")
    return bool(con.execute(f"SELECT count(*) FROM information_schema.tables WHERE {where}",
                            [schema, table, *([catalog] if catalog else [])]).fetchall()[0][0])


def replace_slice(con: duckdb.DuckDBPyConnection, table: str, source: str, where: str, params: list) -> None:
    """Replace the rows of `table` matching `where` with the rows of `source` (a relation or
    `read_parquet(...)`), in one transaction; the table is created from `source` the first time."""
    schema = table.split(".")[0]
    con.execute(f"CREATE SCHEMA IF NOT EXISTS {schema}")
    con.execute(f"CREATE TABLE IF NOT EXISTS {table} AS SELECT * FROM {source} LIMIT 0")
    add_missing_columns(con, table, source)
    with transaction(con):
        con.execute(f"DELETE FROM {table} WHERE {where}", params)
        con.execute(f"INSERT INTO {table} BY NAME SELECT * FROM {source}")


def add_missing_columns(con: duckdb.DuckDBPyConnection, table: str, source: str) -> None:
    """Give `table` every column of `source` it lacks: a newer method may add columns, and earlier
    rows keep NULL in them rather than a `BY NAME` write failing."""
    have = {r[0] for r in con.execute(f"DESCRIBE {table}").fetchall()}
    for name, kind, *_ in con.execute(f"DESCRIBE SELECT * FROM {source}").fetchall():
        if name not in have:
            con.execute(f'ALTER TABLE {table} ADD COLUMN "{name}" {kind}')


def replace_table(con: duckdb.DuckDBPyConnection, schema: str, table: str, data: pa.Table) -> int:
    """Atomically replace `schema.table` with `data`; returns the row count."""
    con.execute(f'CREATE SCHEMA IF NOT EXISTS "{schema}"')
    con.register("_incoming", data)
    try:
        con.execute("BEGIN TRANSACTION")
        con.execute(f'CREATE OR REPLACE TABLE "{schema}"."{table}" AS SELECT * FROM _incoming')
        con.execute("COMMIT")
    except Exception:
        con.execute("ROLLBACK")
        raise
    finally:
        con.unregister("_incoming")
    return data.num_rows
