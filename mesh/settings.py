"""Settings shared by every service, read from MAAS_* environment variables (pydantic-settings)."""

from __future__ import annotations

from pathlib import Path

from pydantic import AliasChoices, Field
from pydantic_settings import BaseSettings, SettingsConfigDict


def _common(name: str) -> AliasChoices:
    # Common fields keep one name (MAAS_REDIS_URL) whatever the service's own prefix is.
    return AliasChoices(f"MAAS_{name.upper()}", name)


class MeshSettings(BaseSettings):
    """Fields every service reads. Service settings subclass this with their own env_prefix."""

    model_config = SettingsConfigDict(
        env_prefix="MAAS_", extra="ignore", populate_by_name=True, use_attribute_docstrings=True
    )

    redis_url: str | None = Field(default=None, validation_alias=_common("redis_url"))
    """Registry server URL (redis://, rediss://, unix://). Unset: a private embedded server under var/."""

    key_prefix: str = Field(default="maas", validation_alias=_common("key_prefix"))
    """Prefix of every registry key, so several meshes (or test runs) can share one server."""

    var_dir: Path = Field(default=Path("var"), validation_alias=_common("var_dir"))
    """Directory for local state: embedded Redis data, logs, pid files."""

    store_dir: Path = Field(default=Path("var/models"), validation_alias=_common("store_dir"))
    """Root of the artifact store; artifacts are addressed as store://<model>/<version>/<file>."""

    log_level: str = Field(default="INFO", validation_alias=_common("log_level"))
    """Root log level."""

    log_json: bool = Field(default=True, validation_alias=_common("log_json"))
    """One JSON object per log line (false: human-readable text)."""

    tls_cert_file: Path | None = Field(default=None, validation_alias=_common("tls_cert_file"))
    """PEM certificate this service presents (server side, and client side for mTLS between services)."""

    tls_key_file: Path | None = Field(default=None, validation_alias=_common("tls_key_file"))
    """PEM private key matching tls_cert_file."""

    tls_ca_file: Path | None = Field(default=None, validation_alias=_common("tls_ca_file"))
    """PEM CA bundle that peers' certificates must chain to; set on both sides to require mTLS."""

    max_message_mb: int = Field(default=64, ge=1, le=2047, validation_alias=_common("max_message_mb"))
    """Largest message a service accepts, in MiB, after decompression (grpc's default is 4 MiB, which
    refuses ordinary tensors). Compressed requests (gzip, deflate) are inflated up to this bound and
    refused past it, so a few KiB on the wire cannot cost a server more."""

    @property
    def tls_enabled(self) -> bool:
        return self.tls_cert_file is not None and self.tls_key_file is not None
