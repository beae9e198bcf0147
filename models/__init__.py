"""Benchmark workloads: networks and datasets with per-example losses."""
