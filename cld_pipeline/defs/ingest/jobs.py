"""Jobs the landing sensor starts and operators re-run."""

import dagster as dg

# One run per arriving submission: the raw layer now; later layers of the same partition join the
# selection as they are built, so a resubmission rebuilds everything downstream of it.
ingest_submission_job = dg.define_asset_job(
    "ingest_submission_job",
    selection=dg.AssetSelection.groups("raw", "validated", "pseudonymised") - dg.AssetSelection.tag("cld/source", "hospital"),
    tags={"dagster/max_retries": "1", "dagster/retry_strategy": "FROM_FAILURE"},
    description="Land one council's quarterly submission (and rebuild its partition downstream).",
)
