"""MLflow: one run per stage execution, tagged with lineage."""
