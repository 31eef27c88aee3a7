"""Datasets: the on-disk layout, the split protocol, MovieLens conversion, synthetic catalogs."""
