"""Measuring a machine: whole-model timings and memory, kernel timings (ONNX Runtime's profiler and
micro-graphs), and the profile fitted to them. Calibrate never imports the export stage."""
