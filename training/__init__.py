"""Training job: reads a dataset, writes a model bundle."""
