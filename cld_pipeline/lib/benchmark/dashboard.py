"""LA dashboards: one static HTML page per council and an England overview, opened from disk.

Built only from the shared (disclosure-controlled) benchmark tables, so a page can never show more
than the tables do: suppressed figures appear as `*`. Charts are Plotly (interactive, keyboard and
screen-reader friendly labels), in the Okabe-Ito palette, which stays distinguishable with the common
colour-vision deficiencies; every chart has a table view with the same numbers. plotly.js is written
once beside the pages, so they work offline with no server and no CDN.
"""

from __future__ import annotations

from pathlib import Path

import duckdb
import plotly.graph_objects as go
from jinja2 import Environment
from plotly.offline import get_plotlyjs

from cld_pipeline.lib.warehouse import table_exists

PALETTE = {"LA": "#0072B2", "Region": "#E69F00", "England": "#009E73"}   # Okabe-Ito
EXTRA = ["#CC79A7", "#56B4E9", "#D55E00", "#F0E442", "#000000"]
SUPPRESSED = "*"

CAVEATS = [
    "Counts of 1 to 7 are shown as * and other counts are rounded to the nearest 5; rates use the rounded "
    "numbers, so parts need not add up to totals.",
    "Medians and 90th percentiles are shown only when at least 8 people are behind them.",
    "Figures follow DHSC's CLD method: the latest submission of each council as of the date shown, events in "
    "the 12-month period, one record per DHSC unique event.",
    "Waiting times follow the provisional v1.1 method (requests of people aged 25 and over who were not "
    "already receiving support); they are experimental statistics.",
    "ASCOF 2D links hospital discharges to reablement on pseudonymised NHS numbers; people without a valid "
    "NHS number cannot be linked. Part 2 is placed in the council where the person is known to social care.",
    "Synthetic data: these pages are built from generated test data, not from any council's records.",
]

PAGE = Environment(autoescape=True).from_string("""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>{{ title }}</title><script src="plotly.min.js"></script>
<style>
body{font-family:Arial,Helvetica,sans-serif;margin:0 auto;max-width:1100px;padding:1rem;color:#0b0c0c;line-height:1.4}
h1{font-size:1.8rem}h2{margin-top:2rem;border-bottom:2px solid #0b0c0c}table{border-collapse:collapse;margin:.5rem 0}
th,td{border:1px solid #b1b4b6;padding:.25rem .5rem;text-align:right}th:first-child,td:first-child{text-align:left}
caption{text-align:left;font-weight:bold;padding:.25rem 0}.meta{background:#f3f2f1;padding:.5rem 1rem}
details{margin:.25rem 0 1.5rem}summary{cursor:pointer;color:#1d70b8}a{color:#1d70b8}
</style></head><body>
<h1>{{ title }}</h1>
<p class="meta">Quarter <strong>{{ quarter }}</strong> (12 months to {{ period_end }}) &middot; data as of
<strong>{{ as_of }}</strong>{% if region %} &middot; region: {{ region }}{% endif %}
{% if method %} &middot; method version <strong>{{ method }}</strong>{% endif %}
{% if england_link %} &middot; <a href="england.html">England overview</a>{% endif %}</p>
{% if method_changes %}<p class="meta">What changed in method {{ method }}: {{ method_changes }}</p>{% endif %}
{% for section in sections %}
<h2 id="{{ section.id }}">{{ section.title }}</h2>
{% if section.note %}<p>{{ section.note }}</p>{% endif %}
{% if section.chart %}<figure role="group" aria-label="{{ section.title }}">{{ section.chart|safe }}</figure>{% endif %}
<details{% if not section.chart %} open{% endif %}><summary>Table view: {{ section.title }}</summary>
<table><caption>{{ section.title }}</caption><thead><tr>{% for h in section.header %}<th scope="col">{{ h }}</th>{% endfor %}</tr></thead>
<tbody>{% for row in section.rows %}<tr>{% for cell in row %}<td>{{ cell }}</td>{% endfor %}</tr>{% endfor %}</tbody></table>
</details>
{% endfor %}
<h2>About these figures</h2><ul>{% for c in caveats %}<li>{{ c }}</li>{% endfor %}</ul>
</body></html>""")


def _cell(v) -> str:
    if v is None:
        return SUPPRESSED
    if isinstance(v, float):
        return f"{v:,.1f}" if v != int(v) else f"{int(v):,}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def _chart(fig: go.Figure, title: str) -> str:
    fig.update_layout(title=title, template="simple_white", height=380, margin=dict(l=60, r=20, t=60, b=80),
                      legend=dict(orientation="h", y=-0.25), font=dict(family="Arial", size=13))
    return fig.to_html(full_html=False, include_plotlyjs=False, config={"displaylogo": False, "responsive": True})


