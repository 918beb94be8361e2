"""Defect injection with a manifest, so tests can assert that the pipeline finds every defect.

Each defective row gets exactly one defect kind (touching one field, or two for missing identifiers).
`EXPECTED` says what the validation layer must do with the row: `reject` (fatal), `flag` (kept with a
data-quality flag), or `keep` (kept; the value is simply carried safely); `RULE` names the rule.
"""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass

import numpy as np

from cld_pipeline.reference import load_local_authorities
from cld_pipeline.spec import load_spec, normalise_header
from cld_pipeline.synthetic.config import DefectRates
from cld_pipeline.synthetic.simulate import NA_DAY, Truth, long_term_mask
from cld_pipeline.synthetic.submissions import SubmissionFile, day_to_date
from cld_pipeline.synthetic.vocab import Vocabularies

EXPECTED = {
    "invalid_code": "flag",
    "release1_value": "flag",
    "case_whitespace": "flag",
    "null_literal": "flag",
    "mandatory_blank": "flag",
    "missing_nhs_number": "flag",
    "invalid_nhs_number": "flag",
    "missing_identifiers": "reject",
    "bad_date": "reject",
    "missing_start_date": "reject",
    "reversed_dates": "reject",
    "open_request": "reject",
    "unknown_event_type": "reject",
    "wrong_la_code": "reject",
    "future_date": "flag",
    "event_after_death": "flag",
    "formula_string": "keep",
    "stray_encoding": "keep",
}

# The validation rule (cld_pipeline/lib/validation/rules.py) that must find each defect.
RULE = {
    "invalid_code": "invalid_code",
    "release1_value": "release1_value",
    "case_whitespace": "normalised",
    "null_literal": "null_literal",
    "mandatory_blank": "mandatory_blank",
    "missing_nhs_number": "mandatory_blank",
    "invalid_nhs_number": "invalid_nhs_number",
    "missing_identifiers": "no_usable_person_identifier",
    "bad_date": "event_start_date_invalid",
    "missing_start_date": "event_start_date_invalid",
    "reversed_dates": "end_before_start",
    "open_request": "end_date_missing",
    "unknown_event_type": "event_type_unmappable",
    "wrong_la_code": "la_code_mismatch",
    "future_date": "future_date",
    "event_after_death": "event_after_death",
    "formula_string": "",
    "stray_encoding": "",
}

# Persistent defects (`DefectInjector.persistent`) as a multiple of the row rate of the same kind:
# the share of long-term clients with an invalid accommodation code on every row, and of service
# users' requests with no outcome in any file.
PERSISTENT_SHARE = {"invalid_code": 1.5, "mandatory_blank": 3.0}

UNKNOWN_EVENT_TYPES = ("Telephone contact", "Safeguarding enquiry", "Information only")
FORMULAS = ('=HYPERLINK("http://example.invalid","open")', "+SUM(1+1)", "@cmd|' /C calc'!A0", "-2+3")
MOJIBAKE = ("St Anne\u00e2\u0080\u0099s Lodge", "Caf\u00c3\u00a9 Court", "Ren\u00c3\u00a9e House")

# Coded fields a defect may target, by event type key (None = every event type).
PERSON_CODED = ("Gender", "Ethnicity", "Accommodation_Status", "Primary_Support_Reason", "Has_Unpaid_Carer")
EVENT_CODED = {
    None: ("Event_Outcome",),
    "request": ("Request_Route_of_Access",),
    "assessment": ("Assessment_Type", "Method_of_Assessment"),
    "review": ("Review_Reason", "Method_of_Review"),
    "service": ("Service_Type", "Service_Component", "Delivery_Mechanism"),
}
EVENT_COLUMN = {  # field -> Events.ints column
    "Event_Outcome": "outcome", "Request_Route_of_Access": "route", "Assessment_Type": "assessment_type",
    "Method_of_Assessment": "assessment_method", "Review_Reason": "review_reason",
    "Method_of_Review": "review_method", "Service_Type": "service_type",
    "Service_Component": "service_component", "Delivery_Mechanism": "delivery",
}
NULLABLE_OPTIONAL = ("Dementia", "Visual_Impairment", "Hearing_Impairment", "GP_Practice_Code")
MANDATORY_PERSON = ("Ethnicity", "Gender", "Accommodation_Status", "Has_Unpaid_Carer")


@dataclass
class Defect:
    file_id: int
    row_number: int
    defect: str
    changes: dict[str, str | None]   # field -> injected text (None = blank)


def _norm(value: str) -> str:
    return re.sub(r"\s+", " ", value.strip()).lower()


