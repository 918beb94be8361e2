"""`cld-pipeline bench`: the pipeline end to end at three scales, against a plain DuckDB baseline.

For each scale (rows in one quarter, all 153 councils) the synthetic collection is generated once
under `bench/work/<scale>/` (kept for later runs), then each repetition copies the landing folder to a
fresh data folder and runs `cld-pipeline run` (the same Dagster jobs as the sensor, headless) in a
child process. A sampler reads the child process tree's resident memory from /proc every 0.2 s; the
Dagster instance's step statistics give each layer's wall time, so each layer gets its rows, seconds,
rows a second and the peak memory while it ran. Per-run overhead is the run's wall time not spent in
steps. The baseline (`commands/bench/baseline.py`) does the same work as one hand-written DuckDB script in a
child process, and the ratio pipeline / baseline is reported per layer and overall.

Results: `bench/results.json` and `bench/results.md` (medians of the repetitions).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

from cld_pipeline.environment import PROJECT_ROOT as ROOT

BENCH = ROOT / "bench"
SCALES = {"100k": 100_000, "1m": 1_000_000, "8m": 8_000_000}
SMOKE = {"10k": 10_000}      # a quick check of the harness itself, not in the default set
LAYERS = {  # Dagster step key -> layer
    "raw_submission": "raw", "validated_submission": "validated", "pseudonymised__events": "pseudonymised",
    "hospital_extract": "hospital", "pseudonymised__hospital_episodes": "hospital", "linked_quarter": "linked",
    "benchmark_quarter": "benchmark", "benchmark__la_dashboards": "benchmark",
}
# Which baseline stage does the same work as each pipeline layer.
BASELINE_STAGE = {"raw": "read_csv", "validated": "validate", "pseudonymised": "hash", "benchmark": "aggregate"}


class Sampler(threading.Thread):
    """Resident memory of a process and its descendants, sampled from /proc."""

    def __init__(self, pid: int, interval: float = 0.2):
        super().__init__(daemon=True)
        self.pid, self.interval, self.samples, self.stopped = pid, interval, [], threading.Event()

    @staticmethod
    def tree_rss(root: int) -> int:
        children: dict[int, list[int]] = {}
        rss: dict[int, int] = {}
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                status = (entry / "status").read_text()
            except OSError:
                continue
            fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
            pid, ppid = int(entry.name), int(fields.get("PPid", "0").strip())
            children.setdefault(ppid, []).append(pid)
            rss[pid] = int(fields.get("VmRSS", "0 kB").split()[0]) * 1024
        total, stack = 0, [root]
        while stack:
            pid = stack.pop()
            total += rss.get(pid, 0)
            stack += children.get(pid, [])
        return total

    def run(self) -> None:
        while not self.stopped.is_set():
            self.samples.append((time.time(), self.tree_rss(self.pid)))
            time.sleep(self.interval)

    def peak(self, start: float | None = None, end: float | None = None) -> int:
        values = [r for t, r in self.samples if (start is None or t >= start - self.interval)
                  and (end is None or t <= end + self.interval)]
        return max(values, default=0)


def run_measured(cmd: list[str], env: dict) -> tuple[float, Sampler, subprocess.CompletedProcess]:
    started = time.time()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    sampler = Sampler(proc.pid)
    sampler.start()
    out, err = proc.communicate()
    sampler.stopped.set()
    sampler.join()
    return time.time() - started, sampler, subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def generate(scale: str, rows: int) -> Path:
    source = BENCH / "work" / scale / "source"
    if (source / "synthetic" / "manifest.json").exists():
        return source
    shutil.rmtree(source, ignore_errors=True)
    subprocess.run([sys.executable, "-m", "cld_pipeline.commands.cli", "generate", "--scale", "national", "--rows", str(rows),
                    "--data-dir", str(source), "--quiet"], check=True, stdout=subprocess.DEVNULL)
    return source


def pipeline_run(source: Path, scale: str, rep: int) -> dict:
    target = BENCH / "work" / scale / f"run{rep}"
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(source / "landing", target / "landing")
    env = {**os.environ, "CLD_DATA_DIR": str(target), "DAGSTER_HOME": str(target / "dagster_home"),
           "CLD_ENVIRONMENT": "development"}
    env.pop("CLD_PSEUDO_KEY", None)
    seconds, sampler, done = run_measured([sys.executable, "-m", "cld_pipeline.commands.cli", "run", "--quiet"], env)
    if done.returncode != 0:
        raise RuntimeError(f"pipeline run failed at {scale}: {done.stderr[-2000:]}")
    layers = layer_stats(target, sampler)
    rows = table_rows(target)
    for name, layer in layers.items():
        layer["rows"] = rows.get(name)
        layer["rows_per_second"] = round(layer["rows"] / layer["seconds"]) if layer.get("rows") and layer["seconds"] else None
    result = {"seconds": round(seconds, 1), "peak_rss_mb": round(sampler.peak() / 2**20), "layers": layers,
              "rows": rows.get("raw")}
    shutil.rmtree(target, ignore_errors=True)
    return result


def layer_stats(target: Path, sampler: Sampler) -> dict:
    """Wall time and peak memory per layer from the instance's step statistics; run overhead."""
    os.environ["DAGSTER_HOME"] = str(target / "dagster_home")
    import dagster as dg

    instance = dg.DagsterInstance.from_config(str(target / "dagster_home"))
    layers: dict[str, dict] = {}
    overhead, runs = 0.0, 0
    for record in instance.get_run_records():
        stats = instance.get_run_step_stats(record.dagster_run.run_id)
        steps = 0.0
        for s in stats:
            if s.start_time is None or s.end_time is None:
                continue
            layer = LAYERS.get(s.step_key, s.step_key)
            entry = layers.setdefault(layer, {"seconds": 0.0, "steps": 0, "peak_rss_mb": 0})
            entry["seconds"] += s.end_time - s.start_time
            entry["steps"] += 1
            entry["peak_rss_mb"] = max(entry["peak_rss_mb"], round(sampler.peak(s.start_time, s.end_time) / 2**20))
            steps += s.end_time - s.start_time
        if record.start_time and record.end_time:
            overhead += (record.end_time - record.start_time) - steps
            runs += 1
    # Where validation's and the benchmark's time goes: each asset records its own split per run (a
    # batch run repeats it on each partition it covers, so each run counts once).
    for layer, key, field in (("validated", ["validated", "events"], "seconds"),
                              ("benchmark", ["benchmark", "activity"], "seconds_by_phase")):
        split = split_seconds(instance, dg.AssetKey(key), field)
        if layer in layers and split:
            layers[layer]["split_seconds"] = split
    instance.dispose()
    for entry in layers.values():
        entry["seconds"] = round(entry["seconds"], 1)
    layers["dagster_run_overhead"] = {"seconds": round(overhead, 1), "runs": runs,
                                      "per_run_seconds": round(overhead / max(runs, 1), 2)}
    return layers


