"""Hospital (SUS APC-like) extracts: reading, validation and pseudonymisation, all from the spec.

An extract is one national file per quarter in `landing/health/`, one row per episode. Reading
reuses the submission reader (lossless, malformed records kept); the rules below are generated from
`hospital_fields` in the specification and run set-based in DuckDB. The pseudonymised copy uses the
same token function and key as social care (`nhs:<number>`), which is what makes linkage possible.
"""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa

from cld_pipeline.lib.privacy.pseudonymise import person_token_sql
from cld_pipeline.lib.ingest.submission_files import (
    SubmissionRefused, parse_date, quarter_of, read_header, read_submission, refusing_unreadable, scan_bytes,
)
from cld_pipeline.lib.validation.prepare import nhs_check_sql
from cld_pipeline.spec import CLDField, load_spec, normalise_header

QUARTER_IN_NAME = re.compile(r"(\d{4})-?Q([1-4])", re.IGNORECASE)
EARLIEST_BIRTH = dt.date(1895, 1, 1)   # HES date-of-birth validity (privacy.md 1.5)
FATAL, FLAG = "fatal", "flag"


def hospital_fields() -> tuple[CLDField, ...]:
    return load_spec().hospital_fields


@dataclass(frozen=True)
class ExtractFacts:
    sha256: str
    size: int
    quarter: str
    rows: int
    width: int                  # fields in the header
    columns: dict[int, str]


def map_hospital_columns(header: list[str]) -> dict[int, str]:
    lookup = {normalise_header(f.name): f.name for f in hospital_fields()}
    columns: dict[int, str] = {}
    for i, name in enumerate(header):
        field = lookup.get(normalise_header(name))
        if field is None:
            continue
        if field in columns.values():
            raise SubmissionRefused("duplicate_column", f"The column {field} appears more than once in the header.")
        columns[i] = field
    missing = [f.name for f in hospital_fields() if f.mandatory == "always" and f.name not in columns.values()]
    if missing:
        raise SubmissionRefused("missing_columns", "The hospital extract lacks mandatory columns: "
                                + ", ".join(missing) + ".", missing=missing)
    return columns


def inspect_and_read_extract(path: Path, name: str | None = None) -> tuple[ExtractFacts, pa.Table]:
    """Checks that refuse a file whole, then every record as text. The quarter is the one in the
    file name (`hospital_extract_2026-Q3.csv`), else the quarter of the latest discharge or admission."""
    with refusing_unreadable():
        facts = scan_bytes(path)
        header = read_header(path)
        columns = map_hospital_columns(header)
        records = read_submission(path, columns, hospital_fields())
    if records.num_rows == 0:
        raise SubmissionRefused("no_rows", "The hospital extract has a header but no data rows.")
    match = QUARTER_IN_NAME.search(name or path.name)
    if match:
        quarter = f"{match.group(1)}-Q{match.group(2)}"
    else:
        days = [parse_date(v) for col in ("discharge_date", "admission_date")
                for v in records.column(col).to_pylist() if v]
        days = [d for d in days if d is not None]
        if not days:
            raise SubmissionRefused("no_dates", "No admission or discharge date can be read, so the extract's "
                                    "quarter cannot be told; name the file hospital_extract_<YYYY>-Q<n>.csv.")
        quarter = quarter_of(max(days))
    return ExtractFacts(facts.sha256, facts.size, quarter, records.num_rows, len(header), columns), records


def quarter_from_name(name: str) -> str | None:
    match = QUARTER_IN_NAME.search(name)
    return f"{match.group(1)}-Q{match.group(2)}" if match else None


# --- validation ------------------------------------------------------------------------------------

def _date(expr: str) -> str:
    return f"COALESCE(TRY_STRPTIME({expr}, '%Y-%m-%d'), TRY_STRPTIME({expr}, '%d/%m/%Y'))::DATE"


def typed_sql(source: str) -> str:
    """Every episode with trimmed text and typed values (`<col>__ok` says whether it parsed or is
    in its code list); `source` is the raw episodes (aliased r)."""
    spec = load_spec()
    select = ["r.extract_id", "r.row_number", "r.field_count", "r.width"]
    for f in hospital_fields():
        c = f.column
        text = f"NULLIF(trim(r.{c}), '')"
        select.append(f"{text} AS {c}__text")
        if f.type == "date":
            select += [f"{_date(text)} AS {c}", f"({text} IS NULL OR {_date(text)} IS NOT NULL) AS {c}__ok"]
        elif f.type == "nhs_number":
            digits = f"regexp_replace({text}, '[ -]', '', 'g')"
            select += [f"CASE WHEN {nhs_check_sql(digits)} THEN {digits} END AS {c}",
                       f"coalesce({nhs_check_sql(digits)}, {text} IS NULL) AS {c}__ok"]
        elif f.type == "coded":
            values = ", ".join(f"'{v}'" for v in spec.codes_for(f.name).value_strings)
            select += [f"CASE WHEN {text} IN ({values}) THEN {text} END AS {c}",
                       f"({text} IS NULL OR {text} IN ({values})) AS {c}__ok"]
        elif f.type == "integer":
            number = f"TRY_CAST({text} AS INTEGER)"
            bounds = " AND ".join(
                [f"{number} >= {int(f.minimum)}"] * (f.minimum is not None) + [f"{number} <= {int(f.maximum)}"]
                * (f.maximum is not None)) or "true"
            select += [f"CASE WHEN {bounds} THEN {number} END AS {c}",
                       f"({text} IS NULL OR coalesce({bounds}, false)) AS {c}__ok"]
        elif f.type == "postcode":
            pattern = r"^[A-Z]{1,2}[0-9][A-Z0-9]? ?[0-9][A-Z]{2}$"
            select += [f"upper({text}) AS {c}",
                       f"({text} IS NULL OR regexp_full_match(upper({text}), '{pattern}')) AS {c}__ok"]
        else:
            select += [f"{text} AS {c}", "true AS " + f"{c}__ok"]
    return f"SELECT {', '.join(select)} FROM {source} r"


