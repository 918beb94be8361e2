"""Reading a council's submission file: checks that refuse a file whole, and lossless parsing.

No Dagster here. The sensor (to find a file's partition) and the raw asset (authoritatively, on the
archived copy) run the same `inspect_submission`; `read_submission` turns every record into text
columns with its row number and nothing dropped: malformed records (too many or too few fields) are
kept with their field count and any surplus values.
"""

from __future__ import annotations

import codecs
import csv
import datetime as dt
import hashlib
import json
import os
import re
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from cld_pipeline.reference import load_local_authorities
from cld_pipeline.spec import CLDField, load_spec, normalise_header

CHUNK = 1 << 20
# A CLD record is about half a kilobyte; a line 128 times that long is not a record but a file
# without line breaks, or an attack on the readers' memory. It is refused before any parsing.
MAX_LINE_BYTES = 64 * 1024
SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._ ()+-]{0,200}\.csv$", re.IGNORECASE)
# Names of files still being written by common tools; never picked up.
PARTIAL_SUFFIXES = (".tmp", ".part", ".partial", ".crdownload", ".filepart", ".swp")
# The collection began in April 2023: no reporting period ends before its first quarter.
EARLIEST_PERIOD_END = dt.date(2023, 6, 30)
LA_CODE_SHAPE = re.compile(r"^(\d{3}|E\d{8})$")


class SubmissionRefused(Exception):
    """A file that cannot be processed at all. `reason` is a stable code, `message` plain words."""

    def __init__(self, reason: str, message: str, **details):
        super().__init__(message)
        self.reason, self.message, self.details = reason, message, details


@dataclass(frozen=True)
class FileFacts:
    """What one streaming pass over the bytes tells: checksum, size, and text problems."""

    sha256: str
    size: int


@dataclass
class SubmissionFacts:
    """What the content says about a submission (enough to choose its partition)."""

    sha256: str
    size: int
    la_code: str                       # the council's submission code (reference)
    quarter: str                       # e.g. 2026-Q3, calendar quarter of the reporting period end
    reporting_period_start: dt.date | None
    reporting_period_end: dt.date
    rows: int
    header: list[str]                  # as submitted
    columns: dict[int, str]            # position -> CLD field name
    unknown_columns: dict[int, str] = field(default_factory=dict)
    la_share: float = 1.0              # share of rows carrying the file's LA code


def received_time(mtime: float | dt.datetime, now: float | None = None) -> dt.datetime:
    """When a file was received (naive UTC): the pipeline's own clock when it first saw the file, or
    the file's modification time where that is earlier (transfer tools keep the sender's time, and
    a council's resubmissions are ordered by it). The sender controls the modification time, so a
    time after the pipeline's clock is never believed."""
    clock = dt.datetime.fromtimestamp(time.time() if now is None else now, dt.timezone.utc).replace(tzinfo=None)
    if isinstance(mtime, dt.datetime):
        stated = mtime.replace(tzinfo=None) if mtime.tzinfo is None else \
            mtime.astimezone(dt.timezone.utc).replace(tzinfo=None)
    else:
        stated = dt.datetime.fromtimestamp(mtime, dt.timezone.utc).replace(tzinfo=None)
    return min(stated, clock)


def quarter_of(day: dt.date) -> str:
    return f"{day.year}-Q{(day.month - 1) // 3 + 1}"


def is_partial_name(name: str) -> bool:
    """Names of files still being written: never picked up. A hidden name ending in `.csv` is not
    one (transfer tools' temporary names carry a suffix), so it is refused rather than left waiting."""
    lower = name.lower()
    return lower.endswith(PARTIAL_SUFFIXES) or (name.startswith(".") and not lower.endswith(".csv"))


def check_name(landing: Path, name: str) -> Path:
    """The file's path inside `landing`, or a refusal when the name could reach anything else."""
    path = landing / name
    if ("/" in name or "\\" in name or name in ("", ".", "..") or not SAFE_NAME.match(name)
            or "\x00" in name):
        raise SubmissionRefused("unsafe_file_name", f"The file name {name!r} is not allowed: use letters, digits, "
                                "spaces, dots, dashes and underscores, ending in .csv.")
    if path.is_symlink() or path.resolve().parent != landing.resolve():
        raise SubmissionRefused("file_outside_landing", f"{name!r} points outside the landing folder "
                                "(a link or path escape); only regular files placed in the folder are read.")
    if path.exists() and not path.is_file():
        raise SubmissionRefused("not_a_regular_file", f"{name!r} is not a regular file (a pipe, socket, device or "
                                "folder); only files placed in the folder are read.")
    return path


