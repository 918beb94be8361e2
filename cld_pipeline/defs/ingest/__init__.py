"""Ingestion layer: landing sensor, raw submissions and events, quarantine."""
