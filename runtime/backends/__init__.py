"""Engine backends: torch (reference modules), onnxruntime, tensorrt."""
