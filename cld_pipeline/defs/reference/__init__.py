"""Reference data layer (councils, code lists)."""
