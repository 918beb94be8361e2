"""Plain domain logic with no Dagster imports, unit-testable on its own."""
