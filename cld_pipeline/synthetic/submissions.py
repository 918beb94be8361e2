"""Quarterly rolling 12-month submission files rendered from the simulated truth.

Each LA's file for a quarter holds every event active in the 12 months to the reporting period end,
as the council would have known it then: services still running are open (no end date), requests,
assessments and reviews appear only once completed, and deaths after the period end are unknown.
Consecutive quarters therefore overlap by nine months. Rendering works in bounded chunks of files.
"""

from __future__ import annotations

import datetime as dt
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv

from cld_pipeline.lib.privacy.identifiers import INWARD_UNIT_LETTERS
from cld_pipeline.reference import LocalAuthority
from cld_pipeline.spec import load_spec
from cld_pipeline.synthetic.simulate import EPOCH, NA_DAY, Truth, add_months, name_pools, to_day
from cld_pipeline.synthetic.vocab import Vocabularies

ISO = "%Y-%m-%d"
UK = "%d/%m/%Y"


@dataclass
class SubmissionFile:
    file_id: int
    la_idx: int
    la: LocalAuthority
    quarter_idx: int
    quarter: str
    period_start: dt.date
    period_end: dt.date
    submitted_at: dt.datetime
    version: int                 # 1 = first submission, 2 = corrected resubmission
    date_format: str
    person_id_style: int
    header_style: str            # canonical | lower | spaced
    include_names: bool
    rows: np.ndarray             # event indices in file row order
    defect_factor: float = 1.0
    file_name: str = ""
    extra: dict = field(default_factory=dict)


def quarter_label(period_end: dt.date) -> str:
    return f"{period_end.year}-Q{(period_end.month - 1) // 3 + 1}"


def quarter_ends(last: dt.date, count: int) -> list[dt.date]:
    """`count` consecutive calendar quarter ends up to `last` (oldest first)."""
    first_of_next = dt.date(last.year + (last.month == 12), last.month % 12 + 1, 1)
    return [add_months(first_of_next, -3 * k) - dt.timedelta(days=1) for k in range(count - 1, -1, -1)]


def window_mask(truth: Truth, vocab: Vocabularies, period_end: dt.date) -> np.ndarray:
    """Events a council submits for the 12 months ending `period_end`."""
    e = truth.events
    end_day = to_day(period_end)
    start_day = to_day(add_months(period_end + dt.timedelta(days=1), -12))
    is_service = e.ints["event_type"] == vocab["event_type"].idx("service")
    open_ = e.end == NA_DAY
    started = e.start <= end_day
    active = open_ | (e.end >= start_day)
    completed = ~open_ & (e.end <= end_day)
    return started & active & (is_service | completed)


