"""Validation of submissions against the CLD Release 2 specification (no Dagster here)."""
