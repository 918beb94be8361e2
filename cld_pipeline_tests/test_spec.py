"""The CLD specification as code: one source of truth, internally consistent."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

import cld_pipeline
from cld_pipeline.spec import SPEC_DIR, CLDSpec, CodeList, load_spec, normalise_header

PACKAGE = Path(cld_pipeline.__file__).parent


def test_every_field_of_the_domain_file_is_in_the_spec():
    names = {f.name for f in load_spec().fields}
    # The Release 2 fields of shared/domain/cld-fields.md section 2 (names removed at ingest included).
    expected = {
        "LA_Code", "LA_Name", "Reporting_Period_Start_Date", "Reporting_Period_End_Date", "NHS_Number",
        "LA_Person_Unique_Identifier", "GP_Practice_Code", "GP_Practice_Name", "Gender", "Ethnicity",
        "Date_of_Birth", "Date_of_Death", "Client_Type", "Primary_Support_Reason", "Postcode",
        "Accommodation_Status", "Employment_Status", "Has_Unpaid_Carer", "Autism_Spectrum_Disorder_ASD",
        "Visual_Impairment", "Hearing_Impairment", "Dementia", "Client_Funding_Status", "Event_Type",
        "Event_Reference", "Event_Start_Date", "Event_End_Date", "Event_Description", "Event_Outcome",
        "Request_Route_of_Access", "Assessment_Type", "Eligible_Needs_Identified", "Method_of_Assessment",
        "Review_Reason", "Review_Outcomes_Achieved", "Method_of_Review", "Total_Hrs_Caring_per_week",
        "No_of_adults_being_cared_for", "Adult_1_Linked_Person_ID", "Adult_2_Linked_Person_ID",
        "Adult_3_Linked_Person_ID", "Service_Type", "Service_Component", "Delivery_Mechanism",
        "Provider_CQC_Location_ID", "Provider_CQC_Location_Name", "Unit_Cost", "Cost_Frequency_Unit_Type",
        "Planned_units_per_week", "First_Name", "Last_Name",
    }
    assert names == expected


def test_identifier_classes_match_the_privacy_rules():
    spec = load_spec()
    by_class = {c: {f.name for f in spec.fields_by_identifier(c)} for c in ("remove", "pseudonymise", "coarsen")}
    assert by_class["pseudonymise"] == {"NHS_Number", "LA_Person_Unique_Identifier", "Adult_1_Linked_Person_ID",
                                        "Adult_2_Linked_Person_ID", "Adult_3_Linked_Person_ID"}
    assert by_class["coarsen"] == {"Date_of_Birth", "Postcode"}
    assert by_class["remove"] == {"First_Name", "Last_Name", "Event_Description"}


def test_columns_are_lower_snake_case_of_the_field_names():
    spec = load_spec()
    assert all(f.column == f.name.lower() for f in spec.fields)
    assert len(set(spec.columns)) == len(spec.columns)


@pytest.mark.parametrize("header, field", [
    ("NHS_Number", "NHS_Number"), ("nhs number", "NHS_Number"), ("NHS  NUMBER", "NHS_Number"),
    ("\ufeffLA_Code", "LA_Code"), (" event_start_date ", "Event_Start_Date"), ("Surname", "Last_Name"),
    ("Autism Spectrum Disorder ASD", "Autism_Spectrum_Disorder_ASD"),
])
def test_header_matching_is_case_and_separator_insensitive(header, field):
    assert load_spec().header_lookup()[normalise_header(header)] == field


def test_event_outcome_hierarchy_is_dhsc_release2_order():
    outcomes = load_spec().code_list("event_outcome")
    ranks = [v.rank for v in outcomes.values]
    assert len(outcomes.values) == 16
    assert sorted(ranks) == [1, 2] + list(range(4, 18))
    assert outcomes.entry(outcomes.value("release1_only")).rank == 3
    assert outcomes.release1["NFA- Other"] == "NFA: Other"


def test_every_release1_mapping_lands_on_a_cleaned_value():
    spec = load_spec()
    for cl in spec.code_lists.values():
        targets = set(cl.cleaned_values) | {spec.derived.invalid_value}
        for raw, cleaned in (cl.release1 | cl.variants).items():
            assert cleaned is None or cleaned in targets, (cl.name, raw)


def test_partial_lists_are_marked_provisional():
    spec = load_spec()
    for name in ("primary_support_reason", "request_route_of_access", "method_of_contact",
                 "review_outcomes_achieved", "total_hrs_caring_per_week", "service_component",
                 "cost_frequency_unit_type", "yes_no_unknown"):
        assert spec.code_list(name).provisional, name
    psr = spec.code_list("primary_support_reason")
    # The two strings DHSC code shows are not provisional even inside a provisional list.
    assert not psr.is_provisional(psr.entry(psr.value("support_to_carer")))


def test_every_code_list_is_the_source_of_some_field():
    spec = load_spec()
    used = {f.code_list for f in spec.fields + spec.hospital_fields if f.code_list}
    assert used == set(spec.code_lists)


def test_an_inconsistent_spec_is_refused():
    raw = yaml.safe_load((SPEC_DIR / "fields.yaml").read_text())
    lists = yaml.safe_load((SPEC_DIR / "code_lists.yaml").read_text())
    fields = raw["fields"]
    bad = [dict(f) for f in fields]
    for f in bad:
        if f["name"] == "Primary_Support_Reason":
            f["mandatory"] = {"when": {"field": "Event_Type", "in": ["Referral"]}, "note": "typo"}
    code_lists = {n: CodeList(name=n, **b) for n, b in lists.items()}
    with pytest.raises(ValueError, match="not in Event_Type"):
        CLDSpec(fields=bad, hospital_fields=raw["hospital_fields"], code_lists=code_lists, derived=raw["derived"],
                linkage=raw["linkage"])


def _code_values() -> dict[str, str]:
    """Every wording a list holds. Bare numeric codes (hospital codes such as "1" or "19") are left
    out: they cannot be told apart from ordinary numbers in code."""
    spec = load_spec()
    values = {}
    for cl in spec.code_lists.values():
        for v in (*cl.cleaned_values, *cl.release1, *cl.variants):
            if any(c.isalpha() for c in v):
                values.setdefault(v, cl.name)
    return values


def _string_constants(path: Path):
    tree = ast.parse(path.read_text(encoding="utf-8"))
    docstrings = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef)):
            body = getattr(node, "body", [])
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                docstrings.add(id(body[0].value))
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            yield node


def test_no_code_value_is_restated_outside_the_spec():
    """Every code list lives once, in cld_pipeline/spec/*.yaml: Python code refers to values by key,
    so no string literal in the package may be a code value (or a Release 1 / variant spelling)."""
    values = _code_values()
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        for const in _string_constants(path):
            if const.value in values:
                offenders.append(f"{path.relative_to(PACKAGE)}:{const.lineno} {const.value!r} ({values[const.value]})")
    assert not offenders, "code values restated in code:\n" + "\n".join(offenders)


def test_generated_vocabularies_come_from_the_spec(tiny_collection, tiny_rows):
    """Every coded value the generator wrote is a spec value, a spec Release 1 spelling, or a defect
    the manifest declares."""
    import csv

    data_dir, _ = tiny_collection
    spec = load_spec()
    declared = {(r["file_name"], int(r["row_number"]), r["field"])
                for r in csv.DictReader((data_dir / "synthetic" / "defects.csv").open(encoding="utf-8"))}
    coded = [f for f in spec.fields if f.type == "coded"]
    seen: dict[str, set[str]] = {f.name: set() for f in coded}
    for file_name, rows in tiny_rows.items():
        for i, row in enumerate(rows, start=1):
            for f in coded:
                value = row.get(f.name, "")
                if value and (file_name, i, f.name) not in declared:
                    assert value in spec.code_list(f.code_list).value_strings, (file_name, i, f.name, value)
                    seen[f.name].add(value)
    # The generator draws from the lists, not from a private copy: common lists are well covered.
    for name in ("Event_Type", "Client_Type", "Service_Type", "Event_Outcome", "Ethnicity"):
        assert len(seen[name]) >= min(len(spec.codes_for(name).values) - 1, 12), name
