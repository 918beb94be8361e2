"""Owner-only files for everything identifiable (privacy.md: identifiable files readable by their owner only).

Every process of the pipeline (the code location when Dagster loads it, each run worker, every
`cld-pipeline` command) calls `secure_data_folder` first: it sets the process umask to 077, so every
file and folder it writes afterwards (archive copies, quarantined files, rights copies, scratch,
Dagster's storage and compute logs, alerts) is created owner-only, and it puts right the modes of
what is already there. The analysts' zone is the exception: `analytics.duckdb` is group-readable
(0640) in a data folder the group may enter (0750), so access to it can be granted to an analysts'
group without granting anything else.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

PRIVATE_FILE, PRIVATE_DIR = 0o600, 0o700
DATA_DIR_MODE = 0o750
# Files at the top of the data folder and their modes; everything else there is owner-only.
TOP_FILES = {"analytics.duckdb": 0o640, "analytics.duckdb.wal": 0o640, "analytics.duckdb.writer.lock": 0o640}


def _chmod(path: Path, mode: int) -> None:
    try:
        st = path.lstat()
        if stat.S_ISLNK(st.st_mode) or stat.S_IMODE(st.st_mode) == mode:
            return
        if stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode):
            os.chmod(path, mode)
    except (FileNotFoundError, PermissionError):
        pass   # removed meanwhile, or not ours: nothing to put right


def secure_data_folder(data_dir: Path) -> None:
    """umask 077 for this process, and owner-only modes on what the data folder already holds."""
    os.umask(0o077)
    data_dir.mkdir(parents=True, exist_ok=True)
    _chmod(data_dir, DATA_DIR_MODE)
    for entry in data_dir.iterdir():
        if entry.is_symlink():
            continue
        if entry.is_dir():
            _chmod(entry, PRIVATE_DIR)
            for root, dirs, files in os.walk(entry):
                for name in dirs:
                    _chmod(Path(root) / name, PRIVATE_DIR)
                for name in files:
                    _chmod(Path(root) / name, PRIVATE_FILE)
        else:
            _chmod(entry, TOP_FILES.get(entry.name, PRIVATE_FILE))
