"""API-key authentication for the public port: the shared mesh.auth verifier (bearer tokens, cached)."""

from __future__ import annotations

from mesh.auth import (
    ANONYMOUS,
    Authenticator,
    KeyVerifier,
    Principal,
    principal_from_key,
    token_from_metadata,
)

__all__ = [
    "ANONYMOUS",
    "Authenticator",
    "KeyVerifier",
    "Principal",
    "principal_from_key",
    "token_from_metadata",
]
