"""Two-tower retrieval library: features, layers, towers, loss, metrics, artifacts, datasets."""
