"""Health linkage: hospital extracts (read, validated, pseudonymised) and the linked tables' SQL."""
