"""Frozen trunks in ONNX Runtime, their per-image content-addressed cache, and LogME backbone selection."""
