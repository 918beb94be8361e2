"""`cld-pipeline generate`: realistic, deterministic synthetic CLD with a truthful defect manifest."""

from __future__ import annotations

import csv
import datetime as dt
import hashlib
import json
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pytest

from cld_pipeline.commands.cli import main as cli_main
from cld_pipeline.lib.privacy.identifiers import is_valid_nhs_number
from cld_pipeline.lib.ingest.submission_files import parse_date
from cld_pipeline.reference import load_local_authorities
from cld_pipeline.spec import load_spec
from cld_pipeline.synthetic import GeneratorConfig, generate
from cld_pipeline.synthetic.vocab import Vocabularies

from .conftest import TINY, read_submission

V = Vocabularies()
REQUEST, ASSESSMENT, SERVICE, REVIEW = (V["event_type"].codes.value(k) for k in ("request", "assessment", "service", "review"))


def defects_of(data_dir: Path) -> list[dict]:
    with (data_dir / "synthetic" / "defects.csv").open(encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def touched(data_dir: Path) -> dict[tuple[str, int], set[str]]:
    out: dict[tuple[str, int], set[str]] = defaultdict(set)
    for d in defects_of(data_dir):
        out[(d["file_name"], int(d["row_number"]))].add(d["defect"])
    return out


def digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*.csv"))}


def test_same_seed_same_bytes_other_seed_other_data(tmp_path, tiny_collection):
    data_dir, manifest = tiny_collection
    again = generate(TINY, tmp_path / "again", progress=False)
    assert digest(tmp_path / "again" / "landing") == digest(data_dir / "landing")
    assert (tmp_path / "again" / "synthetic" / "defects.csv").read_bytes() == \
        (data_dir / "synthetic" / "defects.csv").read_bytes()
    assert again["files"] == manifest["files"]
    other = GeneratorConfig(**{**TINY.__dict__, "seed": TINY.seed + 1})
    generate(other, tmp_path / "other", progress=False)
    assert digest(tmp_path / "other" / "landing") != digest(data_dir / "landing")


def test_every_manifest_defect_is_in_the_files(tiny_collection, tiny_rows):
    data_dir, manifest = tiny_collection
    defects = defects_of(data_dir)
    assert len(defects) > 100
    kinds = {d["defect"] for d in defects}
    assert kinds == set(manifest["config"]["defects"]), "every defect kind is exercised at tiny scale"
    for d in defects:
        row = tiny_rows[d["file_name"]][int(d["row_number"]) - 1]
        assert row[d["field"]] == d["injected_value"], d
    assert {d["expected"] for d in defects} == {"reject", "flag", "keep"}


def test_files_match_the_manifest(tiny_collection, tiny_rows):
    data_dir, manifest = tiny_collection
    on_disk = {p.name for p in (data_dir / "landing").glob("*.csv")}
    assert on_disk == {f["file_name"] for f in manifest["files"]}
    for f in manifest["files"]:
        rows = tiny_rows[f["file_name"]]
        assert len(rows) == f["rows"] > 0
        raw = (data_dir / "landing" / f["file_name"]).read_bytes()
        assert raw.startswith(b"\xef\xbb\xbf") == f["bom_crlf"]
        assert (b"\r\n" in raw) == f["bom_crlf"]
        assert ("First_Name" in rows[0]) == f["includes_names"]
    assert sum(f["rows"] for f in manifest["files"]) == manifest["rows"]


def test_each_file_is_one_council_and_one_reporting_period(tiny_collection, tiny_rows):
    data_dir, manifest = tiny_collection
    wrong_la = {(d["file_name"], int(d["row_number"])) for d in defects_of(data_dir) if d["defect"] == "wrong_la_code"}
    las = load_local_authorities()
    for f in manifest["files"]:
        start, end = dt.date.fromisoformat(f["reporting_period_start"]), dt.date.fromisoformat(f["reporting_period_end"])
        assert (end - start).days in (364, 365)
        for i, row in enumerate(tiny_rows[f["file_name"]], start=1):
            if (f["file_name"], i) not in wrong_la:
                assert row["LA_Code"] == f["la_code"]
            assert las.get(row["LA_Code"]) is not None
            assert parse_date(row["Reporting_Period_Start_Date"]) == start
            assert parse_date(row["Reporting_Period_End_Date"]) == end


def test_consecutive_quarters_overlap_as_rolling_12_months(clean_collection):
    _, manifest, rows = clean_collection
    by_la = defaultdict(dict)
    for f in manifest["files"]:
        by_la[f["la_code"]][f["reporting_period_end"]] = f
    for la_code, files in by_la.items():
        (e1, f1), (e2, f2) = sorted(files.items())
        q1_start = dt.date.fromisoformat(f1["reporting_period_start"])
        q2_start, q2_end = dt.date.fromisoformat(f2["reporting_period_start"]), dt.date.fromisoformat(e2)
        assert (q2_start - q1_start).days in (91, 92) and (q2_end - dt.date.fromisoformat(e1)).days in (91, 92)

        def keyed(f):
            return {(r["LA_Person_Unique_Identifier"], r["Event_Type"], r["Event_Start_Date"], r["Service_Component"],
                     r["Review_Reason"], r["Assessment_Type"]): r for r in rows[f["file_name"]]}

        first, second = keyed(f1), keyed(f2)
        # Exact duplicates happen (as in real extracts; DHSC de-duplicates them) but are rare.
        assert len(first) > 0.995 * len(rows[f1["file_name"]])
        for key, row in first.items():
            end = parse_date(row["Event_End_Date"])
            if end is None or end >= q2_start:
                # Still open, or ended inside the overlap: resubmitted in the next rolling file.
                assert key in second, (la_code, key)
                if end is not None:
                    assert parse_date(second[key]["Event_End_Date"]) == end
            else:
                assert key not in second, "events that ended before the next window are not resubmitted"
        # Rows new in the second file started or ended in its last three months, or changed state.
        new = [r for k, r in second.items() if k not in first]
        assert new and all(parse_date(r["Event_Start_Date"]) > dt.date.fromisoformat(e1)
                           or (parse_date(r["Event_End_Date"]) or q2_end) > dt.date.fromisoformat(e1) for r in new)
        assert len(set(first) & set(second)) / len(second) > 0.5


def test_journeys_are_consistent(clean_collection):
    _, manifest, rows = clean_collection
    types = Counter()
    for f in manifest["files"]:
        end_of_period = dt.date.fromisoformat(f["reporting_period_end"])
        start_of_period = dt.date.fromisoformat(f["reporting_period_start"])
        for row in rows[f["file_name"]]:
            types[row["Event_Type"]] += 1
            start, end = parse_date(row["Event_Start_Date"]), parse_date(row["Event_End_Date"])
            death = parse_date(row["Date_of_Death"])
            assert start is not None and start <= end_of_period
            if row["Event_Type"] != SERVICE:
                assert end is not None, "requests, assessments and reviews are submitted once completed"
            if end is not None:
                assert start <= end <= end_of_period and end >= start_of_period
            if death is not None:
                assert start <= death, "no event starts after the person's death"
                if row["Event_Type"] == SERVICE:
                    assert end is not None and end <= death, "death ends services"
            if row["Event_Type"] == SERVICE:
                assert row["Service_Type"] and row["Service_Component"]
            assert bool(row["Request_Route_of_Access"]) == (row["Event_Type"] == REQUEST)
            assert bool(row["Assessment_Type"]) == (row["Event_Type"] == ASSESSMENT)
            assert bool(row["Review_Reason"]) == (row["Event_Type"] == REVIEW)
    assert set(types) == {REQUEST, ASSESSMENT, SERVICE, REVIEW}
    assert types[SERVICE] > types[REVIEW] > 0 and types[REQUEST] > types[ASSESSMENT]


def test_people_look_like_adult_social_care(clean_collection):
    _, manifest, rows = clean_collection
    people = {}
    identity = defaultdict(set)
    for f in manifest["files"]:
        ref = dt.date.fromisoformat(f["reporting_period_end"])
        for row in rows[f["file_name"]]:
            assert is_valid_nhs_number(row["NHS_Number"]) and row["NHS_Number"].startswith("999")
            people[row["NHS_Number"]] = ((ref - parse_date(row["Date_of_Birth"])).days / 365.25, row)
            identity[row["NHS_Number"]].add((row["LA_Code"], row["LA_Person_Unique_Identifier"], row["Date_of_Birth"]))
    ages = [a for a, _ in people.values()]
    assert min(ages) >= 17.5 and sum(a >= 65 for a in ages) / len(ages) > 0.5
    # One NHS number is one person: same council, LA id and birth date wherever it appears.
    assert all(len(v) == 1 for v in identity.values())
    ethnic = Counter(r["Ethnicity"] for _, r in people.values())
    assert ethnic.most_common(1)[0][0] == V["ethnicity"].values[0] and len(ethnic) >= 10
    assert any(r["Date_of_Death"] for _, r in people.values())


def test_carers_are_linked_to_the_people_they_care_for(clean_collection):
    _, _, rows_by_file = clean_collection
    ct = V["client_type"]
    carer_types = {ct.codes.value("unpaid_carer"), ct.codes.value("carer_by_association")}
    linked = found = 0
    for rows in rows_by_file.values():
        ids = {r["LA_Person_Unique_Identifier"] for r in rows}
        for r in rows:
            if r["Adult_1_Linked_Person_ID"]:
                assert r["Client_Type"] in carer_types
                linked += 1
                found += r["Adult_1_Linked_Person_ID"] in ids
    assert linked > 20 and found / linked > 0.8


def test_resubmissions_correct_an_earlier_file(tiny_collection, tiny_rows):
    data_dir, manifest = tiny_collection
    versions = defaultdict(list)
    for f in manifest["files"]:
        versions[(f["la_code"], f["quarter"])].append(f)
    resubmitted = [sorted(v, key=lambda f: f["submitted_at"]) for v in versions.values() if len(v) > 1]
    assert resubmitted, "TINY asks for resubmissions"
    for first, second in resubmitted:
        assert (first["version"], second["version"]) == (1, 2)
        assert first["rows"] == second["rows"] and second["defects"] < first["defects"]
        assert second["submitted_at"] > first["submitted_at"]
        # Same events in the same order; the only differences are the defects of either file.
        defective = touched(data_dir)
        for i, (a, b) in enumerate(zip(tiny_rows[first["file_name"]], tiny_rows[second["file_name"]]), start=1):
            if (first["file_name"], i) in defective or (second["file_name"], i) in defective:
                continue
            differing = {k for k in a if a[k] != b[k]}
            assert differing <= {"Event_Reference"}, (i, differing)


def test_hospital_extract_links_to_social_care(tiny_collection, tiny_rows):
    data_dir, manifest = tiny_collection
    assert len(manifest["hospital_files"]) == 5  # four quarters before the first period end, and the next
    spells = []
    for h in manifest["hospital_files"]:
        with (data_dir / "landing" / h["file_name"]).open(encoding="utf-8") as fh:
            rows = list(csv.DictReader(fh))
        assert len(rows) == h["rows"] > 0
        assert list(rows[0]) == [f.name for f in load_spec().hospital_fields]
        spells += rows
    for s in spells:
        assert is_valid_nhs_number(s["NHS_Number"])
        if s["Discharge_Date"]:
            assert s["Admission_Date"] <= s["Discharge_Date"]
            if s["Discharge_Ready_Date"]:
                assert s["Admission_Date"] <= s["Discharge_Ready_Date"] <= s["Discharge_Date"]
    discharges = defaultdict(list)
    for s in spells:
        if s["Discharge_Date"] and s["Last_Episode_In_Spell"] == "1":
            discharges[s["NHS_Number"]].append(dt.date.fromisoformat(s["Discharge_Date"]))
    route = V["request_route_of_access"].codes.value("hospital_discharge")
    from_hospital = matched = 0
    window_start = min(dt.date.fromisoformat(h["quarter"][:4] + "-01-01") for h in manifest["hospital_files"])
    for rows in tiny_rows.values():
        for r in rows:
            start = parse_date(r["Event_Start_Date"])
            if r["Request_Route_of_Access"] == route and is_valid_nhs_number(r["NHS_Number"]) and start and start > window_start + dt.timedelta(days=30):
                from_hospital += 1
                matched += any(0 <= (start - d).days <= 3 for d in discharges.get(r["NHS_Number"], []))
    assert from_hospital > 20 and matched / from_hospital > 0.95


def test_council_volumes_follow_population(tmp_path):
    manifest = generate(GeneratorConfig(scale="small", seed=3, hospital=False, defects=TINY.defects.scaled(0)),
                        tmp_path, progress=False)
    las = load_local_authorities()
    rows = Counter()
    for f in manifest["files"]:
        if f["version"] == 1:
            rows[f["la_code"]] += f["rows"]
    assert len(rows) == len(las) == 153
    assert 150_000 < manifest["rows"] < 400_000
    weight = {la.submission_code: 0.35 * la.population_18_plus + 0.65 * la.population_65_plus for la in las}
    codes = sorted(rows)
    assert np.corrcoef([rows[c] for c in codes], [weight[c] for c in codes])[0, 1] > 0.97
    assert json.loads((tmp_path / "synthetic" / "manifest.json").read_text())["defect_counts"] == {}


def test_cli_generate_writes_into_the_data_dir(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("CLD_DATA_DIR", str(tmp_path))
    assert cli_main(["generate", "--scale", "tiny", "--quiet", "--no-hospital", "--no-defects",
                     "--la", "714", "--rows", "500"]) == 0
    summary = json.loads(capsys.readouterr().out)
    files = list((tmp_path / "landing").glob("*.csv"))
    assert summary["submission_files"] == len(files) >= 1
    assert all(r["LA_Code"] == "714" for f in files for r in read_submission(f))


def test_cli_rejects_a_date_that_is_not_a_quarter_end(capsys):
    with pytest.raises(SystemExit):
        cli_main(["generate", "--period-end", "2026-08-31"])
    assert "not a calendar quarter end" in capsys.readouterr().err
