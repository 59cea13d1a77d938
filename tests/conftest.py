"""Shared fixtures: a private registry server for the session, a unique key prefix per test."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from mesh.registry import Registry
from mesh.store import ArtifactStore
from mesh.testing import delete_prefix, private_redis, unique_prefix


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with private_redis(tmp_path_factory.mktemp("redis")) as url:
        yield url


@pytest.fixture
def prefix(redis_url: str) -> Iterator[str]:
    value = unique_prefix()
    yield value
    delete_prefix(redis_url, value)


@pytest.fixture
async def registry(redis_url: str, prefix: str) -> AsyncIterator[Registry]:
    reg = await Registry.connect(redis_url, prefix)
    try:
        yield reg
    finally:
        await reg.close()


@pytest.fixture
def store(tmp_path: Path) -> ArtifactStore:
    return ArtifactStore(tmp_path / "models")
