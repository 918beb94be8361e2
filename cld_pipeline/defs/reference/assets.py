"""Reference layer: the LA list and the CLD code lists, published to the analysts' zone.

Both come straight from the single sources in code (`cld_pipeline.reference`, `cld_pipeline.spec`),
so benchmark tables and analysts' queries join to exactly what the pipeline validates against.
"""

from __future__ import annotations

import json

import dagster as dg
import pyarrow as pa
from dagster_duckdb import DuckDBResource

from cld_pipeline.defs.metadata import table_schema
from cld_pipeline.lib.warehouse import replace_table
from cld_pipeline.reference import load_local_authorities
from cld_pipeline.spec import load_spec

OWNERS = ["team:cld-platform"]


def _materialized(con, schema: str, table: str, rows: int, **extra) -> dg.MaterializeResult:
    return dg.MaterializeResult(
        metadata={
            "dagster/row_count": rows,
            "dagster/table_name": f"analytics.{schema}.{table}",
            "dagster/column_schema": table_schema(con, schema, table),
            **extra,
        }
    )


@dg.asset(
    key=["reference", "local_authorities"],
    group_name="reference",
    kinds={"duckdb"},
    owners=OWNERS,
    description=(
        "England's 153 councils with adult social services responsibilities (2025/26 geography): "
        "CLD LA code, ONS code, name, region and ONS mid-2024 adult populations (the CLD denominators)."
    ),
)
def local_authorities(analytics_db: DuckDBResource) -> dg.MaterializeResult:
    councils = list(load_local_authorities())
    data = pa.table({
        "la_code": [la.submission_code for la in councils],
        "cld_la_code": [la.cld_la_code for la in councils],
        "ons_code": [la.ons_code for la in councils],
        "la_name": [la.name for la in councils],
        "region_code": [la.region_code for la in councils],
        "region_name": [la.region_name for la in councils],
        "population_18_plus": pa.array([la.population_18_plus for la in councils], pa.int64()),
        "population_65_plus": pa.array([la.population_65_plus for la in councils], pa.int64()),
    })
    with analytics_db.get_connection() as con:
        rows = replace_table(con, "reference", "local_authorities", data)
        return _materialized(con, "reference", "local_authorities", rows,
                             regions=len(load_local_authorities().regions))


@dg.asset_check(asset=local_authorities, blocking=True, description=(
    "Every council appears once, under a unique LA code and ONS code, in one of England's nine regions, "
    "with adult populations where 65+ never exceeds 18+."))
def local_authorities_complete(analytics_db: DuckDBResource) -> dg.AssetCheckResult:
    with analytics_db.get_connection() as con:
        councils, codes, ons, regions, bad_population = con.execute("""
            SELECT count(*), count(DISTINCT la_code), count(DISTINCT ons_code), count(DISTINCT region_code),
                   count(*) FILTER (WHERE population_65_plus > population_18_plus OR population_18_plus <= 0)
            FROM reference.local_authorities
        """).fetchall()[0]
    expected = len(load_local_authorities())
    passed = councils == codes == ons == expected and regions == 9 and bad_population == 0
    return dg.AssetCheckResult(passed=passed, metadata={
        "councils": councils, "distinct_la_codes": codes, "distinct_ons_codes": ons, "regions": regions,
        "implausible_populations": bad_population})


@dg.asset(
    key=["reference", "code_lists"],
    group_name="reference",
    kinds={"duckdb"},
    owners=OWNERS,
    description=(
        "Every CLD Release 2 code list from the specification in code: each value with its grouping, "
        "hierarchy rank and provisional flag (`reference.code_list_values`), and every Release 1 and "
        "known-invalid spelling with the Release 2 value it maps to (`reference.code_list_mappings`)."
    ),
)
def code_lists(analytics_db: DuckDBResource) -> dg.MaterializeResult:
    spec = load_spec()
    values: dict[str, list] = {k: [] for k in ("code_list", "value", "key", "value_group", "rank",
                                               "is_submittable", "provisional", "evidence", "attributes")}
    mappings: dict[str, list] = {k: [] for k in ("code_list", "raw_value", "cleaned_value", "source", "provisional")}
    for cl in spec.code_lists.values():
        for submittable, entries in ((True, cl.values), (False, cl.derived_values)):
            for v in entries:
                values["code_list"].append(cl.name)
                values["value"].append(v.value)
                values["key"].append(v.key)
                values["value_group"].append(v.group)
                values["rank"].append(v.rank)
                values["is_submittable"].append(submittable)
                values["provisional"].append(cl.is_provisional(v))
                values["evidence"].append(cl.evidence)
                values["attributes"].append(json.dumps(v.attrs, sort_keys=True))
        for source, mapping in (("release1", cl.release1), ("known_variant", cl.variants)):
            for raw, cleaned in mapping.items():
                unmapped = cl.release1_unmapped if source == "release1" else None
                mappings["code_list"].append(cl.name)
                mappings["raw_value"].append(raw)
                mappings["cleaned_value"].append(cleaned or unmapped or spec.derived.invalid_value)
                mappings["source"].append(source)
                mappings["provisional"].append(cl.release1_provisional if source == "release1" else cl.provisional)
    with analytics_db.get_connection() as con:
        n_values = replace_table(con, "reference", "code_list_values", pa.table(values))
        n_mappings = replace_table(con, "reference", "code_list_mappings", pa.table(mappings))
        return _materialized(con, "reference", "code_list_values", n_values,
                             code_lists=len(spec.code_lists), mappings=n_mappings,
                             provisional_lists=sum(cl.provisional for cl in spec.code_lists.values()))
