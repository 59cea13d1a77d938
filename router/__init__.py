"""Router: placement of versions on workers, the route table, and the picker library gateways import."""

import mesh as mesh  # first: sets grpcio's process switches before grpc loads (mesh/grpcenv.py)
