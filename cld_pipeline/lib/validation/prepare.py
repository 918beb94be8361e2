"""Set-based preparation of a submission's records in DuckDB, generated from the specification.

For every field: the trimmed text; for coded fields the Release 2 value it maps to and how it was
reached (Release 2 as written, case or spaces normalised, Release 1 mapping, known variant,
unmappable, blank, literal NULL); for dates the parsed date and whether it parsed; for the NHS number
the normalised digits and the modulus-11 verdict. The rules (pandera, `rules.py`) then judge these
columns; nothing here decides whether a row is kept.
"""

from __future__ import annotations

import re

import pyarrow as pa

from cld_pipeline.spec import CLDField, load_spec

ROW_KEY_BASE = 1 << 32   # row numbers of one file stay far below 2^32
CODED_SOURCES = ("release2", "normalised", "release1", "variant", "unmapped", "blank", "null_literal")


def _norm(text: str) -> str:
    return re.sub(r"\s+", " ", text.strip()).lower()


def mapping_table() -> pa.Table:
    """Normalised spelling -> cleaned value and how it maps, for every code list (from the spec).
    A Release 2 spelling wins over a Release 1 or variant spelling that normalises the same."""
    spec = load_spec()
    invalid = spec.derived.invalid_value
    rows: dict[tuple[str, str], tuple[str, str]] = {}
    for cl in spec.code_lists.values():
        for value in cl.value_strings:
            rows[(cl.name, _norm(value))] = (value, "release2")
        for raw, cleaned in cl.release1.items():
            rows.setdefault((cl.name, _norm(raw)), (cleaned or cl.release1_unmapped or invalid, "release1"))
        for raw, cleaned in cl.variants.items():
            rows.setdefault((cl.name, _norm(raw)), (cleaned or invalid, "variant"))
    keys = list(rows)
    return pa.table({
        "code_list": [k[0] for k in keys], "norm_key": [k[1] for k in keys],
        "cleaned": [rows[k][0] for k in keys], "source": [rows[k][1] for k in keys],
    })


def _text(col: str, null_literals: tuple[str, ...]) -> str:
    nulls = ", ".join(f"'{n.upper()}'" for n in null_literals)
    return f"CASE WHEN upper(trim(r.{col})) IN ({nulls}) THEN NULL ELSE NULLIF(trim(r.{col}), '') END"


def _date(expr: str) -> str:
    return (f"COALESCE(TRY_STRPTIME({expr}, '%Y-%m-%d'), TRY_STRPTIME({expr}, '%d/%m/%Y'))::DATE")


def nhs_check_sql(digits: str) -> str:
    """Modulus-11 verdict for a 10-character string of digits (privacy.md 1.3), as SQL."""
    # TRY_CAST: SQL does not promise to skip the arithmetic when the format test fails.
    total = " + ".join(f"TRY_CAST(substr({digits}, {i}, 1) AS INTEGER) * {11 - i}" for i in range(1, 10))
    check = f"(11 - ({total}) % 11)"
    return (f"(regexp_full_match({digits}, '[0-9]{{10}}') AND {digits} <> repeat(substr({digits}, 1, 1), 10) "
            f"AND CASE WHEN {check} = 11 THEN 0 WHEN {check} = 10 THEN -1 ELSE {check} END "
            f"= TRY_CAST(substr({digits}, 10, 1) AS INTEGER))")


def prepare_sql(source: str) -> str:
    """SELECT over `source` (raw.events rows of one or many submissions, aliased r) joined to
    `submission_file` (f: one row per submission: submission_id, submission_index, la_code,
    received_date, expected_field_count) and the code mapping as `code_map`. `row_key` names a row
    across the submissions of a batch: submission_index * 2^32 + row_number."""
    spec = load_spec()
    nulls = spec.derived.null_literals
    select = ["r.submission_id", "r.row_number", f"f.submission_index * {ROW_KEY_BASE} + r.row_number AS row_key",
              "r.field_count", "f.expected_field_count", "f.la_code AS file_la_code",
              "f.received_date", "r.extra_values"]
    joins = []
    for field in spec.fields:
        col = field.column
        text = _text(col, nulls)
        is_null_literal = f"(upper(trim(r.{col})) IN ({', '.join(repr(n.upper()) for n in nulls)}))"
        select.append(f"{text} AS {col}")
        select.append(f"(r.{col} IS NOT NULL AND trim(r.{col}) <> r.{col}) AS {col}__padded")
        select.append(f"coalesce({is_null_literal}, false) AS {col}__null_literal")
        if field.type == "coded":
            m = f"m_{col}"
            joins.append(f"LEFT JOIN code_map {m} ON {m}.code_list = '{field.code_list}' "
                         f"AND {m}.norm_key = lower(regexp_replace(trim(r.{col}), '\\s+', ' ', 'g'))")
            select.append(f"CASE WHEN {text} IS NULL THEN NULL ELSE coalesce({m}.cleaned, "
                          f"'{spec.derived.invalid_value}') END AS {col}_cleaned")
            select.append(f"""CASE WHEN r.{col} IS NULL OR trim(r.{col}) = '' THEN 'blank'
                WHEN {is_null_literal} THEN 'null_literal'
                WHEN {m}.source IS NULL THEN 'unmapped'
                WHEN {m}.source = 'release2' AND r.{col} <> {m}.cleaned THEN 'normalised'
                ELSE {m}.source END AS {col}__source""")
        elif field.type == "date":
            select.append(f"{_date(text)} AS {col}__date")
        elif field.type in ("integer", "decimal"):
            select.append(f"TRY_CAST({text} AS DOUBLE) AS {col}__number")
        elif field.type == "nhs_number":
            digits = f"regexp_replace({text}, '[\\s-]', '', 'g')"
            select.append(f"{digits} AS {col}__digits")
            select.append(f"coalesce({nhs_check_sql(digits)}, false) AS {col}__valid")
        elif field.type == "postcode":
            select.append(f"regexp_full_match(upper({text}), '[A-Z]{{1,2}}[0-9][A-Z0-9]? ?[0-9][ABD-HJLNP-UW-Z]{{2}}|ZZ99 ?[0-9][A-Z]{{2}}') "
                          f"AS {col}__valid")
    select.append(f"date_diff('year', {_date(_text('date_of_birth', nulls))}, {_date(_text('event_start_date', nulls))}) "
                  "- CASE WHEN strftime(" + _date(_text('event_start_date', nulls)) + ", '%m%d') < strftime("
                  + _date(_text('date_of_birth', nulls)) + ", '%m%d') THEN 1 ELSE 0 END AS age_at_event_start")
    return f"SELECT {', '.join(select)}\nFROM {source} r JOIN submission_file f ON f.submission_id = r.submission_id\n" + "\n".join(joins)


def coded_fields() -> tuple[CLDField, ...]:
    return tuple(f for f in load_spec().fields if f.type == "coded")
