"""Developer tools (benchmarks); not part of the installed lrp_onnx package."""