def plan_files(truth: Truth, vocab: Vocabularies, rng: np.random.Generator, period_ends: list[dt.date],
               resubmission_share: float) -> list[SubmissionFile]:
    """Which files exist, their rows (in order) and their per-council habits."""
    councils = truth.councils
    n_la = len(councils)
    # Council habits are stable across quarters: date format, person id style, header spelling.
    date_format = np.where(rng.random(n_la) < 0.2, UK, ISO)
    pid_style = rng.integers(0, 3, n_la)
    header_style = rng.choice(["canonical", "lower", "spaced"], size=n_la, p=[0.8, 0.1, 0.1])
    names = rng.random(n_la) < 0.15
    person_la = truth.people.la_idx[truth.events.person]
    files: list[SubmissionFile] = []
    for q, period_end in enumerate(period_ends):
        # Events are stored by (person, start) and people by council, so this is file order.
        selected = np.flatnonzero(window_mask(truth, vocab, period_end))
        bounds = np.searchsorted(person_la[selected], np.arange(n_la + 1))
        period_start = add_months(period_end + dt.timedelta(days=1), -12)
        resubmitting = rng.random(n_la) < resubmission_share
        if resubmission_share > 0 and not resubmitting.any():
            # A few councils only: still at least one corrected file a quarter, as the share asks for.
            resubmitting[rng.integers(0, n_la)] = True
        for la_idx, la in enumerate(councils):
            rows = selected[bounds[la_idx]:bounds[la_idx + 1]]
            if rows.size == 0:
                continue
            submitted = dt.datetime.combine(period_end, dt.time(9)) + dt.timedelta(
                days=int(rng.integers(14, 36)), minutes=int(rng.integers(0, 8 * 60)))
            resubmits = bool(resubmitting[la_idx])
            versions = [(1, submitted, 3.0 if resubmits else 1.0)]
            if resubmits:
                versions.append((2, submitted + dt.timedelta(days=int(rng.integers(7, 30))), 0.3))
            for version, when, factor in versions:
                f = SubmissionFile(
                    file_id=len(files), la_idx=la_idx, la=la, quarter_idx=q, quarter=quarter_label(period_end),
                    period_start=period_start, period_end=period_end, submitted_at=when, version=version,
                    date_format=str(date_format[la_idx]), person_id_style=int(pid_style[la_idx]),
                    header_style=str(header_style[la_idx]), include_names=bool(names[la_idx]),
                    rows=rows, defect_factor=factor)
                f.file_name = (f"CLD_R2_{la.submission_code}_{period_end:%Y%m%d}_"
                               f"{when:%Y%m%dT%H%M%S}.csv")
                files.append(f)
    return files


# --- DuckDB rendering ---------------------------------------------------------------------------------


# --- rendering -----------------------------------------------------------------------------------------
#
# Rows are assembled in file order with Arrow `take` (no joins, so no sort is needed to restore the
# order), DuckDB evaluates the field expressions over that one table in bounded chunks, defects are
# scattered in with `replace_with_mask`, and each file is written by Arrow's CSV writer (which quotes
# every text value; the contract's CSV reader must accept quoted and unquoted fields alike).

CHUNK_ROWS = 600_000


def arrow_dates(days: np.ndarray) -> pa.Array:
    return pa.array(days, type=pa.int32(), mask=days == NA_DAY).cast(pa.date32())


def arrow_coded(positions: np.ndarray, values: tuple[str, ...]) -> pa.Array:
    """Dictionary-encoded wording (cheap to `take`; DuckDB reads it as a string enum)."""
    idx = pa.array(positions.astype(np.int32), mask=positions < 0)
    return pa.DictionaryArray.from_arrays(idx, pa.array(values, type=pa.string()))


EVENT_LISTS = {
    "event_type": "event_type", "outcome": "event_outcome", "route": "request_route_of_access",
    "assessment_type": "assessment_type", "eligible": "eligible_needs_identified",
    "assessment_method": "method_of_contact", "review_reason": "review_reason",
    "review_outcome": "review_outcomes_achieved", "review_method": "method_of_contact",
    "service_type": "service_type", "service_component": "service_component",
    "delivery": "delivery_mechanism", "cost_frequency": "cost_frequency_unit_type",
}


