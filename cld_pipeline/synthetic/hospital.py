"""Synthetic hospital (SUS APC-like) extract for the same people, keyed by the same NHS numbers.

Spells come from three sources: the admissions behind requests routed from hospital discharge (so
discharge-to-care and ASCOF 2D linkage find them), emergency readmissions after reablement that ended
"admitted to hospital", and background admissions of service users, carers and people known only to
hospitals. One national file per calendar quarter of discharge in `landing/health/`.
"""

from __future__ import annotations

import datetime as dt
import os
from dataclasses import dataclass
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa

from cld_pipeline.synthetic.linkage import HospitalView
from cld_pipeline.synthetic.simulate import NA_DAY, Truth, add_months
from cld_pipeline.synthetic.submissions import arrow_coded, arrow_dates, area_letters, postcode_sql, quarter_label
from cld_pipeline.synthetic.vocab import Vocabularies


@dataclass
class Spells:
    person: np.ndarray
    admission: np.ndarray
    discharge: np.ndarray
    ready: np.ndarray               # discharge-ready date, NA_DAY when not recorded
    ints: dict[str, np.ndarray]     # admission_method, discharge_method, discharge_destination,
                                    # management_type, treatment_function -> positions

    def __len__(self) -> int:
        return self.person.size

    def numbered(self, nhs_number: np.ndarray) -> "Spells":
        """Only the spells of people with an NHS number: nobody else can be in an extract."""
        keep = nhs_number[self.person] > 0
        return Spells(person=self.person[keep], admission=self.admission[keep], discharge=self.discharge[keep],
                      ready=self.ready[keep], ints={k: v[keep] for k, v in self.ints.items()})


