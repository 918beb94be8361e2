"""Dagster definitions, one folder per asset layer (loaded by `cld_pipeline.definitions`)."""
