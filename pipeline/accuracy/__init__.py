"""Detection accuracy: mAP exactly as Ultralytics' val computes it, over ONNX Runtime sessions."""
