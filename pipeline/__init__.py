"""Train-to-device pipeline for edge defect detection: the workstation side.

  stages/       the DVC stages, one module each (same name as the dvc.yaml stage and params section)
  imagesets/    YOLO datasets and the synthetic generator
  onnx_models/  ONNX loading, graph edits, INT8 candidates, calibration sets
  accuracy/     mAP as Ultralytics' val computes it
  tracking/     MLflow runs and lineage tags
  config/       params.yaml schemas, file layout, Ultralytics environment
  tools/        reproducibility check, lineage walker
  fleet/        Fabric deploys to Pis and Jetsons

The device runtime is a distribution of its own (`runtime/`, import name `edge_runtime`); this
package imports from it, never the other way round.
"""
