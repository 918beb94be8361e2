"""Partitions: quarter x LA for every per-submission asset, quarter for national ones.

- `quarter` is *dynamic* ("2026-Q3", the contract's spelling): a quarter exists once a file for it
  arrives, so late resubmissions for an old quarter just work and there are no empty partitions
  before the collection began. A time-window definition would give "2026-07-01"-style keys and
  only completed windows; CLD quarters are named by the reporting period end, not by a clock.
- `la` is *static*: the 153 councils of the reference data (their CLD code, or ONS code where a
  council has none). A council appears only when the reference changes, which is a code change.

153 councils x a few dozen quarters stays far below Dagster's partition-count guidance.
"""

import datetime as dt

import dagster as dg

from cld_pipeline.reference import load_local_authorities

quarter_partitions = dg.DynamicPartitionsDefinition(name="quarter")
la_partitions = dg.StaticPartitionsDefinition([la.submission_code for la in load_local_authorities()])
submission_partitions = dg.MultiPartitionsDefinition({"quarter": quarter_partitions, "la": la_partitions})
# Asset groups partitioned by quarter alone, rebuilt downstream of a quarter's LA partitions.
QUARTER_GROUPS = ("linked", "benchmark")


def submission_partition_key(la_code: str, quarter: str) -> dg.MultiPartitionKey:
    return dg.MultiPartitionKey({"la": la_code, "quarter": quarter})


def run_partitions(context: dg.AssetExecutionContext) -> list[tuple[str, str]]:
    """(LA code, quarter) of every partition a run covers: one for an arriving file, many for a
    quarter's backfill (the per-submission assets have `BackfillPolicy.single_run()`)."""
    return [(k.keys_by_dimension["la"], k.keys_by_dimension["quarter"]) for k in context.partition_keys]


# Hospital extracts are national, one file per quarter of discharge; their quarters run ahead of
# and behind the CLD collection's (follow-up windows need earlier and later spells), so they have
# their own dynamic definition rather than adding empty CLD quarters.
hospital_quarter_partitions = dg.DynamicPartitionsDefinition(name="hospital_quarter")


# Freshness the UI shows per asset: councils submit within about six weeks of a quarter's end, so by
# the 15th of the second month after it some submission of the new quarter must have landed; a
# quarter with nothing new by then is shown late (overdue) on the asset and in the Freshness view.
SUBMISSION_WINDOW = dg.FreshnessPolicy.cron(deadline_cron="0 9 15 2,5,8,11 *", lower_bound_delta=dt.timedelta(days=45),
                                           timezone="Europe/London")
# Quarter-level tables are rebuilt at least once a quarter (plus the submission window's margin).
QUARTERLY = dg.FreshnessPolicy.time_window(fail_window=dt.timedelta(days=110), warn_window=dt.timedelta(days=95))
