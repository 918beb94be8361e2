"""The data-quality report a council receives for each submission: one HTML page and one CSV.

Row numbers and the council's own event references point to the records; no identifier, date or
other submitted value is shown. HTML is escaped by Jinja2; CSV cells that a spreadsheet would read
as a formula are prefixed with an apostrophe.
"""

from __future__ import annotations

import csv
from pathlib import Path

from jinja2 import Environment

FORMULA_START = ("=", "+", "-", "@", "\t", "\r")

TEMPLATE = Environment(autoescape=True).from_string("""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<title>CLD data quality: {{ la_name }} {{ quarter }}</title>
<style>
body{font-family:Arial,sans-serif;margin:2rem;color:#0b0c0c;max-width:70rem}
table{border-collapse:collapse;margin:1rem 0}td,th{border:1px solid #b1b4b6;padding:.3rem .6rem;text-align:left}
th{background:#f3f2f1}.reject{color:#d4351c;font-weight:bold}.flag{color:#505a5f}
</style></head><body>
<h1>Client Level Data quality report</h1>
<p><strong>{{ la_name }}</strong> (LA code {{ la_code }}), quarter {{ quarter }}.
File <code>{{ file_name }}</code>, received {{ received_at }}, submission {{ submission_id }}.</p>
<table><tr><th>Rows submitted</th><td>{{ raw_rows }}</td></tr>
<tr><th>Rows accepted</th><td>{{ accepted_rows }}</td></tr>
<tr><th>Rows rejected (cannot be used)</th><td>{{ rejected_rows }}</td></tr>
<tr><th>Rows accepted with a data-quality flag</th><td>{{ flagged_rows }}</td></tr>
<tr><th>Reporting period stated</th><td>{{ stated_period }}</td></tr>
<tr><th>Reporting period derived from the data</th><td>{{ derived_period }}{% if period_differs %} (differs from the stated period){% endif %}</td></tr>
</table>
<h2>Findings by field and rule, worst first</h2>
<table><tr><th>Field</th><th>Rule</th><th>Outcome</th><th>Rows</th><th>What it means</th></tr>
{% for s in summary %}<tr><td>{{ s.field }}</td><td>{{ s.rule }}</td><td class="{{ s.severity }}">{{ 'rejected' if s.severity == 'reject' else 'flagged' }}</td><td>{{ s.rows }}</td><td>{{ s.message }}</td></tr>
{% else %}<tr><td colspan="5">No findings: every row passed every rule.</td></tr>{% endfor %}
</table>
<h2>Rows by event type</h2>
<table><tr><th>Event type</th><th>Submitted</th><th>Rejected</th><th>Flagged</th></tr>
{% for e in event_types %}<tr><td>{{ e.event_type }}</td><td>{{ e.submitted }}</td><td>{{ e.rejected }}</td><td>{{ e.flagged }}</td></tr>{% endfor %}
</table>
<h2>Rows to correct</h2>
<p>Row 1 is the first row after the header. The full list is in the CSV beside this page.</p>
<table><tr><th>Row</th><th>Event reference</th><th>Field</th><th>Rule</th><th>Outcome</th></tr>
{% for r in rows %}<tr><td>{{ r.row_number }}</td><td>{{ r.event_reference or '' }}</td><td>{{ r.field }}</td><td>{{ r.rule }}</td><td class="{{ r.severity }}">{{ 'rejected' if r.severity == 'reject' else 'flagged' }}</td></tr>
{% endfor %}</table>
{% if truncated %}<p>{{ truncated }} more rows are listed in the CSV.</p>{% endif %}
</body></html>
""")

HTML_ROW_LIMIT = 5000


def spreadsheet_safe(value) -> str:
    text = "" if value is None else str(value)
    return "'" + text if text.startswith(FORMULA_START) else text