def area_letters(la_idx: int) -> str:
    """Synthetic postcode area letters per council (valid format; not a real area lookup), a
    different pair for each of up to 441 councils: postcodes shared across councils would make
    people crowd into far fewer postcodes than real ones hold, which misleads linkage."""
    letters = "ABCDEFGHJKLMNOPRSTUWY"
    n = len(letters)
    return letters[(la_idx // n + 2 * la_idx + 1) % n] + letters[(la_idx * 8 + 3) % n]


def postcode_sql(area: str, person: str) -> str:
    """A valid-format synthetic postcode: council area letters, district, sector and unit letters."""
    u = INWARD_UNIT_LETTERS
    return (f"{area} || CAST({person}pc_district AS VARCHAR) || ' ' || CAST({person}pc_sector AS VARCHAR) || "
            f"substr('{u}', 1 + {person}pc_unit // {len(u)}, 1) || substr('{u}', 1 + {person}pc_unit % {len(u)}, 1)")


def _fmt(expr: str) -> str:
    """The council's date format (strftime needs a constant format, hence the CASE)."""
    return f"CASE WHEN f_date_fmt = '{UK}' THEN strftime({expr}, '{UK}') ELSE CAST({expr} AS VARCHAR) END"


def la_person_id_sql(no: str, style: str = "f_pid_style", la_name: str = "f_la_name") -> str:
    """A council's LA person id as it writes it, from the person's number within the council."""
    return f"""CASE {style}
        WHEN 0 THEN CAST({no} AS VARCHAR)
        WHEN 1 THEN 'P' || lpad(CAST({no} AS VARCHAR), 8, '0')
        ELSE upper(substr({la_name}, 1, 3)) || '-' || CAST({no} AS VARCHAR) END"""


def field_expressions(vocab: Vocabularies) -> dict[str, str]:
    """SQL for every submitted field over the assembled row table (prefixes: f_ file, r_ row,
    e_ event, p_ person, lp_ linked cared-for person, fn_/ln_/gp_/pv_ name lookups)."""
    et, ct, eo = vocab["event_type"], vocab["client_type"], vocab["event_outcome"]
    is_service = f"e_event_type = '{et.values[et.idx('service')]}'"
    is_user = f"p_client_type = '{ct.values[ct.idx('service_user')]}'"
    open_at_period_end = f"({is_service} AND (e_end_date IS NULL OR e_end_date > f_period_end))"
    continuation = eo.values[eo.idx("continuation")]

    la_person_id = la_person_id_sql

    return {
        "LA_Code": "f_la_code",
        "LA_Name": "f_la_name",
        "Reporting_Period_Start_Date": "f_period_start_text",
        "Reporting_Period_End_Date": "f_period_end_text",
        "NHS_Number": "CASE WHEN p_nhs_number > 0 THEN CAST(p_nhs_number AS VARCHAR) END",
        "LA_Person_Unique_Identifier": la_person_id("p_la_person_no"),
        "First_Name": "fn_name",
        "Last_Name": "ln_name",
        "GP_Practice_Code": ("chr(CAST(65 + f_la_idx % 26 AS INTEGER)) || "
                             "lpad(CAST(81000 + (f_la_idx * 40 + p_gp_practice) % 99999 AS VARCHAR), 5, '0')"),
        "GP_Practice_Name": "gp_name || ' Medical Practice'",
        "Gender": "p_gender",
        "Ethnicity": "p_ethnicity",
        "Date_of_Birth": _fmt("p_dob"),
        "Date_of_Death": _fmt("CASE WHEN p_dod <= f_period_end THEN p_dod END"),
        "Client_Type": "p_client_type",
        "Primary_Support_Reason": "p_primary_support_reason",
        "Postcode": postcode_sql("f_pc_area", "p_"),
        "Accommodation_Status": "p_accommodation_status",
        "Employment_Status": "p_employment_status",
        "Has_Unpaid_Carer": "p_has_unpaid_carer",
        # Service-user-only fields are left blank on carers' rows.
        "Autism_Spectrum_Disorder_ASD": f"CASE WHEN {is_user} THEN p_autism_spectrum_disorder_asd END",
        "Visual_Impairment": f"CASE WHEN {is_user} THEN p_visual_impairment END",
        "Hearing_Impairment": f"CASE WHEN {is_user} THEN p_hearing_impairment END",
        "Dementia": f"CASE WHEN {is_user} THEN p_dementia END",
        "Client_Funding_Status": f"CASE WHEN {is_user} THEN p_client_funding_status END",
        "Event_Type": "e_event_type",
        # Some councils generate references at extract time (unstable across submissions).
        "Event_Reference": ("CASE WHEN f_pid_style = 2 THEN 'R' || CAST(f_file_id AS VARCHAR) || '-' || CAST(r_row_number AS VARCHAR) "
                            "ELSE 'EV' || CAST(e_event_id AS VARCHAR) END"),
        "Event_Start_Date": _fmt("e_start_date"),
        "Event_End_Date": _fmt("CASE WHEN e_end_date > f_period_end THEN NULL ELSE e_end_date END"),
        "Event_Description": ("CASE WHEN e_conversation = 1 THEN 'Conversation ' || CAST(1 + e_event_id % 3 AS VARCHAR) "
                              "|| ' held with the person and their family' "
                              "WHEN e_event_id % 5 = 0 THEN 'Case note summary recorded by the locality team' END"),
        "Event_Outcome": f"CASE WHEN {open_at_period_end} THEN '{continuation}' ELSE e_outcome END",
        "Request_Route_of_Access": "e_route",
        "Assessment_Type": "e_assessment_type",
        "Eligible_Needs_Identified": "e_eligible",
        "Method_of_Assessment": "e_assessment_method",
        "Review_Reason": "e_review_reason",
        "Review_Outcomes_Achieved": "e_review_outcome",
        "Method_of_Review": "e_review_method",
        "Total_Hrs_Caring_per_week": "p_hrs_caring",
        "No_of_adults_being_cared_for": "CAST(p_adults_cared_for AS VARCHAR)",
        "Adult_1_Linked_Person_ID": f"CASE WHEN lp_la_person_no IS NOT NULL THEN {la_person_id('lp_la_person_no')} END",
        "Adult_2_Linked_Person_ID": "CAST(NULL AS VARCHAR)",
        "Adult_3_Linked_Person_ID": "CAST(NULL AS VARCHAR)",
        "Service_Type": "e_service_type",
        "Service_Component": "e_service_component",
        "Delivery_Mechanism": "e_delivery",
        "Provider_CQC_Location_ID": "CASE WHEN e_provider IS NOT NULL THEN '1-' || CAST(100000000 + f_la_idx * 1000 + e_provider AS VARCHAR) END",
        "Provider_CQC_Location_Name": "pv_name || ' Care Services'",
        "Unit_Cost": "CAST(e_unit_cost AS VARCHAR)",
        "Cost_Frequency_Unit_Type": "e_cost_frequency",
        "Planned_units_per_week": "CAST(e_planned_units AS VARCHAR)",
    }


NAME_FIELDS = ("First_Name", "Last_Name")


def header_for(name: str, style: str) -> str:
    if style == "lower":
        return name.lower()
    if style == "spaced":
        return name.replace("_", " ")
    return name


class Renderer:
    """Writes submission files from the truth, chunk by chunk."""

    def __init__(self, con: duckdb.DuckDBPyConnection, truth: Truth, vocab: Vocabularies,
                 files: list[SubmissionFile], overrides: dict[str, tuple[np.ndarray, np.ndarray, list]]):
        from faker.providers.person.en_GB import Provider as NamePool  # maintained name lists

        self.con, self.truth, self.vocab, self.files = con, truth, vocab, files
        self.spec = load_spec()
        exprs = field_expressions(vocab)
        missing = [f.name for f in self.spec.fields if f.name not in exprs]
        if missing:
            raise RuntimeError(f"the generator has no rule for spec fields {missing}")
        self.exprs = exprs
        # overrides: field -> (file ids, row numbers, values); values None = blank
        self.overrides = overrides
        self.first_names = pa.array(list(NamePool.first_names_female) + list(NamePool.first_names_male))
        self.last_names = pa.array(list(NamePool.last_names))
        self.organisation_names = pa.array(name_pools()[1])
        p, e = truth.people, truth.events
        self.people = pa.table({
            "pid": pa.array(np.arange(len(p), dtype=np.int32)),
            "nhs_number": pa.array(truth.recorded_nhs_number()),
            "la_person_no": pa.array(p.la_person_no),
            "dob": arrow_dates(p.dob), "dod": arrow_dates(p.dod),
            "client_type": arrow_coded(p.client_type, vocab["client_type"].values),
            "pc_district": pa.array(p.postcode_district.astype(np.int32)),
            "pc_sector": pa.array(p.postcode_sector.astype(np.int32)),
            "pc_unit": pa.array(p.postcode_unit.astype(np.int32)),
            "gp_practice": pa.array(p.gp_practice.astype(np.int32)),
            "hrs_caring": arrow_coded(p.hrs_caring, vocab["total_hrs_caring_per_week"].values),
            "adults_cared_for": pa.array(p.adults_cared_for.astype(np.int32), mask=p.adults_cared_for == 0),
            **{name.lower(): arrow_coded(pos, vocab.for_field(name).values) for name, pos in p.coded.items()},
        })
        self.events = pa.table({
            "event_id": pa.array(np.arange(len(e), dtype=np.int32)),
            "start_date": arrow_dates(e.start), "end_date": arrow_dates(e.end),
            "conversation": pa.array(e.ints["conversation"].astype(np.int32)),
            "unit_cost": pa.array(e.unit_cost, mask=np.isnan(e.unit_cost)),
            "planned_units": pa.array(e.planned_units, mask=np.isnan(e.planned_units)),
            "provider": pa.array(e.provider, mask=e.provider < 0),
            **{col: arrow_coded(e.ints[col], vocab[name].values) for col, name in EVENT_LISTS.items()},
        })
        self.file_table = pa.table({
            "file_id": [f.file_id for f in files],
            "la_code": [f.la.submission_code for f in files],
            "la_name": [f.la.name for f in files],
            "la_idx": [f.la_idx for f in files],
            "period_start": [f.period_start for f in files],
            "period_end": [f.period_end for f in files],
            # Constant per file: formatted once here rather than on every row.
            "period_start_text": [f.period_start.strftime(f.date_format) for f in files],
            "period_end_text": [f.period_end.strftime(f.date_format) for f in files],
            "date_fmt": [f.date_format for f in files],
            "pid_style": [f.person_id_style for f in files],
            "pc_area": [area_letters(f.la_idx) for f in files],
        })

    def _assemble(self, chunk: list[SubmissionFile]) -> pa.Table:
        """Every row of the chunk's files, in file order, with the columns the expressions use."""
        p, e = self.truth.people, self.truth.events
        ev = np.concatenate([f.rows for f in chunk]).astype(np.int64)
        file_pos = np.repeat(np.array([f.file_id for f in chunk]), [f.rows.size for f in chunk])
        row_number = np.concatenate([np.arange(1, f.rows.size + 1, dtype=np.int32) for f in chunk])
        person = e.person[ev]
        linked = e.linked_person[ev]
        cols: dict[str, pa.Array] = {"r_pos": pa.array(np.arange(ev.size, dtype=np.int64)),
                                     "r_row_number": pa.array(row_number)}
        for name, col in zip(self.file_table.column_names, self.file_table.take(pa.array(file_pos)).columns):
            cols[f"f_{name}"] = col
        for name, col in zip(self.events.column_names, self.events.take(pa.array(ev)).columns):
            cols[f"e_{name}"] = col
        for name, col in zip(self.people.column_names, self.people.take(pa.array(person)).columns):
            cols[f"p_{name}"] = col
        lp = pa.array(linked, mask=linked < 0)
        cols["lp_la_person_no"] = self.people.column("la_person_no").take(lp)
        n_org = len(self.organisation_names)
        la = p.la_idx[person].astype(np.int64)
        cols["fn_name"] = self.first_names.take(pa.array(p.first_name[person]))
        cols["ln_name"] = self.last_names.take(pa.array(p.last_name[person]))
        cols["gp_name"] = self.organisation_names.take(pa.array((la * 40 + p.gp_practice[person]) % n_org))
        provider = e.provider[ev]
        cols["pv_name"] = self.organisation_names.take(pa.array((la * 60 + provider) % n_org, mask=provider < 0))
        return pa.table(cols)

    def _chunk_overrides(self, chunk: list[SubmissionFile]) -> tuple[pa.Table | None, list[str]]:
        """The chunk's defects as a small table keyed by row position (`set_<F>`/`val_<F>` columns)."""
        offset, start = {}, 0
        for f in chunk:
            offset[f.file_id] = start
            start += f.rows.size
        positions: dict[int, dict[str, str | None]] = {}
        for name, (file_ids, row_numbers, values) in self.overrides.items():
            for k in np.flatnonzero(np.isin(file_ids, list(offset))):
                positions.setdefault(offset[int(file_ids[k])] + int(row_numbers[k]) - 1, {})[name] = values[k]
        if not positions:
            return None, []
        names = sorted({n for changes in positions.values() for n in changes})
        cols: dict[str, pa.Array] = {"r_pos": pa.array(list(positions), pa.int64())}
        for name in names:
            cols[f"set_{name}"] = pa.array([name in c for c in positions.values()])
            cols[f"val_{name}"] = pa.array([c.get(name) for c in positions.values()], pa.string())
        return pa.table(cols), names

    def write(self, landing: Path, staging: Path) -> None:
        pending: list[SubmissionFile] = []
        rows = 0
        for f in self.files:
            pending.append(f)
            rows += f.rows.size
            if rows >= CHUNK_ROWS:
                self._write_chunk(pending, landing, staging)
                pending, rows = [], 0
        if pending:
            self._write_chunk(pending, landing, staging)

    def _write_chunk(self, chunk: list[SubmissionFile], landing: Path, staging: Path) -> None:
        self.con.register("assembled", self._assemble(chunk))
        overrides, fields = self._chunk_overrides(chunk)
        select = ", ".join(
            f'CASE WHEN o."set_{f.name}" THEN o."val_{f.name}" ELSE {self.exprs[f.name]} END AS "{f.name}"'
            if f.name in fields else f'{self.exprs[f.name]} AS "{f.name}"'
            for f in self.spec.fields)
        join = ""
        if overrides is not None:
            self.con.register("chunk_overrides", overrides)
            join = "LEFT JOIN chunk_overrides o USING (r_pos)"
        rendered = self.con.sql(f"SELECT r_pos, {select} FROM assembled {join}").to_arrow_table()
        self.con.unregister("assembled")
        if overrides is not None:
            self.con.unregister("chunk_overrides")
        # The join keeps the scan order (insertion order is preserved); verify rather than trust it.
        pos = rendered.column("r_pos").to_numpy()
        if pos.size and not (np.diff(pos) > 0).all():
            rendered = rendered.take(pa.array(np.argsort(pos)))
        rendered = rendered.drop_columns(["r_pos"])
        parts, start = [], 0
        for f in chunk:
            part = rendered.slice(start, f.rows.size)
            start += f.rows.size
            if not f.include_names:
                part = part.drop_columns(list(NAME_FIELDS))
            parts.append((f, part.rename_columns([header_for(c, f.header_style) for c in part.column_names])))
        # Arrow's CSV writer releases the GIL: two files at a time use both cores.
        with ThreadPoolExecutor(max_workers=2) as pool:
            for _ in pool.map(lambda fp: self._write_file(fp[0], fp[1], landing, staging), parts):
                pass

    def _write_file(self, f: SubmissionFile, part: pa.Table, landing: Path, staging: Path) -> None:
        tmp = staging / f.file_name
        bom_crlf = f.extra.get("bom_crlf", False)
        options = pacsv.WriteOptions(quoting_header="none", eol="\r\n" if bom_crlf else "\n")
        with tmp.open("wb") as out:
            if bom_crlf:
                out.write(b"\xef\xbb\xbf")  # some councils' tools write a byte-order mark and CRLF
            pacsv.write_csv(part, out, options)
        target = landing / f.file_name
        tmp.replace(target)  # atomic: the sensor never sees a half-written file
        ts = f.submitted_at.replace(tzinfo=dt.timezone.utc).timestamp()
        os.utime(target, (ts, ts))


def day_to_date(day: int) -> dt.date:
    return EPOCH + dt.timedelta(days=int(day))
