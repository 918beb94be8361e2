"""Vectorised simulation of people and their care journeys (the "truth" behind the submissions).

Everything is numpy arrays: dates are int32 days since 1970-01-01 (NA_DAY when absent), coded values
are int16 positions in a code list's Release 2 values (-1 when absent). A person's journey runs
request -> (reablement | assessment) -> services -> reviews with consistent dates and outcomes;
carers are linked to the people they care for; deaths end services and stop later events.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np

from cld_pipeline.lib.privacy.identifiers import never_issued_nhs_numbers, never_issued_valid_numbers
from cld_pipeline.reference import LocalAuthority
from cld_pipeline.synthetic.vocab import Vocabularies

NA_DAY = np.iinfo(np.int32).min
EPOCH = dt.date(1970, 1, 1)

# Journey paths for service users and their shares (long-term support journeys start up to
# LTS_HISTORY_YEARS before the first window so that the stock of open services is realistic).
PATHS = ("contact", "reablement", "low_level", "assessment_only", "long_term")
PATH_SHARES = np.array([0.36, 0.16, 0.08, 0.12, 0.28])
LTS_HISTORY_YEARS = 3
# Share of long-term journeys that are long-standing (begun up to 15 years, for people of working
# age, or 8 years before the simulated span), so that the stock of care-home residents is realistic
# while new admissions stay at the published rates (2B, 2C, 2E).
LONG_STANDING_SHARE = (0.45, 0.40)   # working-age, 65 and over
LONG_TERM_KEYS = ("lts_nursing", "lts_residential", "lts_community", "lts_prison")


def long_term_mask(events, vocab) -> np.ndarray:
    """Which events are long-term services."""
    return np.isin(events.ints["service_type"], [vocab["service_type"].idx(k) for k in LONG_TERM_KEYS])
# What follows reablement (ASCOF 2A sequel), with the ST-Max outcome each comes with. Shares are
# calibrated to the published 2A (config.PUBLISHED_TARGETS): about one in five clusters is followed
# by long-term or short-term residential/nursing care.
SEQUELS = ("plain", "long_term", "short_term_care", "other_short_term", "low_level", "nested_equipment",
           "follow_up", "death", "hospital")
SEQUEL_SHARES = np.array([0.58, 0.15, 0.035, 0.03, 0.04, 0.03, 0.06, 0.005, 0.07])
REABLEMENT_OUTCOMES = {
    "plain": {"nfa_ended_planned": 62, "progress_assessment": 15, "nfa_declined": 6, "nfa_ended_other": 10,
              "nfa_information": 4, "nfa_other_service": 3},
    "long_term": {"progress_services": 75, "nfa_ended_planned": 25},
    "short_term_care": {"progress_services": 60, "nfa_ended_planned": 40},
    "other_short_term": {"progress_services": 50, "nfa_ended_planned": 50},
    "low_level": {"progress_services": 50, "nfa_ended_planned": 50},
    "nested_equipment": {"progress_services": 1},
    "follow_up": {"progress_assessment": 1},
    "death": {"nfa_ended_planned": 60, "progress_services": 40},
    "hospital": {"admitted_hospital": 1},
}
# Share of long-term clients who die on each first and last day of a reporting year.
PERIOD_DAY_DEATH_SHARE = 0.003
PERIOD_DAY_DEATHS_AT_LEAST = 4
# Journey starts per month at scale 1 (calibrated: see config.ROWS_PER_PERSON).
JOURNEYS_PER_TARGET_ROW_MONTH = 1 / 2.42


@lru_cache(maxsize=1)
def name_pools() -> tuple[np.ndarray, tuple[str, ...]]:
    """Positions in the surname list that people draw from, and the names GP practices and care
    providers are called after: none of the latter contains a person's first or last name, so an
    organisation's name never reads as a person's name (the privacy tests look for those)."""
    from faker.providers.person.en_GB import Provider as NamePool  # maintained name lists

    surnames = list(NamePool.last_names)
    first = set(NamePool.first_names_female) | set(NamePool.first_names_male)
    kept = [n for i, n in enumerate(surnames) if i % 4 == 3]
    people = [i for i, n in enumerate(surnames) if i % 4 != 3 and not any(n in k for k in kept)]
    organisations = tuple(k for k in kept if not any(x in k for x in first)
                          and not any(surnames[i] in k for i in people))
    return np.array(people, dtype=np.int32), organisations


def to_day(d: dt.date) -> int:
    return (d - EPOCH).days


def add_months(d: dt.date, months: int) -> dt.date:
    y, m = divmod(d.month - 1 + months, 12)
    return dt.date(d.year + y, m + 1, 1)


@dataclass
class People:
    """Person-level truth. Index = person id."""

    la_idx: np.ndarray
    nhs_number: np.ndarray          # int64, every person has a real one (LAs may not submit it)
    la_person_no: np.ndarray        # int64, unique within LA; formatted per LA style when written
    dob: np.ndarray
    dod: np.ndarray                 # NA_DAY when alive at the end of the simulation
    client_type: np.ndarray         # client_type positions
    coded: dict[str, np.ndarray]    # field name -> positions (Gender, Ethnicity, ...)
    first_name: np.ndarray          # positions in the name pools
    last_name: np.ndarray
    postcode_district: np.ndarray   # 0.. per-LA district number
    postcode_sector: np.ndarray
    postcode_unit: np.ndarray       # 0..399, two unit letters
    gp_practice: np.ndarray         # 0.. per-LA practice number
    hrs_caring: np.ndarray          # total_hrs_caring positions (-1 for non-carers)
    adults_cared_for: np.ndarray    # int8 (0 for non-carers)

    def __len__(self) -> int:
        return self.la_idx.size


EVENT_INT_COLUMNS = (
    "event_type", "outcome", "route", "assessment_type", "eligible", "assessment_method",
    "review_reason", "review_outcome", "review_method", "service_type", "service_component",
    "delivery", "cost_frequency", "conversation",
)


@dataclass
class Events:
    """Event-level truth, one row per CLD event."""

    person: np.ndarray
    start: np.ndarray
    end: np.ndarray
    ints: dict[str, np.ndarray]     # EVENT_INT_COLUMNS -> int16 positions (-1 absent)
    unit_cost: np.ndarray           # float64, NaN absent
    planned_units: np.ndarray
    provider: np.ndarray            # int32 per-LA provider number, -1 absent
    linked_person: np.ndarray       # int32 person id of the cared-for adult, -1 absent

    def __len__(self) -> int:
        return self.person.size


class _EventBlocks:
    """Collects blocks of events of one kind and concatenates them once."""

    def __init__(self):
        self.blocks: list[dict[str, np.ndarray]] = []

    def add(self, person, start, end, **cols):
        n = person.size
        block = {"person": person.astype(np.int32), "start": start.astype(np.int32),
                 "end": end.astype(np.int32)}
        for name in EVENT_INT_COLUMNS:
            block[name] = np.broadcast_to(np.asarray(cols.pop(name, -1), dtype=np.int16), n).copy()
        for name, fill in (("unit_cost", np.nan), ("planned_units", np.nan)):
            block[name] = np.broadcast_to(np.asarray(cols.pop(name, fill), dtype=np.float64), n).copy()
        for name in ("provider", "linked_person"):
            block[name] = np.broadcast_to(np.asarray(cols.pop(name, -1), dtype=np.int32), n).copy()
        if cols:
            raise TypeError(f"unknown event columns {sorted(cols)}")
        self.blocks.append(block)

    def build(self) -> Events:
        cat = {k: np.concatenate([b[k] for b in self.blocks]) for k in self.blocks[0]}
        # Councils state planned units with every cost (one unit for weekly or one-off prices).
        costed = ~np.isnan(cat["unit_cost"]) & np.isnan(cat["planned_units"])
        cat["planned_units"][costed] = 1.0
        return Events(
            person=cat["person"], start=cat["start"], end=cat["end"],
            ints={k: cat[k] for k in EVENT_INT_COLUMNS},
            unit_cost=cat["unit_cost"], planned_units=cat["planned_units"],
            provider=cat["provider"], linked_person=cat["linked_person"],
        )


@dataclass
class Truth:
    people: People
    events: Events
    councils: list[LocalAuthority]
    sim_start: int
    sim_end: int
    stats: dict = field(default_factory=dict)
    nhs_recorded: np.ndarray | None = None   # per person: the council records the NHS number (None: all who have one)

    def recorded_nhs_number(self) -> np.ndarray:
        """The NHS number as councils write it: 0 where the person has none or it is not recorded."""
        numbers = self.people.nhs_number
        return numbers if self.nhs_recorded is None else np.where(self.nhs_recorded, numbers, 0)


class Simulator:
    """Builds the truth for a set of councils over the simulated span."""

    def __init__(self, vocab: Vocabularies, rng: np.random.Generator):
        self.v = vocab
        self.rng = rng

    # -- helpers -------------------------------------------------------------------------------------
    def _pick(self, list_name: str, size: int, keys_weights: dict[str, float]) -> np.ndarray:
        voc = self.v[list_name]
        among = np.array([voc.idx(k) for k in keys_weights], dtype=np.int16)
        return voc.sample(self.rng, size, among=among, weights=np.array(list(keys_weights.values())))

    def _gamma_days(self, size: int, shape: float, scale: float, cap: int = 10_000) -> np.ndarray:
        return np.minimum(self.rng.gamma(shape, scale, size), cap).astype(np.int32)

    # -- people --------------------------------------------------------------------------------------
    def people(self, councils: list[LocalAuthority], count: int, carers: int, hospital_only: int,
               ref_day: int) -> People:
        """Service users, then carers, then people known only to hospitals (index ranges in that order)."""
        rng, v = self.rng, self.v
        carers += hospital_only  # hospital-only people share the carers' adult age profile
        total = count + carers
        # LA volumes proportional to adult population, weighted towards older populations.
        pop = np.array([la.population_18_plus * 0.35 + la.population_65_plus * 0.65 for la in councils])
        la_idx = rng.choice(len(councils), size=count, p=pop / pop.sum()).astype(np.int16)

        # Ages of service users: mostly 65+ (working-age adults about 30%).
        band = rng.choice(5, size=count, p=[0.30, 0.19, 0.25, 0.21, 0.05])
        lo = np.array([18, 65, 75, 85, 95])[band]
        hi = np.array([65, 75, 85, 95, 104])[band]
        age = rng.uniform(lo, hi)
        carer_age = rng.uniform(35, 85, size=carers)
        age = np.concatenate([age, carer_age])
        dob = (ref_day - age * 365.25).astype(np.int32)

        client_type = np.full(total, v["client_type"].idx("service_user"), dtype=np.int16)
        client_type[count:] = v["client_type"].idx("unpaid_carer")

        coded: dict[str, np.ndarray] = {}
        for name in ("Gender", "Ethnicity", "Accommodation_Status", "Has_Unpaid_Carer",
                     "Autism_Spectrum_Disorder_ASD", "Visual_Impairment", "Hearing_Impairment",
                     "Dementia", "Client_Funding_Status", "Primary_Support_Reason"):
            coded[name] = self.v.for_field(name).sample(rng, total)

        psr = v["primary_support_reason"]
        working_age = age < 65
        # Working-age service users: learning disability and mental health are far more common.
        wa_weights = psr.weights.copy()
        for key, boost in (("learning_disability", 4.0), ("mental_health", 2.0)):
            wa_weights[psr.idx(key)] *= boost
        wa = np.flatnonzero(working_age[:count])
        coded["Primary_Support_Reason"][wa] = psr.sample(rng, wa.size, among=np.arange(len(psr.values), dtype=np.int16),
                                                         weights=wa_weights)
        coded["Primary_Support_Reason"][count:] = psr.idx("support_to_carer")

        emp = v["employment_status"]
        employment = emp.sample(rng, total)
        older = np.flatnonzero(age >= 65)
        employment[older] = np.where(rng.random(older.size) < 0.9, emp.idx("retired"), emp.idx("unknown"))
        coded["Employment_Status"] = employment

        hrs = np.full(total, -1, dtype=np.int16)
        hrs[count:] = v["total_hrs_caring_per_week"].sample(rng, carers)
        adults = np.zeros(total, dtype=np.int8)
        adults[count:] = np.where(rng.random(carers) < 0.9, 1, 2)

        sex = coded["Gender"]
        from faker.providers.person.en_GB import Provider as NamePool  # maintained name lists
        n_first = len(NamePool.first_names_female)
        surnames = name_pools()[0]
        first_name = rng.integers(0, n_first, size=total)
        first_name = np.where(sex == v["gender"].idx("male"), first_name + n_first, first_name)

        # Hospital-only people live anywhere; carers are moved to their cared-for person's LA later.
        others_la = rng.choice(len(councils), size=carers, p=pop / pop.sum()).astype(np.int16)
        return People(
            la_idx=np.concatenate([la_idx, others_la]),
            nhs_number=allocate_nhs_numbers(total, rng),
            la_person_no=np.zeros(total, dtype=np.int64),                       # assigned per LA below
            dob=dob,
            dod=np.full(total, NA_DAY, dtype=np.int32),
            client_type=client_type,
            coded=coded,
            first_name=first_name.astype(np.int32),
            last_name=surnames[rng.integers(0, len(NamePool.last_names), size=total) * surnames.size
                               // len(NamePool.last_names)],
            postcode_district=rng.integers(1, 30, size=total).astype(np.int16),
            postcode_sector=rng.integers(0, 10, size=total).astype(np.int8),
            postcode_unit=rng.integers(0, 400, size=total).astype(np.int16),
            gp_practice=rng.integers(0, 40, size=total).astype(np.int16),
            hrs_caring=hrs,
            adults_cared_for=adults,
        )

    def assign_la_person_numbers(self, people: People) -> None:
        """Unique, non-sequential LA person numbers within each council."""
        order = np.lexsort((self.rng.random(len(people)), people.la_idx))
        counts = np.bincount(people.la_idx)
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
        rank_in_la = np.empty(len(people), dtype=np.int64)
        rank_in_la[order] = np.arange(len(people)) - np.repeat(starts, counts)
        people.la_person_no = 100_000 + rank_in_la * 7 + self.rng.integers(0, 7, size=len(people))

    # -- journeys ------------------------------------------------------------------------------------
    def journeys(self, people: People, n_users: int, n_carers: int, sim_start: int, first_window: int,
                 sim_end: int, years: list[tuple[int, int]] = (), extra_share: float = 0.12) -> Events:
        """Every service user's journey and the carers' events. `years` are the 12-month periods the
        benchmark reports on (first and last day): some deaths are put on those days on purpose."""
        rng, v = self.rng, self.v
        ev = _EventBlocks()
        et = v["event_type"]
        out = v["event_outcome"]
        self._sim_start = sim_start
        self._forced_person: list[np.ndarray] = []
        self._forced_day: list[np.ndarray] = []
        self._lts: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = []  # person, start, kind, long stay

        # One primary journey per service user plus some repeat contacts.
        path = rng.choice(len(PATHS), size=n_users, p=PATH_SHARES)
        extra = rng.random(n_users) < extra_share
        j_person = np.concatenate([np.arange(n_users), np.flatnonzero(extra)]).astype(np.int32)
        j_path = np.concatenate([path, rng.choice(3, size=int(extra.sum()), p=[0.6, 0.3, 0.1])])
        n = j_person.size
        is_path = {p: j_path == i for i, p in enumerate(PATHS)}
        lts = is_path["long_term"]
        earliest = np.where(lts, sim_start, first_window - 90)
        j_start = (earliest + rng.random(n) * (sim_end - earliest)).astype(np.int32)
        # Long-standing support: some long-term clients' support began years before the simulated
        # span (their request and assessment are too old to be submitted), so that the stock of
        # care-home residents is realistic while new admissions stay at the published rates.
        adult_from = people.dob[j_person] + int(18 * 365.25)
        working_age = sim_end - people.dob[j_person] < 65 * 365.25
        legacy = (lts & (adult_from < sim_start - 365)
                  & (rng.random(n) < np.where(working_age, LONG_STANDING_SHARE[0], LONG_STANDING_SHARE[1])))
        # (At most 15 years back: every event date stays later than the youngest adult's birth date.)
        legacy_from = np.maximum(adult_from, first_window - np.where(working_age, 15, 8) * 365)
        j_start = np.where(legacy, legacy_from + rng.random(n) * (sim_start - legacy_from), j_start).astype(np.int32)

        # Who goes where after the request.
        from_hospital = is_path["reablement"] & (rng.random(n) < 0.35)
        reablement_assessed = is_path["reablement"] & ~from_hospital & (rng.random(n) < 0.75)
        low_assessed = is_path["low_level"] & (rng.random(n) < 0.9)   # an OT assessment before equipment
        assessed = is_path["assessment_only"] | lts | reablement_assessed | low_assessed
        # Same-day responses: a service (hospital discharge to reablement, equipment) or an
        # assessment that starts on the day of the request.
        same_day_service = ((from_hospital & (rng.random(n) < 0.2))
                            | (is_path["low_level"] & ~low_assessed & (rng.random(n) < 0.15)))
        same_day_assessment = assessed & (rng.random(n) < 0.04)

        # Requests: every journey starts with one.
        req_len = np.where(rng.random(n) < 0.4, 0, self._gamma_days(n, 1.2, 6, 60))
        req_len[same_day_service | same_day_assessment] = 0
        req_end = j_start + req_len
        req_outcome = np.full(n, -1, dtype=np.int16)
        contact = is_path["contact"]
        req_outcome[contact] = self._pick("event_outcome", int(contact.sum()), {
            "nfa_information": 40, "nfa_other_service": 15, "nfa_nhs": 8, "nfa_self_funded": 8,
            "nfa_declined": 9, "nfa_no_services": 10, "nfa_other": 7, "nfa_moved": 3})
        req_outcome[is_path["reablement"]] = out.idx("progress_reablement")
        req_outcome[is_path["low_level"]] = out.idx("progress_services")
        req_outcome[assessed] = out.idx("progress_assessment")
        route = v["request_route_of_access"].sample(rng, n)
        route[from_hospital] = v["request_route_of_access"].idx("hospital_discharge")
        conversation = (rng.random(n) < 0.3).astype(np.int16)
        ev.add(j_person, j_start, req_end, event_type=et.idx("request"), outcome=req_outcome,
               route=route, conversation=conversation)

        # First assessments: long-term ones take weeks; short-term ones (before reablement or
        # equipment) are quicker.
        at = v["assessment_type"]
        a_idx = np.flatnonzero(assessed)
        a_short = (reablement_assessed | low_assessed)[a_idx]
        a_start = req_end[a_idx] + np.where(a_short, self._gamma_days(a_idx.size, 1.8, 14, 120),
                                            self._gamma_days(a_idx.size, 2.0, 24, 180))
        a_start[same_day_assessment[a_idx]] = j_start[a_idx][same_day_assessment[a_idx]]
        a_end = a_start + np.where(a_short, rng.integers(0, 11, a_idx.size), rng.integers(0, 22, a_idx.size))
        a_out = self._pick("event_outcome", a_idx.size, {
            "nfa_no_services": 25, "nfa_self_funded": 20, "nfa_information": 20, "nfa_declined": 15,
            "nfa_other": 10, "nfa_nhs": 10})
        a_out[lts[a_idx] | low_assessed[a_idx]] = out.idx("progress_services")
        a_out[reablement_assessed[a_idx]] = out.idx("progress_reablement")
        a_type = np.where(a_short | (rng.random(a_idx.size) < 0.15), at.idx("short_term"), at.idx("long_term"))
        self._assessments(ev, j_person[a_idx], a_start, a_end, a_out, a_type, a_elig=lts[a_idx] | a_short)
        journey_a_end = np.full(n, NA_DAY, dtype=np.int32)
        journey_a_end[a_idx] = a_end

        # A second (sometimes third) request before the first one's assessment: a chaser or a
        # referral from another route while the person waits.
        wait = a_start - j_start[a_idx]
        second = (wait >= 1) & (rng.random(a_idx.size) < 0.07)
        s_idx = np.flatnonzero(second)
        s_start = j_start[a_idx][s_idx] + rng.integers(1, wait[s_idx] + 1)
        third = (a_start[s_idx] > s_start) & (rng.random(s_idx.size) < 0.2)
        t_start = s_start[third] + rng.integers(1, a_start[s_idx][third] - s_start[third] + 1)
        o_person = np.concatenate([j_person[a_idx][s_idx], j_person[a_idx][s_idx][third]])
        o_start = np.concatenate([s_start, t_start])
        ev.add(o_person, o_start, o_start + rng.integers(0, 4, o_start.size), event_type=et.idx("request"),
               outcome=self._pick("event_outcome", o_start.size, {"progress_assessment": 80, "nfa_other_service": 20}),
               route=v["request_route_of_access"].idx("community"),
               conversation=(rng.random(o_start.size) < 0.3).astype(np.int16))

        # Long-term support after the assessment.
        to_lts = a_idx[lts[a_idx]]
        self._lts.append((j_person[to_lts], journey_a_end[to_lts] + self._gamma_days(to_lts.size, 1.8, 11, 120),
                          np.full(to_lts.size, -1, dtype=np.int16), legacy[to_lts]))

        # Low-level support (equipment, meals, professional support), after an OT assessment or directly.
        low = np.flatnonzero(is_path["low_level"])
        l_from = np.where(low_assessed[low], journey_a_end[low], req_end[low])
        l_start = l_from + np.where(low_assessed[low], rng.integers(0, 29, low.size), rng.integers(0, 15, low.size))
        l_start[same_day_service[low]] = j_start[low][same_day_service[low]]
        self._low_level(ev, j_person[low], l_start)

        # Reablement (ST-Max): after the request, or after a short-term assessment.
        r = np.flatnonzero(is_path["reablement"])
        r_from = np.where(reablement_assessed[r], journey_a_end[r], req_end[r])
        r_start = r_from + np.where(reablement_assessed[r], rng.integers(0, 15, r.size), rng.integers(0, 6, r.size))
        r_start[same_day_service[r]] = j_start[r][same_day_service[r]]
        self._reablement(ev, people, j_person[r], r_start)

        events_lts = self._lts
        person = np.concatenate([p for p, _, _, _ in events_lts])
        start = np.concatenate([s for _, s, _, _ in events_lts]).astype(np.int32)
        kind = np.concatenate([k for _, _, k, _ in events_lts])
        long_stay = np.concatenate([x for _, _, _, x in events_lts])
        self._long_term_services(ev, people, person, start, kind, long_stay, sim_end)
        first_lts = (kind == -1) & ~long_stay  # carers look after people on long-term support
        self._carers(ev, people, n_users, n_carers, person[first_lts], start[first_lts], sim_end)
        events = ev.build()
        self._accommodation(people, events)
        self._deaths_on_period_days(events, years)
        return events

    def _assessments(self, ev: _EventBlocks, person, start, end, outcome, a_type, a_elig) -> None:
        rng, v = self.rng, self.v
        eligible = v["eligible_needs_identified"]
        elig = np.where(a_elig | (rng.random(person.size) < 0.3), eligible.idx("yes"), eligible.idx("no"))
        ev.add(person, start, end, event_type=v["event_type"].idx("assessment"), outcome=outcome,
               assessment_type=a_type, eligible=elig,
               assessment_method=v["method_of_contact"].sample(rng, person.size),
               conversation=(rng.random(person.size) < 0.2).astype(np.int16))

    def _low_level(self, ev: _EventBlocks, person: np.ndarray, start: np.ndarray,
                   one_off_only: bool = False) -> None:
        """Short-term low-level support: equipment (one-off, on its start day) or meals and
        professional support for some weeks."""
        rng, v = self.rng, self.v
        sc = v["service_component"]
        among = sc.where(lambda c: "st_low_level" in c.attrs.get("service_types", ()))
        if one_off_only:
            comp = np.full(person.size, sc.idx("equipment"), dtype=np.int16)
        else:
            comp = sc.sample(rng, person.size, among=among, weights=np.where(among == sc.idx("equipment"), 6.0, 1.0))
        one_off = comp == sc.idx("equipment")
        end = np.where(one_off, start, start + rng.integers(7, 90, person.size))
        ev.add(person, start, end, event_type=v["event_type"].idx("service"),
               outcome=v["event_outcome"].idx("nfa_ended_planned"), service_type=v["service_type"].idx("st_low_level"),
               service_component=comp, delivery=v["delivery_mechanism"].idx("commissioned"),
               unit_cost=np.where(one_off, np.round(rng.uniform(40, 800, person.size), 2), np.nan),
               cost_frequency=np.where(one_off, v["cost_frequency_unit_type"].idx("one_off"), -1))

    def _reablement(self, ev: _EventBlocks, people: People, person: np.ndarray, r_start: np.ndarray) -> None:
        """ST-Max with what follows it, so that every branch of ASCOF 2A occurs at realistic rates:
        the sequel (long-term or short-term care, other short-term or low-level support, equipment
        during reablement, a request or assessment in the next week, death, hospital), assessments
        and reviews during reablement, and ST-Max rows that chain, overlap or tie."""
        rng, v = self.rng, self.v
        et, out, st, sc = v["event_type"], v["event_outcome"], v["service_type"], v["service_component"]
        dm = v["delivery_mechanism"]
        m = person.size
        dur = 14 + self._gamma_days(m, 2.0, 12, 76)
        r_end = r_start + dur
        seq = rng.choice(len(SEQUELS), size=m, p=SEQUEL_SHARES)
        is_seq = {name: seq == i for i, name in enumerate(SEQUELS)}

        outcome = np.full(m, -1, dtype=np.int16)
        for name, weights in REABLEMENT_OUTCOMES.items():
            mask = is_seq[name]
            outcome[mask] = self._pick("event_outcome", int(mask.sum()), weights)

        # ST-Max rows: most one row; some split into two rows that overlap or follow within a week
        # (one DHSC cluster), and some with a second row of the same dates and another outcome.
        chain = rng.random(m) < 0.10
        cut = r_start + (dur * rng.uniform(0.3, 0.6, m)).astype(np.int32)
        gap = rng.integers(-5, 8, m)
        second_start = np.minimum(np.maximum(cut + gap, r_start + 1), r_end)
        last_start = np.where(chain, second_start, r_start)
        provider = rng.integers(0, 30, m)
        stmax = dict(event_type=et.idx("service"), service_type=st.idx("st_max"), delivery=dm.idx("commissioned"))
        ch = np.flatnonzero(chain)
        ev.add(person[ch], r_start[ch], cut[ch], outcome=self._pick("event_outcome", ch.size, {
            "continuation": 45, "progress_reablement": 25, "nfa_ended_planned": 30}),
               service_component=sc.idx("reablement"), provider=provider[ch], **stmax)
        ev.add(person, last_start, r_end, outcome=outcome, service_component=sc.idx("reablement"),
               provider=provider, **stmax)
        tie = np.flatnonzero(rng.random(m) < 0.03)
        tie_choices = np.array([out.idx(k) for k in ("nfa_ended_planned", "nfa_ended_other", "progress_services",
                                                      "continuation")], dtype=np.int16)
        tie_out = tie_choices[rng.integers(0, tie_choices.size, tie.size)]
        same = tie_out == outcome[tie]
        tie_out[same] = np.where(outcome[tie][same] == tie_choices[0], tie_choices[3], tie_choices[0])
        ev.add(person[tie], last_start[tie], r_end[tie], outcome=tie_out,
               service_component=sc.idx("home_support"), provider=provider[tie], **stmax)

        # Assessments and reviews during reablement, ending within 12 days of its end (none where
        # equipment alone is to settle the outcome); some people have both, with different outcomes.
        eligible_nested = ~is_seq["nested_equipment"]
        rv = np.flatnonzero(eligible_nested & (rng.random(m) < 0.35))
        rv_end = np.maximum(r_end[rv] - rng.integers(0, 13, rv.size), r_start[rv] + 1)
        rv_start = np.maximum(rv_end - rng.integers(0, 4, rv.size), r_start[rv])
        ev.add(person[rv], rv_start, rv_end, event_type=et.idx("review"),
               outcome=self._pick("event_outcome", rv.size, {
                   "nfa_ended_planned": 55, "continuation": 15, "progress_services": 10, "nfa_information": 8,
                   "nfa_declined": 4, "nfa_other": 4, "nfa_ended_other": 4}),
               review_reason=v["review_reason"].idx("short_term"),
               review_outcome=v["review_outcomes_achieved"].sample(rng, rv.size),
               review_method=v["method_of_contact"].sample(rng, rv.size))
        na = np.flatnonzero(eligible_nested & (rng.random(m) < 0.10))
        na_end = np.maximum(r_end[na] - rng.integers(0, 13, na.size), r_start[na] + 1)
        na_start = np.maximum(na_end - rng.integers(0, 6, na.size), r_start[na])
        self._assessments(ev, person[na], na_start, na_end, self._pick("event_outcome", na.size, {
            "progress_services": 30, "nfa_no_services": 25, "nfa_information": 15, "nfa_ended_planned": 15,
            "continuation": 15}), v["assessment_type"].idx("short_term"), np.ones(na.size, bool))

        # Sequels.
        # (a) Long-term support from the end of reablement (some start in its last days).
        lt = np.flatnonzero(is_seq["long_term"])
        before = rng.random(lt.size) < 0.3
        lt_start = np.where(before, r_end[lt] - np.minimum(rng.integers(1, 11, lt.size), dur[lt] - 1),
                            r_end[lt] + rng.integers(0, 8, lt.size))
        kind = np.array([st.idx("lts_community"), st.idx("lts_residential"), st.idx("lts_nursing")], dtype=np.int16)
        older = r_end[lt] - people.dob[person[lt]] >= 65 * 365.25
        lt_kind = np.where(older, kind[rng.choice(3, size=lt.size, p=[0.78, 0.14, 0.08])],
                           kind[rng.choice(3, size=lt.size, p=[0.96, 0.03, 0.01])]).astype(np.int16)
        self._lts.append((person[lt], lt_start, lt_kind, np.zeros(lt.size, bool)))
        # (b) Short-term residential or nursing care, (c) other short-term home support.
        weekly = v["cost_frequency_unit_type"].idx("weekly")
        for name, comps, cost in (("short_term_care", ("st_residential", "st_nursing"), (600, 1300)),
                                  ("other_short_term", ("home_support",), (150, 500))):
            idx = np.flatnonzero(is_seq[name])
            s = r_end[idx] + rng.integers(0, 8, idx.size)
            comp = np.array([sc.idx(k) for k in comps], dtype=np.int16)[rng.integers(0, len(comps), idx.size)]
            ev.add(person[idx], s, s + rng.integers(7, 43, idx.size), event_type=et.idx("service"),
                   outcome=self._pick("event_outcome", idx.size, {"nfa_ended_planned": 70, "nfa_ended_other": 30}),
                   service_type=st.idx("st_other"), service_component=comp, delivery=dm.idx("commissioned"),
                   unit_cost=np.round(rng.uniform(*cost, idx.size), 2), cost_frequency=weekly,
                   provider=rng.integers(0, 60, idx.size))
        # (d) Low-level support starting in the week after, (e) equipment during reablement.
        ll = np.flatnonzero(is_seq["low_level"])
        self._low_level(ev, person[ll], r_end[ll] + rng.integers(1, 8, ll.size))
        eq = np.flatnonzero(is_seq["nested_equipment"])
        self._low_level(ev, person[eq], r_start[eq] + (dur[eq] * rng.uniform(0, 0.9, eq.size)).astype(np.int32),
                        one_off_only=True)
        # (f) A request or assessment in the week after, with an outcome that settles the sequel.
        fu = np.flatnonzero(is_seq["follow_up"])
        fu_start = r_end[fu] + rng.integers(0, 8, fu.size)
        fu_out = self._pick("event_outcome", fu.size, {"nfa_no_services": 40, "nfa_information": 25,
                                                      "nfa_other_service": 15, "nfa_self_funded": 10,
                                                      "nfa_ended_other": 10})
        as_request = rng.random(fu.size) < 0.25
        self._assessments(ev, person[fu][~as_request], fu_start[~as_request],
                          fu_start[~as_request] + rng.integers(0, 8, int((~as_request).sum())), fu_out[~as_request],
                          v["assessment_type"].idx("short_term"), np.zeros(int((~as_request).sum()), bool))
        ev.add(person[fu][as_request], fu_start[as_request], fu_start[as_request] + rng.integers(0, 3, int(as_request.sum())),
               event_type=et.idx("request"), outcome=fu_out[as_request],
               route=v["request_route_of_access"].idx("community"))
        # (g) Death in the week after reablement ends.
        dd = np.flatnonzero(is_seq["death"])
        self._forced_person.append(person[dd])
        self._forced_day.append(r_end[dd] + rng.integers(1, 8, dd.size))
        # An assessment weeks later for those whose reablement ended "progress to assessment";
        # most then get long-term support.
        onward = np.flatnonzero(outcome == out.idx("progress_assessment"))
        onward = onward[~np.isin(onward, fu)]
        o_start = r_end[onward] + 8 + self._gamma_days(onward.size, 1.5, 12, 180)
        o_end = o_start + rng.integers(0, 22, onward.size)
        to_lts = rng.random(onward.size) < 0.6
        o_out = self._pick("event_outcome", onward.size, {"nfa_no_services": 40, "nfa_self_funded": 30,
                                                        "nfa_information": 30})
        o_out[to_lts] = out.idx("progress_services")
        self._assessments(ev, person[onward], o_start, o_end, o_out, v["assessment_type"].idx("long_term"), to_lts)
        self._lts.append((person[onward][to_lts], o_end[to_lts] + self._gamma_days(int(to_lts.sum()), 1.5, 9, 120),
                          np.full(int(to_lts.sum()), -1, dtype=np.int16), np.zeros(int(to_lts.sum()), bool)))

    def _long_term_services(self, ev: _EventBlocks, people: People, person: np.ndarray, start: np.ndarray,
                            kind: np.ndarray, long_stay: np.ndarray, sim_end: int) -> None:
        """Long-term support packages. `kind` is a service type position, or -1 to draw it by age;
        `long_stay` marks support that began before the simulated span (more often in a care home,
        and for working-age people much longer)."""
        rng, v = self.rng, self.v
        st, sc, out = v["service_type"], v["service_component"], v["event_outcome"]
        et, dm, freq = v["event_type"], v["delivery_mechanism"], v["cost_frequency_unit_type"]
        n = person.size
        age = (start - people.dob[person]) / 365.25
        ld = people.coded["Primary_Support_Reason"][person] == v["primary_support_reason"].idx("learning_disability")
        u = rng.random(n)
        old, very_old = age >= 65, age >= 85
        p_nursing = np.select([long_stay & old, long_stay, very_old, old], [0.20, 0.02, 0.165, 0.10], 0.008)
        p_resid = np.select([long_stay & old, long_stay & ld, long_stay, very_old, old],
                            [0.40, 0.45, 0.15, 0.29, 0.185], 0.045)
        s_type = np.full(n, st.idx("lts_community"), dtype=np.int16)
        s_type[u < p_nursing + p_resid] = st.idx("lts_residential")
        s_type[u < p_nursing] = st.idx("lts_nursing")
        s_type[(age < 65) & (rng.random(n) < 0.01)] = st.idx("lts_prison")
        s_type = np.where(kind >= 0, kind, s_type).astype(np.int16)

        # Community packages: a direct payment (as the component, or as the delivery of another
        # component) for about a third of working-age clients and one in seven older ones; the rest
        # mostly as council-managed personal budgets (ASCOF 3D: config.PUBLISHED_TARGETS).
        community = s_type == st.idx("lts_community")
        dp = community & (rng.random(n) < np.where(age < 65, 0.37, 0.14))
        keys = ("home_support", "supported_living", "extra_care", "shared_lives")
        among = np.array([sc.idx(k) for k in keys], dtype=np.int16)
        comp = np.empty(n, dtype=np.int16)
        for group, weights in ((ld & (age < 65), [30, 50, 0.5, 10]), (~ld & (age < 65), [62, 25, 2, 3]),
                               (age >= 65, [84, 3, 10, 1])):
            g = np.flatnonzero(community & group)
            comp[g] = sc.sample(rng, g.size, among=among, weights=np.array(weights, dtype=float))
        dp_component = dp & (rng.random(n) < 0.6)
        comp[dp_component] = sc.idx("direct_payment")
        comp[s_type == st.idx("lts_residential")] = sc.idx("lt_residential")
        comp[s_type == st.idx("lts_nursing")] = sc.idx("lt_nursing")
        other_lt = sc.where(lambda c: "lts_prison" in c.attrs.get("service_types", ()))
        comp[s_type == st.idx("lts_prison")] = other_lt[0]

        d = rng.random(n)
        delivery = np.where(d < 0.905, dm.idx("managed_budget"), np.where(d < 0.985, dm.idx("commissioned"), -1))
        delivery = np.where(community, delivery, np.where(d < 0.5, dm.idx("managed_budget"), dm.idx("commissioned")))
        delivery[dp] = dm.idx("direct_payment")
        # Some councils leave the delivery blank when the component already says direct payment.
        delivery[dp_component & (rng.random(n) < 0.12)] = -1
        delivery = delivery.astype(np.int16)

        # Costs: home support by the hour, care homes by the week, direct payments every 4 weeks.
        hourly = comp == sc.idx("home_support")
        units = np.where(hourly, np.round(rng.uniform(3, 35, n) * 4) / 4, np.nan)
        weekly_cost = np.where(s_type == st.idx("lts_nursing"), rng.uniform(1000, 1900, n),
                               np.where(s_type == st.idx("lts_residential"), rng.uniform(750, 1400, n),
                                        rng.uniform(120, 900, n)))
        cost = np.where(hourly, rng.uniform(21, 29, n), weekly_cost)
        frequency = np.where(hourly, freq.idx("hourly"), freq.idx("weekly")).astype(np.int16)
        dp_paid = comp == sc.idx("direct_payment")
        cost[dp_paid] = weekly_cost[dp_paid] * 4
        frequency[dp_paid] = freq.idx("four_weekly")
        cost = np.round(cost, 2)

        # Ends other than death: moves, NHS continuing care, support ending; otherwise still open.
        end = start + self.rng.exponential(np.where(long_stay & ~old, 20, 6) * 365, n).astype(np.int32)
        outcome = self._pick("event_outcome", n, {"nfa_ended_other": 50, "nfa_moved": 15, "nfa_nhs": 20,
                                                   "nfa_ended_planned": 15})
        still_open = end > sim_end
        end[still_open] = NA_DAY
        outcome[still_open] = out.idx("continuation")
        provider = rng.integers(0, 60, n).astype(np.int32)

        # Package changes: 20% of services are split into two rows at a change date.
        effective_end = np.where(still_open, sim_end, end)
        change = (rng.random(n) < 0.2) & (effective_end - start > 120)
        c_day = start + ((effective_end - start) * rng.uniform(0.2, 0.8, n)).astype(np.int32)
        first_end = np.where(change, c_day - 1, end)
        first_out = np.where(change, out.idx("continuation"), outcome).astype(np.int16)
        base = dict(event_type=et.idx("service"), service_type=s_type, service_component=comp,
                    delivery=delivery, cost_frequency=frequency, provider=provider)
        ev.add(person, start, first_end, outcome=first_out, unit_cost=cost, planned_units=units, **base)
        ch = np.flatnonzero(change)
        ev.add(person[ch], c_day[ch], end[ch], outcome=outcome[ch],
               unit_cost=np.round(cost[ch] * rng.uniform(1.05, 1.5, ch.size), 2), planned_units=units[ch],
               **{k: (val[ch] if isinstance(val, np.ndarray) else val) for k, val in base.items()})

        # A second, concurrent component for some community packages (equipment, meals, day support).
        # Only packages that outlast the second component's start get one.
        lasts = (end == NA_DAY) | (end >= start + 31)
        add = np.flatnonzero(community & lasts & (rng.random(n) < 0.25))
        add_among = np.array([sc.idx("equipment")] + list(sc.where(
            lambda c: c.key is None and set(c.attrs.get("service_types", ())) >= {"lts_community"})), dtype=np.int16)
        add_comp = sc.sample(rng, add.size, among=add_among, weights=np.r_[3.0, np.ones(add_among.size - 1)])
        a_start = start[add] + rng.integers(0, 31, add.size)
        a_one_off = add_comp == sc.idx("equipment")
        a_end = np.where(a_one_off, a_start, end[add])
        ev.add(person[add], a_start, a_end, event_type=et.idx("service"),
               outcome=np.where(a_one_off, out.idx("nfa_ended_planned"), outcome[add]),
               service_type=np.where(a_one_off, st.idx("st_low_level"), st.idx("lts_community")),
               service_component=add_comp, delivery=np.where(delivery[add] >= 0, delivery[add], dm.idx("commissioned")),
               unit_cost=np.round(np.where(a_one_off, rng.uniform(40, 900, add.size), rng.uniform(20, 150, add.size)), 2),
               cost_frequency=np.where(a_one_off, freq.idx("one_off"), freq.idx("weekly")))

        # Reviews: a first review at 6-12 weeks, then yearly; some unplanned reviews.
        rr = v["review_reason"]
        life_end = np.where(still_open, sim_end, end)
        review_person, review_day, review_reason = [], [], []
        for k in range(0, 8):
            due = start + (rng.integers(42, 85, n) if k == 0 else 365 * k + rng.integers(-30, 31, n))
            ok = due <= life_end
            review_person.append(person[ok]); review_day.append(due[ok])
            review_reason.append(np.full(int(ok.sum()), rr.idx("planned"), dtype=np.int16))
        # Long-standing placements: yearly reviews in the simulated span only.
        for k in range(0, 5):
            due = np.maximum(start, self._sim_start) + 365 * k + rng.integers(0, 365, n)
            ok = long_stay & (due <= life_end) & (due - start > 8 * 365)
            review_person.append(person[ok]); review_day.append(due[ok])
            review_reason.append(np.full(int(ok.sum()), rr.idx("planned"), dtype=np.int16))
        unplanned = rng.random(n) < 0.25
        due = start + (rng.random(n) * (life_end - start)).astype(np.int32)
        unplanned_among = rr.where(lambda c: c.group == rr.codes.entry(rr.codes.value("unplanned")).group)
        review_person.append(person[unplanned]); review_day.append(due[unplanned])
        review_reason.append(rr.sample(rng, int(unplanned.sum()), among=unplanned_among))
        rp, rd, rreason = map(np.concatenate, (review_person, review_day, review_reason))
        r_out = self._pick("event_outcome", rp.size, {"continuation": 80, "progress_services": 8,
                                                       "progress_assessment": 5, "admitted_hospital": 4,
                                                       "nfa_ended_other": 3})
        ev.add(rp, rd, rd + rng.integers(0, 15, rp.size), event_type=et.idx("review"), outcome=r_out,
               review_reason=rreason, review_outcome=v["review_outcomes_achieved"].sample(rng, rp.size),
               review_method=v["method_of_contact"].sample(rng, rp.size),
               conversation=(rng.random(rp.size) < 0.1).astype(np.int16))

    def _carers(self, ev: _EventBlocks, people: People, n_users: int, n_carers: int, cared_for: np.ndarray,
                cared_start: np.ndarray, sim_end: int) -> None:
        """Unpaid carers of some long-term support clients, linked by the cared-for LA person id."""
        rng, v = self.rng, self.v
        st, sc, out, et = v["service_type"], v["service_component"], v["event_outcome"], v["event_type"]
        dm = v["delivery_mechanism"]
        pick = rng.choice(cared_for.size, size=n_carers, replace=cared_for.size < n_carers)
        carer = np.arange(n_users, n_users + n_carers, dtype=np.int32)
        cared = cared_for[pick]
        people.la_idx[carer] = people.la_idx[cared]
        people.coded["Has_Unpaid_Carer"][cared] = v["has_unpaid_carer"].idx("yes")
        people.coded["Has_Unpaid_Carer"][carer] = v["has_unpaid_carer"].idx("no")
        start = cared_start[pick] + rng.integers(-30, 200, n_carers)

        by_association = rng.random(n_carers) < 0.08
        people.client_type[carer[by_association]] = v["client_type"].idx("carer_by_association")
        # Some carers only get information and advice at the request; the others are assessed.
        informed = ~by_association & (rng.random(n_carers) < 0.1)
        assessed = ~by_association & ~informed
        c, s = carer[assessed | informed], start[assessed | informed]
        ev.add(c, s, s + rng.integers(0, 8, c.size), event_type=et.idx("request"),
               outcome=np.where(informed[assessed | informed], out.idx("nfa_information"), out.idx("progress_assessment")),
               route=v["request_route_of_access"].idx("community"))
        c, s = carer[assessed], start[assessed]
        a_start = s + rng.integers(5, 40, c.size)
        a_end = a_start + rng.integers(0, 15, c.size)
        served = rng.random(c.size) < 0.7
        ev.add(c, a_start, a_end, event_type=et.idx("assessment"),
               outcome=np.where(served, out.idx("progress_services"), out.idx("nfa_information")),
               assessment_type=v["assessment_type"].idx("short_term"),
               eligible=v["eligible_needs_identified"].idx("yes"),
               assessment_method=v["method_of_contact"].sample(rng, c.size))

        # Carer services: direct support for carers assessed as eligible, respite for those by association.
        svc_carer = np.concatenate([c[served], carer[by_association]])
        svc_start = np.concatenate([a_end[served] + rng.integers(0, 30, int(served.sum())),
                                    start[by_association]])
        direct = np.concatenate([rng.random(int(served.sum())) < 0.7, np.zeros(int(by_association.sum()), bool)])
        direct_among = sc.where(lambda x: "carer_direct" in x.attrs.get("service_types", ()))
        involving_among = sc.where(lambda x: "carer_involving" in x.attrs.get("service_types", ()))
        # Direct support to carers: mostly direct payments (ASCOF 3D part 2b), some council-managed
        # budgets or commissioned support, a few with no delivery mechanism recorded.
        d = rng.random(direct.size)
        delivery = np.select([d < 0.79, d < 0.875, d < 0.97], [dm.idx("direct_payment"), dm.idx("managed_budget"),
                                                               dm.idx("commissioned")], -1)
        not_dp = direct_among[direct_among != sc.idx("direct_payment")]
        comp = np.where(direct, sc.sample(rng, direct.size, among=not_dp),
                        sc.sample(rng, direct.size, among=involving_among)).astype(np.int16)
        dp_one_off = direct & (delivery == dm.idx("direct_payment")) & (rng.random(direct.size) < 0.3)
        comp[dp_one_off] = sc.idx("direct_payment")
        delivery = np.where(direct, delivery, np.where(rng.random(direct.size) < 0.8, dm.idx("commissioned"),
                                                       dm.idx("managed_budget"))).astype(np.int16)
        end = np.where(dp_one_off, svc_start, svc_start + rng.integers(1, 365, direct.size))
        end = np.where(~dp_one_off & (rng.random(direct.size) < 0.4), NA_DAY, end)
        end = np.where((end != NA_DAY) & (end > sim_end), NA_DAY, end)
        freq = v["cost_frequency_unit_type"]
        linked = cared[np.searchsorted(carer, svc_carer)]
        ev.add(svc_carer, svc_start, end, event_type=et.idx("service"),
               outcome=np.where(end == NA_DAY, out.idx("continuation"), out.idx("nfa_ended_planned")),
               service_type=np.where(direct, st.idx("carer_direct"), st.idx("carer_involving")),
               service_component=comp, delivery=delivery,
               unit_cost=np.round(np.where(dp_one_off, rng.uniform(150, 600, direct.size),
                                           rng.uniform(60, 400, direct.size)), 2),
               cost_frequency=np.where(dp_one_off, freq.idx("one_off"), freq.idx("weekly")),
               linked_person=linked)

    # -- accommodation ----------------------------------------------------------------------------
    def _accommodation(self, people: People, events: Events) -> None:
        """Accommodation consistent with the person's latest long-term support (care home residents
        live in care homes; supported living in supported accommodation ...), some of it unknown so
        that DHSC's inference from services is exercised (ASCOF 2E)."""
        rng, v = self.rng, self.v
        acc, st, sc = v["accommodation_status"], v["service_type"], v["service_component"]
        settled = lambda c: c.attrs.get("settled") == 1  # noqa: E731
        special = {"supported_accommodation", "shared_lives", "sheltered_housing", "care_home", "nursing_home",
                   "prison", "unknown"}
        mainstream = acc.where(lambda c: settled(c) and c.key not in special)
        unsettled = acc.where(lambda c: not settled(c) and c.key not in special)

        def draw(size: int, options: list[tuple[np.ndarray, float]]) -> np.ndarray:
            which = rng.choice(len(options), size=size, p=[w for _, w in options])
            result = np.empty(size, dtype=np.int16)
            for i, (among, _) in enumerate(options):
                k = np.flatnonzero(which == i)
                result[k] = acc.sample(rng, k.size, among=among)
            return result

        one = lambda key: np.array([acc.idx(key)], dtype=np.int16)  # noqa: E731
        unknown = one("unknown")
        status = people.coded["Accommodation_Status"]
        status[:] = draw(len(people), [(mainstream, 0.86), (one("sheltered_housing"), 0.03),
                                       (one("supported_accommodation"), 0.02), (unsettled, 0.02), (unknown, 0.07)])
        lt = np.flatnonzero(long_term_mask(events, self.v))
        order = lt[np.lexsort((events.start[lt], events.person[lt]))]
        last = order[np.r_[events.person[order][1:] != events.person[order][:-1], True]] if order.size else order
        person, s_type, comp = events.person[last], events.ints["service_type"][last], events.ints["service_component"][last]
        rules = [
            (s_type == st.idx("lts_nursing"), [(one("nursing_home"), 0.90), (one("care_home"), 0.03), (unknown, 0.07)]),
            (s_type == st.idx("lts_residential"), [(one("care_home"), 0.90), (one("nursing_home"), 0.03), (unknown, 0.07)]),
            (s_type == st.idx("lts_prison"), [(one("prison"), 0.95), (unknown, 0.05)]),
            (comp == sc.idx("supported_living"), [(one("supported_accommodation"), 0.88), (mainstream, 0.05), (unknown, 0.07)]),
            (comp == sc.idx("shared_lives"), [(one("shared_lives"), 0.90), (unknown, 0.10)]),
            (comp == sc.idx("extra_care"), [(one("sheltered_housing"), 0.88), (mainstream, 0.05), (unknown, 0.07)]),
        ]
        done = np.zeros(person.size, bool)
        for mask, options in rules:
            k = np.flatnonzero(mask & ~done)
            status[person[k]] = draw(k.size, options)
            done[k] = True
        k = np.flatnonzero(~done)
        status[person[k]] = draw(k.size, [(mainstream, 0.90), (unsettled, 0.03), (unknown, 0.07)])

    # -- deaths --------------------------------------------------------------------------------------
    def _deaths_on_period_days(self, events: Events, years) -> None:
        """A few long-term clients die on the first or the last day of a reporting year (the
        boundary cases of ASCOF 2E and 3D)."""
        lt = long_term_mask(events, self.v)
        for day in sorted({d for year in years for d in year}):
            active = lt & (events.start < day - 30) & ((events.end == NA_DAY) | (events.end > day))
            candidates = np.unique(events.person[active])
            chosen = candidates[self.rng.random(candidates.size) < PERIOD_DAY_DEATH_SHARE]
            if chosen.size < PERIOD_DAY_DEATHS_AT_LEAST:   # small collections: a few all the same
                chosen = self.rng.choice(candidates, size=min(PERIOD_DAY_DEATHS_AT_LEAST, candidates.size), replace=False)
            self._forced_person.append(chosen)
            self._forced_day.append(np.full(chosen.size, day, dtype=np.int64))

    def deaths(self, people: People, events: Events, sim_end: int) -> np.ndarray:
        """Draw deaths from an age-dependent hazard (and the deaths the journeys asked for); deaths
        end services. Returns the mask of events that happened (none starts after the person's death)."""
        rng, v = self.rng, self.v
        first = np.full(len(people), np.iinfo(np.int32).max, dtype=np.int64)
        np.minimum.at(first, events.person, events.start)
        has_events = first < np.iinfo(np.int32).max
        age = (np.where(has_events, first, sim_end) - people.dob) / 365.25
        hazard = np.select([age < 65, age < 75, age < 85], [0.01, 0.03, 0.07], 0.18)
        st = events.ints["service_type"]
        in_care_home = np.zeros(len(people), bool)
        in_care_home[events.person[np.isin(st, [v["service_type"].idx("lts_nursing"),
                                                 v["service_type"].idx("lts_residential")])]] = True
        hazard = np.where(in_care_home, hazard * 1.8, hazard)
        death = first + rng.exponential(365.25 / hazard).astype(np.int64)
        forced = self._forced_person
        if forced:
            np.minimum.at(death, np.concatenate(forced).astype(np.int64),
                          np.concatenate(self._forced_day).astype(np.int64))
        dies = has_events & (death <= sim_end)
        people.dod[dies] = death[dies].astype(np.int32)

        dod = people.dod[events.person]
        dead = dod != NA_DAY
        keep = ~dead | (events.start <= dod)
        # Open or later-ending events of people who died end at death, with the deceased outcome.
        ends_after = dead & keep & ((events.end == NA_DAY) | (events.end > dod))
        events.end[ends_after] = dod[ends_after]
        events.ints["outcome"][ends_after] = v["event_outcome"].idx("nfa_deceased")
        return keep