# Leading bytes of files that are not CSV text, with what to tell the sender.
SIGNATURES = (
    (b"\x1f\x8b", "gzip_file", "The file is gzip-compressed. Decompress it and submit the CSV file itself."),
    (b"PK\x03\x04", "zip_file", "The file is a ZIP archive or an Excel workbook (.xlsx), not CSV text. Save the "
                                  "sheet as 'CSV UTF-8' and submit that."),
    (b"\xd0\xcf\x11\xe0", "excel_file", "The file is an old Excel workbook (.xls), not CSV text. Save the sheet "
                                          "as 'CSV UTF-8' and submit that."),
    (b"\xff\xfe", "utf16_file", "The file is UTF-16 text. Save it as 'CSV UTF-8' and submit it again."),
    (b"\xfe\xff", "utf16_file", "The file is UTF-16 text. Save it as 'CSV UTF-8' and submit it again."),
)


def _sniff(head: bytes) -> None:
    for magic, reason, message in SIGNATURES:
        if head.startswith(magic):
            raise SubmissionRefused(reason, message)
    # UTF-16 without a byte-order mark: every other byte of ASCII text is NUL.
    if len(head) >= 4 and head[1::2].count(0) * 2 >= len(head[1::2]) * 2 - 2 and head[0::2].count(0) == 0:
        raise SubmissionRefused("utf16_file", "The file is UTF-16 text. Save it as 'CSV UTF-8' and submit it again.")


def scan_bytes(path: Path) -> FileFacts:
    """One pass: SHA-256, size, and refusal of empty, compressed, binary, non-UTF-8 files and of
    lines too long to be records (named by line number, never quoted)."""
    digest = hashlib.sha256()
    decoder = codecs.getincrementaldecoder("utf-8")()
    size = 0
    line = 1
    line_bytes = 0
    has_text = False
    with path.open("rb") as fh:
        while chunk := fh.read(CHUNK):
            if size == 0:
                _sniff(chunk[:64])
            digest.update(chunk)
            has_text = has_text or bool(chunk.strip(b"\xef\xbb\xbf\r\n\t "))
            if b"\x00" in chunk:
                raise SubmissionRefused("binary_file", "The file contains binary data (NUL bytes); it is not a CSV "
                                        "text file. Export the submission again as CSV.")
            try:
                decoder.decode(chunk)
            except UnicodeDecodeError as err:
                at = chunk[: err.start].count(b"\n") + line
                raise SubmissionRefused(
                    "not_utf8", f"The file is not UTF-8 text: byte 0x{chunk[err.start]:02X} on line {at} cannot be "
                    "read. Save the file as 'CSV UTF-8' and submit it again.", line=at) from None
            start = 0
            while True:
                end = chunk.find(b"\n", start)
                line_bytes += (len(chunk) if end < 0 else end) - start
                if line_bytes > MAX_LINE_BYTES:
                    raise SubmissionRefused(
                        "line_too_long", f"Line {line} of the file is longer than {MAX_LINE_BYTES:,} bytes: a CLD "
                        "record is a few hundred. The file is not a CSV export with one record per line.", line=line)
                if end < 0:
                    break
                line += 1
                line_bytes = 0
                start = end + 1
            size += len(chunk)
        try:
            decoder.decode(b"", final=True)
        except UnicodeDecodeError:
            raise SubmissionRefused("not_utf8", "The file ends in the middle of a character: it is not complete "
                                    "UTF-8 text. Save it as 'CSV UTF-8' and submit it again.") from None
    if not has_text:
        raise SubmissionRefused("empty_file", "The file is empty: it has no header and no rows.")
    return FileFacts(sha256=digest.hexdigest(), size=size)


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def read_header(path: Path) -> list[str]:
    csv.field_size_limit(MAX_LINE_BYTES)
    with path.open(encoding="utf-8-sig", newline="") as fh:
        try:
            return next(csv.reader(fh))
        except StopIteration:
            raise SubmissionRefused("empty_file", "The file is empty: it has no header and no rows.") from None


