"""Artifact store: a directory addressed by store:// URIs, every file verified by sha256 before use."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from mesh.errors import IntegrityError, InvalidArgument, NotFound

SCHEME = "store://"
# Readable by other services' users on a shared volume (mkstemp creates files 0600).
_FILE_MODE = 0o644
_SEGMENT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


@dataclass(frozen=True)
class Artifact:
    uri: str
    sha256: str
    size_bytes: int


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


class ArtifactStore:
    """Files under one root; URIs name paths inside it, anything pointing outside is refused."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)

    def uri_for(self, *parts: str) -> str:
        for part in parts:
            if not _SEGMENT.match(part):
                raise InvalidArgument(f"artifact_uri: path segment {part!r} is not allowed")
        return SCHEME + "/".join(parts)

    def resolve(self, uri: str) -> Path:
        """The file a URI names; InvalidArgument (naming artifact_uri) when it escapes the store."""
        if uri.startswith(SCHEME):
            rel = uri[len(SCHEME) :]
            candidate = (self.root / rel).resolve()
        elif uri.startswith("file://"):
            candidate = Path(uri[len("file://") :]).resolve()
        else:
            raise InvalidArgument(f"artifact_uri: {uri!r} must start with {SCHEME} or file://")
        if candidate != self.root and self.root not in candidate.parents:
            raise InvalidArgument(f"artifact_uri: {uri!r} points outside the model store")
        return candidate

    def verify(self, uri: str, sha256: str) -> Path:
        """Resolves and checks the file's sha256; IntegrityError (naming sha256) when it differs."""
        if not re.fullmatch(r"[0-9a-f]{64}", sha256 or ""):
            raise InvalidArgument(f"sha256: {sha256!r} is not 64 lowercase hex digits")
        path = self.resolve(uri)
        if not path.is_file():
            raise NotFound(f"artifact_uri: {uri!r} does not exist in the model store")
        actual = sha256_file(path)
        if actual != sha256:
            raise IntegrityError(f"sha256: artifact {uri} has sha256 {actual}, the registry expects {sha256}")
        return path

    def put_file(
        self, model: str, version: int | str, src: Path | str, filename: str | None = None
    ) -> Artifact:
        """Copies a file in atomically (temp file + rename) and returns its URI and digest."""
        src = Path(src)
        name = filename or src.name
        uri = self.uri_for(model, str(version), name)
        dest = self.resolve(uri)
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=".incoming-")
        os.close(fd)
        try:
            shutil.copyfile(src, tmp)
            os.chmod(tmp, _FILE_MODE)
            os.replace(tmp, dest)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return Artifact(uri=uri, sha256=sha256_file(dest), size_bytes=dest.stat().st_size)

    def put_bytes(self, model: str, version: int | str, data: bytes, filename: str) -> Artifact:
        uri = self.uri_for(model, str(version), filename)
        dest = self.resolve(uri)
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=".incoming-")
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.chmod(tmp, _FILE_MODE)
        os.replace(tmp, dest)
        return Artifact(uri=uri, sha256=hashlib.sha256(data).hexdigest(), size_bytes=len(data))
