"""The last line of defence for privacy in failures: no exception message from data-touching code
reaches Dagster's event log, the compute logs, an alert or stdout.

Parsers, DuckDB, pandas and pyarrow put the offending value into their messages ("Could not convert
string '9992455527' to INT32"). Every asset that reads submitted rows runs inside
`values_withheld`, which turns any exception that is not already a plain `dg.Failure` into one that
names the step, the exception's type and, where it can be told, the field, and never the message.
The original is not chained (`from None`), so Dagster does not serialise it either.

Faults of the machine (a full disk, a lost file, memory) are told apart: they keep a fixed description
and may be retried; anything else is bad data or a bug, which a retry cannot mend.
"""

from __future__ import annotations

import errno
import re
from contextlib import contextmanager

import dagster as dg
import duckdb

from cld_pipeline.spec import load_spec

ENVIRONMENT_FAULT = "environment"   # metadata value on failures of the machine, not of the data
ENVIRONMENTAL = (OSError, MemoryError, duckdb.IOException, duckdb.OutOfMemoryException)


def _field_named_in(message: str) -> str | None:
    """A CLD field (or its column) that the message names, if any: the field is safe to show."""
    columns = {f.column: f.name for f in load_spec().fields}
    for word in re.findall(r"[A-Za-z_][A-Za-z0-9_]*", message):
        if word in columns:
            return columns[word]
        if word in columns.values():
            return word
    return None


def withheld(err: BaseException, what: str) -> dg.Failure:
    kind = type(err).__name__
    if isinstance(err, ENVIRONMENTAL):
        code = getattr(err, "errno", None)
        reason = errno.errorcode.get(code, "") if code else ""
        if code == errno.ENOSPC or "No space left" in str(err):
            reason = "ENOSPC: the disk is full"
        return dg.Failure(description=f"{what} stopped: {kind}{f' ({reason})' if reason else ''}. Nothing was "
                                      "half-written; free the resource and re-run (cld-pipeline run finishes "
                                      "every incomplete submission).", allow_retries=True,
                          metadata={"exception": kind, "fault": ENVIRONMENT_FAULT})
    field = _field_named_in(str(err))
    return dg.Failure(description=f"{what} failed with {kind}{f' on field {field}' if field else ''}; the message "
                                  "is withheld because it may quote submitted values. Not retried: re-running the "
                                  "same data gives the same error.", allow_retries=False,
                      metadata={"exception": kind, "field": field or ""})


@contextmanager
def values_withheld(what: str):
    """Run data-touching code; any exception but a plain `dg.Failure` becomes `withheld(...)`."""
    try:
        yield
    except (dg.Failure, dg.RetryRequested):
        raise
    except KeyboardInterrupt:
        raise
    except Exception as err:   # noqa: BLE001 - the point is to catch everything
        raise withheld(err, what) from None