class DefectInjector:
    def __init__(self, truth: Truth, vocab: Vocabularies, rng: np.random.Generator):
        self.truth, self.v, self.rng = truth, vocab, rng
        self.spec = load_spec()
        et = vocab["event_type"]
        self.type_key = {et.idx(k): k for k in ("request", "assessment", "service", "review")}
        # Every spelling the validator accepts after normalisation, per list (for typo safety).
        self.known = {
            name: {_norm(x) for x in (*cl.cleaned_values, *cl.release1, *cl.variants)}
            for name, cl in self.spec.code_lists.items()
        }
        # Release 1 spellings that differ from every Release 2 value even after normalisation.
        self.release1_only = {
            name: [raw for raw in cl.release1 if _norm(raw) not in {_norm(x) for x in cl.value_strings}]
            for name, cl in self.spec.code_lists.items()
        }

    def _fmt(self, day: int, f: SubmissionFile) -> str:
        return day_to_date(day).strftime(f.date_format)

    def _current(self, field: str, event: int, person: int) -> str | None:
        if field in EVENT_COLUMN:
            pos = int(self.truth.events.ints[EVENT_COLUMN[field]][event])
        else:
            pos = int(self.truth.people.coded[field][person])
        return None if pos < 0 else self.v.for_field(field).values[pos]

    def _coded_candidates(self, event: int) -> list[str]:
        key = self.type_key[int(self.truth.events.ints["event_type"][event])]
        return [*PERSON_CODED, *EVENT_CODED[None], *EVENT_CODED[key]]

    def _typo(self, list_name: str, value: str) -> str:
        rng = self.rng
        for _ in range(5):
            k = int(rng.integers(1, max(2, len(value) - 1)))
            typo = value[:k] + value[k + 1:]
            if _norm(typo) not in self.known[list_name]:
                return typo
        return value + " (please specify)"

    def persistent(self, rates: DefectRates) -> tuple[np.ndarray, dict[int, str]]:
        """Defects a council's system repeats in every file: requests whose outcome was never
        recorded (events), and people whose accommodation is held as a code that maps to nothing
        (person -> the invalid text, on every row). Unlike row defects they survive de-duplication
        and the latest-person-details rules, which is what the waiting times and ASCOF 2E meet."""
        rng, e, p, v = self.rng, self.truth.events, self.truth.people, self.v
        user = p.client_type[e.person] == v["client_type"].idx("service_user")
        long_term = long_term_mask(e, v)
        clients = np.unique(e.person[long_term & user])
        chosen = clients[rng.random(clients.size) < rates.invalid_code * PERSISTENT_SHARE["invalid_code"]]
        acc = v["accommodation_status"]
        accommodation = {int(q): self._typo(acc.name, acc.values[int(p.coded["Accommodation_Status"][q])])
                         for q in chosen}
        requests = np.flatnonzero((e.ints["event_type"] == v["event_type"].idx("request")) & user
                                  & ~np.isin(e.person, chosen))
        blank = requests[rng.random(requests.size) < rates.mandatory_blank * PERSISTENT_SHARE["mandatory_blank"]]
        return blank, accommodation

    def inject(self, files: list[SubmissionFile], rates: DefectRates) -> list[Defect]:
        defects: list[Defect] = []
        other_codes = [la.submission_code for la in load_local_authorities()]
        e = self.truth.events
        service = self.v["event_type"].idx("service")
        blank_outcome, bad_accommodation = self.persistent(rates)
        bad_people = np.array(sorted(bad_accommodation), dtype=np.int64)
        for f in files:
            n = f.rows.size
            used = np.zeros(n, dtype=bool)
            for i in np.flatnonzero(np.isin(f.rows, blank_outcome)):
                used[i] = True
                defects.append(Defect(f.file_id, int(i) + 1, "mandatory_blank", {"Event_Outcome": None}))
            person = e.person[f.rows]
            for i in np.flatnonzero(np.isin(person, bad_people) & ~used):
                used[i] = True
                defects.append(Defect(f.file_id, int(i) + 1, "invalid_code",
                                      {"Accommodation_Status": bad_accommodation[int(person[i])]}))
            ev_type = e.ints["event_type"][f.rows]
            end = e.end[f.rows]
            end_written = (end != NA_DAY) & (end <= (f.period_end - dt.date(1970, 1, 1)).days)
            has_nhs = self.truth.recorded_nhs_number()[e.person[f.rows]] > 0
            eligible = {
                "missing_nhs_number": has_nhs,
                "invalid_nhs_number": has_nhs,
                "open_request": ev_type != service,
                "reversed_dates": end_written,
                "future_date": ev_type == service,
            }
            for kind, rate in rates.items():
                count = int(self.rng.binomial(n, min(1.0, rate * f.defect_factor)))
                if count == 0:
                    continue
                pool = np.flatnonzero(eligible.get(kind, True) & ~used)
                if pool.size == 0:
                    continue
                picked = self.rng.choice(pool, size=min(count, pool.size), replace=False)
                used[picked] = True
                for i in picked:
                    changes = self._changes(kind, f, int(f.rows[i]), other_codes)
                    if changes:
                        defects.append(Defect(f.file_id, int(i) + 1, kind, changes))
        return defects

    def _changes(self, kind: str, f: SubmissionFile, event: int, other_codes: list[str]) -> dict[str, str | None] | None:
        rng, e, p = self.rng, self.truth.events, self.truth.people
        person = int(e.person[event])
        choose = lambda seq: seq[int(rng.integers(0, len(seq)))]  # noqa: E731
        if kind in ("invalid_code", "case_whitespace"):
            fields = [x for x in self._coded_candidates(event) if self._current(x, event, person)]
            field = choose(fields)
            value = self._current(field, event, person)
            if kind == "invalid_code":
                return {field: self._typo(self.spec.codes_for(field).name, value)}
            return {field: f"  {value.upper() if rng.random() < 0.5 else value.lower()} "}
        if kind == "release1_value":
            options = [(field, raw) for field in self._coded_candidates(event)
                       for raw in self.release1_only[self.spec.codes_for(field).name]]
            field, raw = choose(options)
            return {field: raw}
        if kind == "null_literal":
            return {choose(NULLABLE_OPTIONAL): "NULL"}
        if kind == "mandatory_blank":
            return {choose(MANDATORY_PERSON): None}
        if kind == "missing_nhs_number":
            return {"NHS_Number": None}
        if kind == "invalid_nhs_number":
            number = str(p.nhs_number[person])
            return {"NHS_Number": number[:9] + str((int(number[9]) + 1 + int(rng.integers(0, 8))) % 10)}
        if kind == "missing_identifiers":
            return {"NHS_Number": None, "LA_Person_Unique_Identifier": None}
        if kind == "bad_date":
            year = f.period_end.year
            bad = choose([f"31/02/{year}", f"{year}-02-30", f"{year}-13-01", "not recorded", f"00/00/{year}"])
            return {"Event_Start_Date": bad}
        if kind == "missing_start_date":
            return {"Event_Start_Date": None}
        if kind == "reversed_dates":
            return {"Event_End_Date": self._fmt(int(e.start[event]) - int(rng.integers(1, 61)), f)}
        if kind == "open_request":
            return {"Event_End_Date": None}
        if kind == "unknown_event_type":
            return {"Event_Type": choose(UNKNOWN_EVENT_TYPES)}
        if kind == "wrong_la_code":
            return {"LA_Code": choose([c for c in other_codes if c != f.la.submission_code])}
        if kind == "future_date":
            submitted_day = (f.submitted_at.date() - dt.date(1970, 1, 1)).days
            return {"Event_End_Date": self._fmt(submitted_day + int(rng.integers(30, 400)), f)}
        if kind == "event_after_death":
            return {"Date_of_Death": self._fmt(int(e.start[event]) - int(rng.integers(5, 200)), f)}
        if kind == "formula_string":
            return {"Event_Reference": choose(FORMULAS)}
        if kind == "stray_encoding":
            field = "Provider_CQC_Location_Name" if e.provider[event] >= 0 else "GP_Practice_Name"
            return {field: choose(MOJIBAKE)}
        raise ValueError(f"unknown defect kind {kind}")


def overrides_by_field(defects: list[Defect]) -> dict[str, tuple[np.ndarray, np.ndarray, list]]:
    """field -> (file ids, row numbers, injected values) for the renderer (None = blank)."""
    out: dict[str, tuple[list, list, list]] = {}
    for d in defects:
        for field, value in d.changes.items():
            ids, rows, values = out.setdefault(field, ([], [], []))
            ids.append(d.file_id)
            rows.append(d.row_number)
            values.append(value)
    return {f: (np.array(i), np.array(r), v) for f, (i, r, v) in out.items()}


def manifest_rows(defects: list[Defect], files: list[SubmissionFile]) -> list[dict]:
    names = {f.file_id: f.file_name for f in files}
    header_lookup = load_spec().header_lookup()
    rows = []
    for d in defects:
        for field, value in d.changes.items():
            assert header_lookup[normalise_header(field)] == field
            rows.append({"file_name": names[d.file_id], "row_number": d.row_number, "field": field,
                         "defect": d.defect, "injected_value": "" if value is None else value,
                         "expected": EXPECTED[d.defect], "rule": RULE[d.defect]})
    return rows
