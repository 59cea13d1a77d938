"""Inference worker: the v2 server for the versions placed on it, runtimes, batching, heartbeats."""

import mesh as mesh  # first: sets grpcio's process switches before grpc loads (mesh/grpcenv.py)
