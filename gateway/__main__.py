"""`python -m gateway`: settings → logging → build → serve until SIGTERM/SIGINT → graceful stop."""

from __future__ import annotations

import asyncio
import logging
import sys

from gateway.app import start_gateway
from gateway.settings import GatewaySettings
from mesh.logging import setup_logging
from mesh.server import install_uvloop, wait_for_signal

log = logging.getLogger("gateway")


async def serve(settings: GatewaySettings) -> None:
    app = await start_gateway(settings)
    print(f"GATEWAY_READY {app.address}", flush=True)
    sig = await wait_for_signal()
    log.info("gateway received %s, shutting down", sig.name)
    await app.host.set_serving(False)
    await app.stop(grace_s=10.0)


def main() -> int:
    settings = GatewaySettings()
    setup_logging("gateway", settings.log_level, settings.log_json)
    if settings.uvloop and install_uvloop():
        log.debug("running on uvloop")
    try:
        asyncio.run(serve(settings))
    except ValueError as exc:  # refused configuration (e.g. public address without API keys)
        log.error("%s", exc)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
