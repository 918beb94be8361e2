"""`cld-pipeline rights ...`: lodge a request, apply it through `rights_job`, rebuild, and prove it.

Everything runs in this process against the instance under `$DAGSTER_HOME` (like `cld-pipeline
run`), so the rights run and every rebuild run appear in the UI. The identifiers given on the command
line stay in this process and in the processor zone's pending-request row, which is deleted when the
request has been applied; the proof after an erasure (or restriction) searches every table of both
databases for the person's identifiers and tokens.
"""

from __future__ import annotations

import time

import dagster as dg

from cld_pipeline import settings
from cld_pipeline.defs.operations.audit import sync_dagster
from cld_pipeline.lib.privacy import audit, rights
from cld_pipeline.lib.privacy import rights_actions as actions
from cld_pipeline.lib.warehouse import table_exists
from cld_pipeline.environment import load_pseudonymisation_ring as _ring


def _zones():
    from cld_pipeline.defs.resources import LockedDuckDBResource

    return (LockedDuckDBResource(database=str(settings.identifiable_db_path())),
            LockedDuckDBResource(database=str(settings.analytics_db_path())))


def lodge(action: str, person: rights.Person, requested_by: str, reason: str) -> str:
    identifiable, _ = _zones()
    with identifiable.get_connection() as con:
        return rights.lodge(con, action, person, requested_by, reason)


def carry_out(request_id: str, instance: dg.DagsterInstance | None = None, log=print) -> dict:
    """Apply a lodged request in-process, rebuild what it touched, verify, and audit."""
    from cld_pipeline.definitions import defs as load_defs
    from cld_pipeline.commands.run import prepare_instance

    instance = instance or prepare_instance()
    defs = load_defs()
    ring = _ring()
    identifiable, analytics = _zones()
    with identifiable.get_connection() as con:
        action, person = rights.pending(con, request_id)
        messages = rights.resolve(con, person)     # kept in this process only, for the proof
        actor = con.execute("SELECT requested_by FROM rights.requests WHERE request_id = ?", [request_id]).fetchall()[0][0]
    tokens = rights.person_tokens(messages, ring)
    tags = {"cld/rights_request": request_id, "cld/rights_action": action, "cld/actor": actor,
            "cld/purpose": f"rights request {request_id}"}
    result = defs.resolve_job_def("rights_job").execute_in_process(
        run_config={"ops": {"apply_rights_request": {"config": {"request_id": request_id, "rebuild": "none"}}}},
        instance=instance, tags=tags, raise_on_error=False)
    if not result.success:
        from cld_pipeline.commands.run import _failure_message

        raise rights.RightsError(f"{request_id} was not applied: {_failure_message(result)}")
    summary = result.output_for_node("apply_rights_request")
    log(f"applied   {request_id} ({action}) in run {result.run_id}")
    rebuilt, failed = ([], []) if action == "copy" else rebuild(defs, instance, summary, tags, log)
    out = {**summary, "run_id": result.run_id, "rebuilt": rebuilt, "rebuild_failed": failed}
    if action in rights.SUPPRESSING + ("restrict",):
        out["verification"] = verify(action, messages, tokens)
    with identifiable.get_connection() as con:
        if "verification" in out:
            audit.append(con, f"rights:{action}:verified", request_id,
                         {"remaining": out["verification"], "rebuilt": len(rebuilt), "rebuild_failed": failed},
                         actor, f"rights request {request_id}")
        sync_dagster(instance, con)
    return out


def rebuild(defs, instance: dg.DagsterInstance, summary: dict, tags: dict, log) -> tuple[list[str], list[str]]:
    """Re-run the affected LA partitions and hospital quarters, then the linked and benchmark tables of
    every quarter that held the person (all quarters when hospital data changed), as of the date each
    benchmark was built."""
    from cld_pipeline.defs.partitions import hospital_quarter_partitions, submission_partition_key

    done, failed = [], []

    def run(job_name: str, partition: str, label: str, run_config: dict | None = None) -> None:
        started = time.perf_counter()
        r = defs.resolve_job_def(job_name).execute_in_process(
            instance=instance, partition_key=partition, tags=tags, run_config=run_config, raise_on_error=False)
        (done if r.success else failed).append(label)
        log(f"{'rebuilt' if r.success else 'FAILED':<9} {label} in {time.perf_counter() - started:.1f} s")

    for partition in summary["partitions"]:
        quarter, la = partition.split(" x ")
        run("rights_rebuild_job", str(submission_partition_key(la, quarter)), partition)
    for quarter in summary["hospital_quarters"]:
        run("hospital_rebuild_job", quarter, f"hospital {quarter}")
    _, analytics = _zones()
    with analytics.get_connection() as con:
        def built(table: str) -> dict:
            if not table_exists(con, *table.split(".")):
                return {}
            return dict(con.execute(f"SELECT quarter, max(as_of_date) FROM {table} GROUP BY quarter").fetchall()
                        if table.startswith("benchmark") else
                        con.execute(f"SELECT DISTINCT quarter, NULL FROM {table}").fetchall())
        benchmarks, linked = built("benchmark.activity"), built("linked.match_rates")
    quarters = set(summary["quarters"])
    if summary["hospital_quarters"]:
        quarters |= set(linked) | set(benchmarks)
    hospital_held = bool(instance.get_dynamic_partitions(hospital_quarter_partitions.name))
    for quarter in sorted(quarters):
        if quarter in linked and hospital_held:
            run("linked_quarter_job", quarter, f"linked {quarter}")
        if quarter in benchmarks:
            run("benchmark_quarter_job", quarter, f"benchmark {quarter}", {"ops": {"benchmark_quarter": {
                "config": {"as_of_date": str(benchmarks[quarter])}}}})
    return done, failed


def verify(action: str, messages: set[str], tokens: list[str]) -> dict:
    """Rows still holding the person, per table: analysts' zone by token; after erasure or
    objection also the processor zone, by identifier and by token. Empty means proven."""
    identifiable, analytics = _zones()
    with analytics.get_connection() as con:
        remaining = {f"analytics {t}": n for t, n in actions.occurrences(con, tokens).items()}
    if action in rights.SUPPRESSING:
        with identifiable.get_connection() as con:
            remaining |= {f"identifiable {t}": n for t, n in actions.processor_occurrences(con, messages).items()}
            remaining |= {f"identifiable {t}": n for t, n in actions.occurrences(con, tokens).items()}
    return remaining
