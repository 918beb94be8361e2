"""Synthetic national CLD collection: LA submissions, hospital extracts and a defect manifest.

Deterministic for a seed. The pipeline never sees real CLD data; this is how it is developed,
tested and benchmarked. Writes into `<data dir>/landing` (and `landing/health`), and a manifest of
files and injected defects into `<data dir>/synthetic`.
"""

from __future__ import annotations

import csv
import json
import shutil
import time
from collections import Counter
from dataclasses import asdict
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
from tqdm import tqdm

from cld_pipeline.reference import load_local_authorities
from cld_pipeline.synthetic.config import SCALES, DefectRates, GeneratorConfig, LinkageNoise
from cld_pipeline.synthetic.defects import DefectInjector, manifest_rows, overrides_by_field
from cld_pipeline.synthetic.hospital import hospital_quarters, simulate_spells, write_hospital_extracts
from cld_pipeline.synthetic.linkage import (
    NOISE_KINDS,
    HospitalView,
    hospital_view,
    linkage_rng,
    nhs_recorded,
    prioritise_nhs_numbers,
)
from cld_pipeline.synthetic.simulate import simulate
from cld_pipeline.synthetic.submissions import Renderer, arrow_dates, la_person_id_sql, plan_files, quarter_ends
from cld_pipeline.synthetic.vocab import Vocabularies

__all__ = ["DefectRates", "GeneratorConfig", "LinkageNoise", "SCALES", "generate"]


def _councils(config: GeneratorConfig, rng: np.random.Generator):
    las = list(load_local_authorities())
    if config.la_codes:
        lookup = load_local_authorities()
        return [lookup[c] for c in config.la_codes]
    count = SCALES[config.scale].la_count
    if count is None or count >= len(las):
        return las
    # A spread of councils: one from each of the first `count` regions, chosen by the seed.
    by_region: dict[str, list] = {}
    for la in las:
        by_region.setdefault(la.region_code, []).append(la)
    regions = sorted(by_region)
    return [by_region[r][int(rng.integers(0, len(by_region[r])))] for r in regions[:count]]


def generate(config: GeneratorConfig, data_dir: Path, progress: bool = True) -> dict:
    """Generate the collection; returns the manifest (also written to `synthetic/manifest.json`)."""
    started = time.perf_counter()
    rng = np.random.default_rng(config.seed)
    vocab = Vocabularies()
    landing = data_dir / "landing"
    landing.mkdir(parents=True, exist_ok=True)
    out_dir = data_dir / "synthetic"
    out_dir.mkdir(parents=True, exist_ok=True)
    staging = landing / f".staging-{config.seed}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()

    period_ends = quarter_ends(config.period_end, config.quarters)
    steps = 4 + (1 if config.hospital else 0)
    bar = tqdm(total=steps, desc="generate", unit="step", disable=not progress)

    bar.set_postfix_str("simulating people and journeys")
    councils = _councils(config, rng)
    truth = simulate(councils, vocab, rng, config.target_rows, period_ends[0], period_ends[-1])
    bar.update()

    bar.set_postfix_str("planning submissions")
    files = plan_files(truth, vocab, rng, period_ends, config.resubmission_share)
    for f in files:
        f.extra["bom_crlf"] = bool((f.la_idx * 2654435761 + config.seed) % 10 == 0)
    bar.update()

    # Hospital activity and the council's record of NHS numbers come before the defects, which
    # blank or corrupt only numbers a council did record.
    link_rng = linkage_rng(config.seed)
    spells = None
    numbers_moved = 0
    if config.hospital:
        spells = simulate_spells(truth, vocab, link_rng)
        numbers_moved = prioritise_nhs_numbers(truth.people, spells.person, link_rng)
        spells = spells.numbered(truth.people.nhs_number)
    truth.nhs_recorded = nhs_recorded(truth.people, len(councils), config.linkage, link_rng)
    truth.stats.update(_nhs_stats(truth, spells, numbers_moved, vocab["client_type"].idx("service_user")))

    bar.set_postfix_str("injecting defects")
    defects = DefectInjector(truth, vocab, rng).inject(files, config.defects)
    bar.update()

    con = duckdb.connect()
    try:
        bar.set_postfix_str(f"writing {len(files)} submissions")
        Renderer(con, truth, vocab, files, overrides_by_field(defects)).write(landing, staging)
        write_row_truth(files, out_dir)
        bar.update()
        hospital_files: list[dict] = []
        if spells is not None:
            bar.set_postfix_str("writing hospital extracts")
            view = hospital_view(truth.people, config.linkage, link_rng)
            hospital_files = write_hospital_extracts(con, truth, spells, vocab, link_rng,
                                                     hospital_quarters(period_ends), landing / "health", view)
            write_linkage_truth(con, truth, files, spells, out_dir, view)
            bar.update()
    finally:
        con.close()
        shutil.rmtree(staging, ignore_errors=True)
        bar.close()

    rows = sum(f.rows.size for f in files)
    elapsed = time.perf_counter() - started
    defect_rows = manifest_rows(defects, files)
    defects_per_file = _counts(d.file_id for d in defects)
    with (out_dir / "defects.csv").open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=["file_name", "row_number", "field", "defect", "injected_value", "expected", "rule"])
        writer.writeheader()
        writer.writerows(defect_rows)
    manifest = {
        "config": {**asdict(config), "period_end": config.period_end.isoformat()},
        "generated_in_seconds": round(elapsed, 2),
        "rows": rows,
        "rows_per_second": round(rows / elapsed) if elapsed else None,
        "stats": truth.stats,
        "files": [
            {"file_name": f.file_name, "la_code": f.la.submission_code, "la_name": f.la.name,
             "quarter": f.quarter, "reporting_period_start": f.period_start.isoformat(),
             "reporting_period_end": f.period_end.isoformat(), "submitted_at": f.submitted_at.isoformat(),
             "version": f.version, "rows": int(f.rows.size), "date_format": f.date_format,
             "header_style": f.header_style, "includes_names": f.include_names,
             "bom_crlf": f.extra["bom_crlf"],
             "defects": defects_per_file.get(f.file_id, 0)}
            for f in files
        ],
        "hospital_files": hospital_files,
        "defects_file": "defects.csv",
        "defect_counts": _counts(d.defect for d in defects),
    }
    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=2), encoding="utf-8")
    return manifest


