"""Declarative automation, on by default: quarter-level layers rebuild when their inputs change.

Replaces Dagster's default automation sensor (which starts stopped) so that `make run` and a fresh
deployment rebuild linked tables without anyone toggling it in the UI.
"""

import dagster as dg

quarter_automation_sensor = dg.AutomationConditionSensorDefinition(
    "quarter_automation_sensor",
    target=dg.AssetSelection.all(),
    default_status=dg.DefaultSensorStatus.RUNNING,
    minimum_interval_seconds=60,
    description="Evaluates the automation conditions of quarter-level assets (linked, benchmark) every minute.",
)
