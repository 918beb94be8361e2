"""Resources: one DuckDB database per privacy zone.

`identifiable_db` is the processor's zone (identifiers present); `analytics_db` is the analysts'
zone (pseudonymised and aggregate data only). Keeping them as separate files means access to the
analysts' zone can be granted without ever granting access to identifiers.
"""

import dagster as dg
from dagster_duckdb import DuckDBResource

from cld_pipeline.settings import analytics_db_path, identifiable_db_path


@dg.definitions
def resources() -> dg.Definitions:
    for path in (identifiable_db_path(), analytics_db_path()):
        path.parent.mkdir(parents=True, exist_ok=True)
    return dg.Definitions(
        resources={
            "identifiable_db": DuckDBResource(database=str(identifiable_db_path())),
            "analytics_db": DuckDBResource(database=str(analytics_db_path())),
        }
    )
