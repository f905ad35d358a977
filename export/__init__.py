"""ONNX export of the JanusFlow graph set and the TensorRT build."""
