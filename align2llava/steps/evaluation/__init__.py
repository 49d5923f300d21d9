"""Benchmark evaluation of the tuned MLLM (the evaluate stage)."""
