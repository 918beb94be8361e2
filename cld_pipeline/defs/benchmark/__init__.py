"""Benchmark layer: DHSC main tables, measures with disclosure control, LA dashboards."""
