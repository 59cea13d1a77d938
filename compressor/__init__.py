"""Offline compressor: prune, quantize, cast and distill a registered model, evaluate, gate and register."""
