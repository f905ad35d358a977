"""jfexport: deployment compiler and runtime for JanusFlow.

Sub-packages: `jfexport.reference` (PyTorch model, checkpoint I/O, processor, reference
pipelines), `jfexport.export` (ONNX graphs, TensorRT build), `jfexport.runtime` (engines and
pipelines for serving).
"""

__version__ = "0.1.0"