def allocate_nhs_numbers(count: int, rng: np.random.Generator) -> np.ndarray:
    """Distinct test-range NHS numbers for the first people (service users first); 0 = none.

    The never-issued range holds about 909,000 valid numbers. At national scale there are more people
    than that: the remainder carry no NHS number anywhere (CLD falls back to the LA person id and the
    hospital extract cannot include them), which the manifest reports.
    """
    capacity = never_issued_valid_numbers().size
    numbers = np.zeros(count, dtype=np.int64)
    numbers[: min(count, capacity)] = never_issued_nhs_numbers(min(count, capacity), rng)
    return numbers


def _locality_order(people: People, events: Events, keep: np.ndarray) -> tuple[People, Events]:
    """Renumber people by council and sort the kept events by (person, start).

    Submission rows are written in that order, so gathering a file's rows becomes an almost
    sequential read instead of random access over millions of rows (several times faster).
    """
    order = np.argsort(people.la_idx, kind="stable")
    new_id = np.empty_like(order)
    new_id[order] = np.arange(order.size)
    reordered = People(**{
        name: ({k: a[order] for k, a in value.items()} if isinstance(value, dict) else value[order])
        for name, value in people.__dict__.items()
    })
    kept = np.flatnonzero(keep)
    events.person = new_id[events.person].astype(np.int32)
    events.linked_person = np.where(events.linked_person >= 0, new_id[np.maximum(events.linked_person, 0)],
                                    -1).astype(np.int32)
    # One int64 sort key (person, then start) is much cheaper than a two-key lexsort.
    key = events.person[kept].astype(np.int64) << 32 | (events.start[kept].astype(np.int64) - np.iinfo(np.int32).min)
    return reordered, _take(events, kept[np.argsort(key)])