def _grouped_bars(categories: list[str], series: dict[str, list], title: str, axis: str) -> str:
    fig = go.Figure()
    colours = {**PALETTE}
    for i, (name, values) in enumerate(series.items()):
        colour = colours.get(name.split(":")[0], EXTRA[i % len(EXTRA)])
        fig.add_bar(name=name, x=categories, y=values, marker_color=colour,
                    text=[_cell(v) for v in values], textposition="outside", hovertemplate="%{x}: %{text}<extra></extra>")
    fig.update_layout(barmode="group", yaxis_title=axis)
    return _chart(fig, title)


class DashboardBuilder:
    """Reads the shared benchmark tables of one quarter (all quarters for trends) and writes pages."""

    def __init__(self, con: duckdb.DuckDBPyConnection, quarter: str, folder: Path):
        self.con, self.quarter, self.folder = con, quarter, folder

    def _rows(self, sql: str, params: list) -> list[tuple]:
        return self.con.execute(sql, params).fetchall()

    def write_all(self) -> list[Path]:
        self.folder.mkdir(parents=True, exist_ok=True)
        (self.folder / "plotly.min.js").write_text(get_plotlyjs(), encoding="utf-8")
        meta = self._rows("SELECT any_value(as_of_date), count(*) FROM benchmark.ascof WHERE quarter = ?", [self.quarter])
        self.as_of = meta[0][0]
        log = self._rows("SELECT method_version, method_changes FROM benchmark.method_log WHERE quarter = ?",
                         [self.quarter]) if table_exists(self.con, "benchmark", "method_log") else []
        self.method = log[0] if log else (None, None)
        las = self._rows("""SELECT DISTINCT c.la_code, c.la_name, c.region_code, c.region_name FROM benchmark.comparison c
                            WHERE c.quarter = ? AND c.la_code IN (SELECT geography_code FROM benchmark.activity
                                                                 WHERE quarter = ? AND geography_level = 'LA')
                            ORDER BY 1""", [self.quarter, self.quarter])
        pages = [self._england(las)]
        pages += [self._la(*la) for la in las]
        return pages

    # --- sections ----------------------------------------------------------------------------------

    def _ascof_section(self, codes: list[str]) -> dict:
        rows = self._rows("""SELECT measure, measure_group, geography_level, value, numerator, denominator
                             FROM benchmark.ascof WHERE quarter = ? AND geography_code IN (SELECT unnest(?))
                               AND (measure_group IN ('Total', '18 to 64', '65 and above') OR measure_group LIKE '%: Total')
                             ORDER BY measure, measure_group, geography_level""", [self.quarter, codes])
        labels = sorted({f"{m} {g}" for m, g, *_ in rows})
        series = {level: [next((v for m, g, lv, v, *_ in rows if f"{m} {g}" == lab and lv == level), None)
                          for lab in labels] for level in ("LA", "Region", "England") if any(r[2] == level for r in rows)}
        return {"id": "ascof", "title": "ASCOF measures", "note": "Percentages except 2B and 2C (per 100,000 adults).",
                "chart": _grouped_bars(labels, series, "ASCOF measures against region and England", "value"),
                "header": ["measure", "group", "geography", "value", "numerator", "denominator"],
                "rows": [[_cell(c) for c in r] for r in rows]}

    def _trend_section(self, code: str, region: str | None) -> dict:
        rows = self._rows("""SELECT quarter, geography_level, measure, value FROM benchmark.ascof
                             WHERE geography_code IN (?, ?, 'E92000001')
                               AND (measure_group = 'Total' OR measure_group = '65 and above: Total')
                             ORDER BY measure, quarter, geography_level""", [code, region or code])
        fig = go.Figure()
        measures = sorted({r[2] for r in rows})
        for i, m in enumerate(measures):
            for level, dash in (("LA", "solid"), ("Region", "dot"), ("England", "dash")):
                pts = [(q, v) for q, lv, mm, v in rows if mm == m and lv == level]
                if pts:
                    fig.add_scatter(x=[p[0] for p in pts], y=[p[1] for p in pts], mode="lines+markers",
                                    name=f"{m} {level}", line=dict(color=EXTRA[i % len(EXTRA)] if level == "LA"
                                                                   else PALETTE[level], dash=dash))
        return {"id": "trend", "title": "Trend over the quarters available",
                "chart": _chart(fig, "ASCOF (Total) by quarter"), "header": ["quarter", "geography", "measure", "value"],
                "rows": [[_cell(c) for c in r] for r in rows]}

    def _waits_section(self, codes: list[str]) -> dict:
        rows = self._rows("""SELECT interval, geography_level, people, median_days, p90_days, share_within_28_days
                             FROM benchmark.waiting_times WHERE quarter = ? AND geography_code IN (SELECT unnest(?))
                             ORDER BY interval, geography_level""", [self.quarter, codes])
        bands = self._rows("""SELECT interval, wait_band, people FROM benchmark.waiting_time_bands
                              WHERE quarter = ? AND geography_code = ? ORDER BY interval, band_order""",
                           [self.quarter, codes[0]])
        fig = go.Figure()
        band_names = list(dict.fromkeys(b for _, b, _ in bands))
        for i, band in enumerate(band_names):
            fig.add_bar(name=band, x=[iv for iv, b, _ in bands if b == band], y=[p for _, b, p in bands if b == band],
                        marker_color=(EXTRA + list(PALETTE.values()))[i % 8])
        fig.update_layout(barmode="stack", yaxis_title="people")
        return {"id": "waits", "title": "Waiting times", "note": "Distribution of waits in days (this council); "
                "medians and 90th percentiles against region and England in the table.",
                "chart": _chart(fig, "How long people waited (days)"),
                "header": ["interval", "geography", "people", "median days", "90th percentile", "% within 28 days"],
                "rows": [[_cell(c) for c in r] for r in rows]}

    def _activity_section(self, codes: list[str]) -> dict:
        rows = self._rows("""SELECT event_type, geography_level, events, people, events_per_100k_adults
                             FROM benchmark.activity WHERE quarter = ? AND geography_code IN (SELECT unnest(?))
                               AND breakdown = 'total' ORDER BY event_type, geography_level""", [self.quarter, codes])
        types = sorted({r[0] for r in rows})
        series = {level: [next((v for t, lv, _, _, v in rows if t == ty and lv == level), None) for ty in types]
                  for level in ("LA", "Region", "England") if any(r[1] == level for r in rows)}
        return {"id": "activity", "title": "Activity per 100,000 adults",
                "chart": _grouped_bars(types, series, "Events per 100,000 adults", "per 100,000 adults"),
                "header": ["event type", "geography", "events", "people", "per 100,000 adults"],
                "rows": [[_cell(c) for c in r] for r in rows]}

    def _services_section(self, code: str) -> dict:
        rows = self._rows("""SELECT breakdown_value, events, people FROM benchmark.activity
                             WHERE quarter = ? AND geography_code = ? AND breakdown = 'service_type'
                             ORDER BY breakdown_value""", [self.quarter, code])
        fig = go.Figure(go.Bar(x=[r[1] for r in rows], y=[r[0] for r in rows], orientation="h",
                               marker_color=PALETTE["LA"], text=[_cell(r[1]) for r in rows], textposition="outside"))
        fig.update_layout(xaxis_title="services", yaxis=dict(automargin=True))
        return {"id": "services", "title": "Services by type", "chart": _chart(fig, "Services by type (this council)"),
                "header": ["service type", "services", "people"], "rows": [[_cell(c) for c in r] for r in rows]}

    def _exclusions_section(self, codes: list[str]) -> dict:
        rows = self._rows("""SELECT measure, reason, geography_level, people FROM benchmark.ascof_exclusions
                             WHERE quarter = ? AND geography_code IN (SELECT unnest(?))
                             ORDER BY measure, geography_level""", [self.quarter, codes])
        return {"id": "exclusions", "title": "People the ASCOF measures could not place", "chart": None,
                "note": "People in the 2E cohorts whose accommodation is unknown, invalid or only presumed from their "
                        "services, and 3D clients and carers whose delivery mechanism is unknown (DHSC's exclusions).",
                "header": ["measure", "reason", "geography", "people"], "rows": [[_cell(c) for c in r] for r in rows]}

    def _reablement_section(self, code: str) -> dict:
        rows = self._rows("""SELECT sequel, final_outcome, CASE WHEN in_numerator THEN 'numerator'
                                    WHEN in_denominator THEN 'denominator only' ELSE 'not counted' END, clusters
                             FROM benchmark.ascof_2a_outcomes WHERE quarter = ? AND geography_code = ?
                               AND age_group = 'Total' ORDER BY sequel_type, final_outcome""", [self.quarter, code])
        by_sequel: dict[str, int] = {}
        for sequel, _, _, n in rows:
            by_sequel[sequel] = by_sequel.get(sequel, 0) + (n or 0)
        fig = go.Figure(go.Bar(x=list(by_sequel.values()), y=list(by_sequel), orientation="h",
                               marker_color=PALETTE["LA"], text=[_cell(v) for v in by_sequel.values()],
                               textposition="outside"))
        fig.update_layout(xaxis_title="reablement episodes (shown counts)", yaxis=dict(automargin=True))
        return {"id": "reablement", "title": "ASCOF 2A: what followed reablement",
                "note": "Each reablement (ST-Max) episode of a new client ending in the year, by what DHSC's method "
                        "found after it. Only the outcomes marked numerator or denominator count in 2A.",
                "chart": _chart(fig, "Reablement episodes by sequel (this council)"),
                "header": ["sequel", "final outcome", "counts in 2A as", "clusters"],
                "rows": [[_cell(c) for c in r] for r in rows]}

    def _quarterly_waits_section(self, codes: list[str]) -> dict:
        rows = self._rows("""SELECT statistical_quarter_start, geography_level, age_band, interval, waits, median_days,
                                    requests, assessments, services
                             FROM benchmark.waiting_times_quarterly WHERE quarter = ?
                               AND geography_code IN (SELECT unnest(?)) AND geography_level <> 'Region'
                             ORDER BY 1, 2 DESC, 3, 4""", [self.quarter, codes])
        fig = go.Figure()
        for i, (level, band) in enumerate((lv, b) for lv in ("LA", "England") for b in ("25 to 64", "65 and above")):
            pts = [(str(q), m) for q, lv, b, iv, _, m, *_ in rows
                   if lv == level and b == band and iv == "request_to_assessment"]
            if pts:
                fig.add_scatter(x=[q for q, _ in pts], y=[m for _, m in pts], mode="lines+markers",
                                name=f"{level}: {band}", line=dict(color=PALETTE.get(level) if i % 2 == 0 else
                                                                  EXTRA[i % len(EXTRA)],
                                                                  dash="solid" if level == "LA" else "dash"))
        fig.update_layout(yaxis_title="median days", xaxis_title="statistical quarter (start)")
        return {"id": "waits-by-quarter", "title": "Waiting times by quarter and age band",
                "note": "DHSC's method: each wait in the quarter of the assessment, service or conversation that "
                        "answered the request, and that event's age band; requests, assessments and services show "
                        "the activity behind the waits.",
                "chart": _chart(fig, "Median days from request to first response"),
                "header": ["quarter", "geography", "age band", "interval", "waits", "median days", "requests",
                           "assessments", "services"],
                "rows": [[_cell(c) for c in r] for r in rows]}

    def _data_quality_section(self, code: str) -> dict:
        rows = self._rows("""SELECT field, rule, CASE severity WHEN 'reject' THEN 'rejected' ELSE 'flagged' END, rows,
                                    share_percent, england_share_percent
                             FROM benchmark.data_quality WHERE quarter = ? AND geography_code = ?
                             ORDER BY coalesce(share_percent, 0) DESC, field, rule LIMIT 25""", [self.quarter, code])
        return {"id": "data-quality", "title": "Data quality beside England", "chart": None,
                "note": "Rows of the files behind these figures that a validation rule rejected or flagged, as a share "
                        "of the rows submitted, with England's share (the 25 largest).",
                "header": ["field", "rule", "outcome", "rows", "% of rows", "England %"],
                "rows": [[_cell(c) for c in r] for r in rows]}

    def _bcf_section(self, codes: list[str]) -> dict:
        rows = self._rows("""SELECT metric, geography_level, numerator, denominator, value FROM benchmark.bcf_metrics
                             WHERE quarter = ? AND geography_code IN (SELECT unnest(?))
                             ORDER BY measure, geography_level""", [self.quarter, codes])
        return {"id": "bcf", "title": "Better Care Fund metrics", "chart": None,
                "header": ["metric", "geography", "numerator", "denominator", "value"],
                "rows": [[_cell(c) for c in r] for r in rows]}

    def _changes_section(self, code: str) -> dict:
        rows = self._rows("""SELECT figure, previous_value, value, change_percent FROM benchmark.release_changes
                             WHERE quarter = ? AND geography_code = ? AND flagged ORDER BY abs(change) DESC, figure""",
                          [self.quarter, code])
        return {"id": "changes", "title": "Moves since the previous quarter", "chart": None,
                "note": "Headline figures that moved more than 5% on the previous quarter's build: worth checking "
                        "before acting on them." if rows else "No headline figure moved more than 5% on the previous "
                                                              "quarter's build (or there is no previous build).",
                "header": ["figure", "previous quarter", "this quarter", "% change"],
                "rows": [[_cell(c) for c in r] for r in rows]}

    def _excluded_section(self, code: str | None) -> dict:
        rows = self._rows("""SELECT la_code, quarter, submission_id, reason FROM benchmark.excluded_submissions
                             WHERE ? IS NULL OR la_code = ? ORDER BY la_code, quarter""", [code, code]) \
            if table_exists(self.con, "benchmark", "excluded_submissions") else []
        return {"id": "excluded", "title": "Submissions left out by the operator", "chart": None,
                "note": "Files excluded from every figure (the council's previous file is used where there is one)."
                        if rows else "No submission is excluded.",
                "header": ["LA", "quarter", "submission", "reason"], "rows": [[_cell(c) for c in r] for r in rows]}

    # --- pages ---------------------------------------------------------------------------------------

    def _la(self, code: str, name: str, region_code: str, region_name: str) -> Path:
        codes = [code, region_code, "E92000001"]
        sections = [self._ascof_section(codes), self._trend_section(code, region_code), self._waits_section(codes),
                    self._activity_section(codes), self._services_section(code), self._reablement_section(code),
                    self._quarterly_waits_section(codes), self._exclusions_section(codes), self._bcf_section(codes),
                    self._data_quality_section(code), self._changes_section(code), self._excluded_section(code)]
        return self._write(f"{code}.html", f"{name}: adult social care benchmark", sections, region_name)

    def _england(self, las) -> Path:
        rows = self._rows("""SELECT la_code, la_name, region_name, figure, la_value, la_rank, las_ranked
                             FROM benchmark.comparison WHERE quarter = ? AND figure LIKE 'ascof%' AND NOT no_submission
                             ORDER BY figure, la_rank""", [self.quarter])
        # A council without a file is listed once, as such: never a value of 0, never a rank.
        missing = self._rows("""SELECT DISTINCT la_code, la_name, region_name FROM benchmark.comparison
                                WHERE quarter = ? AND no_submission ORDER BY 1""", [self.quarter])
        ranked = [[_cell(c) for c in r] for r in rows]
        regions = self._rows("""SELECT geography_name, measure, value FROM benchmark.ascof WHERE quarter = ?
                                AND geography_level = 'Region' AND measure_group = 'Total' ORDER BY 2, 1""", [self.quarter])
        names = sorted({r[0] for r in regions})
        series = {m: [next((v for n, mm, v in regions if n == name and mm == m), None) for name in names]
                  for m in sorted({r[1] for r in regions})}
        links = [[f"{name} ({code})", region, f"{code}.html"] for code, name, _, region in las]
        sections = [
            {"id": "regions", "title": "ASCOF by region", "chart": _grouped_bars(names, series, "ASCOF (Total) by region",
                                                                                 "value"),
             "header": ["region", "measure", "value"], "rows": [[_cell(c) for c in r] for r in regions]},
            {"id": "ranks", "title": "Councils ranked", "chart": None,
             "header": ["LA", "name", "region", "figure", "value", "rank", "of"], "rows": ranked},
            {"id": "councils", "title": "Council pages", "chart": None, "header": ["council", "region", "page"],
             "rows": links},
            {"id": "no-submission", "title": "Councils without a submission (not ranked)", "chart": None,
             "note": "No file covering the 12 months was received by the as-of date: these councils have no figures "
                     "this quarter, are not ranked, and are left out of their region's and England's figures."
                     if missing else "Every council has a submission covering the 12 months.",
             "header": ["LA", "name", "region", "status"], "rows": [[*m, "no submission"] for m in missing]},
            self._excluded_section(None),
        ]
        return self._write("england.html", "England: adult social care benchmark", sections, None)

    def _write(self, file: str, title: str, sections: list[dict], region: str | None) -> Path:
        period_end = self._rows("SELECT max(reporting_period_end) FROM pseudonymised.submissions WHERE quarter = ?",
                                [self.quarter])[0][0]
        page = PAGE.render(title=title, quarter=self.quarter, as_of=self.as_of, region=region, sections=sections,
                           caveats=CAVEATS, england_link=file != "england.html", period_end=period_end,
                           method=self.method[0], method_changes=self.method[1])
        path = self.folder / file
        path.write_text(page, encoding="utf-8")
        return path