def map_columns(header: list[str]) -> tuple[dict[int, str], dict[int, str]]:
    """Header positions -> CLD field (case-insensitive, spaces and underscores alike), plus the
    positions of unrecognised columns. Refuses missing required columns and ambiguous headers."""
    spec = load_spec()
    lookup = spec.header_lookup()
    columns: dict[int, str] = {}
    unknown: dict[int, str] = {}
    for i, name in enumerate(header):
        field_name = lookup.get(normalise_header(name))
        if field_name is None:
            unknown[i] = name
        elif field_name in columns.values():
            raise SubmissionRefused("duplicate_column", f"The column {field_name} appears more than once in the "
                                    "header; each CLD field must appear once.", column=field_name)
        else:
            columns[i] = field_name
    missing = [f.name for f in spec.fields if f.required_column and f.name not in columns.values()]
    if missing:
        raise SubmissionRefused("missing_columns", "The header lacks mandatory CLD columns: " + ", ".join(missing)
                                + ". Check the header row against the CLD Release 2 specification.", missing=missing)
    return columns, unknown


def parse_date(text: str | None) -> dt.date | None:
    """Dates as the contract allows: YYYY-MM-DD or DD/MM/YYYY (surrounding spaces ignored)."""
    if not text:
        return None
    text = text.strip()
    for fmt in ("%Y-%m-%d", "%d/%m/%Y"):
        try:
            return dt.datetime.strptime(text, fmt).date()
        except ValueError:
            continue
    return None


def _mode(values: pa.ChunkedArray) -> tuple[str | None, int, int]:
    """Most common non-blank value, its count, and the number of rows."""
    trimmed = pc.utf8_trim_whitespace(values)
    counts = pc.value_counts(trimmed.filter(pc.and_(pc.is_valid(trimmed), pc.not_equal(trimmed, ""))))
    if len(counts) == 0:
        return None, 0, len(values)
    best = max(counts.to_pylist(), key=lambda c: c["counts"])
    return best["values"], best["counts"], len(values)


def unreadable(err: BaseException) -> SubmissionRefused:
    """Any other failure to read a file, as a refusal that names the exception's type only: parsers'
    messages can quote the file's content."""
    return SubmissionRefused("unreadable_file", f"The file could not be read as CSV ({type(err).__name__}). Check "
                             "that it is a CSV export with one header row and one record per line, and submit it "
                             "again.")


@contextmanager
def refusing_unreadable():
    """Whatever goes wrong while a file is read becomes a refusal of that file (`unreadable`)."""
    try:
        yield
    except SubmissionRefused:
        raise
    except MemoryError:
        raise
    except Exception as err:   # noqa: BLE001 - one bad file must never stop the others
        raise unreadable(err) from None


def inspect_submission(path: Path, received: dt.date | None = None) -> SubmissionFacts:
    """Everything that decides whether a file is processed and in which partition; raises
    SubmissionRefused with plain words otherwise, whatever goes wrong. Reads only the three columns
    it needs."""
    with refusing_unreadable():
        return _inspect(path, received)


def _inspect(path: Path, received: dt.date | None) -> SubmissionFacts:
    facts = scan_bytes(path)
    header = read_header(path)
    columns, unknown = map_columns(header)
    by_field = {name: i for i, name in columns.items()}
    table = _read_fast(path, len(header), include=[by_field["LA_Code"], by_field["Reporting_Period_Start_Date"],
                                                   by_field["Reporting_Period_End_Date"]])
    if table is None:  # malformed records: read the three columns exactly
        table = read_submission(path, columns).select(["la_code", "reporting_period_start_date",
                                                       "reporting_period_end_date"])
    return _judge(facts, header, columns, unknown, table.rename_columns(["la", "start", "end"]), received)


def inspect_and_read(path: Path, received: dt.date | None = None) -> tuple[SubmissionFacts, pa.Table]:
    """`inspect_submission` and `read_submission` in one parse of the file (for the raw asset)."""
    with refusing_unreadable():
        facts = scan_bytes(path)
        header = read_header(path)
        columns, unknown = map_columns(header)
        records = read_submission(path, columns)
    three = records.select(["la_code", "reporting_period_start_date", "reporting_period_end_date"])
    return _judge(facts, header, columns, unknown, three.rename_columns(["la", "start", "end"]), received), records


