"""Probabilistic linkage of social care people without a valid NHS number to hospital patients.

A Fellegi-Sunter model fitted by Splink on DuckDB, run inside the processor zone before
pseudonymisation (fuzzy comparison is impossible on keyed hashes). There are no names in CLD or in
the hospital extract, so, as NHS England's name-less linkage does, the model compares:

- date of birth: exact; day and month swapped; one character different (a single mistyped digit);
  birth years at most one apart (age); anything else;
- postcode: Splink's postcode comparison (full, sector, district, area);
- sex: the same, or not (NULL when either side did not record it).

Blocking (which pairs are scored at all): the same date of birth in the same postcode area; the
date of birth with day and month swapped, in the same area; the same full postcode; the same sex,
birth year and postcode district. (Date of birth alone would score every council person against
about 25 patients nationally; a person who moved out of the area is left to clerical review.)

Parameters: u by random sampling; m seeded from labelled pairs (social care people whose council
did record a valid NHS number, matched to the patient with that number, in a *training* half),
then refined by expectation maximisation, blocked on date of birth and on postcode in turn. The
other half of the labels (held out) judges the model: the threshold is the lowest candidate
match probability at which held-out precision reaches the target, and is stored with the model.

A person is linked when the best patient's share of the odds over every plausible patient reaches
the threshold (`decisions_sql`); when rivals pull a good pair below it, the person goes to clerical
review instead. Reviewers' decisions are labels for the next model and
override it for their pair: a rejected pair is never linked, a confirmed one always is.

Inputs on the connection (all identifiable, processor zone only):
`sc_people(record_id BIGINT, dob DATE, sex VARCHAR, postcode VARCHAR, role VARCHAR, nhs_number VARCHAR)`
with role `unlabelled` (the people to link: nhs_number NULL), `train` or `holdout` (nhs_number the
number the council recorded); `patients(record_id BIGINT, nhs_number VARCHAR, dob DATE, sex VARCHAR,
postcode VARCHAR)`; optionally `review_labels(sc_record_id BIGINT, patient_record_id BIGINT, is_match BOOLEAN)`.
"""

from __future__ import annotations

import json
import logging
import math
from contextlib import contextmanager
from dataclasses import dataclass, field

import duckdb

MODEL_VERSION = "1"
TARGET_PRECISION = 0.995
CANDIDATE_THRESHOLDS = (0.5, 0.8, 0.9, 0.95, 0.98, 0.99, 0.995, 0.998, 0.999, 0.9995, 0.9999)
SCORE_FLOOR = 0.01            # pairs scored below this are not kept at all
MAX_LABELLED = 60_000         # labelled people drawn per quarter (half train, half held out)
EM_MIN_PRIOR_SHIFT = -2.0     # bits: below this the people to link are too rarely matchable for EM


@dataclass
class Model:
    settings: dict                      # Splink's model JSON (no record values: see test_probabilistic_linkage)
    threshold: float
    metrics: dict = field(default_factory=dict)
    prior_shift: float = 0.0            # bits added to the people-to-link's match weights (see `_prior_shift`)

    def to_json(self) -> str:
        return json.dumps({"model_version": MODEL_VERSION, "threshold": self.threshold, "metrics": self.metrics,
                           "prior_shift_bits": self.prior_shift, "splink": self.settings}, sort_keys=True)


def _dob_comparison():
    import splink.comparison_level_library as cll
    import splink.comparison_library as cl

    return cl.CustomComparison(output_column_name="dob", comparison_description="date of birth", comparison_levels=[
        cll.NullLevel("dob"),
        cll.ExactMatchLevel("dob"),
        cll.CustomLevel("dob_swapped_l = dob_r", "day and month swapped"),
        cll.CustomLevel("levenshtein(dob_l, dob_r) <= 1", "one character different"),
        cll.CustomLevel("abs(birth_year_l - birth_year_r) <= 1", "birth years at most one apart"),
        cll.ElseLevel(),
    ])


