"""The CLD Release 2 specification as code.

`fields.yaml` and `code_lists.yaml` beside this module are the single source of truth for the
field list, identifier classes, applicability, mandatory rules, code lists, Release 1 mappings,
groupings and the event outcome hierarchy. This module only loads and checks them; validation,
pseudonymisation, the synthetic generator and the field documentation all read them from here.
"""

from __future__ import annotations

import datetime as dt
import re
from functools import cached_property, lru_cache
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field as PydField, model_validator

SPEC_DIR = Path(__file__).parent

FieldType = Literal[
    "string", "date", "integer", "decimal", "coded", "nhs_number", "postcode", "la_code", "free_text"
]
IdentifierClass = Literal["remove", "pseudonymise", "coarsen", "keep"]
Evidence = Literal["R", "Rh", "Rn", "P", "I", "DD"]
Module = Literal[
    "submission", "person", "event", "request", "assessment", "review", "carer", "service"
]


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


# --- conditions (mandatory rules) -------------------------------------------------------------------


class FieldIn(_Frozen):
    field: str
    in_: tuple[str, ...] = PydField(alias="in")


class FieldGroupIn(_Frozen):
    field: str
    group_in: tuple[str, ...]


class FieldPresent(_Frozen):
    field: str
    present: bool = True


class AgeBetween(_Frozen):
    age_at_event_start: tuple[int, int]


class AllOf(_Frozen):
    all: tuple["Condition", ...]


class AnyOf(_Frozen):
    any: tuple["Condition", ...]


class Not(_Frozen):
    not_: "Condition" = PydField(alias="not")


Condition = Annotated[
    Union[FieldIn, FieldGroupIn, FieldPresent, AgeBetween, AllOf, AnyOf, Not],
    PydField(union_mode="left_to_right"),
]
for _model in (AllOf, AnyOf, Not):
    _model.model_rebuild()


def iter_conditions(condition: Any):
    """Every leaf and branch of a condition tree, depth first."""
    yield condition
    children: tuple = ()
    if isinstance(condition, AllOf):
        children = condition.all
    elif isinstance(condition, AnyOf):
        children = condition.any
    elif isinstance(condition, Not):
        children = (condition.not_,)
    for child in children:
        yield from iter_conditions(child)


class ConditionalRule(_Frozen):
    when: Condition
    note: str


Mandatory = Union[Literal["always", "optional"], ConditionalRule]


# --- fields ----------------------------------------------------------------------------------------


class AppliesTo(_Frozen):
    event_types: tuple[str, ...] | None = None
    client_types: tuple[str, ...] | None = None


class CLDField(_Frozen):
    name: str
    type: FieldType
    module: Module | None = None
    identifier: IdentifierClass
    mandatory: Mandatory
    code_list: str | None = None
    applies_to: AppliesTo = AppliesTo()
    required_column: bool = False
    cld: bool = True
    aliases: tuple[str, ...] = ()
    evidence: Evidence | None = None
    provisional: bool = False
    description: str = ""
    minimum: float | None = None
    maximum: float | None = None

    @property
    def column(self) -> str:
        """Column name in every table: lower snake case of the CLD name (the contract's rule)."""
        return self.name.lower()

    @model_validator(mode="after")
    def _coded_has_list(self) -> "CLDField":
        if (self.type == "coded") != (self.code_list is not None):
            raise ValueError(f"{self.name}: a code_list is required exactly for coded fields")
        return self


# --- code lists ------------------------------------------------------------------------------------


class CodeValue(_Frozen):
    value: str
    key: str | None = None
    group: str | None = None
    rank: int | None = None
    provisional: bool | None = None
    attrs: dict[str, Any] = {}


