"""Resources: one DuckDB database per privacy zone, one writer at a time.

`identifiable_db` is the processor's zone (identifiers present); `analytics_db` is the analysts'
zone (pseudonymised and aggregate data only). Keeping them as separate files means access to the
analysts' zone can be granted without ever granting access to identifiers.

DuckDB allows one process to open a database file for writing. Rather than a Dagster concurrency
pool (whose slots a killed run keeps until the daemon's run monitoring frees them, so a headless
`cld-pipeline run` after a crash would wait forever), every connection takes an OS file lock beside
the database first: runs queue for it, the kernel releases it when a process dies, and connections
are held only for short transactions (parsing and other heavy work happen outside them).
"""

import fcntl
import os
import time
from contextlib import contextmanager
from pathlib import Path

import dagster as dg
from dagster_duckdb import DuckDBResource

from cld_pipeline.lib.privacy.file_modes import secure_data_folder
from cld_pipeline.lib.privacy.pseudonymise import PseudoKey, load_key, load_ring
from cld_pipeline import environment, settings
from cld_pipeline.settings import analytics_db_path, data_dir, identifiable_db_path


# Owner-only for the processor zone; the analysts' group may read the analysts' zone.
FILE_MODES = {"identifiable.duckdb": 0o600, "analytics.duckdb": 0o640}


def _restrict_file_mode(database: str) -> None:
    path = Path(database)
    mode = FILE_MODES.get(path.name)
    if mode is not None and path.exists() and (path.stat().st_mode & 0o777) != mode:
        os.chmod(path, mode)


class LockedDuckDBResource(DuckDBResource):
    """DuckDBResource whose connections are serialised across processes by a lock file."""

    lock_timeout_seconds: int = 3600

    @contextmanager
    def get_connection(self):
        lock_path = Path(f"{self.database}.writer.lock")
        lock_path.parent.mkdir(parents=True, exist_ok=True)
        with lock_path.open("a") as lock:
            deadline = time.monotonic() + self.lock_timeout_seconds
            while True:
                try:
                    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"waited {self.lock_timeout_seconds} s for {lock_path.name}") from None
                    time.sleep(0.05)
            try:
                with super().get_connection() as con:
                    # DuckDBResource closes the connection only when the block ends without an
                    # error; after a failure it stayed open (holding the file) until garbage
                    # collection, so another process, or a read-only open here, was refused.
                    try:
                        _restrict_file_mode(self.database)
                        con.execute(f"SET memory_limit = '{settings.duckdb_memory_limit()}'")
                        yield con
                    finally:
                        con.close()
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)


class ProcessorZoneOutbox(dg.ConfigurableResource):
    """Write-only access to the processor zone for analytical assets: they may deposit results
    that must not be shown to analysts (the benchmark's unsuppressed figures), but get no connection
    and so cannot read identifiers. Analytical assets never take `identifiable_db` (a test says so)."""

    database: str

    def replace_slice(self, table: str, parquet: str, where: str, params: list) -> None:
        from cld_pipeline.lib.warehouse import replace_slice

        with LockedDuckDBResource(database=self.database).get_connection() as con:
            replace_slice(con, table, f"read_parquet('{parquet}')", where, params)


class PseudonymisationKey(dg.ConfigurableResource):
    """The secret key for person tokens, read through Dagster's EnvVar (`CLD_PSEUDO_KEY`), so the UI
    shows only the variable's name. `environment` is `CLD_ENVIRONMENT` (default `development`, where
    a labelled throw-away key file is created in the data folder if no key is set); in any other
    environment a missing or short key stops the run."""

    key: str | None = None
    key_version: str = "1"
    environment: str = "development"
    previous_keys: str | None = None

    def load(self) -> PseudoKey:
        return load_key(self.key, self.key_version, self.environment, data_dir())

    def load_ring(self) -> tuple[PseudoKey, ...]:
        """Current key and the previous versions still held (`CLD_PSEUDO_KEY_PREVIOUS`)."""
        return load_ring(self.load(), self.previous_keys)


@dg.definitions
def resources() -> dg.Definitions:
    env = environment.current()
    secure_data_folder(data_dir())   # this process and the runs it starts write owner-only files
    return dg.Definitions(
        resources={
            "identifiable_db": LockedDuckDBResource(database=str(identifiable_db_path())),
            "analytics_db": LockedDuckDBResource(database=str(analytics_db_path())),
            "processor_outbox": ProcessorZoneOutbox(database=str(identifiable_db_path())),
            "pseudonymisation_key": PseudonymisationKey(
                key=dg.EnvVar("CLD_PSEUDO_KEY") if env.key_from_env else None,
                key_version=env.key_version,
                environment=env.name,
                previous_keys=dg.EnvVar("CLD_PSEUDO_KEY_PREVIOUS") if env.previous_keys_from_env else None,
            ),
        }
    )
