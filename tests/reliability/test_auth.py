"""Auth at the gateway: every bad credential gets the right status on every attempt, and tokens appear
neither in any service's log output nor in clear in Redis."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import redis
import tritonclient.grpc.aio as grpcclient
from tritonclient.utils import InferenceServerException

from mesh.registry import Registry
from mesh_pb import registry_pb2
from tests.reliability.conftest import SharedMesh
from tests.reliability.harness import async_wait_until, write_figures

ATTEMPTS = 100  # per case
CONCURRENCY = 10


def _code(exc: InferenceServerException) -> str:
    return (exc.status() or "UNKNOWN").replace("StatusCode.", "")


class Attempts:
    """Runs one call many times and tallies the status codes (and the error texts, to scan for tokens)."""

    def __init__(self, client: grpcclient.InferenceServerClient, mesh: SharedMesh) -> None:
        self.client = client
        self.mesh = mesh
        self.results: dict[str, Counter[str]] = {}
        self.error_texts: list[str] = []

    def _input(self) -> grpcclient.InferInput:
        inp = grpcclient.InferInput("pixels", list(self.mesh.pixels.shape), "FP32")
        inp.set_data_from_numpy(self.mesh.pixels)
        return inp

    async def run(
        self, case: str, call: Callable[[int], Awaitable[object]], n: int = ATTEMPTS
    ) -> Counter[str]:
        tally: Counter[str] = Counter()
        sem = asyncio.Semaphore(CONCURRENCY)

        async def one(i: int) -> None:
            async with sem:
                try:
                    await call(i)
                    tally["OK"] += 1
                except InferenceServerException as exc:
                    tally[_code(exc)] += 1
                    self.error_texts.append(exc.message() or "")

        await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(n))), timeout=120)
        self.results[case] = tally
        return tally

    def infer(self, model: str, headers: dict[str, str] | None) -> Callable[[int], Awaitable[object]]:
        async def call(_i: int) -> object:
            return await self.client.infer(model, [self._input()], headers=headers, client_timeout=10.0)

        return call


def _dump_prefix(url: str, prefix: str) -> tuple[int, bytes]:
    """Every key and value under the prefix, whatever its type, as one byte string."""
    client: Any = redis.Redis.from_url(url)
    parts: list[bytes] = []
    count = 0
    try:
        for key in client.scan_iter(match=f"{prefix}:*", count=500):
            count += 1
            parts.append(key)
            kind = client.type(key)
            if kind == b"string":
                parts.append(client.get(key) or b"")
            elif kind == b"hash":
                for k, v in client.hgetall(key).items():
                    parts += [k, v]
            elif kind == b"set":
                parts += list(client.smembers(key))
            elif kind == b"zset":
                parts += [m for m, _ in client.zrange(key, 0, -1, withscores=True)]
            elif kind == b"list":
                parts += list(client.lrange(key, 0, -1))
            elif kind == b"stream":
                for _id, fields in client.xrange(key):
                    for k, v in fields.items():
                        parts += [k, v]
    finally:
        client.close()
    return count, b"\n".join(parts)


@pytest.mark.slow
async def test_auth_statuses_and_no_token_leaks(
    shared_mesh: SharedMesh, redis_url: str, figures_path: Path
) -> None:
    mesh = shared_mesh
    stack = mesh.stack
    prefix = stack.prefix
    _admin_id, admin_token = mesh.admin_key
    infer_id, infer_token = mesh.infer_key
    reg = await Registry.connect(redis_url, prefix)
    client = grpcclient.InferenceServerClient(mesh.gateway_url)
    attempts = Attempts(client, mesh)
    try:
        doomed_id, doomed_token = await reg.create_api_key("reliability-doomed", registry_pb2.INFER)
        wrong_tokens = [
            "garbage",
            "k0000000000000000.c2VjcmV0c2VjcmV0c2VjcmV0",
            f"{infer_id}.wrong-secret-for-a-real-key-id",
            infer_token + "x",
            infer_token[:-1],
            infer_id,
            "." + infer_token.partition(".")[2],
        ]
        infer_h = mesh.bearer(infer_token)

        # The good keys work (so the refusals below are about the credential, nothing else).
        ok = await attempts.run("infer_key_in_scope", attempts.infer("digits", infer_h), n=20)
        ok_admin = await attempts.run("admin_key", attempts.infer("digits", mesh.bearer(admin_token)), n=20)

        await attempts.run("no_key", attempts.infer("digits", None))
        await attempts.run(
            "wrong_key",
            lambda i: attempts.infer("digits", mesh.bearer(wrong_tokens[i % len(wrong_tokens)]))(i),
        )
        await attempts.run(
            "malformed_authorization",
            lambda i: attempts.infer(
                # Basic auth, an empty bearer, a valid token without the "Bearer " scheme
                "digits",
                {"authorization": ["Basic dXNlcjpwdw==", "Bearer", "bearer  ", infer_token][i % 4]},
            )(i),
        )

        # Revocation of a key in use: refused within the gateway's cache TTL, then on every attempt.
        await attempts.run("doomed_before_revoke", attempts.infer("digits", mesh.bearer(doomed_token)), n=5)
        await reg.revoke_api_key(doomed_id)
        t_revoked = time.monotonic()

        async def refused() -> bool:
            try:
                await attempts.infer("digits", mesh.bearer(doomed_token))(0)
            except InferenceServerException as exc:
                return _code(exc) == "UNAUTHENTICATED"
            return False

        await async_wait_until(refused, 15.0, "revoked key refused", interval_s=0.05)
        revocation_s = time.monotonic() - t_revoked
        await attempts.run("revoked_key", attempts.infer("digits", mesh.bearer(doomed_token)))

        # Scope: the infer key may use digits only.
        await attempts.run("out_of_scope_infer", attempts.infer("chatty", infer_h))
        await attempts.run(
            "out_of_scope_metadata", lambda _i: client.get_model_metadata("chatty", headers=infer_h)
        )
        # Admin RPCs with an infer-only key (and with none).
        await attempts.run("load_with_infer_key", lambda _i: client.load_model("digits", headers=infer_h))
        await attempts.run("unload_with_infer_key", lambda _i: client.unload_model("digits", headers=infer_h))
        await attempts.run("load_without_key", lambda _i: client.load_model("digits"))
        await attempts.run("unload_without_key", lambda _i: client.unload_model("digits"))
        still_ok = await attempts.run("infer_key_after", attempts.infer("digits", infer_h), n=20)
    finally:
        await client.close()
        await reg.close()

    expected: dict[str, str] = {
        "no_key": "UNAUTHENTICATED",
        "wrong_key": "UNAUTHENTICATED",
        "malformed_authorization": "UNAUTHENTICATED",
        "revoked_key": "UNAUTHENTICATED",
        "out_of_scope_infer": "PERMISSION_DENIED",
        "out_of_scope_metadata": "PERMISSION_DENIED",
        "load_with_infer_key": "PERMISSION_DENIED",
        "unload_with_infer_key": "PERMISSION_DENIED",
        "load_without_key": "UNAUTHENTICATED",
        "unload_without_key": "UNAUTHENTICATED",
    }
    right = {
        case: round(attempts.results[case][code] / sum(attempts.results[case].values()), 4)
        for case, code in expected.items()
    }

    # Tokens (and their secret halves) in the services' output and in Redis.
    secrets = {
        "admin": admin_token,
        "infer": infer_token,
        "revoked": doomed_token,
        **{f"wrong{i}": t for i, t in enumerate(wrong_tokens) if "." in t and len(t.partition(".")[2]) >= 8},
    }
    needles = {name: [tok, tok.partition(".")[2]] for name, tok in secrets.items()}
    logs = stack.all_logs()
    leaked_logs = sorted(name for name, ns in needles.items() if any(n and n in logs for n in ns))
    key_count, dump = _dump_prefix(redis_url, prefix)
    leaked_redis = sorted(name for name, ns in needles.items() if any(n and n.encode() in dump for n in ns))
    texts = "\n".join(attempts.error_texts)
    leaked_errors = sorted(name for name, ns in needles.items() if any(n and n in texts for n in ns))

    figures = {
        "attempts_per_case": ATTEMPTS,
        "codes": {case: dict(t) for case, t in attempts.results.items()},
        "right_status_fraction": right,
        "revocation_effective_s": round(revocation_s, 3),
        "log_bytes_scanned": len(logs),
        "redis_keys_scanned": key_count,
        "tokens_in_logs": leaked_logs,
        "tokens_in_redis": leaked_redis,
        "tokens_in_error_messages": leaked_errors,
    }
    write_figures(figures_path, "auth", figures)
    assert ok == Counter(OK=20) and ok_admin == Counter(OK=20) and still_ok == Counter(OK=20)
    assert all(v == 1.0 for v in right.values()), right
    assert len(logs) > 0 and key_count > 0
    assert not leaked_logs and not leaked_redis and not leaked_errors
