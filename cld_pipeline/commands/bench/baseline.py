"""The baseline of `cld-pipeline bench`: the pipeline's work as one plain DuckDB script, no orchestration.

Reads every submission CSV (headers matched by the spec, all text), types and maps codes with the
validated layer's own SQL (`prepare_sql`: dates in both formats, Release 1 and variant mapping, NHS
check digit), applies the fatal row rules that SQL expresses directly (identifiers, mandatory dates
and event type, date order), computes the HMAC person token in SQL with the same function, writes the
processor and analysts' databases, and counts events and people by LA, region and England with
rounding to 5 and 1-7 suppressed. Threads 2 and a 3 GB memory limit, as the pipeline's steps.

    python -m cld_pipeline.commands.bench.baseline <landing folder> <work folder>   # prints stage seconds as JSON
"""

from __future__ import annotations

import json
import secrets
import sys
import time
from pathlib import Path

import duckdb
import pyarrow as pa


def main(landing: Path, work: Path) -> dict:
    from cld_pipeline.lib.privacy.pseudonymise import PseudoKey, person_token_sql
    from cld_pipeline.lib.validation.prepare import mapping_table, prepare_sql
    from cld_pipeline.reference import load_local_authorities
    from cld_pipeline.spec import load_spec, normalise_header

    spec = load_spec()
    lookup = spec.header_lookup()
    columns = {f.name: f.column for f in spec.fields}
    seconds = {}
    con = duckdb.connect(str(work / "identifiable.duckdb"))
    con.execute("SET threads = 2")
    con.execute("SET memory_limit = '3GB'")
    con.execute(f"SET temp_directory = '{work / 'spill'}'")
    con.execute("SET preserve_insertion_order = false")

    t = time.perf_counter()
    selects = []
    for i, path in enumerate(sorted(landing.glob("*.csv"))):
        source = f"read_csv('{path}', header = true, all_varchar = true, ignore_errors = true, null_padding = true)"
        header = [r[0] for r in con.execute(f"DESCRIBE SELECT * FROM {source}").fetchall()]
        present = {columns[lookup[normalise_header(h)]]: h for h in header if normalise_header(h) in lookup}
        cols = ", ".join(f'"{present[c]}" AS {c}' if c in present else f"NULL::VARCHAR AS {c}"
                         for c in (f.column for f in spec.fields))
        selects.append(f"SELECT {i} AS submission_id, row_number() OVER () AS row_number, 0 AS field_count, {cols}, "
                       f"NULL::VARCHAR AS extra_values FROM {source}")
    con.execute("CREATE TABLE raw_events AS " + " UNION ALL ".join(selects))
    seconds["read_csv"] = round(time.perf_counter() - t, 2)

    t = time.perf_counter()
    con.register("code_map", mapping_table())
    n = len(selects)
    con.register("submission_file", pa.table({
        "submission_id": pa.array(range(n), pa.int32()), "submission_index": pa.array(range(n), pa.int64()),
        "la_code": ["000"] * n, "received_date": pa.array([None] * n, pa.date32()),
        "expected_field_count": pa.array([0] * n, pa.int32())}))
    con.execute(f"CREATE TABLE prepared AS {prepare_sql('raw_events')}")
    cleaned = ", ".join(f"{f.column}_cleaned" for f in spec.fields if f.type == "coded")
    fatal = ("(nhs_number__valid OR la_person_unique_identifier IS NOT NULL) AND event_start_date__date IS NOT NULL "
             f"AND event_type_cleaned IS NOT NULL AND event_type_cleaned <> '{spec.derived.invalid_value}' "
             "AND (event_end_date__date IS NULL OR event_end_date__date >= event_start_date__date)")
    con.execute(f"""CREATE TABLE validated_events AS SELECT submission_id, row_number, la_code,
        CASE WHEN nhs_number__valid THEN nhs_number__digits END AS nhs_number, la_person_unique_identifier,
        date_of_birth__date AS date_of_birth, event_start_date__date AS event_start_date,
        event_end_date__date AS event_end_date, {cleaned} FROM prepared WHERE {fatal}""")
    con.execute(f"CREATE TABLE rejections AS SELECT submission_id, row_number FROM prepared WHERE NOT coalesce({fatal}, false)")
    con.execute("DROP TABLE prepared")
    seconds["validate"] = round(time.perf_counter() - t, 2)

    t = time.perf_counter()
    key = PseudoKey(secrets.token_bytes(32), "bench")
    ipad, opad = key.pads
    con.execute(f"ATTACH '{work / 'analytics.duckdb'}' AS analytics")
    token = person_token_sql("nhs_number", "la_code", "la_person_unique_identifier")
    con.execute(f"""CREATE TABLE analytics.events AS SELECT * EXCLUDE (nhs_number, la_person_unique_identifier,
        date_of_birth), {token} AS person_id, year(date_of_birth) AS birth_year,
        CAST(floor(date_diff('day', date_of_birth, event_start_date) / 365.25) AS INTEGER) AS age
        FROM validated_events""", {"ipad": ipad, "opad": opad})
    seconds["hash"] = round(time.perf_counter() - t, 2)

    t = time.perf_counter()
    councils = list(load_local_authorities())
    regions = pa.table({"la_code": [la.submission_code for la in councils], "region": [la.region_code for la in councils]})
    con.register("regions", regions)
    con.execute("""CREATE TABLE analytics.counts AS
        WITH g AS (SELECT e.la_code, r.region, e.event_type_cleaned, count(*) AS events, count(DISTINCT person_id) AS people
                   FROM analytics.events e LEFT JOIN regions r USING (la_code)
                   GROUP BY GROUPING SETS ((e.la_code, r.region, e.event_type_cleaned), (r.region, e.event_type_cleaned),
                                           (e.event_type_cleaned)))
        SELECT *, CASE WHEN people BETWEEN 1 AND 7 THEN NULL ELSE 5 * floor(people / 5 + 0.5) END AS people_shown,
                  CASE WHEN events BETWEEN 1 AND 7 THEN NULL ELSE 5 * floor(events / 5 + 0.5) END AS events_shown
        FROM g""")
    seconds["aggregate"] = round(time.perf_counter() - t, 2)
    seconds["rows"] = con.execute("SELECT count(*) FROM raw_events").fetchall()[0][0]
    con.close()
    return seconds


if __name__ == "__main__":
    print(json.dumps(main(Path(sys.argv[1]), Path(sys.argv[2]))))
