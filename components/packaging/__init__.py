"""From a checkpoint to the file that ships: ONNX export with its own checks, pruning, and compress
(INT8 and mixed precision under an accuracy budget)."""