def simulate_spells(truth: Truth, vocab: Vocabularies, rng: np.random.Generator) -> Spells:
    e, p = truth.events, truth.people
    et, out = vocab["event_type"], vocab["event_outcome"]
    am, mt = vocab["admission_method"], vocab["management_type"]
    emergency_methods = am.where(lambda c: c.group == am.codes.entry(am.codes.value("emergency_ae")).group)
    # Each source gives (person, admission day, emergency?, known discharge day or NA_DAY).
    sources: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = []

    # 1. Admissions behind requests routed from hospital discharge: discharged 0-3 days before.
    from_hospital = (e.ints["event_type"] == et.idx("request")) & (
        e.ints["route"] == vocab["request_route_of_access"].idx("hospital_discharge"))
    idx = np.flatnonzero(from_hospital)
    discharge = e.start[idx] - rng.integers(0, 4, idx.size)
    los = 1 + np.minimum(rng.gamma(1.5, 6, idx.size), 120).astype(np.int32)
    sources.append((e.person[idx], discharge - los, np.ones(idx.size, bool), discharge))

    # 2. Emergency readmissions after reablement that ended "admitted to hospital".
    readmit = np.flatnonzero((e.ints["event_type"] == et.idx("service"))
                             & (e.ints["outcome"] == out.idx("admitted_hospital")))
    re_adm = e.end[readmit] + rng.integers(0, 3, readmit.size)
    sources.append((e.person[readmit], re_adm, np.ones(readmit.size, bool), np.full(readmit.size, NA_DAY)))

    # 3. Background admissions: older people are admitted more often.
    years = (truth.sim_end - truth.sim_start) / 365.25
    age = (truth.sim_end - p.dob) / 365.25
    count = rng.poisson(np.where(age >= 65, 0.45, 0.22) * years)
    person = np.repeat(np.arange(len(p), dtype=np.int32), count)
    adm = truth.sim_start + (rng.random(person.size) * (truth.sim_end - truth.sim_start)).astype(np.int32)
    sources.append((person, adm, rng.random(person.size) < 0.7, np.full(person.size, NA_DAY)))

    person, admission, emergency, fixed_discharge = (np.concatenate(parts) for parts in zip(*sources))
    admission = admission.astype(np.int32)
    from_request = np.arange(person.size) < idx.size
    los = 1 + np.minimum(rng.gamma(1.3, 5, person.size), 150).astype(np.int32)
    discharge = np.where(fixed_discharge != NA_DAY, fixed_discharge, admission + los).astype(np.int32)

    # Every person may be admitted here; people without an NHS number are left out only once the
    # numbers have gone to people with hospital activity first (synthetic/linkage.py, `numbered`).
    dod = p.dod[person]
    keep = (dod == NA_DAY) | (admission <= dod)
    person, admission, discharge, emergency = person[keep], admission[keep], discharge[keep], emergency[keep]
    dod, from_request = dod[keep], from_request[keep]
    died = (dod != NA_DAY) & (discharge >= dod)
    discharge = np.where(died, dod, discharge)

    m = person.size
    method = np.where(emergency, am.sample(rng, m, among=emergency_methods),
                      am.sample(rng, m, among=am.where(lambda c: c.group != am.codes.entry(
                          am.codes.value("emergency_ae")).group)))
    management = np.where(emergency,
                          np.where(rng.random(m) < 0.88, mt.idx("emergency"), mt.idx("non_elective")),
                          mt.sample(rng, m, among=mt.where(lambda c: c.group != "emergency")))
    dm, dd = vocab["discharge_method"], vocab["discharge_destination"]
    alive_destinations = dd.where(lambda c: c.key != "died")
    destination = dd.sample(rng, m, among=alive_destinations)
    destination[from_request] = dd.idx("usual_residence")
    discharge_method = dm.sample(rng, m, among=dm.where(lambda c: c.key != "died"))
    destination = np.where(died, dd.idx("died"), destination).astype(np.int16)
    discharge_method = np.where(died, dm.idx("died"), discharge_method).astype(np.int16)
    ready = np.where(rng.random(m) < 0.85, np.maximum(admission, discharge - rng.integers(0, 11, m)), NA_DAY)
    ready = np.where(died, NA_DAY, ready).astype(np.int32)
    tf = vocab["treatment_function"]
    treatment = np.where(age[person] >= 75, np.where(rng.random(m) < 0.5, tf.idx("geriatric"), tf.sample(rng, m)),
                         tf.sample(rng, m)).astype(np.int16)
    return Spells(person=person, admission=admission, discharge=discharge, ready=ready, ints={
        "admission_method": method.astype(np.int16), "discharge_method": discharge_method,
        "discharge_destination": destination, "management_type": management.astype(np.int16),
        "treatment_function": treatment})


