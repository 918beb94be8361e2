"""The pandera schema of `validated.events`, generated from the specification.

Independent of the row rules that built the table: every accepted row must carry cleaned values
from the code lists, a usable identifier, a real start date, an end date where the event type needs
one and not before the start, and the file's LA code. A failure here is a defect of the pipeline,
so the asset check that runs it is blocking.
"""

from __future__ import annotations

import pandas as pd
import pandera.pandas as pa

from cld_pipeline.spec import load_spec


def validated_events_schema() -> pa.DataFrameSchema:
    spec = load_spec()
    invalid = spec.derived.invalid_value
    columns: dict[str, pa.Column] = {
        "submission_id": pa.Column(str, nullable=False),
        "row_number": pa.Column(int, pa.Check.ge(1), nullable=False),
        "nhs_number": pa.Column(str, pa.Check.str_matches(r"^[0-9]{10}$"), nullable=True),
        "event_start_date": pa.Column(nullable=False),
    }
    for f in spec.fields:
        if f.type == "coded":
            cl = spec.code_list(f.code_list)
            columns[f"{f.column}_cleaned"] = pa.Column(
                str, pa.Check.isin([*cl.cleaned_values, invalid]), nullable=f.name != "Event_Type")
    et = spec.code_list("event_type")
    service = et.value("service")

    def dates_in_order(d: pd.DataFrame) -> pd.Series:
        end, start = pd.to_datetime(d["event_end_date"]), pd.to_datetime(d["event_start_date"])
        return end.isna() | (end >= start)

    return pa.DataFrameSchema(
        columns=columns,
        checks=[
            pa.Check(dates_in_order, name="end_not_before_start"),
            pa.Check(lambda d: d["event_end_date"].notna() | (d["event_type_cleaned"] == service),
                     name="completed_unless_service"),
            pa.Check(lambda d: d["nhs_number"].notna() | d["la_person_unique_identifier"].notna(),
                     name="usable_identifier"),
            pa.Check(lambda d: d["la_code"].str.upper() == d["la_code_of_file"].str.upper(), name="file_la_code"),
        ],
        unique=["submission_id", "row_number"],   # a batch holds many submissions
        strict=False,
        name="validated.events",
    )
