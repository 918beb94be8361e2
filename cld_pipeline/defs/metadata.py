"""Dagster metadata the asset layers share."""

import dagster as dg
import duckdb


def table_schema(con: duckdb.DuckDBPyConnection, schema: str, table: str) -> dg.TableSchema:
    """Column names and DuckDB types of a table, as Dagster column-schema metadata."""
    rows = con.execute(
        "SELECT column_name, data_type FROM information_schema.columns "
        "WHERE table_schema = ? AND table_name = ? ORDER BY ordinal_position",
        [schema, table],
    ).fetchall()
    return dg.TableSchema(columns=[dg.TableColumn(name=n, type=t) for n, t in rows])