def _judge(facts: FileFacts, header: list[str], columns: dict[int, str], unknown: dict[int, str], table: pa.Table,
           received: dt.date | None) -> SubmissionFacts:
    rows = table.num_rows
    if rows == 0:
        raise SubmissionRefused("no_rows", "The file has a header but no data rows.")
    la_value, la_count, total = _mode(table.column("la"))
    # Values are only echoed when they look like what they should be: a misaligned column could
    # otherwise put an NHS number or a date of birth into a message that reaches the event log.
    shown = repr(la_value) if la_value and LA_CODE_SHAPE.match(la_value) else "(not an LA code)"
    if la_value is None or la_count * 2 <= total:
        raise SubmissionRefused(
            "no_majority_la", "No LA code is shared by most rows, so the file's council cannot be told. "
            f"The most common LA code {shown} is on {la_count} of {total} rows.")
    council = load_local_authorities().get(la_value)
    if council is None:
        raise SubmissionRefused("unknown_la_code", f"The LA code {shown} is not one of England's 153 councils "
                                "with adult social services responsibilities.")
    end_text, _, _ = _mode(table.column("end"))
    start_text, _, _ = _mode(table.column("start"))
    end, start = parse_date(end_text), parse_date(start_text)
    received = received or dt.date.today()
    if end is None:
        raise SubmissionRefused("missing_reporting_period", "The reporting period end date is missing or not a "
                                "date; write it as YYYY-MM-DD or DD/MM/YYYY on every row.")
    if end > received + dt.timedelta(days=1) or end < EARLIEST_PERIOD_END or (start is not None and start > end):
        # The dates are not quoted: with swapped headers they could be people's dates of birth.
        raise SubmissionRefused("impossible_reporting_period", "The reporting period (Reporting_Period_Start_Date "
                                "and Reporting_Period_End_Date, the values most rows carry) is impossible: it must end "
                                "on or before the day the file is received, after its start, and not before the "
                                f"collection's first quarter ended ({EARLIEST_PERIOD_END.isoformat()}).")
    return SubmissionFacts(sha256=facts.sha256, size=facts.size, la_code=council.submission_code, quarter=quarter_of(end),
                           reporting_period_start=start, reporting_period_end=end, rows=rows, header=header,
                           columns=columns, unknown_columns=unknown, la_share=la_count / total)


def _read_fast(path: Path, width: int, include: list[int] | None = None) -> pa.Table | None:
    """Arrow's multithreaded reader when every record has the header's width; None otherwise."""
    names = [f"c{i}" for i in range(width)]
    malformed = []

    def invalid(row) -> str:
        malformed.append(row.number)
        return "skip"

    table = pacsv.read_csv(
        path,
        read_options=pacsv.ReadOptions(column_names=names, skip_rows=1, block_size=8 << 20),
        parse_options=pacsv.ParseOptions(newlines_in_values=True, invalid_row_handler=invalid),
        convert_options=pacsv.ConvertOptions(
            column_types={n: pa.string() for n in names}, strings_can_be_null=True,
            null_values=[""], quoted_strings_can_be_null=True,
            include_columns=[names[i] for i in include] if include is not None else None),
    )
    if malformed:
        return None  # the exact reader keeps those records and their numbering
    return table


def read_submission(path: Path, columns: dict[int, str], fields: tuple[CLDField, ...] | None = None) -> pa.Table:
    """Every record as text: `row_number` (1 = first data row), `field_count`, one column per field
    (CLD fields unless `fields` says otherwise; NULL when blank or absent), and `extra_values` (JSON)
    for unrecognised columns or surplus fields."""
    fields = load_spec().fields if fields is None else fields
    header = read_header(path)
    table = _read_fast(path, len(header))
    if table is not None:
        n = table.num_rows
        out = {"row_number": pa.array(range(1, n + 1), pa.int64()),
               "field_count": pa.array([len(header)] * n, pa.int32())}
        by_field = {name: i for i, name in columns.items()}
        for f in fields:
            out[f.column] = table.column(by_field[f.name]) if f.name in by_field else pa.nulls(n, pa.string())
        unknown = [i for i in range(len(header)) if i not in columns]
        out["extra_values"] = _extra_json(table, header, unknown) if unknown else pa.nulls(n, pa.string())
        return pa.table(out)
    return _read_exact(path, header, columns, fields)


