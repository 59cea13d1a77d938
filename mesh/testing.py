"""Test helpers: a private registry server, unique key prefixes, cleanup of only what a test wrote."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import redis

from mesh.redis_embed import EmbeddedRedis

TEST_REDIS_ENV = "MAAS_TEST_REDIS_URL"


@contextmanager
def private_redis(data_dir: Path) -> Iterator[str]:
    """MAAS_TEST_REDIS_URL when set (shared server: tests only touch their own prefix), else a private one."""
    external = os.environ.get(TEST_REDIS_ENV)
    if external:
        yield external
        return
    server = EmbeddedRedis(data_dir, persist=False)
    url = server.start()
    try:
        yield url
    finally:
        server.stop()


def unique_prefix() -> str:
    return f"maastest:{uuid.uuid4().hex[:12]}"


def delete_prefix(url: str, prefix: str) -> int:
    """Deletes the keys under one prefix (SCAN, never FLUSH: the server may be shared)."""
    client = redis.Redis.from_url(url)
    deleted = 0
    try:
        batch = []
        for key in client.scan_iter(match=f"{prefix}:*", count=500):
            batch.append(key)
            if len(batch) >= 500:
                deleted += client.delete(*batch)
                batch.clear()
        if batch:
            deleted += client.delete(*batch)
    finally:
        client.close()
    return deleted
