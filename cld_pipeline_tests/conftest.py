"""Shared fixtures: a generated tiny national collection, reused by the tests that only read it."""

from __future__ import annotations

import csv
import os
import secrets
import shutil
import subprocess
from contextlib import contextmanager
from pathlib import Path

import pytest

from cld_pipeline.spec import load_spec, normalise_header
from cld_pipeline.synthetic import DefectRates, GeneratorConfig, generate

TINY = GeneratorConfig(scale="tiny", quarters=2, seed=7, resubmission_share=0.3)
CLEAN = GeneratorConfig(scale="tiny", quarters=2, seed=11, resubmission_share=0.0,
                        defects=DefectRates().scaled(0.0), hospital=False)


@pytest.fixture(scope="session")
def tiny_collection(tmp_path_factory) -> tuple[Path, dict]:
    """Two quarters for six councils, with defects and resubmissions (generated once)."""
    data_dir = tmp_path_factory.mktemp("tiny")
    manifest = generate(TINY, data_dir, progress=False)
    return data_dir, manifest


def read_submission(path: Path) -> list[dict[str, str]]:
    """A submission as the contract defines it: UTF-8 with optional BOM, header names matched
    case-insensitively with spaces and underscores alike; values keyed by CLD field name."""
    lookup = load_spec().header_lookup()
    with path.open(encoding="utf-8-sig", newline="") as fh:
        reader = csv.reader(fh)
        header = [lookup[normalise_header(h)] for h in next(reader)]
        return [dict(zip(header, row)) for row in reader]


@pytest.fixture(scope="session")
def clean_collection(tmp_path_factory) -> tuple[Path, dict, dict[str, list[dict[str, str]]]]:
    """Two quarters for six councils with no defects: for exact assertions about the data itself."""
    data_dir = tmp_path_factory.mktemp("clean")
    manifest = generate(CLEAN, data_dir, progress=False)
    rows = {f["file_name"]: read_submission(data_dir / "landing" / f["file_name"]) for f in manifest["files"]}
    return data_dir, manifest, rows


@pytest.fixture(scope="session")
def tiny_rows(tiny_collection) -> dict[str, list[dict[str, str]]]:
    data_dir, manifest = tiny_collection
    return {f["file_name"]: read_submission(data_dir / "landing" / f["file_name"]) for f in manifest["files"]}


PIPELINE_KEY = secrets.token_hex(32)
PIPELINE = GeneratorConfig(scale="tiny", quarters=2, seed=17, resubmission_share=0.2)


@contextmanager
def environment(**values: str):
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture(scope="session")
def pseudonymised_pipeline(tmp_path_factory):
    """A tiny collection with defects, resubmissions and hospital extracts, processed end to end by
    `cld-pipeline run` in production mode (the raw rows and extracts are kept for the assertions)."""
    from cld_pipeline.commands.run import prepare_instance, process_landing

    data_dir = tmp_path_factory.mktemp("pseudo")
    manifest = generate(PIPELINE, data_dir, progress=False)
    rows = {f["file_name"]: read_submission(data_dir / "landing" / f["file_name"]) for f in manifest["files"]}
    hospital = []
    for h in manifest["hospital_files"]:
        with (data_dir / "landing" / h["file_name"]).open(encoding="utf-8") as fh:
            hospital += list(csv.DictReader(fh))
    with environment(CLD_DATA_DIR=str(data_dir), DAGSTER_HOME=str(data_dir / "dagster_home"),
                     CLD_PSEUDO_KEY=PIPELINE_KEY, CLD_ENVIRONMENT="production"):
        summary = process_landing(prepare_instance(), log=lambda *_: None)
    assert summary.ok, summary.failed
    return data_dir, rows, hospital, summary


ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"   # screenshots CI keeps


def find_chromium() -> str:
    """Headless Chromium for browser tests, installed from Debian's packages when missing."""
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if found := shutil.which(name):
            return found
    subprocess.run(["apt-get", "update", "-qq"], check=True, capture_output=True, timeout=600)
    subprocess.run(["apt-get", "install", "-y", "-qq", "chromium"], check=True, capture_output=True, timeout=1200,
                   env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
    return shutil.which("chromium")


def browse(url: str, screenshot: Path | None = None, budget_ms: int = 20000) -> str:
    """The page's DOM after its scripts ran (and a screenshot when asked)."""
    flags = [find_chromium(), "--headless", "--no-sandbox", "--disable-gpu", f"--virtual-time-budget={budget_ms}",
             "--window-size=1600,1400"]
    dom = subprocess.run([*flags, "--dump-dom", url], capture_output=True, text=True, timeout=180).stdout
    if screenshot is not None:
        screenshot.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run([*flags, f"--screenshot={screenshot}", url], capture_output=True, timeout=180)
    return dom


def occurrences(needles, haystacks) -> set[str]:
    """Which needles occur anywhere in any haystack (str or bytes), in one pass per haystack
    (Aho-Corasick): tens of thousands of identifiers against megabytes of logs and pages."""
    import ahocorasick

    automaton = ahocorasick.Automaton()
    for needle in set(needles):
        automaton.add_word(needle, needle)
    if not len(automaton):
        return set()
    automaton.make_automaton()
    found: set[str] = set()
    for haystack in haystacks:
        text = haystack.decode("latin-1") if isinstance(haystack, bytes) else haystack
        found |= {needle for _, needle in automaton.iter(text)}
    return found
