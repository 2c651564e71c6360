"""Pieces the benchmark scripts share: server processes, artifacts, statistics, timing, FLOPs and reports.

A package rather than modules next to the scripts, so that tests/test_bench.py (which runs every
bench/*.py with --help) sees only the scripts.
"""
