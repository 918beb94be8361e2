"""`run_failure_alerts`: every failed run becomes an alert that names its quarter, LA, file, step and error.

Written three ways so on-call staff see it wherever they look: a log line in the sensor's tick, a
JSON file in `$CLD_DATA_DIR/alerts/` (for a pager or a file watcher), and, when
`CLD_ALERT_WEBHOOK` is set, a POST of the same JSON to a chat tool's incoming webhook (Slack, Teams
and Mattermost accept `{"text": ...}`). Errors are the runs' own messages, first line only: the
pipeline's failures never quote a row's values.
"""

import datetime as dt
import json
import os
import urllib.request

import dagster as dg

from cld_pipeline import settings

MAX_ERROR = 500
RUNBOOK = 'docs/operations.md, "Runbook: a quarter has failed"'


RANGE_START, RANGE_END = "dagster/asset_partition_range_start", "dagster/asset_partition_range_end"


def _split(key: str) -> tuple[str | None, str | None]:
    """(LA, quarter) of a partition key: `714|2026-Q3` (quarter x LA) or `2026-Q3` (quarter)."""
    la = quarter = None
    for part in key.split("|"):
        if "-Q" in part:
            quarter = part
        elif part:
            la = part
    return la, quarter


def _partition(tags: dict) -> tuple[str | None, str | None]:
    la = tags.get("cld/la") or tags.get("dagster/partition/la")
    quarter = tags.get("cld/quarter") or tags.get("dagster/partition/quarter")
    if not quarter and "dagster/partition" in tags:
        la_tag, quarter = _split(tags["dagster/partition"])
        la = la or la_tag
    if RANGE_START in tags:   # one run over a range of councils (a batch, or a quarter's backfill)
        first_la, first_quarter = _split(tags[RANGE_START])
        last_la, last_quarter = _split(tags.get(RANGE_END, tags[RANGE_START]))
        quarter = quarter or first_quarter or last_quarter
        if not tags.get("cld/la"):
            la = first_la if first_la == last_la else f"{first_la}..{last_la}"
    return la, quarter


def build_alert(run: dg.DagsterRun, step_failures: list[tuple[str, str]], run_error: str) -> dict:
    la, quarter = _partition(dict(run.tags))
    step, error = step_failures[0] if step_failures else (None, run_error)
    error = (error or "").strip().splitlines()[0][:MAX_ERROR] if error else "run failed"
    return {
        "alert": "run_failed", "raised_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "run_id": run.run_id, "job": run.job_name, "quarter": quarter, "la": la,
        "file": run.tags.get("cld/file") or ("the councils' current submissions" if RANGE_START in run.tags else None),
        "step": step, "error": error,
        "backfill": run.tags.get("dagster/backfill"),
        # One backfill per quarter covers every failed council, however many alerts there are.
        "what_to_do": (f"See {RUNBOOK}; when the cause is fixed: cld-pipeline backfill --quarter {quarter} "
                       "--failed-only") if quarter else f"See {RUNBOOK}.",
    }


def write_alert(alert: dict) -> str:
    folder = settings.data_dir() / "alerts"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{alert['raised_at'].replace(':', '')}-{alert['run_id'][:8]}.json"
    path.write_text(json.dumps(alert, indent=2), encoding="utf-8")
    return str(path)


def post_webhook(alert: dict, url: str, timeout: float = 10.0) -> None:
    text = (f"CLD pipeline: {alert['job']} failed" + (f" for LA {alert['la']}" if alert["la"] else "")
            + (f" in {alert['quarter']}" if alert["quarter"] else "") + f" at step {alert['step']}: {alert['error']}")
    body = json.dumps({"text": text, **alert}).encode("utf-8")
    request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"}, method="POST")
    with urllib.request.urlopen(request, timeout=timeout):
        pass


@dg.run_failure_sensor(
    name="run_failure_alerts",
    minimum_interval_seconds=5,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Writes an alert (log line, alerts/*.json, optional webhook CLD_ALERT_WEBHOOK) for every failed run, "
                "naming quarter, LA, file, step and error.",
)
def run_failure_alerts(context: dg.RunFailureSensorContext) -> None:
    failures = []
    for event in context.get_step_failure_events():
        data = event.step_failure_data
        message = (data.user_failure_data.description if data.user_failure_data and data.user_failure_data.description
                   else (data.error.cause or data.error).message if data.error else event.message)
        failures.append((event.step_key, message))
    alert = build_alert(context.dagster_run, failures, context.failure_event.message or "")
    path = write_alert(alert)
    context.log.error(f"ALERT run {alert['run_id']} ({alert['job']}) failed: quarter={alert['quarter']} la={alert['la']} "
                      f"step={alert['step']}: {alert['error']} -> {path}")
    url = os.environ.get("CLD_ALERT_WEBHOOK")
    if url:
        try:
            post_webhook(alert, url)
        except Exception as err:  # an unreachable chat tool must not hide the alert file
            context.log.warning(f"webhook not reached ({type(err).__name__}); the alert file is written")
