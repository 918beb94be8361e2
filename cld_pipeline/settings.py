"""Where things live: the data folder layout of the contract (shared/contract.md)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def data_dir() -> Path:
    """`$CLD_DATA_DIR`, default `./data`, as an absolute path."""
    return Path(os.environ.get("CLD_DATA_DIR") or "data").resolve()


def landing_dir() -> Path:
    return data_dir() / "landing"


def identifiable_db_path() -> Path:
    """The processor's zone: raw and validated records, rejections (identifiers present)."""
    return data_dir() / "identifiable.duckdb"


def analytics_db_path() -> Path:
    """The analysts' zone: pseudonymised, linked and benchmark tables; never a direct identifier."""
    return data_dir() / "analytics.duckdb"


def new_scratch(prefix: str) -> Path:
    """A fresh folder under `work/` for one step's intermediate files (the caller removes it)."""
    root = data_dir() / "work"
    root.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=prefix, dir=root))


def duckdb_memory_limit() -> str:
    """What each DuckDB database may hold in memory before it spills to disk
    (`CLD_DUCKDB_MEMORY_LIMIT`, default 2GB). DuckDB's own default is 80% of the machine: a national
    batch then kept 11-15 GB resident for work that runs as fast within 2 GB."""
    return os.environ.get("CLD_DUCKDB_MEMORY_LIMIT", "2GB")


def work_connection(scratch: Path):
    """An in-memory DuckDB connection for a step's intermediate work: 2 threads, the memory limit,
    spilling into the step's scratch folder."""
    import duckdb

    con = duckdb.connect()
    con.execute("SET threads = 2")
    con.execute(f"SET memory_limit = '{duckdb_memory_limit()}'")
    con.execute(f"SET temp_directory = '{scratch / 'spill'}'")
    return con
