"""The CLD Release 2 row rules, generated from the specification as pandera checks.

Each rule is a named `pandera.Check` over the prepared columns (`prepare.py`) that is True where a
row passes. `row_rules_schema()` gathers them into one DataFrameSchema. The validator evaluates each
check with pandera's own Check API, vectorised over a bounded chunk, and turns failing positions
into `validated.rejections` (fatal rules) or `validated.dq_flags` (the rest). Messages are plain
words and never carry a submitted value.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import pandas as pd
import pandera.pandas as pa

from cld_pipeline.spec import (
    AgeBetween, AllOf, AnyOf, CLDField, ConditionalRule, FieldGroupIn, FieldIn, FieldPresent, Not, iter_conditions,
    load_spec,
)

FATAL, FLAG = "reject", "flag"


@dataclass(frozen=True)
class Rule:
    rule: str          # stable rule id (the manifest names these)
    field: str         # CLD field name, or "(record)"
    severity: str      # reject | flag
    message: str       # plain words, no values
    check: pa.Check
    columns: tuple[str, ...]   # the prepared columns the check reads (pandera's cost grows with width)


def _coded(field_name: str) -> str:
    return load_spec().field(field_name).column + "_cleaned"


def _value(key_list: str, key: str) -> str:
    return load_spec().code_list(key_list).value(key)


def condition_mask(df: pd.DataFrame, condition) -> pd.Series:
    """A spec condition evaluated over prepared rows (vectorised)."""
    spec = load_spec()
    if isinstance(condition, FieldIn):
        return df[_coded(condition.field)].isin(condition.in_)
    if isinstance(condition, FieldGroupIn):
        cl = spec.codes_for(condition.field)
        groups = {v.value: v.group for v in cl.values + cl.derived_values}
        return df[_coded(condition.field)].map(groups).isin(condition.group_in)
    if isinstance(condition, FieldPresent):
        column = spec.field(condition.field).column
        present = df[column].notna()
        return present if condition.present else ~present
    if isinstance(condition, AgeBetween):
        lo, hi = condition.age_at_event_start
        return df["age_at_event_start"].between(lo, hi)
    if isinstance(condition, AllOf):
        out = pd.Series(True, index=df.index)
        for c in condition.all:
            out &= condition_mask(df, c)
        return out
    if isinstance(condition, AnyOf):
        out = pd.Series(False, index=df.index)
        for c in condition.any:
            out |= condition_mask(df, c)
        return out
    if isinstance(condition, Not):
        return ~condition_mask(df, condition.not_)
    raise TypeError(condition)


def applies(df: pd.DataFrame, field: CLDField) -> pd.Series:
    out = pd.Series(True, index=df.index)
    if field.applies_to.event_types:
        out &= df["event_type_cleaned"].isin(field.applies_to.event_types)
    if field.applies_to.client_types:
        out &= df["client_type_cleaned"].isin(field.applies_to.client_types)
    return out


def _blank(df: pd.DataFrame, field: CLDField) -> pd.Series:
    return df[field.column].isna()


def _rule(rule: str, field: str, severity: str, message: str, fn, columns) -> Rule:
    # ignore_na=False: a row whose checked columns are all blank is judged, not skipped.
    return Rule(rule, field, severity, message, pa.Check(fn, name=f"{rule}|{field}", error=message, ignore_na=False),
                tuple(dict.fromkeys(columns)))


def _condition_columns(condition) -> list[str]:
    spec = load_spec()
    out = []
    for node in iter_conditions(condition):
        if isinstance(node, (FieldIn, FieldGroupIn)):
            out.append(_coded(node.field))
        elif isinstance(node, FieldPresent):
            out.append(spec.field(node.field).column)
        elif isinstance(node, AgeBetween):
            out.append("age_at_event_start")
    return out


def _mandatory_columns(field: CLDField) -> list[str]:
    cols = [field.column, "event_type_cleaned", "client_type_cleaned"]
    if isinstance(field.mandatory, ConditionalRule):
        cols += _condition_columns(field.mandatory.when)
    return cols


@lru_cache(maxsize=1)
def row_rules() -> tuple[Rule, ...]:
    spec = load_spec()
    invalid = spec.derived.invalid_value
    et = spec.code_list("event_type")
    service = et.value("service")
    event_types = set(et.value_strings)
    rules: list[Rule] = [
        # --- fatal: the row cannot be used at all -----------------------------------------------
        _rule("malformed_record", "(record)", FATAL,
              "The record does not have one value per header column (a stray comma or line break).",
              lambda d: d["field_count"] == d["expected_field_count"], ["field_count", "expected_field_count"]),
        _rule("no_usable_person_identifier", "NHS_Number", FATAL,
              "No usable person identifier: the NHS number is missing or fails its check digit, and there is "
              "no LA person identifier.",
              lambda d: d["nhs_number__valid"] | d["la_person_unique_identifier"].notna(),
              ["nhs_number__valid", "la_person_unique_identifier"]),
        _rule("event_type_unmappable", "Event_Type", FATAL,
              "The event type is missing or is not Request, Assessment, Service or Review.",
              lambda d: d["event_type_cleaned"].isin(event_types), ["event_type_cleaned"]),
        _rule("event_start_date_invalid", "Event_Start_Date", FATAL,
              "The event start date is missing or is not a date (use YYYY-MM-DD or DD/MM/YYYY).",
              lambda d: d["event_start_date__date"].notna(), ["event_start_date__date"]),
        _rule("end_before_start", "Event_End_Date", FATAL,
              "The event ends before it starts.",
              lambda d: ~(d["event_end_date__date"] < d["event_start_date__date"]).fillna(False),
              ["event_end_date__date", "event_start_date__date"]),
        _rule("end_date_missing", "Event_End_Date", FATAL,
              "A request, assessment or review must have an end date (only services may be open).",
              lambda d: d["event_end_date__date"].notna() | (d["event_type_cleaned"] == service)
              | ~d["event_type_cleaned"].isin(event_types), ["event_end_date__date", "event_type_cleaned"]),
        _rule("la_code_mismatch", "LA_Code", FATAL,
              "The row's LA code is not the council this file belongs to.",
              lambda d: d["la_code"].fillna("").str.upper() == d["file_la_code"].str.upper(),
              ["la_code", "file_la_code"]),
        # --- flags: the row is kept -------------------------------------------------------------
        _rule("invalid_nhs_number", "NHS_Number", FLAG,
              "The NHS number fails its format or check digit; it is treated as missing (the LA person "
              "identifier is used).",
              lambda d: d["nhs_number"].isna() | d["nhs_number__valid"], ["nhs_number", "nhs_number__valid"]),
        _rule("future_date", "Event_End_Date", FLAG,
              "An event date is after the day the file was received.",
              lambda d: ~((d["event_start_date__date"] > d["received_date"])
                          | (d["event_end_date__date"] > d["received_date"])).fillna(False),
              ["event_start_date__date", "event_end_date__date", "received_date"]),
        _rule("event_after_death", "Date_of_Death", FLAG,
              "The event starts after the person's date of death.",
              lambda d: ~(d["event_start_date__date"] > d["date_of_death__date"]).fillna(False),
              ["event_start_date__date", "date_of_death__date"]),
        _rule("invalid_postcode", "Postcode", FLAG,
              "The postcode is not in a valid UK format.",
              lambda d: d["postcode"].isna() | d["postcode__valid"].fillna(False), ["postcode", "postcode__valid"]),
    ]
    for field in spec.fields:
        col = field.column
        rules.append(_rule("null_literal", field.name, FLAG,
                           f"{field.name} holds the text NULL; it is treated as blank.",
                           lambda d, c=col: ~d[f"{c}__null_literal"], [f"{col}__null_literal"]))
        if field.type == "coded":
            rules += [
                _rule("release1_value", field.name, FLAG,
                      f"{field.name} holds a Release 1 value; it was mapped to its Release 2 equivalent.",
                      lambda d, c=col: d[f"{c}__source"] != "release1", [f"{col}__source"]),
                _rule("invalid_code", field.name, FLAG,
                      f"{field.name} is not in the Release 2 list and cannot be mapped; it is recorded as "
                      f"'{invalid}'.",
                      lambda d, c=col: d[f"{c}_cleaned"] != invalid, [f"{col}_cleaned"]),
                _rule("known_variant", field.name, FLAG,
                      f"{field.name} uses a known non-standard spelling; it was mapped to the Release 2 value.",
                      lambda d, c=col: ~((d[f"{c}__source"] == "variant") & (d[f"{c}_cleaned"] != invalid)),
                      [f"{col}__source", f"{col}_cleaned"]),
                _rule("normalised", field.name, FLAG,
                      f"{field.name} differs from the Release 2 value only in spaces or capital letters; "
                      "it was normalised.",
                      lambda d, c=col: d[f"{c}__source"] != "normalised", [f"{col}__source"]),
            ]
        elif field.type in ("date",) and field.name not in ("Event_Start_Date",):
            rules.append(_rule("invalid_date", field.name, FLAG,
                               f"{field.name} is not a date (use YYYY-MM-DD or DD/MM/YYYY); it is treated as blank.",
                               lambda d, c=col: d[c].isna() | d[f"{c}__date"].notna(), [col, f"{col}__date"]))
        elif field.type in ("integer", "decimal"):
            lo, hi = field.minimum, field.maximum
            rules.append(_rule("invalid_number", field.name, FLAG,
                               f"{field.name} is not a number in the expected range; it is treated as blank.",
                               lambda d, c=col, lo=lo, hi=hi: d[c].isna() | d[f"{c}__number"].between(
                                   -1e18 if lo is None else lo, 1e18 if hi is None else hi).fillna(False),
                               [col, f"{col}__number"]))
        if field.mandatory != "optional":
            rules.append(_rule("mandatory_blank", field.name, FLAG,
                               f"{field.name} is mandatory here but blank.",
                               lambda d, f=field: ~(_mandatory_here(d, f) & _blank(d, f)), _mandatory_columns(field)))
    return tuple(rules)


def _mandatory_here(df: pd.DataFrame, field: CLDField) -> pd.Series:
    where = applies(df, field)
    if isinstance(field.mandatory, ConditionalRule):
        where &= condition_mask(df, field.mandatory.when)
    return where


@lru_cache(maxsize=1)
def row_rules_schema() -> pa.DataFrameSchema:
    """All row rules as one pandera schema (the artefact the validator evaluates)."""
    return pa.DataFrameSchema(checks=[r.check for r in row_rules()], name="CLD Release 2 row rules")


def rule_index() -> dict[str, Rule]:
    return {r.check.name: r for r in row_rules()}
