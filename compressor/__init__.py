"""Offline compressor: prune, quantize, cast and distill a registered model, evaluate, gate and register."""

import mesh as mesh  # first: sets grpcio's process switches before grpc loads (mesh/grpcenv.py)
