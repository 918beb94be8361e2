"""Probabilistic linkage, per CLD quarter, inside the processor zone (identifiable.duckdb, schema
`linkage`), before anything reaches the analysts. The method is in `lib/linkage/probabilistic.py`,
the step's plain logic in `lib/linkage/step.py`.

- `linkage/probabilistic_model`: the quarter's Splink model (its JSON, the threshold chosen on
  held-out labels, precision and recall on them), in `linkage.models` and `data/linkage/models/`.
- `linkage/person_links`: each council person without a valid NHS number who links to a hospital
  patient: deterministically (other rows of theirs carry the number) or probabilistically (exactly
  one patient at or above the threshold, or a reviewer confirmed the pair).
- `linkage/review_queue`: pairs for clerical review (ambiguous people, and a sample near the
  threshold), with both sides' date of birth, sex and postcode: processor zone only.

After writing them, the step re-keys the quarter's rows without an NHS number in
`pseudonymised.events` (the person token, `link_method`, `match_probability`), exactly as the
pseudonymised layer does when it runs after this step, so the order of the two never matters.
"""


import shutil
import time

import dagster as dg

from cld_pipeline import settings
from cld_pipeline.defs.errors import values_withheld
from cld_pipeline.defs.health.assets import VALIDATED_EPISODES
from cld_pipeline.defs.metadata import table_schema
from cld_pipeline.defs.partitions import QUARTERLY, quarter_partitions
from cld_pipeline.defs.resources import LockedDuckDBResource, PseudonymisationKey
from cld_pipeline.defs.validate.assets import EVENTS as VALIDATED_EVENTS
from cld_pipeline.lib.ingest.chain import processor_state
from cld_pipeline.lib.linkage import step
from cld_pipeline.lib.linkage.probabilistic import TARGET_PRECISION
from cld_pipeline.lib.privacy.identifiers import IDENTIFIER_SHAPED
from cld_pipeline.lib.privacy.pseudonymise import KeyError_

OWNERS = ["team:cld-linkage"]
GROUP = "probabilistic_linkage"
MODEL = dg.AssetKey(["linkage", "probabilistic_model"])
LINKS = dg.AssetKey(["linkage", "person_links"])
REVIEW = dg.AssetKey(["linkage", "review_queue"])
AUTOMATION = (dg.AutomationCondition.any_deps_updated().since_last_handled()
              & ~dg.AutomationCondition.any_deps_in_progress() & ~dg.AutomationCondition.in_progress())


@dg.multi_asset(
    specs=[
        dg.AssetSpec(MODEL, group_name=GROUP, kinds={"duckdb", "splink"}, owners=OWNERS,
                     description="The quarter's Splink model (processor zone): its JSON, the threshold chosen on "
                                 "held-out NHS-number labels, and precision and recall on them.",
                     automation_condition=AUTOMATION, freshness_policy=QUARTERLY,
                     deps=[VALIDATED_EVENTS, dg.AssetDep(VALIDATED_EPISODES, partition_mapping=dg.AllPartitionMapping())]),
        dg.AssetSpec(LINKS, group_name=GROUP, kinds={"duckdb"}, owners=OWNERS, deps=[MODEL],
                     description="Council people without a valid NHS number linked to a hospital patient "
                                 "(processor zone): by NHS number on their other rows, or probabilistically."),
        dg.AssetSpec(REVIEW, group_name=GROUP, kinds={"duckdb"}, owners=OWNERS, deps=[MODEL],
                     description="Pairs for clerical review (processor zone): every ambiguous person and a sample "
                                 "near the threshold, both sides' date of birth, sex and postcode."),
    ],
    partitions_def=quarter_partitions,
    check_specs=[
        dg.AssetCheckSpec("holdout_precision", asset=MODEL,
                          description=f"Precision on the held-out NHS-number labels reaches "
                                      f"{TARGET_PRECISION:.1%} at the chosen threshold (a warning)."),
        dg.AssetCheckSpec("model_free_of_identifiers", asset=MODEL, blocking=True,
                          description="The model's JSON holds nothing shaped like an NHS number, a date or a postcode."),
    ],
)
def probabilistic_linkage(context: dg.AssetExecutionContext, identifiable_db: LockedDuckDBResource,
                          analytics_db: LockedDuckDBResource, pseudonymisation_key: PseudonymisationKey):
    with values_withheld("Probabilistic linkage"):
        yield from _body(context, identifiable_db, analytics_db, pseudonymisation_key)