class CodeList(_Frozen):
    name: str
    evidence: Evidence
    provisional: bool
    values: tuple[CodeValue, ...]
    derived_values: tuple[CodeValue, ...] = ()
    grouping: str | None = None
    release1: dict[str, str | None] = {}
    release1_provisional: bool = False
    release1_unmapped: str | None = None
    variants: dict[str, str | None] = {}

    @property
    def value_strings(self) -> tuple[str, ...]:
        """The Release 2 defined list: the values valid on submission."""
        return tuple(v.value for v in self.values)

    @property
    def cleaned_values(self) -> tuple[str, ...]:
        """Every value a `<field>_cleaned` column may hold."""
        return self.value_strings + tuple(v.value for v in self.derived_values)

    def value(self, key: str) -> str:
        """The wording of the value with this stable key (code refers to keys, never to wording)."""
        for v in self.values + self.derived_values:
            if v.key == key:
                return v.value
        raise KeyError(f"code list {self.name!r} has no value with key {key!r}")

    def entry(self, value: str) -> CodeValue:
        for v in self.values + self.derived_values:
            if v.value == value:
                return v
        raise KeyError(f"{value!r} is not in code list {self.name!r}")

    def is_provisional(self, value: CodeValue) -> bool:
        return self.provisional if value.provisional is None else value.provisional


class Band(_Frozen):
    label: str
    min: int
    max: int


class Derived(_Frozen):
    invalid_value: str
    null_literals: tuple[str, ...]
    age_bands: tuple[Band, ...]
    working_age_bands: tuple[Band, ...]
    unknown_age_band: str


class Linkage(_Frozen):
    """Windows and exclusions of the health-linked measures (fields.yaml `linkage`)."""

    evidence: Evidence
    minimum_age: int
    cluster_gap_days: int
    link_days_before: int
    link_days_after: int
    outcome_days: int
    service_lookback_days: int
    service_windows_days: tuple[int, ...]
    readmission_windows_days: tuple[int, ...]
    earliest_admission: dt.date
    excluded_treatment_functions: tuple[str, ...]
    excluded_treatment_function_prefixes: tuple[str, ...]


# --- the whole specification -----------------------------------------------------------------------


def normalise_header(name: str) -> str:
    """Header matching rule of the contract: case-insensitive, spaces and underscores alike."""
    return re.sub(r"[\s_]+", "_", name.strip().lstrip("\ufeff")).lower()


class CLDSpec(_Frozen):
    fields: tuple[CLDField, ...]
    hospital_fields: tuple[CLDField, ...]
    code_lists: dict[str, CodeList]
    derived: Derived
    linkage: Linkage

    @cached_property
    def _by_name(self) -> dict[str, CLDField]:
        return {f.name: f for f in self.fields}

    def field(self, name: str) -> CLDField:
        return self._by_name[name]

    def code_list(self, name: str) -> CodeList:
        return self.code_lists[name]

    @cached_property
    def _list_by_field(self) -> dict[str, CodeList]:
        return {f.name: self.code_lists[f.code_list] for f in self.fields + self.hospital_fields if f.code_list}

    def codes_for(self, field_name: str) -> CodeList:
        """The code list of a coded submission or hospital field."""
        try:
            return self._list_by_field[field_name]
        except KeyError:
            raise KeyError(f"{field_name} is not a coded field") from None

    @property
    def columns(self) -> tuple[str, ...]:
        return tuple(f.column for f in self.fields)

    def header_lookup(self) -> dict[str, str]:
        """Normalised header spelling -> CLD field name, including aliases."""
        lookup: dict[str, str] = {}
        for f in self.fields:
            for spelling in (f.name, *f.aliases):
                lookup[normalise_header(spelling)] = f.name
        return lookup

    def fields_by_identifier(self, identifier: IdentifierClass) -> tuple[CLDField, ...]:
        return tuple(f for f in self.fields if f.identifier == identifier)

    @model_validator(mode="after")
    def _cross_references(self) -> "CLDSpec":
        problems: list[str] = []
        names = {f.name for f in self.fields}
        if len(names) != len(self.fields):
            problems.append("duplicate field names")
        for f in self.fields + self.hospital_fields:
            if f.code_list and f.code_list not in self.code_lists:
                problems.append(f"{f.name}: unknown code list {f.code_list}")
        for cl in self.code_lists.values():
            problems += _code_list_problems(cl, self.derived.invalid_value)
        event_types = set(self.code_lists["event_type"].value_strings)
        client_types = set(self.code_lists["client_type"].value_strings)
        for f in self.fields:
            for et in f.applies_to.event_types or ():
                if et not in event_types:
                    problems.append(f"{f.name}: applies_to names unknown event type {et!r}")
            for ct in f.applies_to.client_types or ():
                if ct not in client_types:
                    problems.append(f"{f.name}: applies_to names unknown client type {ct!r}")
            if isinstance(f.mandatory, ConditionalRule):
                problems += self._condition_problems(f.name, f.mandatory.when, names)
        if problems:
            raise ValueError("CLD specification is inconsistent:\n  " + "\n  ".join(problems))
        return self

    def _condition_problems(self, owner: str, condition: Any, names: set[str]) -> list[str]:
        problems = []
        for node in iter_conditions(condition):
            if isinstance(node, (FieldIn, FieldGroupIn, FieldPresent)) and node.field not in names:
                problems.append(f"{owner}: rule names unknown field {node.field}")
                continue
            if isinstance(node, FieldIn):
                known = set(self.codes_for(node.field).value_strings)
                problems += [f"{owner}: rule value {v!r} not in {node.field}" for v in node.in_ if v not in known]
            if isinstance(node, FieldGroupIn):
                cl = self.codes_for(node.field)
                groups = {v.group for v in cl.values}
                problems += [f"{owner}: rule group {g!r} not in {cl.name}" for g in node.group_in if g not in groups]
        return problems


