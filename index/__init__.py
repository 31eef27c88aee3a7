"""Index job: reads a model bundle and a catalog, writes an index version."""