def _body(context, identifiable_db, analytics_db, pseudonymisation_key):
    started = time.perf_counter()
    quarter = context.partition_key
    try:
        key = pseudonymisation_key.load_ring()[0]
    except KeyError_ as err:
        raise dg.Failure(description=str(err), allow_retries=False) from None
    scratch = settings.new_scratch("linkage-")
    try:
        with identifiable_db.get_connection() as con:
            submissions = [(la, sid) for la, q, sid, usable in processor_state(con) if q == quarter and usable]
            if not submissions:
                raise dg.Failure(description=f"No usable validated submission for {quarter} yet.", allow_retries=False)
            hospital_held = step.export_inputs(con, scratch, submissions)
        work = settings.work_connection(scratch)
        try:
            outcome = step.link_quarter(work, scratch, quarter, hospital_held)
        finally:
            work.close()
        with identifiable_db.get_connection() as con:
            step.store(con, scratch, quarter, outcome)
            relinked_rows = step.rekey_rows(con, scratch, quarter, key, submissions)
            schemas = {k: table_schema(con, "linkage", t) for k, t in
                       ((MODEL, "models"), (LINKS, "person_links"), (REVIEW, "review_queue"))}
        with analytics_db.get_connection() as con:
            updated = step.apply_to_analysts_zone(con, scratch, quarter)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    seconds = round(time.perf_counter() - started, 2)
    model, counts = outcome.model, outcome.counts
    metrics = model.metrics if model is not None else {}
    yield dg.MaterializeResult(asset_key=MODEL, metadata={
        "trained": model is not None, "why_not": outcome.why_not or "trained",
        "threshold": model.threshold if model is not None else None,
        "holdout_precision": metrics.get("holdout_precision"), "holdout_recall": metrics.get("holdout_recall"),
        "holdout_people": metrics.get("holdout_people"), "holdout_findable": metrics.get("holdout_findable"),
        "training_people": counts["train"], "seconds": seconds, "dagster/column_schema": schemas[MODEL],
        "dagster/table_name": "identifiable.linkage.models"})
    yield dg.MaterializeResult(asset_key=LINKS, metadata={
        "dagster/row_count": counts["links"], "people_without_nhs_number": counts["unlabelled"],
        "people_linked_probabilistic": counts["probabilistic"], "people_linked_by_other_rows": counts["other_rows"],
        "people_ambiguous": counts["ambiguous"], "pseudonymised_rows_rekeyed": updated,
        "processor_rows_considered": relinked_rows, "dagster/column_schema": schemas[LINKS],
        "dagster/table_name": "identifiable.linkage.person_links"})
    yield dg.MaterializeResult(asset_key=REVIEW, metadata={
        "dagster/row_count": counts["review"], "dagster/column_schema": schemas[REVIEW],
        "dagster/table_name": "identifiable.linkage.review_queue"})
    precision = metrics.get("holdout_precision")
    yield dg.AssetCheckResult(check_name="holdout_precision", asset_key=MODEL, severity=dg.AssetCheckSeverity.WARN,
                              passed=model is None or (precision is not None and precision >= TARGET_PRECISION),
                              metadata={"holdout_precision": precision, "holdout_recall": metrics.get("holdout_recall"),
                                        "threshold": model.threshold if model is not None else None})
    found = bool(model is not None and IDENTIFIER_SHAPED.search(model.to_json()))
    yield dg.AssetCheckResult(check_name="model_free_of_identifiers", asset_key=MODEL, passed=not found,
                              metadata={"identifier_shaped_strings": "found" if found else "none"})