def _code_list_problems(cl: CodeList, invalid_value: str) -> list[str]:
    problems = []
    values = cl.value_strings
    if len(set(values)) != len(values):
        problems.append(f"{cl.name}: duplicate values")
    keys = [v.key for v in cl.values + cl.derived_values if v.key]
    if len(set(keys)) != len(keys):
        problems.append(f"{cl.name}: duplicate keys")
    targets = set(cl.cleaned_values) | {invalid_value}
    for source, mapping in (("release1", cl.release1), ("variants", cl.variants)):
        for raw, cleaned in mapping.items():
            if raw in values:
                problems.append(f"{cl.name}: {source} value {raw!r} is already a Release 2 value")
            if cleaned is not None and cleaned not in targets:
                problems.append(f"{cl.name}: {source} maps {raw!r} to unknown value {cleaned!r}")
    if cl.release1_unmapped and cl.release1_unmapped not in targets:
        problems.append(f"{cl.name}: release1_unmapped {cl.release1_unmapped!r} is not a cleaned value")
    return problems


@lru_cache(maxsize=1)
def load_spec() -> CLDSpec:
    """Load and cross-check the specification (cached: it is immutable)."""
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml when available: 10x faster
    fields_doc = yaml.load((SPEC_DIR / "fields.yaml").read_text(encoding="utf-8"), Loader=loader)
    lists_doc = yaml.load((SPEC_DIR / "code_lists.yaml").read_text(encoding="utf-8"), Loader=loader)
    code_lists = {name: CodeList(name=name, **body) for name, body in lists_doc.items()}
    return CLDSpec(
        fields=fields_doc["fields"],
        hospital_fields=fields_doc["hospital_fields"],
        code_lists=code_lists,
        derived=fields_doc["derived"],
        linkage=fields_doc["linkage"],
    )


__all__ = [
    "AgeBetween",
    "AllOf",
    "AnyOf",
    "CLDField",
    "CLDSpec",
    "CodeList",
    "CodeValue",
    "ConditionalRule",
    "FieldGroupIn",
    "FieldIn",
    "FieldPresent",
    "Linkage",
    "Not",
    "iter_conditions",
    "load_spec",
    "normalise_header",
]
