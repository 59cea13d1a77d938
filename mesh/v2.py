"""The public KServe v2 / Triton contract, imported once from tritonclient under one alias.

A second definition of package ``inference`` in one process fails in protobuf's descriptor pool,
so the mesh never generates these stubs itself: ``from mesh.v2 import pb, pb_grpc, config_pb``.
"""

from tritonclient.grpc import model_config_pb2 as config_pb
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc

SERVICE_NAME = "inference.GRPCInferenceService"

__all__ = ["SERVICE_NAME", "config_pb", "pb", "pb_grpc"]
