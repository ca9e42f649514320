"""Command-line tools beside the pipeline: the reproducibility check and the lineage walker."""
