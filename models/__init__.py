"""Model recipes used by the tests (tiny random-weight transformers exported to ONNX)."""