def _take(events: Events, idx: np.ndarray) -> Events:
    return Events(
        person=events.person[idx], start=events.start[idx], end=events.end[idx],
        ints={k: a[idx] for k, a in events.ints.items()},
        unit_cost=events.unit_cost[idx], planned_units=events.planned_units[idx],
        provider=events.provider[idx], linked_person=events.linked_person[idx],
    )


def simulate(councils: list[LocalAuthority], vocab: Vocabularies, rng: np.random.Generator,
             target_rows_per_quarter: int, first_period_end: dt.date, last_period_end: dt.date) -> Truth:
    """People, journeys and deaths for every council, sized to the target volume."""
    first_window = to_day(add_months(first_period_end + dt.timedelta(days=1), -12))
    sim_end = to_day(last_period_end)
    sim_start = first_window - int(LTS_HISTORY_YEARS * 365.25)
    months = (sim_end - (first_window - 90)) / 30.44
    # Journeys whose events fall in the windows scale with the months covered.
    n_users = int(target_rows_per_quarter * JOURNEYS_PER_TARGET_ROW_MONTH * months / 12 * 1.0)
    n_users = max(n_users, 50)
    n_carers = int(n_users * 0.06)
    # People known only to hospitals need NHS numbers to be in an extract at all, so they are only
    # simulated while the test range has numbers left.
    spare_numbers = max(0, never_issued_valid_numbers().size - n_users - n_carers)
    n_hospital_only = min(int(n_users * 0.4), spare_numbers)
    sim = Simulator(vocab, rng)
    people = sim.people(councils, n_users, n_carers, n_hospital_only, sim_end)
    # The 12-month years a benchmark reports on: one ending at each quarter end.
    years, q_end = [], first_period_end
    while q_end <= last_period_end:
        years.append((to_day(add_months(q_end + dt.timedelta(days=1), -12)), to_day(q_end)))
        q_end = add_months(q_end + dt.timedelta(days=1), 3) - dt.timedelta(days=1)
    events = sim.journeys(people, n_users, n_carers, sim_start, first_window, sim_end, years)
    sim.assign_la_person_numbers(people)
    happened = sim.deaths(people, events, sim_end)
    people, events = _locality_order(people, events, happened)
    return Truth(people=people, events=events, councils=councils, sim_start=sim_start, sim_end=sim_end,
                 stats={"people": len(people), "service_users": n_users, "carers": n_carers,
                        "hospital_only_people": n_hospital_only, "events": len(events),
                        "people_without_nhs_number": int((people.nhs_number == 0).sum())})