def write_row_truth(files, out_dir: Path) -> None:
    """`truth_rows.parquet`: which simulated event each submitted row describes (file name, row
    number from 1, event), so de-duplication can be checked against the events that really happened."""
    import pyarrow.parquet as pq

    pq.write_table(pa.table({
        "file_name": pa.DictionaryArray.from_arrays(
            pa.array(np.repeat(np.arange(len(files), dtype=np.int32), [f.rows.size for f in files])),
            pa.array([f.file_name for f in files], pa.string())),
        "row_number": pa.array(np.concatenate([np.arange(1, f.rows.size + 1) for f in files]), pa.int64()),
        "event": pa.array(np.concatenate([f.rows for f in files]).astype(np.int64)),
    }), out_dir / "truth_rows.parquet")


def _nhs_stats(truth, spells, numbers_moved: int, service_user: int) -> dict:
    """What share of people carry an NHS number anywhere, and in their council's records."""
    people = truth.people
    has = people.nhs_number > 0
    in_hospital = np.zeros(len(people), dtype=bool)
    if spells is not None:
        in_hospital[spells.person] = True
    in_care = np.zeros(len(people), dtype=bool)
    in_care[truth.events.person] = True     # people known to a council (the rest are hospital-only)
    users = in_care & (people.client_type == service_user)
    recorded = truth.nhs_recorded
    share = lambda mask: round(float(mask.sum() / max(in_care.sum(), 1)), 4)   # noqa: E731 - of people known to councils
    return {
        "people_with_nhs_number": int(has.sum()),
        "share_of_council_people_with_nhs_number": share(has & in_care),
        "share_of_service_users_with_nhs_number": round(float(has[users].mean()), 4) if users.any() else None,
        "share_of_council_people_with_nhs_number_recorded": share(recorded & in_care),
        "council_people_with_nhs_number_unrecorded": int((has & ~recorded & in_care).sum()),
        "people_in_hospital_extracts": int(in_hospital.sum()),
        "council_people_unrecorded_and_in_hospital_extracts": int((has & ~recorded & in_care & in_hospital).sum()),
        "nhs_numbers_moved_to_people_with_hospital_activity": numbers_moved,
    }


def write_linkage_truth(con: duckdb.DuckDBPyConnection, truth, files, spells, out_dir: Path,
                        view: HospitalView) -> None:
    """Who is who, for linkage tests: `truth_people.parquet` (person, LA code, LA person id as the
    council writes it, NHS number, whether the council recorded it, how the hospital's record of the
    person differs) and `truth_spells.parquet` (spell id, person, dates). Synthetic identifiers
    only; real data has no such file."""
    p = truth.people
    style = {f.la_idx: f.person_id_style for f in files}
    councils = truth.councils
    con.register("truth_people_in", pa.table({
        "person": pa.array(np.arange(len(p), dtype=np.int32)),
        "la_code": pa.array([c.submission_code for c in councils]).take(pa.array(p.la_idx.astype(np.int32))),
        "la_name": pa.array([c.name for c in councils]).take(pa.array(p.la_idx.astype(np.int32))),
        "pid_style": pa.array([style.get(i, 0) for i in range(len(councils))]).take(pa.array(p.la_idx.astype(np.int32))),
        "la_person_no": pa.array(p.la_person_no),
        "nhs_number": pa.array(p.nhs_number),
        "nhs_recorded": pa.array(truth.nhs_recorded),
        "hospital_noise": pa.DictionaryArray.from_arrays(pa.array(view.noise.astype(np.int32)),
                                                         pa.array(NOISE_KINDS)),
    }))
    con.execute(f"""COPY (SELECT person, la_code, {la_person_id_sql('la_person_no', 'pid_style', 'la_name')}
                           AS la_person_id, CASE WHEN nhs_number > 0 THEN CAST(nhs_number AS VARCHAR) END AS nhs_number,
                           nhs_recorded, CAST(hospital_noise AS VARCHAR) AS hospital_noise
                    FROM truth_people_in) TO '{out_dir / "truth_people.parquet"}' (FORMAT parquet)""")
    con.unregister("truth_people_in")
    con.register("truth_spells_in", pa.table({
        "spell": pa.array(np.arange(len(spells), dtype=np.int32)), "person": pa.array(spells.person),
        "admission": arrow_dates(spells.admission), "discharge": arrow_dates(spells.discharge)}))
    con.execute(f"""COPY (SELECT 'S' || lpad(CAST(spell AS VARCHAR), 9, '0') AS spell_id, person,
                           admission AS admission_date, discharge AS discharge_date FROM truth_spells_in)
                    TO '{out_dir / "truth_spells.parquet"}' (FORMAT parquet)""")
    con.unregister("truth_spells_in")


def _counts(items) -> dict:
    return dict(sorted(Counter(items).items()))