def write_hospital_extracts(con: duckdb.DuckDBPyConnection, truth: Truth, spells: Spells, vocab: Vocabularies,
                            rng: np.random.Generator, quarters: list[dt.date], folder: Path,
                            view: HospitalView) -> list[dict]:
    """One file per quarter of discharge; spells still open at the quarter end appear undischarged.
    People are written as the hospital records them (`view`: linkage noise included)."""
    folder.mkdir(parents=True, exist_ok=True)
    p = truth.people
    sex_of_gender = np.append(_sex_positions(vocab), vocab["hospital_sex"].idx("not_known"))  # [-1]: not recorded
    multi_episode = rng.random(len(spells)) < 0.1
    table = pa.table({
        "spell": pa.array(np.arange(len(spells), dtype=np.int32)),
        "nhs_number": pa.array(p.nhs_number[spells.person]),
        "dob": arrow_dates(view.dob[spells.person]),
        "sex": arrow_coded(sex_of_gender[view.gender[spells.person]], vocab["hospital_sex"].values),
        "pc_area": pa.array([area_letters(i) for i in range(len(truth.councils))])
        .take(pa.array(p.la_idx[spells.person].astype(np.int32))),
        "pc_district": pa.array(view.postcode_district[spells.person].astype(np.int32)),
        "pc_sector": pa.array(view.postcode_sector[spells.person].astype(np.int32)),
        "pc_unit": pa.array(view.postcode_unit[spells.person].astype(np.int32)),
        "admission": arrow_dates(spells.admission),
        "discharge": arrow_dates(spells.discharge),
        "ready": arrow_dates(spells.ready),
        "multi_episode": pa.array(multi_episode),
        **{k: arrow_coded(v, vocab[k].values) for k, v in spells.ints.items()},
    })
    con.register("spells", table)
    written = []
    for period_end in quarters:
        q_start = add_months(period_end + dt.timedelta(days=1), -3)
        path = folder / f"hospital_extract_{quarter_label(period_end)}.csv"
        tmp = folder / f".{path.name}.partial"
        con.execute(f"""
            COPY (
                WITH in_quarter AS (
                    SELECT *, discharge > DATE '{period_end}' AS still_in
                    FROM spells
                    WHERE (discharge BETWEEN DATE '{q_start}' AND DATE '{period_end}')
                       OR (admission BETWEEN DATE '{q_start}' AND DATE '{period_end}' AND discharge > DATE '{period_end}')
                ), episodes AS (
                    SELECT *, 1 AS last_episode FROM in_quarter
                    UNION ALL
                    SELECT *, 0 AS last_episode FROM in_quarter WHERE multi_episode
                )
                SELECT
                    CAST(nhs_number AS VARCHAR) AS "NHS_Number",
                    strftime(dob, '%Y-%m-%d') AS "Date_of_Birth",
                    sex AS "Sex",
                    {postcode_sql("pc_area", "")} AS "Postcode",
                    'S' || lpad(CAST(spell AS VARCHAR), 9, '0') AS "Spell_ID",
                    last_episode AS "Last_Episode_In_Spell",
                    strftime(admission, '%Y-%m-%d') AS "Admission_Date",
                    CASE WHEN last_episode = 1 AND NOT still_in THEN strftime(discharge, '%Y-%m-%d') END AS "Discharge_Date",
                    CASE WHEN last_episode = 1 AND NOT still_in THEN strftime(ready, '%Y-%m-%d') END AS "Discharge_Ready_Date",
                    admission_method AS "Admission_Method",
                    CASE WHEN last_episode = 1 AND NOT still_in THEN discharge_method END AS "Discharge_Method",
                    CASE WHEN last_episode = 1 AND NOT still_in THEN discharge_destination END AS "Discharge_Destination",
                    management_type AS "Management_Type",
                    treatment_function AS "Treatment_Function_Code"
                FROM episodes
                ORDER BY spell, last_episode
            ) TO '{tmp}' (FORMAT csv, HEADER)
        """)
        rows = con.execute(f"SELECT count(*) FROM read_csv('{tmp}', header=true, all_varchar=true)").fetchall()[0][0]
        tmp.replace(path)
        ts = dt.datetime.combine(period_end + dt.timedelta(days=20), dt.time(6)).replace(tzinfo=dt.timezone.utc).timestamp()
        os.utime(path, (ts, ts))
        written.append({"file_name": f"health/{path.name}", "quarter": quarter_label(period_end), "rows": rows})
    con.unregister("spells")
    return written


def _sex_positions(vocab: Vocabularies) -> np.ndarray:
    """Gender position -> hospital sex code position (the two lists share their keys)."""
    g, s = vocab["gender"], vocab["hospital_sex"]
    fallback = {"other": "not_specified", "unknown": "not_known"}
    return np.array([s.idx(fallback.get(c.key, c.key)) for c in g.codes.values], dtype=np.int16)


def hospital_quarters(period_ends: list[dt.date]) -> list[dt.date]:
    """Quarters of hospital data covering every CLD window: the four before the first period end and on."""
    first = period_ends[0]
    back = [add_months(first + dt.timedelta(days=1), -3 * k) - dt.timedelta(days=1) for k in (3, 2, 1)]
    return back + list(period_ends)
