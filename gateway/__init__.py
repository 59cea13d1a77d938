"""Public KServe v2 front door of the mesh: auth, version resolution, worker choice, coalescing, failover."""

import mesh as mesh  # first: sets grpcio's process switches before grpc loads (mesh/grpcenv.py)
