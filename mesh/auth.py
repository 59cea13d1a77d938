"""API-key authentication shared by the services: bearer tokens verified against the registry, cached."""

from __future__ import annotations

import asyncio
import hashlib
import inspect
import ipaddress
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import grpc
import grpc.aio

from mesh.errors import PermissionDenied, Unauthenticated, Unavailable
from mesh.server import WrappingInterceptor

log = logging.getLogger(__name__)

_BEARER = "bearer "

Need = Literal["admin", "any"]
"""What an RPC asks of its caller's key: the admin role, or any valid key."""


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling: the key's id (safe to log), its role, model scope and rate limit."""

    key_id: str
    name: str
    admin: bool
    models: frozenset[str]
    """Model names this key may use; empty = every model."""
    rate_limit_rps: float
    """Requests per second for this key; 0 = the gateway's default."""

    def check_model(self, model: str) -> None:
        if self.models and model not in self.models:
            raise PermissionDenied(f"model_name: API key '{self.key_id}' may not use model '{model}'")

    def check_admin(self, what: str) -> None:
        if not self.admin:
            raise PermissionDenied(
                f"{what} needs an API key with the admin role (key '{self.key_id}' has infer)"
            )


ANONYMOUS = Principal(key_id="", name="anonymous", admin=True, models=frozenset(), rate_limit_rps=0.0)
"""Caller on a service where keys are optional and none was sent."""


class KeyVerifier(Protocol):
    """What the authenticator needs from the registry."""

    async def verify_api_key(self, token: str) -> Any | None: ...


