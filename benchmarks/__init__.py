"""Benchmarks of iii-embedded against its peers and the raw SQLite limits (``make bench``).

Measurements, never tests: nothing here asserts a time. Each scenario runs in a fresh
subprocess (``python -m benchmarks.worker``) so state and peak RSS do not leak between
scenarios; ``benchmarks.run`` takes medians and prints ratios measured in the same run.
"""
