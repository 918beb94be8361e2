"""Hospital extracts: their own sensor, raw/validated/pseudonymised assets per quarter."""
