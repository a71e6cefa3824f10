"""Exporters for phones: ONNX (verified with onnxruntime on real inputs)."""
