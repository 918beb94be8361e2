"""The environment, decided in one place: development or production.

Everything that differs between a laptop and a deployment is chosen here and nowhere else:

| setting | development (default) | production |
| --- | --- | --- |
| `CLD_ENVIRONMENT` | `development` | anything else, e.g. `production` |
| Dagster instance (`CLD_DAGSTER_PROFILE`) | `local`: `dagster.yaml`, embedded SQLite | `production`: `deploy/dagster.production.yaml`, PostgreSQL |
| pseudonymisation key | `CLD_PSEUDO_KEY`, else a labelled throw-away key file in the data folder | `CLD_PSEUDO_KEY` from the secret store, required |

The Dagster resources (`defs/resources.py`), `cld-pipeline run`, `cld-pipeline instance` and the rights
commands all read `current()`; no other module reads these variables. No Dagster import here.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from cld_pipeline import settings

PROJECT_ROOT = Path(__file__).resolve().parents[1]
INSTANCE_PROFILES = {"local": PROJECT_ROOT / "dagster.yaml",
                     "production": PROJECT_ROOT / "deploy" / "dagster.production.yaml"}


@dataclass(frozen=True)
class Environment:
    name: str                         # `development`, or the deployment's name
    instance_profile_name: str        # a key of INSTANCE_PROFILES
    profile_chosen: bool              # CLD_DAGSTER_PROFILE was set explicitly
    key_from_env: bool                # CLD_PSEUDO_KEY is set (its value is never held here)
    key_version: str
    previous_keys_from_env: bool      # CLD_PSEUDO_KEY_PREVIOUS is set

    @property
    def is_development(self) -> bool:
        return self.name == "development"

    @property
    def instance_profile(self) -> Path:
        return INSTANCE_PROFILES[self.instance_profile_name]

    @property
    def dagster_home(self) -> Path:
        return Path(os.environ.get("DAGSTER_HOME") or settings.data_dir() / "dagster_home")


def current() -> Environment:
    """The environment this process runs in, read from the variables in the table above."""
    profile = os.environ.get("CLD_DAGSTER_PROFILE", "local")
    if profile not in INSTANCE_PROFILES:
        raise SystemExit(f"CLD_DAGSTER_PROFILE={profile!r}: use one of {', '.join(INSTANCE_PROFILES)}")
    return Environment(
        name=os.environ.get("CLD_ENVIRONMENT", "development"),
        instance_profile_name=profile,
        profile_chosen="CLD_DAGSTER_PROFILE" in os.environ,
        key_from_env=bool(os.environ.get("CLD_PSEUDO_KEY")),
        key_version=os.environ.get("CLD_PSEUDO_KEY_VERSION", "1"),
        previous_keys_from_env=bool(os.environ.get("CLD_PSEUDO_KEY_PREVIOUS")),
    )


def prepare_dagster_home(env: Environment | None = None) -> Path:
    """`$DAGSTER_HOME` (default `$CLD_DATA_DIR/dagster_home`) holding the chosen profile's
    dagster.yaml; an explicitly chosen profile replaces what is there, so a changed setting takes
    effect. Sets `DAGSTER_HOME` for this process and returns it."""
    from cld_pipeline.lib.privacy.file_modes import secure_data_folder

    env = env or current()
    secure_data_folder(settings.data_dir())
    home = env.dagster_home
    home.mkdir(parents=True, exist_ok=True)
    profile = env.instance_profile
    if profile.exists() and (not (home / "dagster.yaml").exists() or env.profile_chosen):
        shutil.copyfile(profile, home / "dagster.yaml")
    os.environ["DAGSTER_HOME"] = str(home)
    return home


def load_pseudonymisation_key():
    """The current key, outside Dagster (`cld-pipeline run` and the rights commands)."""
    from cld_pipeline.lib.privacy.pseudonymise import load_key

    env = current()
    return load_key(os.environ.get("CLD_PSEUDO_KEY"), env.key_version, env.name, settings.data_dir())


def load_pseudonymisation_ring():
    """The current key and the previous versions still held (`CLD_PSEUDO_KEY_PREVIOUS`)."""
    from cld_pipeline.lib.privacy.pseudonymise import load_ring

    return load_ring(load_pseudonymisation_key(), os.environ.get("CLD_PSEUDO_KEY_PREVIOUS"))
