"""The `cld-pipeline` command and its programs: run, backfill, rights, bench (`cli.main` is the entry point)."""
