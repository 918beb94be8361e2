"""Benchmarking by DHSC's method: main tables, measures, the quarter's build, LA dashboards."""
