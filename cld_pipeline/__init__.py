"""cld-pipeline: Adult Social Care Client Level Data as Dagster software-defined assets on DuckDB."""

__version__ = "0.1.0"
