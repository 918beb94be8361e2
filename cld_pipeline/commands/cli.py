"""`cld-pipeline`: the command line.

    cld-pipeline generate [--scale tiny|small|national] [--quarters N] [--seed S] ...
    cld-pipeline run        process everything in the landing folder (headless), print a summary
    cld-pipeline backfill --quarter Q [--la L] [--failed-only] [--status]
    cld-pipeline rights copy|restrict|unrestrict|object|erase (--nhs-number N | --la L --person-id P) --reason R
    cld-pipeline rights apply --request ID | list
    cld-pipeline exclude add --submission ID --reason R | remove --submission ID | list [--received]
    cld-pipeline linkage show|review-export|review-record|evaluate --quarter Q ...
    cld-pipeline audit [--action A] [--limit N] [--verify]
    cld-pipeline retention [--dry-run] [--today DATE]
    cld-pipeline spec-docs [--check]
    cld-pipeline instance [--refresh]   prepare $DAGSTER_HOME for this environment
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
from pathlib import Path

from cld_pipeline import settings


def _date(text: str) -> dt.date:
    try:
        return dt.date.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a date like 2026-09-30") from None


def _quarter_end(text: str) -> dt.date:
    day = _date(text)
    if (day + dt.timedelta(days=1)).day != 1 or day.month not in (3, 6, 9, 12):
        raise argparse.ArgumentTypeError(f"{text} is not a calendar quarter end (31 Mar, 30 Jun, 30 Sep, 31 Dec)")
    return day


def _tune_allocator_for_bulk_arrays() -> None:
    """Keep freed memory in the process heap for reuse (glibc; a no-op elsewhere).

    Generation allocates and frees hundreds of arrays of 50-100 MB. By default each one is a fresh
    mmap whose pages fault in on first touch; at national scale that was a fifth of the run time.
    Only the `generate` command does this: it is a short-lived process.
    """
    import ctypes

    import pyarrow as pa

    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-4, 0)              # M_MMAP_MAX: large blocks from the heap, not mmap
        libc.mallopt(-1, 2**31 - 1)      # M_TRIM_THRESHOLD: do not hand freed memory back at once
        libc.mallopt(-2, 512 * 2**20)    # M_TOP_PAD: grow the heap in large steps
    except (OSError, AttributeError):
        return
    pa.set_memory_pool(pa.system_memory_pool())  # Arrow buffers share the same tuned heap


def _generate(args: argparse.Namespace) -> int:
    from cld_pipeline.synthetic import DefectRates, GeneratorConfig, LinkageNoise, generate
    from cld_pipeline.synthetic.config import DEFAULT_PERIOD_END

    _tune_allocator_for_bulk_arrays()
    rates = DefectRates().scaled(0.0 if args.no_defects else args.defect_rate)
    config = GeneratorConfig(
        scale=args.scale,
        seed=args.seed,
        quarters=args.quarters,
        period_end=args.period_end or DEFAULT_PERIOD_END,
        defects=rates,
        resubmission_share=args.resubmission_share,
        linkage=LinkageNoise(nhs_unrecorded=args.nhs_unrecorded_share),
        hospital=not args.no_hospital,
        la_codes=tuple(args.la) if args.la else None,
        rows_per_quarter=args.rows,
    )
    data_dir = Path(args.data_dir).resolve() if args.data_dir else settings.data_dir()
    manifest = generate(config, data_dir, progress=not args.quiet)
    summary = {
        "landing": str(data_dir / "landing"),
        "submission_files": len(manifest["files"]),
        "hospital_files": len(manifest["hospital_files"]),
        "rows": manifest["rows"],
        "seconds": manifest["generated_in_seconds"],
        "rows_per_second": manifest["rows_per_second"],
        "defects": sum(manifest["defect_counts"].values()),
        "manifest": str(data_dir / "synthetic" / "manifest.json"),
    }
    print(json.dumps(summary, indent=2))
    return 0


def _run(args: argparse.Namespace) -> int:
    from cld_pipeline.commands.run import process_landing
    from cld_pipeline import environment
    from cld_pipeline.lib.privacy.pseudonymise import KeyError_

    try:  # refuse before landing anything rather than fail every pseudonymisation run
        environment.load_pseudonymisation_key()
    except KeyError_ as err:
        print(f"cld-pipeline run: {err}", file=sys.stderr)
        return 2
    from cld_pipeline.lib.privacy.retention import AgreementEnded, assert_processing_allowed

    try:
        assert_processing_allowed()
    except AgreementEnded as err:
        print(f"cld-pipeline run: {err}", file=sys.stderr)
        return 2

    summary = process_landing(log=(lambda *_: None) if args.quiet else print)
    print(json.dumps(summary.as_dict(), indent=2))
    return 0 if summary.ok else 1


def _spec_docs(args: argparse.Namespace) -> int:
    from cld_pipeline.spec.docs import DOC_PATH, render_field_docs

    text = render_field_docs()
    if args.check:
        current = DOC_PATH.read_text(encoding="utf-8") if DOC_PATH.exists() else ""
        if current != text:
            print(f"{DOC_PATH} is out of date: run `cld-pipeline spec-docs`", file=sys.stderr)
            return 1
        print(f"{DOC_PATH} is up to date")
        return 0
    DOC_PATH.write_text(text, encoding="utf-8")
    print(f"wrote {DOC_PATH}")
    return 0


def _backfill(args: argparse.Namespace) -> int:
    from cld_pipeline.commands.backfill import BackfillRefused, daemon_is_running, launch_backfill, quarter_status
    from cld_pipeline.commands.run import prepare_instance

    instance = prepare_instance()
    try:
        if args.status:
            status = quarter_status(instance, args.quarter)
            print(json.dumps({"quarter": args.quarter, "whole": status.whole, "complete": status.materialized,
                              "failed": status.failed, "in_progress": status.in_progress,
                              "quarter_tables": status.quarter_tables}, indent=2))
            return 0 if status.whole else 1
        backfill_id, las = launch_backfill(args.quarter, args.la, args.failed_only, instance)
    except BackfillRefused as refusal:
        print(refusal, file=sys.stderr)
        return 2
    print(f"backfill {backfill_id}: {args.quarter}, {len(las)} LA partition(s): {', '.join(las)}")
    print(f"follow it at http://127.0.0.1:3000/runs/b/{backfill_id} (Overview > Backfills)")
    if not daemon_is_running(instance):
        print("note: no Dagster daemon heartbeat in the last 2 minutes; the backfill starts when the daemon runs "
              "(make run, or dagster-daemon run -w workspace.yaml)", file=sys.stderr)
    return 0


def _rights(args: argparse.Namespace) -> int:
    from cld_pipeline.commands import rights as subject_rights
    from cld_pipeline.lib.privacy import rights
    from cld_pipeline.lib.privacy.audit import current_actor
    from cld_pipeline.lib.privacy.pseudonymise import KeyError_

    try:
        if args.action == "list":
            identifiable, _ = subject_rights._zones()
            with identifiable.get_connection() as con:
                rights.ensure_schema(con)
                cur = con.execute("SELECT request_id, action, status, lodged_at, applied_at, requested_by, reason "
                                  "FROM rights.requests ORDER BY lodged_at")
                names = [d[0] for d in cur.description]
                print(json.dumps([dict(zip(names, r)) for r in cur.fetchall()], indent=2, default=str))
            return 0
        if args.action == "apply":
            if not args.request:
                print("cld-pipeline rights apply: --request is required", file=sys.stderr)
                return 2
            request_id = args.request
        else:
            person = rights.parse_person(args.nhs_number, args.la, args.person_id)
            identifiable, _ = subject_rights._zones()
            with identifiable.get_connection() as con:
                held = rights.rows_held(con, person)
            if not held and args.action == "copy":
                print("No submitted row names this person: the copy will be empty (nothing is held).")
            elif not held and not args.allow_not_held:
                print(f"cld-pipeline rights: no submitted row names this person, so there is nothing to {args.action}. "
                      "Check the NHS number or LA person id for a typo: a mistyped number would put someone else "
                      "on the list. If the person is known not to be held yet and future submissions must leave "
                      "them out, run again with --allow-not-held.", file=sys.stderr)
                return 3
            request_id = subject_rights.lodge(args.action, person, args.requested_by or current_actor(), args.reason or "")
            print(f"lodged    {request_id} ({args.action})")
            if args.lodge_only:
                print(f"apply it with `cld-pipeline rights apply --request {request_id}`, or launch rights_job in the "
                      f"UI with request_id: {request_id}")
                return 0
        summary = subject_rights.carry_out(request_id, log=(lambda *_: None) if args.quiet else print)
    except (rights.RightsError, KeyError_) as err:
        print(f"cld-pipeline rights: {err}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=2, default=str))
    return 0 if not summary.get("rebuild_failed") and not summary.get("verification") else 1


def _exclude(args: argparse.Namespace) -> int:
    from cld_pipeline.commands import rights as subject_rights
    from cld_pipeline.lib.benchmark import exclusions
    from cld_pipeline.lib.privacy import audit
    from cld_pipeline.lib.privacy.audit import current_actor

    identifiable, analytics = subject_rights._zones()
    try:
        with analytics.get_connection() as con:
            if args.action == "list":
                rows = exclusions.received(con) if args.received else exclusions.listing(con)
                print(json.dumps(rows, indent=2, default=str))
                return 0
            if not args.submission:
                print(f"cld-pipeline exclude {args.action}: --submission is required", file=sys.stderr)
                return 2
            if args.action == "add":
                row = exclusions.exclude(con, args.submission, args.reason or "", args.by or current_actor())
                detail = {"la_code": row["la_code"], "quarter": row["quarter"], "reason": row["reason"]}
            else:
                if not exclusions.include(con, args.submission):
                    print(f"cld-pipeline exclude: submission {args.submission} was not excluded", file=sys.stderr)
                    return 3
                detail = {}
    except exclusions.ExclusionError as err:
        print(f"cld-pipeline exclude: {err}", file=sys.stderr)
        return 2
    with identifiable.get_connection() as con:
        audit.append(con, f"exclude:{args.action}", args.submission, detail, actor=args.by or current_actor(),
                     purpose=detail.get("reason"))
    quarter = detail.get("quarter") or "the quarters it covers"
    print(f"{'excluded' if args.action == 'add' else 'included again'}  {args.submission}; the figures change when the "
          f"benchmark is rebuilt: launch benchmark_quarter_job for {quarter} (and later quarters) in the UI.")
    return 0


def _linkage(args: argparse.Namespace) -> int:
    """The processor zone's probabilistic linkage: the model, clerical review, and (synthetic data
    only) precision and recall against the generator's truth."""
    from cld_pipeline.commands import rights as subject_rights
    from cld_pipeline.lib.linkage import review
    from cld_pipeline.lib.linkage.evaluation import evaluate
    from cld_pipeline.lib.linkage.person_links import models
    from cld_pipeline.lib.privacy import audit
    from cld_pipeline.lib.privacy.audit import current_actor

    identifiable, _ = subject_rights._zones()
    actor = args.by or current_actor()
    with identifiable.get_connection() as con:
        if args.action == "show":
            print(json.dumps(models(con, args.quarter), indent=2))
            return 0
        if not args.quarter and args.action != "review-record":
            print(f"cld-pipeline linkage {args.action}: --quarter is required", file=sys.stderr)
            return 2
        if args.action == "evaluate":
            truth = Path(args.truth) if args.truth else settings.data_dir() / "synthetic" / "truth_people.parquet"
            if not truth.exists():
                print(f"cld-pipeline linkage evaluate: no generator truth at {truth} (synthetic data only)",
                      file=sys.stderr)
                return 2
            print(json.dumps(evaluate(con, truth, args.quarter), indent=2))
            return 0
        if args.action == "review-export":
            path = Path(args.file) if args.file else review.default_path(args.quarter)
            count = review.export_queue(con, args.quarter, path)
            audit.append(con, "linkage:review-export", args.quarter, {"pairs": count}, actor=actor)
            print(f"{count} pairs to review written to {path} (owner-only; processor zone). Fill the decision column "
                  f"with match, non_match or unsure, then: cld-pipeline linkage review-record --file {path}")
            return 0
        if not args.file:
            print("cld-pipeline linkage review-record: --file is required", file=sys.stderr)
            return 2
        try:
            counts = review.record_decisions(con, Path(args.file), actor)
        except (review.ReviewError, OSError) as err:
            print(f"cld-pipeline linkage review-record: {err}", file=sys.stderr)
            return 2
        audit.append(con, "linkage:review-record", Path(args.file).name, counts, actor=actor)
    print(f"recorded {counts['match']} match and {counts['non_match']} non-match decisions "
          f"({counts['undecided']} rows left undecided); the next linkage run uses them: launch linked_quarter_job.")
    return 0


