"""The shipped model on the test split, in ONNX Runtime, as it will be served."""