def split_seconds(instance, key, field: str) -> dict[str, float]:
    import dagster as dg

    split: dict[str, float] = {}
    seen: set[str] = set()
    try:
        records = instance.fetch_materializations(key, limit=10_000).records
    except Exception as err:  # the split is a profile, not a result: never lose a run over it
        print(f"no split for {key.to_user_string()}: {err}", file=sys.stderr)
        return {}
    for event in records:
        if event.run_id in seen:
            continue
        seen.add(event.run_id)
        timing = event.asset_materialization.metadata.get(field)
        for part, value in ((timing.value if isinstance(timing, dg.JsonMetadataValue) else None) or {}).items():
            if part != "total" and isinstance(value, (int, float)):
                split[part] = split.get(part, 0.0) + float(value)
    return {k: round(v, 1) for k, v in sorted(split.items())}


def table_rows(target: Path) -> dict:
    import duckdb

    out = {}
    for db, queries in (("identifiable.duckdb", {"raw": "raw.events", "validated": "validated.events",
                                                 "hospital": "validated.hospital_episodes"}),
                        ("analytics.duckdb", {"pseudonymised": "pseudonymised.events", "linked": "linked.person_spells",
                                              "benchmark": "dhsc.joined_submissions"})):
        con = duckdb.connect(str(target / db), read_only=True)
        for name, table in queries.items():
            try:
                out[name] = con.execute(f"SELECT count(*) FROM {table}").fetchall()[0][0]
            except duckdb.Error:
                out[name] = None
        con.close()
    return out


def baseline_run(source: Path, scale: str) -> dict:
    target = BENCH / "work" / scale / "baseline"
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir(parents=True)
    seconds, sampler, done = run_measured([sys.executable, "-m", "cld_pipeline.commands.bench.baseline",
                                           str(source / "landing"), str(target)], dict(os.environ))
    if done.returncode != 0:
        raise RuntimeError(f"baseline failed at {scale}: {done.stderr[-2000:]}")
    stages = json.loads(done.stdout.strip().splitlines()[-1])
    shutil.rmtree(target, ignore_errors=True)
    return {"seconds": round(seconds, 1), "peak_rss_mb": round(sampler.peak() / 2**20), "stages": stages}


