"""Validation rules at their boundaries, and robustness on arbitrary text."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from cld_pipeline.lib.validation.engine import SubmissionContext, validate_submission
from cld_pipeline.lib.validation.report import spreadsheet_safe
from cld_pipeline.lib.validation.rules import row_rules, row_rules_schema
from cld_pipeline.spec import load_spec

SPEC = load_spec()
FIELDS = [f for f in SPEC.fields]
CTX = SubmissionContext(submission_id="s1", la_code="714", quarter="2026-Q3", received_date=dt.date(2026, 10, 20),
                        expected_field_count=len(FIELDS), reporting_period_start=dt.date(2025, 10, 1),
                        reporting_period_end=dt.date(2026, 9, 30))
VALID_NHS = "9434765919"


def base(**values) -> dict[str, str | None]:
    row = {f.column: None for f in FIELDS}
    row.update(la_code="714", reporting_period_start_date="2025-10-01", reporting_period_end_date="2026-09-30",
               nhs_number=VALID_NHS, la_person_unique_identifier="P1", gender="Female",
               ethnicity="White: Irish", date_of_birth="1940-05-01", client_type="Service user",
               primary_support_reason="Physical support: Personal care support", postcode="M1 1AE",
               accommodation_status="Registered care home", has_unpaid_carer="No",
               event_type="Request", event_start_date="2026-01-05", event_end_date="2026-01-06",
               event_outcome="NFA: Other", request_route_of_access="Community or other route")
    row.update(values)
    return row


def judge(tmp_path: Path, rows: list[dict], field_counts: list[int] | None = None, expectations: bool = False):
    n = len(rows)
    table = {"submission_id": ["s1"] * n, "row_number": list(range(1, n + 1)),
             "field_count": field_counts or [len(FIELDS)] * n}
    for f in FIELDS:
        table[f.column] = pa.array([r.get(f.column) for r in rows], pa.string())
    table["extra_values"] = pa.array([None] * n, pa.string())
    pq.write_table(pa.table(table), tmp_path / "raw.parquet")
    result = validate_submission(tmp_path / "raw.parquet", CTX, tmp_path / "work", expectations=expectations)
    found = set()
    for name in ("rejections", "dq_flags"):
        for r in pq.read_table(getattr(result, name)).to_pylist():
            found.add((r["row_number"], r["rule"], r["field"]))
    return result, found


def only(found, row=1):
    return {(rule, field) for n, rule, field in found if n == row}


def test_a_clean_row_passes_every_rule(tmp_path):
    result, found = judge(tmp_path, [base()])
    assert found == set() and result.accepted_rows == 1 and result.schema_failures == 0


@pytest.mark.parametrize("values, expected", [
    ({"nhs_number": "943 476 5919"}, set()),                                           # spaces allowed
    ({"nhs_number": "9434765918"}, {("invalid_nhs_number", "NHS_Number")}),            # check digit
    ({"nhs_number": "9434765918", "la_person_unique_identifier": None},
     {("no_usable_person_identifier", "NHS_Number")}),
    ({"nhs_number": None, "la_person_unique_identifier": None}, {("no_usable_person_identifier", "NHS_Number")}),
    ({"nhs_number": None}, {("mandatory_blank", "NHS_Number")}),
    ({"event_type": "Telephone contact"}, {("event_type_unmappable", "Event_Type")}),
    ({"event_type": "  referral "}, {("release1_value", "Event_Type")}),
    ({"event_start_date": "31/02/2026"}, {("event_start_date_invalid", "Event_Start_Date")}),
    ({"event_start_date": None}, {("event_start_date_invalid", "Event_Start_Date")}),
    ({"event_start_date": "05/01/2026", "event_end_date": "05/01/2026"}, set()),       # same day, UK format
    ({"event_end_date": "2026-01-04"}, {("end_before_start", "Event_End_Date")}),
    ({"event_end_date": None}, {("end_date_missing", "Event_End_Date")}),
    ({"la_code": "906"}, {("la_code_mismatch", "LA_Code")}),
    ({"gender": " female "}, {("normalised", "Gender")}),
    ({"gender": "FEMALE"}, {("normalised", "Gender")}),
    ({"gender": "F"}, {("known_variant", "Gender")}),
    ({"gender": "Fmale"}, {("invalid_code", "Gender")}),
    ({"ethnicity": "White"}, {("invalid_code", "Ethnicity")}),                          # DHSC: bare group is invalid
    ({"ethnicity": "White - Irish"}, {("release1_value", "Ethnicity")}),
    ({"client_type": "Service User"}, {("normalised", "Client_Type")}),                 # R1 differs only in case
    ({"dementia": "NULL"}, {("null_literal", "Dementia")}),
    ({"gender": "null"}, {("null_literal", "Gender"), ("mandatory_blank", "Gender")}),
    ({"event_end_date": "2026-11-30", "event_type": "Service", "service_type": "Short term support: ST-Max",
      "service_component": "Reablement", "client_funding_status": "Fully social care funded"},
     {("future_date", "Event_End_Date")}),
    ({"date_of_death": "2026-01-01"}, {("event_after_death", "Date_of_Death")}),
    ({"date_of_death": "2026-01-05"}, set()),                                           # death on the start day
    ({"date_of_birth": "1940-13-01"}, {("invalid_date", "Date_of_Birth")}),
    ({"postcode": "M1 1CE"}, {("invalid_postcode", "Postcode")}),
    ({"postcode": "ZZ99 3VZ"}, set()),
])
def test_rule_boundaries(tmp_path, values, expected):
    _, found = judge(tmp_path, [base(**values)])
    assert only(found) == expected


def test_mandatory_rules_follow_the_spec_conditions(tmp_path):
    rows = [
        base(primary_support_reason=None),                                      # request: PSR not mandatory
        base(primary_support_reason=None, event_type="Assessment", assessment_type="Long term assessment",
             method_of_assessment="Face to face"),
        base(event_type="Service", event_end_date=None, service_type="Long term support: Community",
             service_component="Home support or domiciliary care", client_funding_status="Fully client funded",
             delivery_mechanism="CASSR managed personal budget"),                 # cost trio missing
        base(event_type="Service", event_end_date=None, service_type="Long term support: Community",
             service_component="Home support or domiciliary care", client_funding_status="Fully client funded",
             delivery_mechanism="CASSR commissioned support"),                    # commissioned: not needed
        base(date_of_birth="1990-01-01", primary_support_reason="Learning disability support",
             event_type="Review", review_reason="Review of short term support", method_of_review="Telephone",
             client_funding_status="Fully social care funded"),
    ]
    _, found = judge(tmp_path, rows)
    assert only(found, 1) == set()
    assert only(found, 2) == {("mandatory_blank", "Primary_Support_Reason")}
    assert only(found, 3) == {("mandatory_blank", "Unit_Cost"), ("mandatory_blank", "Cost_Frequency_Unit_Type"),
                              ("mandatory_blank", "Planned_units_per_week")}
    assert only(found, 4) == set()
    assert only(found, 5) == {("mandatory_blank", "Employment_Status")}            # LD, 18-64, service user


def test_a_malformed_record_is_rejected_not_lost(tmp_path):
    result, found = judge(tmp_path, [base(), base()], field_counts=[len(FIELDS), len(FIELDS) + 2])
    assert only(found, 2) == {("malformed_record", "(record)")}
    assert (result.accepted_rows, result.rejected_rows) == (1, 1)


def test_rules_form_one_pandera_schema_from_the_spec():
    schema = row_rules_schema()
    names = {c.name for c in schema.checks}
    assert len(names) == len(row_rules())
    coded = [f.name for f in SPEC.fields if f.type == "coded"]
    assert {f"release1_value|{f}" for f in coded} <= names and {f"invalid_code|{f}" for f in coded} <= names


def test_spreadsheet_formulas_are_neutralised():
    assert spreadsheet_safe('=HYPERLINK("x")') == "'=HYPERLINK(\"x\")"
    assert spreadsheet_safe("+SUM(1)").startswith("'") and spreadsheet_safe("@cmd").startswith("'")
    assert spreadsheet_safe("EV123") == "EV123" and spreadsheet_safe(None) == ""


any_text = st.one_of(st.none(), st.text(max_size=30), st.sampled_from(["NULL", " ", "01/01/1900", "9999-99-99",
                                                                       "\u00c3\u00a9", "=1+1", "-", "0"]))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.dictionaries(st.sampled_from([f.column for f in FIELDS]), any_text, max_size=12),
                min_size=1, max_size=5))
def test_the_validator_never_crashes_and_conserves_rows(tmp_path_factory, overrides):
    rows = [base(**o) for o in overrides]
    result, _ = judge(tmp_path_factory.mktemp("h"), rows)
    assert result.raw_rows == len(rows) == result.accepted_rows + result.rejected_rows
    assert result.schema_failures == 0


def test_expectations_run_on_the_output(tmp_path):
    result, _ = judge(tmp_path, [base(), base(gender="Fmale"), base(ethnicity=None)], expectations=True)
    by_name = {e["expectation"]: e for e in result.expectations}
    assert by_name["valid_codes:Gender"]["unexpected"] == 1 and not by_name["valid_codes:Gender"]["success"]
    assert by_name["complete:Ethnicity"]["unexpected"] == 1
    assert by_name["complete:Service_Type"]["rows"] == 0          # applies to services only
    assert all(set(e) == {"expectation", "rows", "unexpected", "unexpected_percent", "success"}
               for e in result.expectations)


def test_worker_processes_judge_exactly_as_in_process(tmp_path, monkeypatch):
    """The pandas-bound steps split by Parquet row group across worker processes give the same
    rejections, flags, accepted rows and expectations as running here."""
    from cld_pipeline.lib.validation import engine

    rows = [base(la_person_unique_identifier=f"P{i}", gender=["Female", "Fmale", None][i % 3],
                 event_end_date=["2026-01-06", "2025-12-01", "not a date"][i % 3]) for i in range(240)]
    monkeypatch.setattr(engine, "ROW_GROUP_ROWS", 50)
    monkeypatch.setenv("CLD_VALIDATION_WORKERS", "1")
    (tmp_path / "inline").mkdir()
    (tmp_path / "pooled").mkdir()
    inline, inline_found = judge(tmp_path / "inline", rows, expectations=True)
    monkeypatch.setenv("CLD_VALIDATION_WORKERS", "2")
    pool = engine._pool(5)
    assert pool is not None
    pool.shutdown()
    pooled, pooled_found = judge(tmp_path / "pooled", rows, expectations=True)
    assert pooled_found == inline_found and len(inline_found) > 100
    assert (pooled.accepted_rows, pooled.rejected_rows, pooled.flagged_rows, pooled.expectations) == (
        inline.accepted_rows, inline.rejected_rows, inline.flagged_rows, inline.expectations)
    assert pq.read_table(pooled.events).equals(pq.read_table(inline.events))


def test_expectation_counts_equal_great_expectations_own_row_level_evaluation(tmp_path):
    """The suite's counts come from one DuckDB profile of every council; on the same accepted rows,
    GX's own pandas evaluation of the row-level expectations gives the same rows and unexpected rows."""
    import great_expectations as gx
    import great_expectations.expectations as gxe

    from cld_pipeline.lib.validation.expectations import UNIQUE_KEY, _context

    service = SPEC.code_list("event_type").value("service")
    rows = []
    for i in range(60):
        start = ["2026-01-05", "2011-02-01", "2026-10-25", None][i % 4] or "2026-03-01"
        rows.append(base(la_person_unique_identifier=f"P{i % 23}", gender=["Female", "Fmale", None][i % 3],
                         ethnicity=None if i % 5 == 0 else "White: Irish", event_start_date=start,
                         event_end_date=None if i % 2 else "2026-10-26",
                         event_type=service if i % 2 else "Request",
                         service_type=None if i % 7 == 0 else "Long Term Support: Residential",
                         event_outcome=None if i % 2 else "NFA: Other"))
    rows += [base(la_person_unique_identifier="P-twice")] * 3
    result, _ = judge(tmp_path, rows, expectations=True)
    ours = {e["expectation"]: (e["rows"], e["unexpected"]) for e in result.expectations}

    _, batch_definition = _context()
    frame = pq.read_table(result.events).to_pandas(date_as_object=False)
    earliest = dt.datetime.combine(CTX.reporting_period_start - dt.timedelta(days=3653), dt.time())
    service_type = SPEC.field("Service_Type")
    row_level = {
        "valid_codes:Gender": gxe.ExpectColumnValuesToNotBeInSet(column="gender_cleaned",
                                                                 value_set=[SPEC.derived.invalid_value]),
        "complete:Ethnicity": gxe.ExpectColumnValuesToNotBeNull(column="ethnicity_cleaned"),
        "complete:Service_Type": gxe.ExpectColumnValuesToNotBeNull(
            column="service_type_cleaned", condition_parser="pandas",
            row_condition=" | ".join(f'event_type_cleaned=="{v}"' for v in service_type.applies_to.event_types)),
        "dates_in_range:Event_Start_Date": gxe.ExpectColumnValuesToBeBetween(
            column="event_start_date", min_value=earliest,
            max_value=dt.datetime.combine(CTX.received_date, dt.time())),
        "unique:events": gxe.ExpectCompoundColumnsToBeUnique(column_list=list(UNIQUE_KEY)),
    }
    suite = gx.ExpectationSuite(name="row_level")
    for name, expectation in row_level.items():
        expectation.meta = {"name": name}
        suite.add_expectation(expectation)
    theirs = {r.expectation_config.meta["name"]: (r.result["element_count"], r.result["unexpected_count"])
              for r in batch_definition.get_batch(batch_parameters={"dataframe": frame}).validate(suite).results}
    assert theirs == {name: ours[name] for name in row_level}
    assert all(unexpected > 0 for _, unexpected in theirs.values())
