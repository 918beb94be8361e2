"""Shared fixtures: a generated tiny national collection, reused by the tests that only read it."""

from __future__ import annotations

import csv
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
