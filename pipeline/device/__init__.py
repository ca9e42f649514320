"""Code that runs ON a Raspberry Pi or a Jetson, shipped to devices as-is.

Imports nothing outside this package but numpy, opencv and onnxruntime (and, lazily inside the
TensorRT backend, tensorrt + pycuda). Python 3.9+. The workstation side imports from here, never
the other way round.
"""
