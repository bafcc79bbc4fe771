"""Networks and their files: the backbone registry and builders, the classifier and its checkpoint,
the parts partial fine-tuning cuts, ONNX writing (torch) and reading/running (no torch), and INT8."""