def settings_creator(prior: float):
    import splink.comparison_library as cl
    from splink import SettingsCreator, block_on

    return SettingsCreator(
        link_type="link_only",
        linker_uid="cld",            # Splink draws a random one otherwise: the same data must give the same JSON
        unique_id_column_name="record_id",
        probability_two_random_records_match=prior,
        comparisons=[_dob_comparison(), cl.PostcodeComparison("postcode"), cl.ExactMatch("sex")],
        blocking_rules_to_generate_predictions=[
            block_on("dob", "area"),
            "l.dob_swapped = r.dob AND l.area = r.area",
            block_on("postcode"),
            block_on("sex", "birth_year", "district"),
        ],
        retain_matching_columns=False,
        retain_intermediate_calculation_columns=False,
        max_iterations=20,
    )


def _inputs(con: duckdb.DuckDBPyConnection) -> None:
    """The two Splink inputs, one row per person, with the derived comparison columns."""
    derived = """record_id,
                 strftime(dob, '%Y-%m-%d') AS dob,
                 CASE WHEN day(dob) <= 12 AND day(dob) <> month(dob)
                      THEN strftime(make_date(year(dob), day(dob), month(dob)), '%Y-%m-%d') END AS dob_swapped,
                 year(dob) AS birth_year,
                 postcode,
                 regexp_extract(postcode, '^([A-Z]{1,2}[0-9][A-Z0-9]?) ', 1) AS district,
                 nullif(regexp_extract(postcode, '^([A-Z]{1,2})[0-9]', 1), '') AS area,
                 CASE WHEN sex IN ('male', 'female') THEN sex END AS sex"""
    con.execute(f"""CREATE OR REPLACE TEMP TABLE splink_sc AS
                    SELECT {derived}, CASE WHEN role = 'train' THEN nhs_number END AS label
                    FROM sc_people""")
    con.execute(f"CREATE OR REPLACE TEMP TABLE splink_patients AS SELECT {derived}, nhs_number AS label FROM patients")


def _linker(con: duckdb.DuckDBPyConnection, settings):
    from splink import DuckDBAPI, Linker

    api = DuckDBAPI(connection=con)
    frames = [api.register("splink_sc", table_name="sc"), api.register("splink_patients", table_name="patients_in")]
    return Linker(frames, settings, log_level=logging.WARNING)


def probability_sql(weight: str) -> str:
    """A match weight (bits) as a probability."""
    return f"1 / (1 + pow(2, -({weight})))"


def _label_counts(con: duckdb.DuckDBPyConnection) -> dict[str, tuple[int, int]]:
    """Per role: (people, people whose NHS number is among the patients: findable)."""
    counts = {role: (n, found) for role, n, found in con.execute("""
        SELECT role, count(*), count(*) FILTER (WHERE nhs_number IN (SELECT nhs_number FROM patients))
        FROM sc_people GROUP BY role""").fetchall()}
    return {role: counts.get(role, (0, 0)) for role in ("train", "holdout", "unlabelled")}


def _prior(con: duckdb.DuckDBPyConnection, labels: dict[str, tuple[int, int]]) -> float:
    """Share of random (person, patient) pairs that are a match, from the training labels: the
    share of labelled people found among the patients, over the number of patients."""
    labelled, found = labels["train"]
    patients = con.execute("SELECT count(*) FROM patients").fetchall()[0][0]
    share = found / labelled if labelled else 0.5
    return min(max(share, 0.01) / max(patients, 1), 0.5)


