"""Retention: keep the data only until the data sharing agreement (DSA) ends, then destroy it.

The DSA is configuration (`CLD_DSA_ID`, `CLD_DSA_EXPIRES_ON`). Once the expiry date has passed, the
retention job (scheduled daily) destroys everything in the data folder that holds or derives from
the councils' data: both databases, the archive of original files, quarantine, landing, reports,
rights copies, scratch space, synthetic truth files, linkage models and review files, and the key material the pipeline is
responsible for (the development key file). A production key lives in the deployment's secret store:
the certificate lists it as the custodian's action. Each file is overwritten with random bytes,
flushed and unlinked (on SSDs and copy-on-write file systems overwriting is best effort; destroying
the key and the volume's encryption key is what makes copies unreadable, privacy.md 4.6).

Before anything goes, the audit log is exported beside the certificate, because accountability
outlives the data. The certificate lists what was destroyed, when, by whom, with each file's size and
SHA-256, and is itself checksummed. A dry run lists what would go and touches nothing. After
destruction the pipeline refuses new data for the ended agreement.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from cld_pipeline import settings
from cld_pipeline.lib.privacy.pseudonymise import DEV_KEY_FILE

DEFAULT_DSA_ID = "DSA-CLD-SYNTHETIC-0001"
DEFAULT_EXPIRES_ON = dt.date(2031, 3, 31)
# Relative to the data folder. Kept: dagster_home (run metadata, no identifiers: checked by the
# privacy tests), alerts/ (file names and errors) and destruction/ (certificates, audit log).
DESTROYED = ["identifiable.duckdb", "identifiable.duckdb.wal", "analytics.duckdb", "analytics.duckdb.wal",
             "archive", "quarantine", "landing", "reports", "rights", "work", "synthetic", "linkage", DEV_KEY_FILE]
CERTIFICATES = "destruction"


@dataclass(frozen=True)
class Agreement:
    dsa_id: str
    expires_on: dt.date

    def expired(self, today: dt.date | None = None) -> bool:
        return (today or dt.date.today()) > self.expires_on


def agreement() -> Agreement:
    text = os.environ.get("CLD_DSA_EXPIRES_ON")
    try:
        expires = dt.date.fromisoformat(text) if text else DEFAULT_EXPIRES_ON
    except ValueError:
        raise ValueError(f"CLD_DSA_EXPIRES_ON={text!r} is not a date like 2031-03-31") from None
    return Agreement(os.environ.get("CLD_DSA_ID", DEFAULT_DSA_ID), expires)


class AgreementEnded(RuntimeError):
    """Data may not be processed: the agreement has ended."""


def assert_processing_allowed(today: dt.date | None = None) -> None:
    dsa = agreement()
    if dsa.expired(today):
        raise AgreementEnded(f"The data sharing agreement {dsa.dsa_id} ended on {dsa.expires_on}: no data may be "
                             "received or processed under it (the retention job destroys what is held).")


def destroyed(data_dir: Path | None = None) -> bool:
    """A destruction certificate exists: the data of the agreement has been destroyed."""
    return any(((data_dir or settings.data_dir()) / CERTIFICATES).glob("certificate-*.json"))


def planned(data_dir: Path | None = None) -> list[Path]:
    """Every file the destruction covers, in a stable order."""
    root = data_dir or settings.data_dir()
    files: list[Path] = []
    for name in DESTROYED:
        path = root / name
        if path.is_file() or path.is_symlink():
            files.append(path)
        elif path.is_dir():
            files += sorted(p for p in path.rglob("*") if p.is_file() or p.is_symlink())
    files += sorted(p for p in root.glob("*.duckdb.writer.lock"))
    return files


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _shred(path: Path) -> None:
    if not path.is_symlink():
        size = path.stat().st_size
        with path.open("r+b") as fh:
            left = size
            while left > 0:
                chunk = min(left, 1 << 20)
                fh.write(os.urandom(chunk))
                left -= chunk
            fh.flush()
            os.fsync(fh.fileno())
    path.unlink()


def destroy(dry_run: bool = True, today: dt.date | None = None, actor: str | None = None,
            audit_export=None) -> dict:
    """Destroy (or, dry, list) the data once the agreement has passed. `audit_export(path)` writes the
    audit log to `path` before the databases go. Returns the certificate (or the dry-run listing)."""
    from cld_pipeline.lib.privacy.audit import current_actor

    root = settings.data_dir()
    dsa = agreement()
    today = today or dt.date.today()
    files = planned(root)
    rel = [str(p.relative_to(root)) for p in files]
    if dry_run or not dsa.expired(today):
        return {"dsa_id": dsa.dsa_id, "expires_on": str(dsa.expires_on), "expired": dsa.expired(today),
                "dry_run": dry_run, "destroyed": False, "would_destroy": rel,
                "bytes": sum(p.stat().st_size for p in files if not p.is_symlink())}
    now = dt.datetime.now(dt.timezone.utc).replace(microsecond=0)
    folder = root / CERTIFICATES
    folder.mkdir(parents=True, exist_ok=True)
    stamp = now.strftime("%Y%m%dT%H%M%SZ")
    audit_file = folder / f"audit-log-{stamp}.csv"
    if audit_export is not None:
        audit_export(audit_file)
    items = []
    for path, name in zip(files, rel):
        size = 0 if path.is_symlink() else path.stat().st_size
        items.append({"path": name, "bytes": size, "sha256": None if path.is_symlink() else _sha256(path)})
        _shred(path)
    for name in DESTROYED:   # empty folders left behind
        path = root / name
        if path.is_dir():
            for sub in sorted((p for p in path.rglob("*") if p.is_dir()), reverse=True):
                sub.rmdir()
            path.rmdir()
    key_held_outside = bool(os.environ.get("CLD_PSEUDO_KEY") or os.environ.get("CLD_PSEUDO_KEY_PREVIOUS"))
    certificate = {
        "certificate": "Secure destruction of Adult Social Care Client Level Data",
        "dsa_id": dsa.dsa_id, "dsa_expired_on": str(dsa.expires_on), "destroyed_at": now.isoformat(),
        "destroyed_by": actor or current_actor(), "data_folder": str(root),
        "method": "each file overwritten once with random bytes, flushed to disk, then unlinked",
        "files": items, "file_count": len(items), "bytes": sum(i["bytes"] for i in items),
        "key_material": {"development_key_file": DEV_KEY_FILE in rel,
                         "production_keys": ("held in the deployment's secret store (CLD_PSEUDO_KEY, "
                                             "CLD_PSEUDO_KEY_PREVIOUS): the key custodian must destroy every version"
                                             if key_held_outside else "none configured")},
        "kept": ["dagster_home (run metadata without identifiers)", "alerts", f"{CERTIFICATES}/"],
        "audit_log": ({"path": str(audit_file.relative_to(root)), "sha256": _sha256(audit_file)}
                      if audit_file.exists() else None),
    }
    body = json.dumps(certificate, indent=2, sort_keys=True)
    certificate["certificate_sha256"] = hashlib.sha256(body.encode()).hexdigest()
    path = folder / f"certificate-{stamp}.json"
    path.write_text(json.dumps(certificate, indent=2, sort_keys=True), encoding="utf-8")
    certificate["certificate_path"] = str(path)
    return certificate
