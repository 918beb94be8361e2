"""Reading submission files: whole-file refusals in plain words, and lossless record parsing."""

from __future__ import annotations

import csv
import datetime as dt
import io
import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from cld_pipeline.lib.ingest.submission_files import (
    SubmissionRefused,
    check_name,
    inspect_submission,
    is_partial_name,
    parse_date,
    read_submission,
)
from cld_pipeline.spec import load_spec

SPEC = load_spec()
HEADER = [f.name for f in SPEC.fields]
RECEIVED = dt.date(2026, 11, 1)


def record(**values) -> dict[str, str]:
    base = {name: "" for name in HEADER}
    base.update({"LA_Code": "714", "Reporting_Period_Start_Date": "2025-10-01",
                 "Reporting_Period_End_Date": "2026-09-30", "NHS_Number": "9990000018",
                 "LA_Person_Unique_Identifier": "P1", "Event_Type": "Request",
                 "Event_Start_Date": "2026-01-05", "Event_End_Date": "2026-01-06"})
    base.update(values)
    return base


def write(path: Path, rows: list[dict], header: list[str] = HEADER, newline: str = "\n", bom: bool = False) -> Path:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=header, lineterminator=newline, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + buffer.getvalue().encode("utf-8"))
    return path


def refusal(path: Path) -> SubmissionRefused:
    with pytest.raises(SubmissionRefused) as caught:
        inspect_submission(path, received=RECEIVED)
    return caught.value


def test_a_good_file_gives_its_partition(tmp_path):
    facts = inspect_submission(write(tmp_path / "a.csv", [record(), record(), record()], bom=True, newline="\r\n"),
                               received=RECEIVED)
    assert (facts.la_code, facts.quarter, facts.rows) == ("714", "2026-Q3", 3)
    assert facts.reporting_period_start == dt.date(2025, 10, 1) and len(facts.sha256) == 64


def test_councils_without_a_cassr_code_submit_their_ons_code(tmp_path):
    facts = inspect_submission(write(tmp_path / "a.csv", [record(LA_Code="E06000061")]), received=RECEIVED)
    assert facts.la_code == "E06000061"


@pytest.mark.parametrize("content, reason", [
    (b"", "empty_file"),
    (b"\xef\xbb\xbf\r\n", "empty_file"),
    (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "binary_file"),
    ("LA_Code,Name\n714,Jos\u00e9\n".encode("cp1252"), "not_utf8"),
    (b"Name,Other\nx,y\n", "missing_columns"),
])
def test_files_refused_whole(tmp_path, content, reason):
    path = tmp_path / "f.csv"
    path.write_bytes(content)
    assert refusal(path).reason == reason


def test_header_only_and_duplicate_columns_are_refused(tmp_path):
    assert refusal(write(tmp_path / "a.csv", [])).reason == "no_rows"
    assert refusal(write(tmp_path / "b.csv", [record()], header=HEADER + ["nhs number"])).reason == "duplicate_column"


def test_la_code_must_be_shared_by_most_rows_and_known(tmp_path):
    mixed = [record(LA_Code="714"), record(LA_Code="906"), record(LA_Code="503"), record(LA_Code="714")]
    refused = refusal(write(tmp_path / "a.csv", mixed))
    assert refused.reason == "no_majority_la" and "2 of 4 rows" in refused.message
    # A minority of other codes is accepted here: those rows are rejected one by one in validation.
    facts = inspect_submission(write(tmp_path / "b.csv", mixed + [record(LA_Code="714")]), received=RECEIVED)
    assert facts.la_code == "714" and facts.la_share == pytest.approx(0.6)
    assert refusal(write(tmp_path / "c.csv", [record(LA_Code="999")])).reason == "unknown_la_code"


def test_identifiers_never_reach_a_refusal_message(tmp_path):
    shifted = [record(LA_Code="9990000018", Reporting_Period_End_Date="1947-03-02")] * 3
    message = refusal(write(tmp_path / "a.csv", shifted)).message
    assert "9990000018" not in message and "1947" not in message


@pytest.mark.parametrize("end, start, reason", [
    ("", "2025-10-01", "missing_reporting_period"),
    ("not a date", "2025-10-01", "missing_reporting_period"),
    ("2027-03-31", "2026-04-01", "impossible_reporting_period"),   # after the file arrived
    ("2026-09-30", "2026-12-01", "impossible_reporting_period"),   # starts after it ends
    ("2019-03-31", "2018-04-01", "impossible_reporting_period"),
])
def test_reporting_period_must_be_present_and_possible(tmp_path, end, start, reason):
    rows = [record(Reporting_Period_End_Date=end, Reporting_Period_Start_Date=start)]
    assert refusal(write(tmp_path / "a.csv", rows)).reason == reason


