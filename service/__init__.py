"""HTTP service: reads a model bundle and an index version, answers retrieval queries."""