def _audit(args: argparse.Namespace) -> int:
    from cld_pipeline.defs.operations.audit import sync_dagster
    from cld_pipeline.commands import rights as subject_rights
    from cld_pipeline.commands.run import prepare_instance
    from cld_pipeline.lib.privacy import audit, retention

    if retention.destroyed():
        print("The data was destroyed; the audit log is exported beside the certificate in destruction/.")
        return 0
    instance = prepare_instance()
    identifiable, _ = subject_rights._zones()
    with identifiable.get_connection() as con:
        sync_dagster(instance, con)
        if args.verify:
            broken = audit.verify(con)
            print("audit log chain intact" if broken is None else f"audit log chain broken at entry {broken}")
            return 0 if broken is None else 1
        rows = audit.entries(con, args.action, args.limit)
    if args.json:
        print(json.dumps(rows, indent=2, default=str))
        return 0
    for r in rows:
        print(f"{r['seq']:>6}  {r['logged_at']:%Y-%m-%d %H:%M:%S}  {r['actor']:<24.24}  {r['action']:<22.22}  "
              f"{(r['target'] or ''):<40.40}  {r['purpose'] or ''}")
    return 0


def _retention(args: argparse.Namespace) -> int:
    from cld_pipeline.definitions import defs as load_defs
    from cld_pipeline.commands.run import prepare_instance

    config = {"dry_run": args.dry_run, "today": str(args.today) if args.today else ""}
    result = load_defs().resolve_job_def("retention_job").execute_in_process(
        run_config={"ops": {"destroy_expired_data": {"config": config}}}, instance=prepare_instance(),
        tags={"cld/actor": os.environ.get("CLD_ACTOR") or "cli", "cld/purpose": "retention"}, raise_on_error=False)
    if not result.success:
        from cld_pipeline.commands.run import _failure_message

        print(f"cld-pipeline retention: {_failure_message(result)}", file=sys.stderr)
        return 1
    if args.dry_run:
        from cld_pipeline.lib.privacy import retention

        print(json.dumps(retention.destroy(dry_run=True, today=args.today), indent=2, default=str))
    else:
        print(json.dumps(result.output_for_node("destroy_expired_data"), indent=2, default=str))
    return 0


