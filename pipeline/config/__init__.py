"""Configuration: params.yaml schemas, the repository's file layout, and the Ultralytics
environment (offline, integrations off)."""
