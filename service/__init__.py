"""tserve: an Open Inference Protocol server for ONNX Transformers on ONNX Runtime."""

__version__ = "0.1.0"