def train(con: duckdb.DuckDBPyConnection, seed: int = 1) -> Model:
    """Fit the model, score the held-out labels and choose the threshold (see the module text)."""
    _inputs(con)
    _ensure_review_labels(con)
    labels = _label_counts(con)
    shift, prior_metrics = _prior_shift(con, labels)
    from splink import block_on

    linker = _linker(con, settings_creator(_prior(con, labels)))
    # Estimation sums probabilities over many pairs; on two threads the order of the sums, and so
    # the last bits, change from run to run (and rounding cannot always hide it: a value can sit on
    # a rounding boundary). One thread makes the same data give the same model, which a re-run
    # must. Scoring, row by row, keeps every thread.
    with _one_thread(con):
        linker.training.estimate_u_using_random_sampling(max_pairs=2e6, seed=seed)
        if labels["train"][0]:
            linker.training.estimate_m_from_label_column("label")
        if con.execute("SELECT count(*) FROM review_labels WHERE is_match").fetchall()[0][0]:
            con.execute("""CREATE OR REPLACE TEMP TABLE review_pairs AS
                           SELECT 'sc' AS source_dataset_l, sc_record_id AS record_id_l,
                                  'patients_in' AS source_dataset_r, patient_record_id AS record_id_r
                           FROM review_labels WHERE is_match""")
            linker.training.estimate_m_from_pairwise_labels("review_pairs")
        # EM refines m on the blocked pairs of everybody. When the people to link are mostly people
        # with no hospital record (their base rate far below the labelled people's), those pairs are
        # nearly all non-matches and EM fits them instead: the label-seeded m is kept.
        em = "run" if shift > EM_MIN_PRIOR_SHIFT else f"skipped: prior shift {shift} bits"
        for rule in (block_on("dob"), block_on("postcode")) if em == "run" else ():
            try:
                linker.training.estimate_parameters_using_expectation_maximisation(
                    rule, record_sample_proportion=1.0, max_pairs=5e6)
            except Exception as err:   # noqa: BLE001 - EM that cannot converge keeps the label-seeded m
                logging.getLogger(__name__).warning("EM blocked on %s did not run: %s", rule, type(err).__name__)
    # Parameters rounded to 10 significant digits (the JSON stays readable), and the pairs scored
    # with the rounded model.
    settings = _rounded(_with_exact_postcode_u(con, linker.misc.save_model_to_json()))
    _score(con, _linker(con, settings))
    metrics, threshold = _judge(con, labels)
    return Model(settings=settings, threshold=threshold, metrics={**metrics, **prior_metrics, "em": em},
                 prior_shift=shift)


@contextmanager
def _one_thread(con: duckdb.DuckDBPyConnection):
    threads = con.execute("SELECT current_setting('threads')").fetchall()[0][0]
    con.execute("SET threads = 1")
    try:
        yield
    finally:
        con.execute(f"SET threads = {int(threads)}")


def _with_exact_postcode_u(con: duckdb.DuckDBPyConnection, settings: dict) -> dict:
    """u of an exact full-postcode match counted exactly when random sampling never saw one (real
    postcodes hold a few dozen people, so two random records rarely share one): the share of all
    (person, patient) pairs that share a postcode."""
    for comparison in settings["comparisons"]:
        for level in comparison["comparison_levels"]:
            if level.get("sql_condition") == '"postcode_l" = "postcode_r"' and not level.get("u_probability"):
                shared, pairs = con.execute("""
                    SELECT coalesce(sum(a.n * b.n), 0), (SELECT count(*) FROM splink_sc) * (SELECT count(*) FROM splink_patients)
                    FROM (SELECT postcode, count(*) AS n FROM splink_sc WHERE postcode IS NOT NULL GROUP BY ALL) a
                    JOIN (SELECT postcode, count(*) AS n FROM splink_patients GROUP BY ALL) b USING (postcode)""").fetchall()[0]
                level["u_probability"] = max(shared, 1) / max(pairs, 1)
    return settings


