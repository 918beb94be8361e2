"""Vectorised simulation of people and their care journeys (the "truth" behind the submissions).

Everything is numpy arrays: dates are int32 days since 1970-01-01 (NA_DAY when absent), coded values
are int16 positions in a code list's Release 2 values (-1 when absent). A person's journey runs
request -> (reablement | assessment) -> services -> reviews with consistent dates and outcomes;
carers are linked to the people they care for; deaths end services and stop later events.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field

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
# Journey starts per month at scale 1 (calibrated: see config.ROWS_PER_PERSON).
JOURNEYS_PER_TARGET_ROW_MONTH = 1 / 2.36


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
            last_name=rng.integers(0, len(NamePool.last_names), size=total).astype(np.int32),
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
                 sim_end: int, extra_share: float = 0.12) -> Events:
        rng, v = self.rng, self.v
        ev = _EventBlocks()
        et = v["event_type"]
        out = v["event_outcome"]
        st = v["service_type"]
        sc = v["service_component"]

        # One primary journey per service user plus some repeat contacts.
        path = rng.choice(len(PATHS), size=n_users, p=PATH_SHARES)
        extra = rng.random(n_users) < extra_share
        j_person = np.concatenate([np.arange(n_users), np.flatnonzero(extra)]).astype(np.int32)
        j_path = np.concatenate([path, rng.choice(3, size=int(extra.sum()), p=[0.6, 0.3, 0.1])])
        lts = j_path == PATHS.index("long_term")
        earliest = np.where(lts, sim_start, first_window - 90)
        j_start = (earliest + rng.random(j_person.size) * (sim_end - earliest)).astype(np.int32)

        # Requests: every journey starts with one.
        req_len = np.where(rng.random(j_person.size) < 0.4, 0, self._gamma_days(j_person.size, 1.2, 6, 60))
        req_end = j_start + req_len
        req_outcome = np.full(j_person.size, -1, dtype=np.int16)
        is_path = {p: j_path == i for i, p in enumerate(PATHS)}
        req_outcome[is_path["contact"]] = self._pick("event_outcome", int(is_path["contact"].sum()), {
            "nfa_information": 40, "nfa_other_service": 15, "nfa_nhs": 8, "nfa_self_funded": 8,
            "nfa_declined": 9, "nfa_no_services": 10, "nfa_other": 7, "nfa_moved": 3})
        req_outcome[is_path["reablement"]] = out.idx("progress_reablement")
        req_outcome[is_path["low_level"]] = out.idx("progress_services")
        req_outcome[is_path["assessment_only"] | lts] = out.idx("progress_assessment")
        route = v["request_route_of_access"].sample(rng, j_person.size)
        from_hospital = is_path["reablement"] & (rng.random(j_person.size) < 0.55)
        route[from_hospital] = v["request_route_of_access"].idx("hospital_discharge")
        conversation = (rng.random(j_person.size) < 0.3).astype(np.int16)
        ev.add(j_person, j_start, req_end, event_type=et.idx("request"), outcome=req_outcome,
               route=route, conversation=conversation)

        # Reablement (ST-Max) after the request; some go on to an assessment.
        r = np.flatnonzero(is_path["reablement"])
        r_start = req_end[r] + rng.integers(0, 6, r.size)
        r_end = r_start + 14 + self._gamma_days(r.size, 2.0, 12, 76)
        r_out = self._pick("event_outcome", r.size, {
            "nfa_ended_planned": 58, "progress_assessment": 22, "admitted_hospital": 8,
            "nfa_declined": 5, "nfa_ended_other": 7})
        ev.add(j_person[r], r_start, r_end, event_type=et.idx("service"), outcome=r_out,
               service_type=st.idx("st_max"), service_component=sc.idx("reablement"),
               delivery=v["delivery_mechanism"].idx("commissioned"), provider=rng.integers(0, 30, r.size))
        reviewed = rng.random(r.size) < 0.3
        rv_start = r_end[reviewed] - rng.integers(0, 6, int(reviewed.sum()))
        ev.add(j_person[r][reviewed], rv_start, rv_start + rng.integers(0, 4, rv_start.size),
               event_type=et.idx("review"), outcome=out.idx("nfa_ended_planned"),
               review_reason=v["review_reason"].idx("short_term"),
               review_outcome=v["review_outcomes_achieved"].sample(rng, rv_start.size),
               review_method=v["method_of_contact"].sample(rng, rv_start.size))
        onward = r_out == out.idx("progress_assessment")

        # Low-level short-term support (equipment, meals, professional support).
        low = np.flatnonzero(is_path["low_level"])
        low_comp_among = sc.where(lambda c: "st_low_level" in c.attrs.get("service_types", ()))
        low_w = np.where(low_comp_among == sc.idx("equipment"), 6.0, 1.0)
        l_comp = sc.sample(rng, low.size, among=low_comp_among, weights=low_w)
        l_start = req_end[low] + rng.integers(0, 15, low.size)
        one_off = l_comp == sc.idx("equipment")
        l_end = np.where(one_off, l_start, l_start + rng.integers(7, 90, low.size))
        ev.add(j_person[low], l_start, l_end, event_type=et.idx("service"),
               outcome=out.idx("nfa_ended_planned"), service_type=st.idx("st_low_level"),
               service_component=l_comp, delivery=v["delivery_mechanism"].idx("commissioned"),
               unit_cost=np.where(one_off, np.round(rng.uniform(40, 800, low.size), 2), np.nan),
               cost_frequency=np.where(one_off, v["cost_frequency_unit_type"].idx("one_off"), -1))

        # Assessments: straight from the request, or after reablement.
        a_idx = np.concatenate([np.flatnonzero(is_path["assessment_only"] | lts), r[onward]])
        a_prev_end = np.concatenate([req_end[is_path["assessment_only"] | lts], r_end[onward]])
        a_to_lts = np.concatenate([lts[is_path["assessment_only"] | lts], rng.random(int(onward.sum())) < 0.6])
        a_start = a_prev_end + self._gamma_days(a_idx.size, 1.5, 14, 180)
        a_end = a_start + rng.integers(0, 29, a_idx.size)
        a_out = self._pick("event_outcome", a_idx.size, {
            "nfa_no_services": 25, "nfa_self_funded": 20, "nfa_information": 20, "nfa_declined": 15,
            "nfa_other": 10, "nfa_nhs": 10})
        a_out[a_to_lts] = out.idx("progress_services")
        at = v["assessment_type"]
        a_type = np.where(rng.random(a_idx.size) < 0.85, at.idx("long_term"), at.idx("short_term"))
        eligible = v["eligible_needs_identified"]
        a_elig = np.where(a_to_lts | (rng.random(a_idx.size) < 0.3), eligible.idx("yes"), eligible.idx("no"))
        ev.add(j_person[a_idx], a_start, a_end, event_type=et.idx("assessment"), outcome=a_out,
               assessment_type=a_type, eligible=a_elig,
               assessment_method=v["method_of_contact"].sample(rng, a_idx.size),
               conversation=(rng.random(a_idx.size) < 0.2).astype(np.int16))

        # Long-term support services.
        lt_person = j_person[a_idx[a_to_lts]]
        lt_start = a_end[a_to_lts] + self._gamma_days(lt_person.size, 2.0, 8, 120)
        self._long_term_services(ev, people, lt_person, lt_start, sim_end)
        self._carers(ev, people, n_users, n_carers, lt_person, lt_start, sim_end)
        events = ev.build()
        return events

    def _long_term_services(self, ev: _EventBlocks, people: People, person: np.ndarray,
                            start: np.ndarray, sim_end: int) -> None:
        rng, v = self.rng, self.v
        st, sc, out = v["service_type"], v["service_component"], v["event_outcome"]
        et, dm, freq = v["event_type"], v["delivery_mechanism"], v["cost_frequency_unit_type"]
        n = person.size
        age = (start - people.dob[person]) / 365.25
        u = rng.random(n)
        p_nursing = np.where(age >= 85, 0.15, np.where(age >= 65, 0.08, 0.02))
        p_resid = np.where(age >= 85, 0.25, np.where(age >= 65, 0.15, 0.08))
        s_type = np.full(n, st.idx("lts_community"), dtype=np.int16)
        s_type[u < p_nursing + p_resid] = st.idx("lts_residential")
        s_type[u < p_nursing] = st.idx("lts_nursing")
        s_type[(age < 65) & (rng.random(n) < 0.01)] = st.idx("lts_prison")

        comp = np.empty(n, dtype=np.int16)
        community = s_type == st.idx("lts_community")
        comm_among = np.array([sc.idx(k) for k in ("home_support", "direct_payment", "supported_living",
                                                     "extra_care", "shared_lives")], dtype=np.int16)
        comm_w = np.array([55, 20, 8, 5, 2], dtype=float)
        comp[community] = sc.sample(rng, int(community.sum()), among=comm_among, weights=comm_w)
        comp[s_type == st.idx("lts_residential")] = sc.idx("lt_residential")
        comp[s_type == st.idx("lts_nursing")] = sc.idx("lt_nursing")
        other_lt = sc.where(lambda c: "lts_prison" in c.attrs.get("service_types", ()))
        comp[s_type == st.idx("lts_prison")] = other_lt[0]

        delivery = np.where(rng.random(n) < 0.65, dm.idx("commissioned"), dm.idx("managed_budget")).astype(np.int16)
        delivery[comp == sc.idx("direct_payment")] = dm.idx("direct_payment")

        # Costs: home support by the hour, care homes by the week, direct payments every 4 weeks.
        hourly = comp == sc.idx("home_support")
        units = np.where(hourly, np.round(rng.uniform(3, 35, n) * 4) / 4, np.nan)
        weekly_cost = np.where(s_type == st.idx("lts_nursing"), rng.uniform(1000, 1900, n),
                               np.where(s_type == st.idx("lts_residential"), rng.uniform(750, 1400, n),
                                        rng.uniform(120, 900, n)))
        cost = np.where(hourly, rng.uniform(21, 29, n), weekly_cost)
        frequency = np.where(hourly, freq.idx("hourly"), freq.idx("weekly")).astype(np.int16)
        dp = comp == sc.idx("direct_payment")
        cost[dp] = weekly_cost[dp] * 4
        frequency[dp] = freq.idx("four_weekly")
        cost = np.round(cost, 2)

        # Ends other than death: moves, NHS continuing care, support ending; otherwise still open.
        end = start + self.rng.exponential(6 * 365, n).astype(np.int32)
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
               service_component=add_comp, delivery=dm.idx("commissioned"),
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
        pick = rng.choice(cared_for.size, size=n_carers, replace=cared_for.size < n_carers)
        carer = np.arange(n_users, n_users + n_carers, dtype=np.int32)
        cared = cared_for[pick]
        people.la_idx[carer] = people.la_idx[cared]
        people.coded["Has_Unpaid_Carer"][cared] = v["has_unpaid_carer"].idx("yes")
        people.coded["Has_Unpaid_Carer"][carer] = v["has_unpaid_carer"].idx("no")
        start = cared_start[pick] + rng.integers(-30, 200, n_carers)

        by_association = rng.random(n_carers) < 0.08
        people.client_type[carer[by_association]] = v["client_type"].idx("carer_by_association")
        assessed = ~by_association
        c, s = carer[assessed], start[assessed]
        ev.add(c, s, s + rng.integers(0, 8, c.size), event_type=et.idx("request"),
               outcome=out.idx("progress_assessment"),
               route=v["request_route_of_access"].idx("community"))
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
        comp = np.where(direct, sc.sample(rng, direct.size, among=direct_among),
                        sc.sample(rng, direct.size, among=involving_among)).astype(np.int16)
        one_off = direct & (comp == sc.idx("direct_payment"))
        end = np.where(one_off, svc_start, svc_start + rng.integers(1, 365, direct.size))
        end = np.where(~one_off & (rng.random(direct.size) < 0.4), NA_DAY, end)
        end = np.where((end != NA_DAY) & (end > sim_end), NA_DAY, end)
        freq = v["cost_frequency_unit_type"]
        linked = cared[np.searchsorted(carer, svc_carer)]
        ev.add(svc_carer, svc_start, end, event_type=et.idx("service"),
               outcome=np.where(end == NA_DAY, out.idx("continuation"), out.idx("nfa_ended_planned")),
               service_type=np.where(direct, st.idx("carer_direct"), st.idx("carer_involving")),
               service_component=comp,
               delivery=np.where(one_off, v["delivery_mechanism"].idx("direct_payment"),
                                 v["delivery_mechanism"].idx("managed_budget")),
               unit_cost=np.round(np.where(one_off, rng.uniform(150, 600, direct.size),
                                           rng.uniform(60, 400, direct.size)), 2),
               cost_frequency=np.where(one_off, freq.idx("one_off"), freq.idx("weekly")),
               linked_person=linked)

    # -- deaths --------------------------------------------------------------------------------------
    def deaths(self, people: People, events: Events, sim_end: int) -> np.ndarray:
        """Draw deaths from an age-dependent hazard; deaths end services. Returns the mask of events
        that happened (none starts after the person's death)."""
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
        hazard = np.where(in_care_home, hazard * 2.5, hazard)
        death = first + rng.exponential(365.25 / hazard).astype(np.int64)
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
    events = sim.journeys(people, n_users, n_carers, sim_start, first_window, sim_end)
    sim.assign_la_person_numbers(people)
    happened = sim.deaths(people, events, sim_end)
    people, events = _locality_order(people, events, happened)
    return Truth(people=people, events=events, councils=councils, sim_start=sim_start, sim_end=sim_end,
                 stats={"people": len(people), "service_users": n_users, "carers": n_carers,
                        "hospital_only_people": n_hospital_only, "events": len(events),
                        "people_without_nhs_number": int((people.nhs_number == 0).sum())})
