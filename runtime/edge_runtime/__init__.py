"""The device runtime: code that runs ON a Raspberry Pi or a Jetson.

A distribution of its own (`runtime/pyproject.toml`). Imports nothing outside this package but
numpy, opencv and onnxruntime (and, lazily inside the TensorRT backend, tensorrt + pycuda).
Python 3.8+. The workstation imports from here, never the other way round.
"""