def _prior_shift(con: duckdb.DuckDBPyConnection, labels: dict[str, tuple[int, int]]) -> tuple[float, dict]:
    """How much rarer (or commoner) a hospital match is among the people to link than among the
    labelled people, as bits to add to their match weights.

    The model's prior comes from labelled people: the share of them found among the patients. The
    people whose council recorded no number can differ a lot (at national synthetic scale most of
    them have no hospital record at all), and a prior that is too high turns weak evidence into
    links. Their share is estimated as Splink's `estimate_probability_two_random_records_match`
    does: people matched by a near-certain rule (same date of birth and full postcode), divided by
    that rule's recall, measured on the held-out labels."""
    (labelled, found), (_, holdout_findable), (unlabelled, _) = labels["train"], labels["holdout"], labels["unlabelled"]
    rule_found, rule_unlabelled = con.execute("""
        SELECT count(DISTINCT s.record_id) FILTER (WHERE s.role = 'holdout' AND s.nhs_number = p.nhs_number),
               count(DISTINCT s.record_id) FILTER (WHERE s.role = 'unlabelled')
        FROM sc_people s JOIN patients p ON p.dob = s.dob AND p.postcode = s.postcode""").fetchall()[0]
    if not (labelled and found and holdout_findable and rule_found and unlabelled):
        return 0.0, {}
    share_labelled = found / labelled
    recall = rule_found / holdout_findable
    share_unlabelled = min(max(rule_unlabelled, 1) / recall / unlabelled, 0.99)
    shift = math.log2(share_unlabelled / share_labelled)
    return round(shift, 4), {"findable_share_labelled": round(share_labelled, 5),
                             "findable_share_to_link": round(share_unlabelled, 5),
                             "exact_rule_recall": round(recall, 5), "prior_shift_bits": round(shift, 4)}


def _rounded(value, digits: int = 10):
    """Every float in a model's settings to `digits` significant digits."""
    if isinstance(value, float):
        return float(f"{value:.{digits}g}")
    if isinstance(value, dict):
        return {k: _rounded(v, digits) for k, v in value.items()}
    if isinstance(value, list):
        return [_rounded(v, digits) for v in value]
    return value


def _score(con: duckdb.DuckDBPyConnection, linker) -> None:
    """Every blocked pair scored at or above the floor, as temp table `scores`
    (sc_record_id, patient_record_id, match_probability, match_weight)."""
    predictions = linker.inference.predict(threshold_match_probability=SCORE_FLOOR)
    con.execute(f"""CREATE OR REPLACE TEMP TABLE scores AS
                    SELECT CASE WHEN source_dataset_l = 'sc' THEN record_id_l ELSE record_id_r END AS sc_record_id,
                           CASE WHEN source_dataset_l = 'sc' THEN record_id_r ELSE record_id_l END AS patient_record_id,
                           match_probability, match_weight
                    FROM {predictions.physical_name}""")
    predictions.drop_table_from_database_and_remove_from_cache()


def decisions_sql(threshold: str = "$threshold", shift: str = "0") -> str:
    """Per social care person: the best patient and the decision, after reviewers' decisions (a
    rejected pair is removed, a confirmed pair wins).

    A pair's Splink weight says how likely the two records are one person against random pairs;
    `shift` (bits) moves it to the base rate of the people being linked (`_prior_shift`). When
    several patients are plausible, each is less likely to be *the* one, so the probability
    reported and compared with the threshold is the best pair's share of the odds, assuming at most
    one patient is the person: odds_best / (1 + sum of every candidate's odds). `linked` when that
    reaches the threshold (or a reviewer confirmed the pair); `ambiguous` when the best pair alone
    reaches it but rivals pull it below (clerical review); else `below_threshold`. A
    reviewer-confirmed pair is reported with probability 1."""
    return f"""
        WITH pairs AS (
            SELECT s.sc_record_id, s.patient_record_id, least(s.match_weight + {shift}, 60) AS weight,
                   coalesce(r.is_match, false) AS confirmed
            FROM scores s LEFT JOIN review_labels r
              ON r.sc_record_id = s.sc_record_id AND r.patient_record_id = s.patient_record_id
            WHERE r.is_match IS DISTINCT FROM false
            UNION ALL   -- a confirmed pair the model did not score (it changed, or never blocked them together)
            SELECT r.sc_record_id, r.patient_record_id, NULL, true FROM review_labels r
            WHERE r.is_match AND NOT EXISTS (SELECT 1 FROM scores s WHERE s.sc_record_id = r.sc_record_id
                                                                     AND s.patient_record_id = r.patient_record_id)
        ), ranked AS (
            SELECT *, {probability_sql('weight')} AS pair_probability,
                   CASE WHEN confirmed THEN 1.0
                        -- summed in patient order, so the same pairs always give the same last bits
                        ELSE pow(2, weight) / (1 + sum(pow(2, coalesce(weight, 0))) OVER (
                            PARTITION BY sc_record_id ORDER BY patient_record_id
                            ROWS BETWEEN UNBOUNDED PRECEDING AND UNBOUNDED FOLLOWING))
                   END AS match_probability,
            FROM pairs
            QUALIFY row_number() OVER (PARTITION BY sc_record_id
                                       ORDER BY confirmed DESC, weight DESC NULLS LAST, patient_record_id) = 1
        )
        SELECT sc_record_id, patient_record_id, match_probability, weight AS match_weight,
               CASE WHEN confirmed OR match_probability >= {threshold} THEN 'linked'
                    WHEN pair_probability >= {threshold} THEN 'ambiguous' ELSE 'below_threshold' END AS decision
        FROM ranked"""


