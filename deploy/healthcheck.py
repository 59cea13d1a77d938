"""Container healthcheck: exits 0 when the gRPC server at ADDRESS reports SERVING on grpc.health.v1.

Usage: python healthcheck.py HOST:PORT [SERVICE]. Uses TLS (and mTLS) when MAAS_TLS_CA_FILE is set,
the way the services' own channels do.
"""

from __future__ import annotations

import os
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def _read(name: str) -> bytes | None:
    path = os.environ.get(name)
    if not path:
        return None
    with open(path, "rb") as fh:
        return fh.read()


def check(address: str, service: str = "", timeout_s: float = 3.0) -> bool:
    ca = _read("MAAS_TLS_CA_FILE")
    if ca is not None:
        creds = grpc.ssl_channel_credentials(ca, _read("MAAS_TLS_KEY_FILE"), _read("MAAS_TLS_CERT_FILE"))
        channel = grpc.secure_channel(address, creds)
    else:
        channel = grpc.insecure_channel(address)
    with channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout_s)
        except grpc.RpcError as exc:
            print(f"{address}: {exc.code().name}", file=sys.stderr)
            return False
    serving = reply.status == health_pb2.HealthCheckResponse.SERVING
    if not serving:
        print(
            f"{address}: {health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)}", file=sys.stderr
        )
    return serving


def main(argv: list[str]) -> int:
    if not argv or len(argv) > 2:
        print(__doc__, file=sys.stderr)
        return 2
    return 0 if check(argv[0], argv[1] if len(argv) == 2 else "") else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
