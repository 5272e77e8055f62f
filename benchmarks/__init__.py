"""Benchmarks: each module runs as ``python -m benchmarks.<name>`` and prints one JSON object
on its last line (ratios against a baseline measured in the same run)."""
