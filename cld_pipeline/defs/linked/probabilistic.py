"""Probabilistic linkage, per CLD quarter, inside the processor zone (identifiable.duckdb, schema
`linkage`), before anything reaches the analysts. The method is in `lib/linkage/probabilistic.py`.

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


import hashlib
import json
import os
import re
import shutil
import time

import dagster as dg
import duckdb

from cld_pipeline import settings
from cld_pipeline.defs.errors import values_withheld
from cld_pipeline.defs.health.assets import VALIDATED_EPISODES
from cld_pipeline.defs.metadata import table_schema
from cld_pipeline.defs.partitions import QUARTERLY, quarter_partitions
from cld_pipeline.defs.resources import LockedDuckDBResource, PseudonymisationKey
from cld_pipeline.defs.validate.assets import EVENTS as VALIDATED_EVENTS
from cld_pipeline.lib.ingest.chain import processor_state
from cld_pipeline.lib.linkage import probabilistic as model_lib
from cld_pipeline.lib.linkage.person_links import (
    ensure_tables,
    linked_person_select,
    links_join_sql,
)
from cld_pipeline.lib.privacy import rights
from cld_pipeline.lib.privacy.pseudonymise import KeyError_
from cld_pipeline.lib.warehouse import table_exists, transaction

OWNERS = ["team:cld-linkage"]
GROUP = "probabilistic_linkage"
MODEL = dg.AssetKey(["linkage", "probabilistic_model"])
LINKS = dg.AssetKey(["linkage", "person_links"])
REVIEW = dg.AssetKey(["linkage", "review_queue"])
REVIEW_SAMPLE = 100            # pairs near the threshold sampled for review per quarter (ambiguous ones on top)
AUTOMATION = (dg.AutomationCondition.any_deps_updated().since_last_handled()
              & ~dg.AutomationCondition.any_deps_in_progress() & ~dg.AutomationCondition.in_progress())
# Anything that looks like an NHS number, a date or a postcode: none may be in a model's JSON.
# (Ten digits after a decimal point are a parameter, not an NHS number.)
IDENTIFIER_PATTERN = re.compile(r"(?<![\d.])\d{10}(?!\d)|\b(19|20)\d\d-\d\d-\d\d\b|\b[A-Z]{1,2}\d[A-Z\d]? ?\d[A-Z]{2}\b")



def models_dir():
    return settings.data_dir() / "linkage" / "models"


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
                                      f"{model_lib.TARGET_PRECISION:.1%} at the chosen threshold (a warning)."),
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
            ensure_tables(con)
            submissions = [(la, sid) for la, q, sid, usable in processor_state(con) if q == quarter and usable]
            if not submissions:
                raise dg.Failure(description=f"No usable validated submission for {quarter} yet.", allow_retries=False)
            _register_submissions(con, submissions)
            for table in ("validated.events", "validated.hospital_episodes"):   # people under restriction stay out
                if table_exists(con, *table.split(".")):
                    rights.ensure_restriction_column(con, table)
            con.execute(f"COPY ({model_lib.roles_sql(f'({model_lib.social_care_people_sql()})')}) "
                        f"TO '{scratch / 'people.parquet'}' (FORMAT parquet)")
            hospital_held = table_exists(con, "validated", "hospital_episodes")
            if hospital_held:
                con.execute(f"COPY ({model_lib.patients_sql()}) TO '{scratch / 'patients.parquet'}' (FORMAT parquet)")
            con.execute(f"COPY (SELECT la_code, la_person_id, nhs_number, arg_max(is_match, decided_at) AS is_match "
                        f"FROM linkage.review_decisions GROUP BY ALL) TO '{scratch / 'decisions.parquet'}' (FORMAT parquet)")
        work = settings.work_connection(scratch)
        try:
            outcome = _link(work, scratch, quarter, hospital_held)
        finally:
            work.close()
        model, counts = outcome["model"], outcome["counts"]
        # Named by its content: the same data gives the same model, and a re-run the same tables.
        model_id = f"{quarter}-" + (hashlib.sha256(model.to_json().encode()).hexdigest()[:12] if model else "none")
        with identifiable_db.get_connection() as con:
            ensure_tables(con)
            with transaction(con):   # the quarter's model, links and review queue change together
                for table in ("models", "person_links", "review_queue"):
                    con.execute(f"DELETE FROM linkage.{table} WHERE quarter = ?", [quarter])
                if model is not None:
                    con.execute("INSERT INTO linkage.models VALUES (?, ?, now(), ?, ?, ?)",
                                [quarter, model_id, model.threshold, model.to_json(), json.dumps(model.metrics)])
                con.execute(f"INSERT INTO linkage.person_links SELECT ?, la_code, la_person_id, nhs_number, link_method, "
                            f"match_probability, match_weight, decided_by, ? FROM read_parquet('{scratch / 'links.parquet'}')",
                            [quarter, model_id])
                con.execute(f"INSERT INTO linkage.review_queue SELECT ?, *, now() "
                            f"FROM read_parquet('{scratch / 'review.parquet'}')", [quarter])
            _register_submissions(con, submissions)
            relinked_rows = _rekey_rows(con, scratch, quarter, key)
            schemas = {k: table_schema(con, "linkage", t) for k, t in
                       ((MODEL, "models"), (LINKS, "person_links"), (REVIEW, "review_queue"))}
        if model is not None:
            folder = models_dir()
            folder.mkdir(parents=True, exist_ok=True)
            target = folder / f"{quarter}.json"
            tmp = folder / f".{quarter}.json.partial"
            tmp.write_text(model.to_json(), encoding="utf-8")
            os.chmod(tmp, 0o600)
            tmp.replace(target)
        with analytics_db.get_connection() as con:
            updated = _apply_to_analysts_zone(con, scratch, quarter)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    seconds = round(time.perf_counter() - started, 2)
    metrics = model.metrics if model is not None else {}
    yield dg.MaterializeResult(asset_key=MODEL, metadata={
        "trained": model is not None, "why_not": outcome["why_not"] or "trained",
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
                              passed=model is None or (precision is not None and precision >= model_lib.TARGET_PRECISION),
                              metadata={"holdout_precision": precision, "holdout_recall": metrics.get("holdout_recall"),
                                        "threshold": model.threshold if model is not None else None})
    found = bool(model is not None and IDENTIFIER_PATTERN.search(model.to_json()))
    yield dg.AssetCheckResult(check_name="model_free_of_identifiers", asset_key=MODEL, passed=not found,
                              metadata={"identifier_shaped_strings": "found" if found else "none"})


def _register_submissions(con: duckdb.DuckDBPyConnection, submissions: list[tuple[str, str]]) -> None:
    con.execute("CREATE OR REPLACE TEMP TABLE quarter_submissions (la_code VARCHAR, submission_id VARCHAR)")
    con.executemany("INSERT INTO quarter_submissions VALUES (?, ?)", [list(s) for s in submissions])


def _link(work: duckdb.DuckDBPyConnection, scratch, quarter: str, hospital_held: bool) -> dict:
    """Train, score and decide on the scratch copies; writes links.parquet and review.parquet."""
    work.execute(f"CREATE TABLE council_people AS SELECT row_number() OVER (ORDER BY la_code, la_person_id) AS record_id, * "
                 f"FROM read_parquet('{scratch / 'people.parquet'}')")
    if hospital_held:
        work.execute(f"CREATE TABLE patients AS SELECT row_number() OVER (ORDER BY nhs_number) AS record_id, * "
                     f"FROM read_parquet('{scratch / 'patients.parquet'}') WHERE dob IS NOT NULL")
    else:
        work.execute("CREATE TABLE patients (record_id BIGINT, nhs_number VARCHAR, dob DATE, sex VARCHAR, postcode VARCHAR)")
    work.execute("""CREATE TABLE sc_people AS SELECT record_id, dob, sex, postcode, role,
                    CASE WHEN role <> 'unlabelled' THEN nhs_number END AS nhs_number
                    FROM council_people WHERE role IS NOT NULL""")
    work.execute(f"""CREATE TEMP TABLE review_labels AS
                     SELECT c.record_id AS sc_record_id, p.record_id AS patient_record_id, d.is_match
                     FROM read_parquet('{scratch / 'decisions.parquet'}') d
                     JOIN council_people c ON c.la_code = d.la_code AND c.la_person_id = d.la_person_id
                     JOIN patients p ON p.nhs_number = d.nhs_number""")
    counts = dict(zip(("unlabelled", "train", "holdout"), work.execute(
        "SELECT count(*) FILTER (WHERE role = 'unlabelled'), count(*) FILTER (WHERE role = 'train'), "
        "count(*) FILTER (WHERE role = 'holdout') FROM sc_people").fetchall()[0]))
    patients = work.execute("SELECT count(*) FROM patients").fetchall()[0][0]
    why_not = None
    if not patients:
        why_not = "no hospital patients held"
    elif not counts["unlabelled"]:
        why_not = "every council person has a valid NHS number"
    elif counts["train"] < 50 or counts["holdout"] < 50:
        why_not = "fewer than 50 labelled people for training or for the held-out judgement"
    model = None
    work.execute("CREATE TEMP TABLE links (sc_record_id BIGINT, patient_record_id BIGINT, match_probability DOUBLE, "
                 "match_weight DOUBLE, patients_above_threshold BIGINT, decision VARCHAR)")
    work.execute("CREATE TEMP TABLE scores (sc_record_id BIGINT, patient_record_id BIGINT, match_probability DOUBLE, "
                 "match_weight DOUBLE)")
    if why_not is None:
        model = model_lib.train(work)
        model_lib.link(work, model)
    # Deterministic first: people whose other rows carry their one valid NHS number.
    work.execute(f"""COPY (
        SELECT la_code, la_person_id, nhs_number, 'nhs_number' AS link_method, NULL::DOUBLE AS match_probability,
               NULL::DOUBLE AS match_weight, 'other_rows' AS decided_by
        FROM council_people WHERE other_rows
        UNION ALL
        SELECT c.la_code, c.la_person_id, p.nhs_number, 'probabilistic', round(l.match_probability, 9),
               round(l.match_weight, 6),
               CASE WHEN r.is_match THEN 'reviewer' ELSE 'model' END
        FROM links l JOIN council_people c ON c.record_id = l.sc_record_id
        JOIN patients p ON p.record_id = l.patient_record_id
        LEFT JOIN review_labels r ON r.sc_record_id = l.sc_record_id AND r.patient_record_id = l.patient_record_id
        WHERE l.decision = 'linked') TO '{scratch / 'links.parquet'}' (FORMAT parquet)""")
    threshold = model.threshold if model is not None else 1.0
    shift = model.prior_shift if model is not None else 0.0
    low, _ = model_lib.REVIEW_BAND
    # Every ambiguous person's best pair, then a seeded sample of pairs near the threshold not yet decided.
    work.execute(f"""COPY (
        WITH candidates AS (
            SELECT s.sc_record_id, s.patient_record_id, 1 / (1 + pow(2, -(s.match_weight + {shift}))) AS match_probability,
                   s.match_weight + {shift} AS match_weight,
                   CASE WHEN l.decision = 'ambiguous' THEN 'ambiguous' ELSE 'near_threshold' END AS reason
            FROM scores s JOIN sc_people u ON u.record_id = s.sc_record_id AND u.role = 'unlabelled'
            LEFT JOIN links l ON l.sc_record_id = s.sc_record_id
            LEFT JOIN review_labels r ON r.sc_record_id = s.sc_record_id AND r.patient_record_id = s.patient_record_id
            WHERE r.is_match IS NULL
              AND ((l.decision = 'ambiguous' AND s.patient_record_id = l.patient_record_id)
                   OR 1 / (1 + pow(2, -(s.match_weight + {shift}))) BETWEEN {low}
                      AND least({threshold} + (1 - {threshold}) * 0.9, 0.99999))
        ), picked AS (
            SELECT * FROM candidates
            QUALIFY reason = 'ambiguous'
                 OR row_number() OVER (PARTITION BY reason ORDER BY hash(sc_record_id, patient_record_id, '{quarter}'))
                    <= {REVIEW_SAMPLE}
        )
        SELECT substr(sha256(c.la_code || ':' || c.la_person_id || ':' || p.nhs_number || ':{quarter}'), 1, 16) AS pair_id,
               k.reason, c.la_code, c.la_person_id, p.nhs_number, k.match_probability, k.match_weight,
               c.dob AS council_dob, c.sex AS council_sex, c.postcode AS council_postcode,
               p.dob AS hospital_dob, p.sex AS hospital_sex, p.postcode AS hospital_postcode
        FROM picked k JOIN council_people c ON c.record_id = k.sc_record_id
        JOIN patients p ON p.record_id = k.patient_record_id
        ORDER BY reason, match_probability DESC) TO '{scratch / 'review.parquet'}' (FORMAT parquet)""")
    counts.update(zip(("links", "probabilistic", "other_rows"), work.execute(
        f"SELECT count(*), count(*) FILTER (WHERE link_method = 'probabilistic'), count(*) FILTER (WHERE decided_by = 'other_rows') "
        f"FROM read_parquet('{scratch / 'links.parquet'}')").fetchall()[0]))
    counts["ambiguous"] = work.execute("SELECT count(*) FROM links WHERE decision = 'ambiguous'").fetchall()[0][0]
    counts["review"] = work.execute(f"SELECT count(*) FROM read_parquet('{scratch / 'review.parquet'}')").fetchall()[0][0]
    return {"model": model, "counts": counts, "why_not": why_not}


def _rekey_rows(con: duckdb.DuckDBPyConnection, scratch, quarter: str, key) -> int:
    """The person token, link method and probability of every row without a valid NHS number in the
    quarter's current submissions, as the pseudonymised layer computes them (rekey.parquet)."""
    ipad, opad = key.pads
    con.execute(f"""COPY (
        SELECT v.submission_id, v.row_number,
               {linked_person_select('v', 's.la_code', 'l.nhs_number', 'l.link_method', 'l.match_probability')}
        FROM validated.events v JOIN quarter_submissions s USING (submission_id)
        {links_join_sql('v', 's.la_code', '$quarter')}
        WHERE v.nhs_number IS NULL) TO '{scratch / 'rekey.parquet'}' (FORMAT parquet)""",
                {"ipad": ipad, "opad": opad, "quarter": quarter})
    return con.execute(f"SELECT count(*) FROM read_parquet('{scratch / 'rekey.parquet'}')").fetchall()[0][0]


def _apply_to_analysts_zone(con: duckdb.DuckDBPyConnection, scratch, quarter: str) -> int:
    """Re-key the quarter's rows without an NHS number in pseudonymised.events (one transaction)."""
    if not table_exists(con, "pseudonymised", "events"):
        return 0
    con.execute("ALTER TABLE pseudonymised.events ADD COLUMN IF NOT EXISTS link_method VARCHAR")
    con.execute("ALTER TABLE pseudonymised.events ADD COLUMN IF NOT EXISTS match_probability DOUBLE")
    with transaction(con):
        changed = con.execute(f"""
            UPDATE pseudonymised.events e
            SET person_id = k.person_id, link_method = k.link_method, match_probability = k.match_probability
            FROM read_parquet('{scratch / 'rekey.parquet'}') k
            WHERE e.quarter = ? AND e.submission_id = k.submission_id AND e.row_number = k.row_number
              AND (e.person_id IS DISTINCT FROM k.person_id OR e.link_method IS DISTINCT FROM k.link_method
                   OR e.match_probability IS DISTINCT FROM k.match_probability)""", [quarter]).fetchall()[0][0]
    return changed
