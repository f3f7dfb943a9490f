"""Benchmarks: the speed harness (and the GPU device check), the quantized-memory table, operator counts."""
