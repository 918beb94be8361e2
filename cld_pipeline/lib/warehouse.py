"""Small DuckDB helpers shared by the asset layers."""

from __future__ import annotations

import duckdb
import pyarrow as pa

import dagster as dg


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


def table_schema(con: duckdb.DuckDBPyConnection, schema: str, table: str) -> dg.TableSchema:
    """Column names and DuckDB types of a table, as Dagster column-schema metadata."""
    rows = con.execute(
        "SELECT column_name, data_type FROM information_schema.columns "
        "WHERE table_schema = ? AND table_name = ? ORDER BY ordinal_position",
        [schema, table],
    ).fetchall()
    return dg.TableSchema(columns=[dg.TableColumn(name=n, type=t) for n, t in rows])