def test_uk_dates_are_accepted(tmp_path):
    facts = inspect_submission(write(tmp_path / "a.csv", [record(Reporting_Period_End_Date="30/09/2026",
                                                                 Reporting_Period_Start_Date="01/10/2025")]),
                               received=RECEIVED)
    assert facts.quarter == "2026-Q3"


def test_names_that_could_escape_the_folder(tmp_path):
    landing = tmp_path / "landing"
    landing.mkdir()
    (tmp_path / "secret.csv").write_text("x")
    os.symlink(tmp_path / "secret.csv", landing / "link.csv")
    for name in ("../secret.csv", "..", "a/b.csv", "-rf.csv", "x.csv\x00.txt", "noextension"):
        with pytest.raises(SubmissionRefused) as caught:
            check_name(landing, name)
        assert caught.value.reason == "unsafe_file_name"
    with pytest.raises(SubmissionRefused) as caught:
        check_name(landing, "link.csv")
    assert caught.value.reason == "file_outside_landing"
    assert check_name(landing, "CLD 714 (v2).csv") == landing / "CLD 714 (v2).csv"
    assert is_partial_name("a.csv.part") and is_partial_name(".a.csv.Xy12Zq") and not is_partial_name("a.csv")
    # A hidden name ending in .csv is no transfer tool's temporary file: it is refused, not left waiting.
    assert not is_partial_name(".hidden.csv") and not is_partial_name("..x.csv")
    for name in (".hidden.csv", "..x.csv"):
        with pytest.raises(SubmissionRefused) as caught:
            check_name(landing, name)
        assert caught.value.reason == "unsafe_file_name"


def test_malformed_records_are_kept_whole(tmp_path):
    path = write(tmp_path / "a.csv", [record(), record()])
    lines = path.read_text().splitlines()
    lines.insert(2, lines[1] + ",SURPLUS")          # a record with one field too many
    lines.append(",".join(lines[1].split(",")[:5]))  # and one cut short
    path.write_text("\n".join(lines) + "\n")
    facts = inspect_submission(path, received=RECEIVED)
    table = read_submission(path, facts.columns)
    assert table.num_rows == facts.rows == 4
    assert table.column("row_number").to_pylist() == [1, 2, 3, 4]
    assert table.column("field_count").to_pylist() == [len(HEADER), len(HEADER) + 1, len(HEADER), 5]
    assert "SURPLUS" in table.column("extra_values")[1].as_py()
    assert table.column("event_type").to_pylist() == ["Request", "Request", "Request", None]


def test_unknown_columns_are_kept_and_absent_optional_columns_are_null(tmp_path):
    header = [h for h in HEADER if h != "Dementia"] + ["Local_Note"]
    rows = [{**record(), "Local_Note": "kept"}]
    path = write(tmp_path / "a.csv", rows, header=header)
    facts = inspect_submission(path, received=RECEIVED)
    table = read_submission(path, facts.columns)
    assert table.column("dementia").to_pylist() == [None]
    assert '"Local_Note": "kept"' in table.column("extra_values")[0].as_py()


text = st.text(alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00\r"), max_size=12)


@settings(max_examples=60, suppress_health_check=[HealthCheck.function_scoped_fixture], deadline=None)
@given(values=st.lists(st.tuples(text, text, text), min_size=1, max_size=8))
def test_records_round_trip_exactly(tmp_path, values):
    """Whatever text a council writes (commas, quotes, newlines, spaces, 'NULL'), raw keeps it."""
    rows = [record(Event_Description=a, Provider_CQC_Location_Name=b, GP_Practice_Name=c) for a, b, c in values]
    path = write(tmp_path / "r.csv", rows)
    table = read_submission(path, inspect_submission(path, received=RECEIVED).columns)
    for column, index in (("event_description", 0), ("provider_cqc_location_name", 1), ("gp_practice_name", 2)):
        assert table.column(column).to_pylist() == [v[index] or None for v in values]


@given(st.dates(min_value=dt.date(1900, 1, 1), max_value=dt.date(2100, 12, 31)))
def test_both_date_formats_parse(day):
    assert parse_date(day.isoformat()) == day
    assert parse_date(day.strftime("%d/%m/%Y")) == day
    assert parse_date(f" {day.isoformat()} ") == day


@pytest.mark.parametrize("text", ["31/02/2025", "2025-13-01", "2025-02-30", "yesterday", "", None, "00/00/2025"])
def test_impossible_dates_do_not_parse(text):
    assert parse_date(text) is None