def is_loopback(bind: str) -> bool:
    """True when `host:port` listens on a loopback address only."""
    host = bind.rsplit(":", 1)[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def keys_required(auth_mode: str, bind: str) -> bool | None:
    """What an `auth_mode` setting means on `bind`: True = every call needs a key, False = optional
    (a key that is sent must be valid), None = no checks at all. "auto" = required off loopback."""
    if auth_mode == "disabled":
        return None
    if auth_mode == "auto":
        return not is_loopback(bind)
    return auth_mode == "required"


def bearer_metadata(token: str | None) -> tuple[tuple[str, str], ...]:
    """Call metadata carrying `token` as `authorization: Bearer <token>`; empty when there is no token."""
    return (("authorization", f"Bearer {token}"),) if token else ()


def _is_admin(role: Any) -> bool:
    # The registry returns the Role enum value (ADMIN = 2); accept its name too.
    if isinstance(role, str):
        return role.strip().lower() == "admin"
    name = getattr(role, "name", None)
    if isinstance(name, str):
        return name.lower() == "admin"
    try:
        return int(role) == 2
    except (TypeError, ValueError):
        return False


def principal_from_key(key: Any) -> Principal:
    return Principal(
        key_id=str(key.key_id),
        name=str(getattr(key, "name", "")),
        admin=_is_admin(getattr(key, "role", 0)),
        models=frozenset(getattr(key, "models", ()) or ()),
        rate_limit_rps=float(getattr(key, "rate_limit_rps", 0.0) or 0.0),
    )


def token_from_metadata(metadata: Iterable[tuple[str, Any]] | None) -> str | None:
    """The bearer token of `authorization: Bearer <token>`, or None when the header is absent."""
    if not metadata:
        return None
    for key, value in metadata:
        if key == "authorization":
            text = value.decode("ascii", "replace") if isinstance(value, bytes) else str(value)
            if text[:7].lower() != _BEARER:
                raise Unauthenticated("authorization: expected 'Bearer <token>'")
            token = text[7:].strip()
            if not token:
                raise Unauthenticated("authorization: empty bearer token")
            return token
    return None


@dataclass(slots=True)
class _Entry:
    principal: Principal | None
    expires: float
    stale_until: float


class Authenticator:
    """Verifies bearer tokens with a small TTL cache.

    Positive and negative answers are cached for `ttl_s`, so the registry sees at most one lookup per key
    every few seconds and a revoked key stops working within `ttl_s`. While the registry is unreachable a
    key verified in the last `stale_s` seconds keeps working, so a Redis restart does not stop traffic.
    Tokens are never logged and are kept only as sha256 digests.
    """

    def __init__(
        self,
        verifier: KeyVerifier | None,
        *,
        required: bool,
        ttl_s: float = 2.0,
        stale_s: float = 300.0,
        max_entries: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if required and verifier is None:
            raise ValueError("API keys are required but no registry is configured to verify them")
        self._verifier = verifier
        self.required = required
        self._ttl_s = ttl_s
        self._stale_s = stale_s
        self._max_entries = max_entries
        self._clock = clock
        self._cache: dict[bytes, _Entry] = {}
        self._pending: dict[bytes, asyncio.Future[Principal | None]] = {}

    async def authenticate(self, metadata: Iterable[tuple[str, Any]] | None) -> Principal:
        token = token_from_metadata(metadata)
        if token is None:
            if self.required:
                raise Unauthenticated("authorization: missing API key (send 'authorization: Bearer <token>')")
            return ANONYMOUS
        if self._verifier is None:
            # Keys are optional here and no registry is configured: a token cannot be checked.
            raise Unauthenticated("authorization: this service has no registry to verify API keys")
        digest = hashlib.sha256(token.encode()).digest()
        entry = self._cache.get(digest)
        now = self._clock()
        if entry is not None and now < entry.expires:
            principal = entry.principal
        else:
            principal = await self._verify(digest, token, entry)
        if principal is None:
            raise Unauthenticated("authorization: invalid or revoked API key")
        return principal

    async def _verify(self, digest: bytes, token: str, entry: _Entry | None) -> Principal | None:
        pending = self._pending.get(digest)
        if pending is not None:
            return await asyncio.shield(pending)
        fut: asyncio.Future[Principal | None] = asyncio.get_running_loop().create_future()
        self._pending[digest] = fut
        try:
            principal = await self._lookup(digest, token, entry)
        except BaseException as exc:
            if not fut.done():
                fut.set_exception(exc)
                fut.exception()  # mark retrieved: waiters re-raise it themselves
            raise
        else:
            fut.set_result(principal)
            return principal
        finally:
            self._pending.pop(digest, None)

    async def _lookup(self, digest: bytes, token: str, entry: _Entry | None) -> Principal | None:
        assert self._verifier is not None
        try:
            key = await self._verifier.verify_api_key(token)
        except Exception as exc:
            now = self._clock()
            if entry is not None and now < entry.stale_until:
                log.warning("registry unreachable (%s); using cached API key verdict", type(exc).__name__)
                entry.expires = now + self._ttl_s
                return entry.principal
            raise Unavailable(f"authorization: cannot verify API key now ({type(exc).__name__})") from exc
        principal = None if key is None or getattr(key, "revoked", False) else principal_from_key(key)
        now = self._clock()
        if len(self._cache) >= self._max_entries:
            self._evict(now)
        self._cache[digest] = _Entry(principal, now + self._ttl_s, now + self._stale_s)
        return principal

    def _evict(self, now: float) -> None:
        for digest in [d for d, e in self._cache.items() if e.stale_until <= now]:
            del self._cache[digest]
        while len(self._cache) >= self._max_entries:
            self._cache.pop(next(iter(self._cache)))


class ApiKeyInterceptor(WrappingInterceptor):
    """Checks the caller's API key before the handler of a protected RPC runs.

    `rules` maps a full method ("/maas.v1.RouterService/Place") or a whole service
    ("/maas.v1.RegistryService/") to what it needs: "admin" (a key with the admin role) or "any" (any
    valid key). A method rule wins over its service's rule; RPCs no rule names (grpc.health.v1,
    reflection) are not checked. Refusals are MeshErrors, so they must reach the ErrorInterceptor: put
    this interceptor after it. Each method's wrapped handler is built once.
    """

    def __init__(self, auth: Authenticator, rules: Mapping[str, Need]) -> None:
        super().__init__()
        self.auth = auth
        self.rules = dict(rules)

    def need(self, method: str) -> Need | None:
        """What `method` ("/pkg.Service/Method") asks of its caller; None = not checked."""
        rule = self.rules.get(method)
        if rule is None:
            rule = self.rules.get(method[: method.rfind("/") + 1])
        return rule

    async def check(self, method: str, need: Need, metadata: Iterable[tuple[str, Any]] | None) -> Principal:
        principal = await self.auth.authenticate(metadata)
        if need == "admin":
            principal.check_admin(method.lstrip("/"))
        return principal

    def _wrap(self, handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
        need = self.need(method)
        if need is None:
            return handler
        check = self.check
        deserialize, serialize = handler.request_deserializer, handler.response_serializer

        if handler.unary_unary is not None or handler.stream_unary is not None:
            inner_unary = handler.unary_unary or handler.stream_unary

            async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
                await check(method, need, context.invocation_metadata())
                return await inner_unary(request, context)

            if handler.unary_unary is not None:
                return grpc.unary_unary_rpc_method_handler(unary, deserialize, serialize)
            return grpc.stream_unary_rpc_method_handler(unary, deserialize, serialize)

        inner_stream = handler.unary_stream or handler.stream_stream

        async def streaming(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            # Checked once, when the stream opens: a key revoked later does not end a running stream.
            await check(method, need, context.invocation_metadata())
            result = inner_stream(request, context)
            if inspect.isasyncgen(result):
                async for item in result:
                    yield item
            else:
                await result

        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(streaming, deserialize, serialize)
        return grpc.stream_stream_rpc_method_handler(streaming, deserialize, serialize)