def _ensure_review_labels(con: duckdb.DuckDBPyConnection) -> None:
    con.execute("CREATE TEMP TABLE IF NOT EXISTS review_labels "
                "(sc_record_id BIGINT, patient_record_id BIGINT, is_match BOOLEAN)")


def _judge(con: duckdb.DuckDBPyConnection, labels: dict[str, tuple[int, int]]) -> tuple[dict, float]:
    """Precision and recall on the held-out labels at each candidate threshold; the threshold is
    the lowest whose precision reaches the target (the highest candidate when none does)."""
    holdout, findable = labels["holdout"]
    table = []
    for t in CANDIDATE_THRESHOLDS:
        linked, correct = con.execute(f"""
            SELECT count(*), count(*) FILTER (WHERE h.nhs_number = p.nhs_number)
            FROM ({decisions_sql(str(t))}) d
            JOIN sc_people h ON h.record_id = d.sc_record_id AND h.role = 'holdout'
            JOIN patients p ON p.record_id = d.patient_record_id
            WHERE d.decision = 'linked'""").fetchall()[0]
        table.append({"threshold": t, "links": linked, "correct": correct,
                      "precision": round(correct / linked, 5) if linked else None,
                      "recall": round(correct / findable, 5) if findable else None})
    good = [row for row in table if row["precision"] is not None and row["precision"] >= TARGET_PRECISION]
    chosen = good[0] if good else table[-1]
    metrics = {"holdout_people": holdout, "holdout_findable": findable, "target_precision": TARGET_PRECISION,
               "holdout_precision": chosen["precision"], "holdout_recall": chosen["recall"], "by_threshold": table}
    return metrics, chosen["threshold"]


def link(con: duckdb.DuckDBPyConnection, model: Model) -> None:
    """Decide for the people to link, from the pairs `train` scored: temp table `links`
    (sc_record_id, patient_record_id, match_probability, match_weight, decision) for every
    unlabelled person with at least one candidate at or above the score floor."""
    con.execute(f"""CREATE OR REPLACE TEMP TABLE links AS
                    SELECT d.* FROM ({decisions_sql(shift="$shift")}) d
                    JOIN sc_people s ON s.record_id = d.sc_record_id AND s.role = 'unlabelled'""",
                {"threshold": model.threshold, "shift": model.prior_shift})


# --- the people, from the processor zone's validated tables ---------------------------------------

def _postcode_sql(column: str) -> str:
    """Upper case, one space before the inward code (`ab12cd` and `AB1 2CD ` alike); NULL when empty."""
    squeezed = f"upper(regexp_replace(coalesce({column}, ''), '\\s', '', 'g'))"
    return f"CASE WHEN length({squeezed}) >= 5 THEN substr({squeezed}, 1, length({squeezed}) - 3) || ' ' || right({squeezed}, 3) END"


