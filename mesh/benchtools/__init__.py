"""Benchmark tools behind `maas bench`: closed-loop load, a bare echo baseline, a private stack."""