def failures_sql(typed: str) -> str:
    """One row per failed rule: extract_id, row_number, field, rule, message, severity."""
    parts = []

    def add(field: str, rule: str, message: str, severity: str, condition: str) -> None:
        parts.append(f"SELECT extract_id, row_number, '{field}' AS field, '{rule}' AS rule, "
                     f"'{message}' AS message, '{severity}' AS severity FROM {typed} WHERE {condition}")

    add("(row)", "malformed_row", "The record does not have as many fields as the header.", FATAL,
        "field_count <> width")
    for f in hospital_fields():
        c = f.column
        if f.mandatory == "always":
            add(f.name, "mandatory_blank", f"{f.name} is mandatory and blank.", FATAL, f"{c}__text IS NULL")
        rule, message, severity = {
            "date": ("invalid_date", "is not a date (YYYY-MM-DD or DD/MM/YYYY).", FATAL),
            "nhs_number": ("invalid_nhs_number", "fails the NHS number check (10 digits, modulus 11).", FATAL),
            "coded": ("not_in_code_list", "is not a value of its code list.", FATAL),
            "integer": ("out_of_range", "is not a whole number in its allowed range.", FATAL),
            "postcode": ("invalid_postcode", "is not a UK postcode; the area is left unknown.", FLAG),
        }.get(f.type, (None, None, None))
        if rule:
            add(f.name, rule, f"{f.name} {message}", severity, f"{c}__text IS NOT NULL AND NOT {c}__ok")
    add("Discharge_Date", "discharge_before_admission", "The discharge date is before the admission date.", FATAL,
        "discharge_date < admission_date")
    add("Date_of_Birth", "impossible_date_of_birth",
        f"The date of birth is after admission or before {EARLIEST_BIRTH.isoformat()}.", FATAL,
        f"date_of_birth > admission_date OR date_of_birth < DATE '{EARLIEST_BIRTH}'")
    add("Discharge_Ready_Date", "ready_outside_spell",
        "The discharge-ready date is before admission or after discharge.", FLAG,
        "discharge_ready_date < admission_date OR discharge_ready_date > discharge_date")
    add("Discharge_Method", "discharge_details_missing",
        "A discharged last episode has no discharge method or destination.", FLAG,
        "discharge_date IS NOT NULL AND last_episode_in_spell = 1 "
        "AND (discharge_method__text IS NULL OR discharge_destination__text IS NULL)")
    return " UNION ALL ".join(parts)


def validated_columns() -> list[str]:
    return [f.column for f in hospital_fields()]


# --- pseudonymisation ------------------------------------------------------------------------------

def pseudonymise_sql(source: str, quarter_sql: str) -> str:
    """The analysts' copy of validated episodes (`source`, aliased v): the person token under the
    same function as social care, birth year and month, ages and band at admission, postcode district."""
    spec = load_spec()
    birth = "make_date(year(v.date_of_birth), month(v.date_of_birth), 1)"

    def age_at(day: str) -> str:
        return f"CAST(floor(date_diff('day', {birth}, {day}) / 365.25) AS INTEGER)"

    bands = " ".join(f"WHEN {age_at('v.admission_date')} BETWEEN {b.min} AND {b.max} THEN '{b.label}'"
                     for b in spec.derived.age_bands)
    keep = [f"v.{f.column}" for f in hospital_fields() if f.identifier == "keep"]
    return f"""
        SELECT {quarter_sql} AS extract_quarter, v.extract_id, v.row_number,
               {person_token_sql('v.nhs_number', 'NULL', 'NULL')} AS person_id, $key_version AS key_version,
               year(v.date_of_birth) AS birth_year, month(v.date_of_birth) AS birth_month,
               {age_at('v.admission_date')} AS age_at_admission,
               {age_at('coalesce(v.discharge_date, v.admission_date)')} AS age_at_discharge,
               CASE {bands} ELSE '{spec.derived.unknown_age_band}' END AS age_band,
               nullif(regexp_extract(v.postcode, '^([A-Z]{{1,2}}[0-9][A-Z0-9]?) ?[0-9][A-Z]{{2}}$', 1), '')
                   AS postcode_district,
               {', '.join(keep)}
        FROM {source} v"""
