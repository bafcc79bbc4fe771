"""`tlops serve` and the MLflow pyfunc: an ONNX Runtime session behind HTTP, micro-batched, without torch."""