def _sex_sql(column: str, code_list: str) -> str:
    """The code list's value mapped to its key when it is male or female, else NULL (not recorded)."""
    from cld_pipeline.spec import load_spec

    cl = load_spec().code_list(code_list)
    return f"CASE {column} WHEN '{cl.value('male')}' THEN 'male' WHEN '{cl.value('female')}' THEN 'female' END"


def social_care_people_sql(submissions: str = "quarter_submissions") -> str:
    """One row per council person (LA code, LA person id) of the quarter's current submissions
    (`submissions`: submission_id, la_code), from validated rows not under restriction: how many
    distinct valid NHS numbers their rows carry, the number when there is one, whether some rows
    lack it, and the latest date of birth, sex and postcode they were recorded with (rows on the same
    day in a fixed order: the result never depends on the order rows were stored in)."""
    latest = "(v.event_start_date, v.submission_id, v.row_number)"
    return f"""
        SELECT s.la_code, trim(v.la_person_unique_identifier) AS la_person_id,
               count(DISTINCT v.nhs_number) AS nhs_numbers,
               min(v.nhs_number) AS nhs_number,
               bool_or(v.nhs_number IS NULL) AS rows_without_number,
               arg_max(v.date_of_birth, {latest}) FILTER (WHERE v.date_of_birth IS NOT NULL) AS dob,
               arg_max({_sex_sql('v.gender_cleaned', 'gender')}, {latest})
                   FILTER (WHERE v.gender_cleaned IS NOT NULL) AS sex,
               arg_max({_postcode_sql('v.postcode')}, {latest})
                   FILTER (WHERE nullif(trim(v.postcode), '') IS NOT NULL) AS postcode
        FROM validated.events v JOIN {submissions} s USING (submission_id)
        WHERE NOT coalesce(v.processing_restricted, false) AND nullif(trim(v.la_person_unique_identifier), '') IS NOT NULL
        GROUP BY ALL"""


def patients_sql() -> str:
    """One row per hospital patient (valid NHS number) not under restriction, as their latest
    episode records them (episodes of the same day in a fixed order)."""
    latest = "(admission_date, extract_id, row_number)"
    return f"""
        SELECT nhs_number,
               arg_max(date_of_birth, {latest}) FILTER (WHERE date_of_birth IS NOT NULL) AS dob,
               arg_max({_sex_sql('sex', 'hospital_sex')}, {latest}) AS sex,
               arg_max({_postcode_sql('postcode')}, {latest}) FILTER (WHERE postcode IS NOT NULL) AS postcode
        FROM validated.hospital_episodes
        WHERE nhs_number IS NOT NULL AND NOT coalesce(processing_restricted, false)
        GROUP BY nhs_number"""


def roles_sql(people: str = "council_people", max_labelled: int = MAX_LABELLED) -> str:
    """Each council person's part: `unlabelled` (no valid NHS number on any row: to link),
    `train` / `holdout` (a sample of people with exactly one valid number, split by a hash of it),
    `other_rows` (some rows lack the number other rows carry: linked deterministically), or NULL."""
    return f"""
        WITH labelled AS (
            SELECT la_code, la_person_id, hash(nhs_number || 'cld-linkage') AS h FROM {people}
            WHERE nhs_numbers = 1 AND dob IS NOT NULL
            ORDER BY h, la_code, la_person_id LIMIT {int(max_labelled)}
        )
        SELECT p.*, CASE WHEN p.nhs_numbers = 0 AND p.dob IS NOT NULL THEN 'unlabelled'
                         WHEN l.h IS NOT NULL THEN CASE WHEN l.h % 2 = 0 THEN 'train' ELSE 'holdout' END END AS role,
                    p.nhs_numbers = 1 AND p.rows_without_number AS other_rows
        FROM {people} p LEFT JOIN labelled l USING (la_code, la_person_id)"""
