"""ONNX models on the workstation: loading with clear errors, graph edits and metadata, INT8
quantization candidates, and the calibration sets they are calibrated on."""
