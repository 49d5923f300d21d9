"""The embedded default: the demo world, the demo base MLLM, and demo-only diagnostics."""