def median_of(results: list[dict]) -> dict:
    """Median run (by wall time), with the spread of wall times."""
    ordered = sorted(results, key=lambda r: r["seconds"])
    chosen = dict(ordered[len(ordered) // 2])
    chosen["runs"] = len(results)
    chosen["all_seconds"] = [r["seconds"] for r in results]
    return chosen


def main(scales: list[str], repeat: int, latency: bool = False) -> int:
    BENCH.mkdir(exist_ok=True)
    path = BENCH / "results.json"
    results = json.loads(path.read_text()) if path.exists() else {}
    results["machine"] = {"cpus": os.cpu_count(), "memory_gb": round(os.sysconf("SC_PAGE_SIZE") *
                                                                     os.sysconf("SC_PHYS_PAGES") / 2**30, 1)}
    for scale in scales:
        rows = {**SCALES, **SMOKE}[scale]
        source = generate(scale, rows)
        reps = repeat if rows < 8_000_000 else 1
        pipeline = median_of([pipeline_run(source, scale, i) for i in range(reps)])
        baseline = median_of([baseline_run(source, scale) for _ in range(reps)])
        ratios = {layer: round(pipeline["layers"][layer]["seconds"] / baseline["stages"][stage], 2)
                  for layer, stage in BASELINE_STAGE.items()
                  if layer in pipeline["layers"] and baseline["stages"].get(stage)}
        ratios["total"] = round(pipeline["seconds"] / baseline["seconds"], 2)
        results.setdefault("scales", {})[scale] = {"rows": pipeline["rows"], "pipeline": pipeline,
                                                  "baseline": baseline, "ratio_pipeline_to_baseline": ratios,
                                                  "measured_at": time.strftime("%Y-%m-%d %H:%M")}
        path.write_text(json.dumps(results, indent=2))
        (BENCH / "results.md").write_text(markdown(results))
        print(f"{scale}: pipeline {pipeline['seconds']} s, baseline {baseline['seconds']} s, ratio {ratios['total']}")
    if latency:   # a median-sized council's file at national scale, with the daemon
        from cld_pipeline.commands.bench import latency as bench_latency

        results["latency"] = {**bench_latency.measure(generate("8m", SCALES["8m"]), BENCH / "work" / "latency"),
                              "measured_at": time.strftime("%Y-%m-%d %H:%M")}
        path.write_text(json.dumps(results, indent=2))
        (BENCH / "results.md").write_text(markdown(results))
        print(f"latency: median {results['latency']['median_seconds']} s from landing to pseudonymised")
    return 0


def markdown(results: dict) -> str:
    lines = ["# Benchmark: `cld-pipeline bench`", "",
             f"Machine: {results['machine']['cpus']} cores, {results['machine']['memory_gb']} GiB. Medians of the "
             "runs shown (`runs`); one quarter, 153 councils, hospital extracts included.", "",
             "| scale | rows | layer | seconds | rows/s | peak MiB | baseline stage s | ratio |",
             "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: |"]
    for scale, r in results.get("scales", {}).items():
        p, b, ratio = r["pipeline"], r["baseline"], r["ratio_pipeline_to_baseline"]
        for layer, v in p["layers"].items():
            stage = BASELINE_STAGE.get(layer)
            lines.append(f"| {scale} | {v.get('rows') or ''} | {layer} | {v['seconds']} | {v.get('rows_per_second') or ''} "
                         f"| {v.get('peak_rss_mb', '')} | {b['stages'].get(stage, '') if stage else ''} "
                         f"| {ratio.get(layer, '')} |")
        lines.append(f"| {scale} | {r['rows']} | **end to end** (runs: {p['runs']}, {p['all_seconds']}) | "
                     f"**{p['seconds']}** | {round(r['rows'] / p['seconds'])} | {p['peak_rss_mb']} | "
                     f"{b['seconds']} (peak {b['peak_rss_mb']} MiB) | **{ratio['total']}** |")
    lines += ["", "Where the time goes inside a layer (seconds, summed over its runs):", ""]
    for scale, r in results.get("scales", {}).items():
        for layer in ("validated", "benchmark"):
            split = r["pipeline"]["layers"].get(layer, {}).get("split_seconds")
            if split:
                lines.append(f"- {scale} {layer}: " + ", ".join(f"{k} {v}" for k, v in split.items()))
    if "latency" in results:
        lat = results["latency"]
        lines += ["", f"Landing to pseudonymised with the daemon (median-sized national files, "
                      f"{lat['settle_seconds']:g} s settling, sensor every {lat['sensor_interval_seconds']} s): "
                      f"median **{lat['median_seconds']} s** (target {lat['target_seconds']} s); "
                      + ", ".join(f"{a['rows']} rows {a['seconds']} s" for a in lat["arrivals"]) + "."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser()
    parser.add_argument("--scale", action="append", choices=list(SCALES) + list(SMOKE))
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--latency", action="store_true")
    args = parser.parse_args()
    sys.exit(main(args.scale or list(SCALES), args.repeat, args.latency))