class ReportWriter:
    """Writes each submission's report from a batch's results in `work` (rejections, dq_flags and
    prepared Parquet files), loading the findings and the rows' references once for the batch."""

    def __init__(self, work: Path):
        from cld_pipeline.settings import work_connection

        self.con = work_connection(work)
        self.con.execute(f"""CREATE TABLE findings AS
            SELECT submission_id, row_number, field, rule, message, 'reject' AS severity
            FROM read_parquet('{work / 'rejections.parquet'}')
            UNION ALL
            SELECT submission_id, row_number, field, rule, message, 'flag'
            FROM read_parquet('{work / 'dq_flags.parquet'}')""")
        self.con.execute(f"""CREATE TABLE submitted_rows AS SELECT submission_id, row_number, event_reference,
            coalesce(event_type_cleaned, '(blank)') AS event_type FROM read_parquet('{work / 'prepared.parquet'}')""")

    def close(self) -> None:
        self.con.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def write(self, folder: Path, info: dict) -> tuple[Path, Path]:
        """`info`: the submission's facts and counts (its `submission_id` selects its findings)."""
        folder.mkdir(parents=True, exist_ok=True)
        con, sid = self.con, {"sid": info["submission_id"]}
        findings = "SELECT * FROM findings WHERE submission_id = $sid"
        summary = con.execute(f"""
            SELECT field, rule, severity, any_value(message) AS message, count(*) AS rows
            FROM ({findings}) GROUP BY field, rule, severity
            ORDER BY CASE WHEN severity = 'reject' THEN 0 ELSE 1 END, rows DESC, field""", sid).fetchall()
        event_types = con.execute(f"""
            WITH f AS ({findings}),
            r AS (SELECT row_number, event_type FROM submitted_rows WHERE submission_id = $sid)
            SELECT event_type, count(*),
                   count(*) FILTER (WHERE row_number IN (SELECT row_number FROM f WHERE severity = 'reject')),
                   count(*) FILTER (WHERE row_number IN (SELECT row_number FROM f WHERE severity = 'flag'))
            FROM r GROUP BY 1 ORDER BY 2 DESC""", sid).fetchall()
        rows_query = f"""
            SELECT f.row_number, p.event_reference, f.field, f.rule, f.severity, f.message
            FROM ({findings}) f JOIN submitted_rows p USING (submission_id, row_number)
            ORDER BY f.row_number, f.severity DESC, f.field"""
        name = f"data_quality_{info['la_code']}_{info['quarter']}_{info['submission_id']}"
        csv_path, html_path = folder / f"{name}.csv", folder / f"{name}.html"
        with csv_path.open("w", newline="", encoding="utf-8") as fh:
            writer = csv.writer(fh)
            writer.writerow(["row_number", "event_reference", "field", "rule", "outcome", "message"])
            cursor = con.execute(rows_query, sid)
            while batch := cursor.fetchmany(10_000):
                writer.writerows([r[0], spreadsheet_safe(r[1]), r[2], r[3],
                                  "rejected" if r[4] == "reject" else "flagged", spreadsheet_safe(r[5])]
                                 for r in batch)
        listed = con.execute(rows_query + f" LIMIT {HTML_ROW_LIMIT}", sid).fetchall()
        total = con.execute(f"SELECT count(*) FROM ({findings})", sid).fetchall()[0][0]
        html_path.write_text(TEMPLATE.render(
            **info,
            summary=[dict(field=s[0], rule=s[1], severity=s[2], message=s[3], rows=s[4]) for s in summary],
            event_types=[dict(event_type=e[0], submitted=e[1], rejected=e[2], flagged=e[3]) for e in event_types],
            rows=[dict(row_number=r[0], event_reference=r[1], field=r[2], rule=r[3], severity=r[4]) for r in listed],
            truncated=max(0, total - HTML_ROW_LIMIT)), encoding="utf-8")
        return html_path, csv_path


def write_report(folder: Path, info: dict, work: Path) -> tuple[Path, Path]:
    """One submission's report from the results in `work`."""
    with ReportWriter(work) as writer:
        return writer.write(folder, info)
