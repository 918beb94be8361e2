"""How analysts open the data: `analytics.duckdb` only, read-only, with no way out to other files.

    from cld_pipeline.analyst import connect
    with connect() as con:
        con.sql("SELECT * FROM benchmark.ascof WHERE geography_level = 'England'").show()

The connection is read-only (no table can be changed), and DuckDB's external access is switched
off, so it cannot ATTACH `identifiable.duckdb` or read the archive's CSV files through `read_csv`.
While it is open it holds the analytics database's lock in shared mode: analysts' queries run side
by side, and the pipeline's next write waits for them to close (keep sessions short; DuckDB lets no
process write while another has the file open). The processor zone's file is owner-only (0600).
"""

from __future__ import annotations

import fcntl
import os
from contextlib import contextmanager
from pathlib import Path

import duckdb

from cld_pipeline import settings


def _is_processor_zone(path: Path) -> bool:
    """By what the file is, not what it is called: a link, a copy under another name or a hard link
    to the processor's database is refused (its real path, its inode, or a table only it holds)."""
    processor = settings.identifiable_db_path()
    if path.name == processor.name or path.resolve() == processor.resolve():
        return True
    if processor.exists() and os.path.samefile(path, processor):
        return True
    if path.resolve() == settings.analytics_db_path().resolve():
        return False
    try:
        with duckdb.connect(str(path), read_only=True) as probe:
            schemas = {r[0] for r in probe.execute("SELECT DISTINCT schema_name FROM duckdb_schemas()").fetchall()}
    except duckdb.Error:
        return False
    return bool(schemas & {"raw", "validated", "rights", "audit"})


@contextmanager
def connect(database: Path | None = None):
    path = Path(database or settings.analytics_db_path())
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist yet: run the pipeline first.")
    if _is_processor_zone(path):
        raise PermissionError("Analysts' tools open analytics.duckdb only; identifiable.duckdb is the processor's zone.")
    with Path(f"{path}.writer.lock").open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_SH)
        try:
            con = duckdb.connect(str(path), read_only=True)
            try:
                con.execute("SET enable_external_access = false")
                con.execute("SET lock_configuration = true")   # the settings above cannot be undone
                yield con
            finally:
                con.close()
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
