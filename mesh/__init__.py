"""MaaS mesh shared core: settings, errors, logging, codec, registry, gRPC bootstrap."""

from mesh import grpcenv as grpcenv  # grpcio's process switches, set before anything imports grpc