def _extra_json(table: pa.Table, header: list[str], positions: list[int]) -> pa.Array:
    values = [table.column(i).to_pylist() for i in positions]
    keys = [header[i] for i in positions]
    return pa.array([json.dumps(dict(zip(keys, row)), ensure_ascii=False) for row in zip(*values)], pa.string())


def _read_exact(path: Path, header: list[str], columns: dict[int, str], fields: tuple[CLDField, ...]) -> pa.Table:
    """Python's csv module, record by record: slower, but keeps malformed records whole."""
    width = len(header)
    cols: dict[str, list] = {"row_number": [], "field_count": []}
    cols.update({f.column: [] for f in fields})
    cols["extra_values"] = []
    by_name = {f.name: f for f in fields}
    column_of = {i: by_name[name].column for i, name in columns.items()}
    absent = [f.column for f in fields if f.name not in columns.values()]
    csv.field_size_limit(MAX_LINE_BYTES)   # scan_bytes refused longer lines (a quoted field may span lines)
    with path.open(encoding="utf-8-sig", newline="") as fh:
        reader = csv.reader(fh)
        next(reader)
        for number, record in enumerate(reader, start=1):
            cols["row_number"].append(number)
            cols["field_count"].append(len(record))
            for i, col in column_of.items():
                cols[col].append(record[i] if i < len(record) and record[i] != "" else None)
            for col in absent:
                cols[col].append(None)
            extra = {header[i]: record[i] for i in range(min(width, len(record))) if i not in columns}
            extra.update({f"_surplus_{k}": v for k, v in enumerate(record[width:], start=1)})
            cols["extra_values"].append(json.dumps(extra, ensure_ascii=False) if extra else None)
    schema = [("row_number", pa.int64()), ("field_count", pa.int32())]
    schema += [(f.column, pa.string()) for f in fields] + [("extra_values", pa.string())]
    return pa.table(cols, schema=pa.schema(schema))


def archive_copy(source: Path, archive: Path, sha256: str) -> Path:
    """Copy byte-for-byte into `archive/<sha256>` (write, fsync, rename; verified), once."""
    archive.mkdir(parents=True, exist_ok=True)
    target = archive / sha256
    if target.exists() and sha256_of(target) == sha256:
        return target
    tmp = archive / f".{sha256}.{os.getpid()}.tmp"
    with source.open("rb") as src, tmp.open("wb") as dst:
        shutil.copyfileobj(src, dst, CHUNK)
        dst.flush()
        os.fsync(dst.fileno())
    if sha256_of(tmp) != sha256:
        tmp.unlink()
        raise RuntimeError(f"{source.name} changed while it was being archived; it will be read again")
    os.replace(tmp, target)
    return target


def confined_name(name: str, suffix: str = "") -> str:
    """`name + suffix` when that is one ordinary file name, else `refused-<digest>` + suffix."""
    plain = (name and len(name) <= 200 and name not in (".", "..") and not any(c in name for c in "/\\\x00")
             and not name.startswith("-"))
    return (name if plain else "refused-" + hashlib.sha256(name.encode("utf-8", "replace")).hexdigest()[:16]) + suffix


def write_refusal(quarantine: Path, name: str, refusal: SubmissionRefused, sha256: str | None,
                  received_at: dt.datetime) -> Path:
    """`quarantine/<name>.error.json`: why the file was refused, in plain words. Always inside
    `quarantine`: a name that is not one plain path component (run config can say anything) is
    replaced by a digest of it, and the name itself is kept in the JSON."""
    quarantine.mkdir(parents=True, exist_ok=True)
    path = quarantine / confined_name(name, ".error.json")
    path.write_text(json.dumps({
        "file_name": name,
        "refused_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "received_at": received_at.isoformat(timespec="seconds"),
        "reason": refusal.reason,
        "message": refusal.message,
        "sha256": sha256,
        "archived_as": f"archive/{sha256}" if sha256 else None,
        "what_to_do": "Correct the file and place it in the landing folder again; nothing from it was loaded.",
        "details": {k: v for k, v in refusal.details.items() if k not in ("sha256",)},
    }, indent=2), encoding="utf-8")
    return path


