"""Pseudonymised layer: keyed-hash tokens and generalised fields for the analysts zone."""