def _instance(args: argparse.Namespace) -> int:
    from cld_pipeline import environment

    env = environment.current()
    if args.refresh:   # `make run`: the profile in the repository wins over an edited copy
        env = environment.Environment(**{**env.__dict__, "profile_chosen": True})
    print(environment.prepare_dagster_home(env))
    return 0


def rights_actions() -> tuple[str, ...]:
    from cld_pipeline.lib.privacy.rights import ACTIONS

    return ACTIONS


def build_parser() -> argparse.ArgumentParser:
    from cld_pipeline.commands import bench

    parser = argparse.ArgumentParser(prog="cld-pipeline", description="Adult Social Care Client Level Data pipeline")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="write a synthetic national CLD collection into the landing folder",
                         description="Synthetic CLD submissions (rolling 12 months per LA and quarter), hospital "
                                     "extracts and a manifest of injected defects. Deterministic for a seed.")
    gen.add_argument("--scale", choices=["tiny", "small", "national"], default="small",
                     help="tiny: 6 councils, ~12k rows a quarter; small: all 153, ~250k; national: ~8 million")
    gen.add_argument("--quarters", type=int, default=1, help="consecutive quarterly submissions per LA (default 1)")
    gen.add_argument("--period-end", type=_quarter_end, help="reporting period end of the latest quarter (default 2026-09-30)")
    gen.add_argument("--seed", type=int, default=20251)
    gen.add_argument("--rows", type=int, help="override the scale's rows per quarter")
    gen.add_argument("--la", action="append", metavar="CODE", help="only this council (CLD or ONS code); repeatable")
    gen.add_argument("--defect-rate", type=float, default=1.0, help="multiply every defect rate (default 1.0)")
    gen.add_argument("--no-defects", action="store_true", help="clean files only")
    gen.add_argument("--nhs-unrecorded-share", type=float, default=0.05,
                     help="mean share of people with an NHS number that their council did not record (varies by "
                          "council; default 0.05)")
    gen.add_argument("--resubmission-share", type=float, default=0.05,
                     help="share of LA-quarters that send a corrected resubmission (default 0.05)")
    gen.add_argument("--no-hospital", action="store_true", help="skip the hospital extracts")
    gen.add_argument("--data-dir", help="defaults to $CLD_DATA_DIR or ./data")
    gen.add_argument("--quiet", action="store_true", help="no progress bar")
    gen.set_defaults(func=_generate)

    run = sub.add_parser("run", help="process everything in the landing folder through the asset graph, headless",
                         description="Runs each landing file through the same Dagster jobs the sensor starts, in this "
                                     "process, against the instance under $DAGSTER_HOME, and first finishes whatever an "
                                     "earlier run left incomplete. Exit 0 only when every accepted file's partitions "
                                     "materialised and no chain is incomplete (refused files are reported, not failures).")
    run.add_argument("--quiet", action="store_true", help="only the JSON summary")
    run.set_defaults(func=_run)

    bf = sub.add_parser("backfill", help="rebuild a quarter's LA partitions through a Dagster backfill (daemon)",
                        description="Creates a Dagster backfill of the quarter's per-submission layers and its linked "
                                    "and benchmark tables, which the daemon executes (progress on the UI's Backfills "
                                    "page). Partitions are rebuilt from the archived copy of each current submission.")
    bf.add_argument("--quarter", required=True, help="e.g. 2026-Q3")
    bf.add_argument("--la", help="only this council (CLD or ONS code)")
    bf.add_argument("--failed-only", action="store_true", help="only LA partitions whose last attempt failed")
    bf.add_argument("--status", action="store_true", help="print the quarter's partition status and exit "
                                                          "(exit 0 when the quarter is whole)")
    bf.set_defaults(func=_backfill)

    rg = sub.add_parser("rights", help="data-subject rights: copy, restrict, unrestrict, object, erase",
                        description="Lodge a data-subject rights request and apply it through rights_job: the "
                                    "person's records in every layer are copied, withheld from analysis, or removed and "
                                    "kept out of later submissions; affected partitions are rebuilt and the result "
                                    "verified. Identifiers stay in this process and the processor zone.")
    rg.add_argument("action", choices=[*rights_actions(), "apply", "list"])
    rg.add_argument("--nhs-number", help="the person's NHS number")
    rg.add_argument("--la", help="council (CLD or ONS code), with --person-id")
    rg.add_argument("--person-id", help="the council's own person id, with --la")
    rg.add_argument("--reason", help="why: case reference and legal basis (recorded in the audit log; no identifiers)")
    rg.add_argument("--requested-by", help="who is acting (default: CLD_ACTOR or the user name)")
    rg.add_argument("--request", help="with `apply`: a request lodged earlier")
    rg.add_argument("--allow-not-held", action="store_true",
                    help="register the request even though no submitted row names the person yet")
    rg.add_argument("--lodge-only", action="store_true", help="record the request; apply it later or from the UI")
    rg.add_argument("--quiet", action="store_true", help="only the JSON summary")
    rg.set_defaults(func=_rights)

    ex = sub.add_parser("exclude", help="the operator's list of submissions left out of the benchmark",
                        description="DHSC's import blacklist: a listed submission is never chosen for the benchmark "
                                    "(the council's previous file covers the period where there is one), and the "
                                    "dashboards show it with its reason. Changes are audited; rebuild the quarter to "
                                    "apply them.")
    ex.add_argument("action", choices=["add", "remove", "list"])
    ex.add_argument("--submission", help="the submission id (see `exclude list --received`)")
    ex.add_argument("--reason", help="shown to councils: why the file is left out (no identifiers)")
    ex.add_argument("--by", help="who decided (default: CLD_ACTOR or the user name)")
    ex.add_argument("--received", action="store_true", help="with `list`: the submissions that could be listed")
    ex.set_defaults(func=_exclude)

    lk = sub.add_parser("linkage", help="probabilistic linkage: the model, clerical review, evaluation",
                        description="show: each quarter's model, threshold and held-out precision and recall. "
                                    "review-export: the quarter's pairs for clerical review as an owner-only CSV. "
                                    "review-record: record a reviewed file (labels for the next model). evaluate: "
                                    "precision and recall against the synthetic generator's truth.")
    lk.add_argument("action", choices=["show", "review-export", "review-record", "evaluate"])
    lk.add_argument("--quarter", help="the CLD quarter, e.g. 2026-Q3")
    lk.add_argument("--file", help="review-export: where to write (default data/linkage/review/); review-record: "
                                   "the reviewed file")
    lk.add_argument("--truth", help="evaluate: the generator's truth_people.parquet (default data/synthetic/)")
    lk.add_argument("--by", help="who reviewed (default: CLD_ACTOR or the user name)")
    lk.set_defaults(func=_linkage)

    au = sub.add_parser("audit", help="print the audit log (runs, materialisations, rights actions, exports)",
                        description="Syncs finished Dagster runs into the processor zone's append-only audit log "
                                    "and prints it: when, who, what, target, why.")
    au.add_argument("--action", help="only entries of this action (run, materialisation, rights, export, retention)")
    au.add_argument("--limit", type=int, help="only the last N entries")
    au.add_argument("--json", action="store_true")
    au.add_argument("--verify", action="store_true", help="check the hash chain (exit 1 if an entry was altered)")
    au.set_defaults(func=_audit)

    rt = sub.add_parser("retention", help="destroy the data once the data sharing agreement has ended",
                        description="Runs retention_job: once CLD_DSA_EXPIRES_ON has passed, destroys both databases, "
                                    "the archive, quarantine, landing, reports, rights copies and the development key, "
                                    "and writes a destruction certificate under destruction/. Before then, or with "
                                    "--dry-run, it lists what would go and deletes nothing.")
    rt.add_argument("--dry-run", action="store_true", help="list what would be destroyed; delete nothing")
    rt.add_argument("--today", type=_date, help="judge expiry as of this date (rehearsals)")
    rt.set_defaults(func=_retention)

    bn = sub.add_parser("bench", help="benchmark the pipeline end to end at three scales against a DuckDB baseline",
                        description="Generates 100k, 1M and 8M-row collections under bench/work/ if absent, runs "
                                    "`cld-pipeline run` on each (medians of --repeat runs below 8M) and the plain DuckDB "
                                    "baseline, and writes bench/results.json and bench/results.md.")
    bn.add_argument("--scale", action="append", choices=[*bench.SCALES, *bench.SMOKE],
                    help="repeatable; default all three")
    bn.add_argument("--repeat", type=int, default=3)
    bn.add_argument("--latency", action="store_true",
                    help="also time median-sized national files from landing to pseudonymised with the daemon running")
    bn.set_defaults(func=lambda a: bench.main(a.scale or list(bench.SCALES), a.repeat, a.latency))

    inst = sub.add_parser("instance", help="prepare $DAGSTER_HOME with this environment's dagster.yaml and print it")
    inst.add_argument("--refresh", action="store_true", help="replace an existing dagster.yaml with the profile's")
    inst.set_defaults(func=_instance)

    docs = sub.add_parser("spec-docs", help="write docs/cld-fields.md from the specification in code")
    docs.add_argument("--check", action="store_true", help="fail if the committed document is out of date")
    docs.set_defaults(func=_spec_docs)
    return parser


def main(argv: list[str] | None = None) -> int:
    import warnings

    import dagster as dg

    # Dagster marks some parameters we use as beta; on a terminal that reads like an error.
    warnings.filterwarnings("ignore", category=dg.BetaWarning)
    warnings.filterwarnings("ignore", category=dg.PreviewWarning)
    args = build_parser().parse_args(argv)
    if getattr(args, "quarters", 1) < 1:
        build_parser().error("--quarters must be at least 1")
    if args.func is not _spec_docs:
        from cld_pipeline.lib.privacy.file_modes import secure_data_folder

        secure_data_folder(settings.data_dir())   # every file written from here on is owner-only
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
