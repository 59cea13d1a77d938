"""`python -m router`: settings -> logging -> build -> serve until SIGTERM/SIGINT -> graceful stop."""

from __future__ import annotations

import asyncio
import logging

from mesh.logging import setup_logging
from mesh.server import install_uvloop, start_metrics_server, wait_for_signal
from router.app import start_router
from router.settings import RouterSettings

log = logging.getLogger("router")


async def main(settings: RouterSettings) -> None:
    app = await start_router(settings)
    if settings.metrics_port:
        port = start_metrics_server(settings.metrics_port)
        log.info("router metrics on http://127.0.0.1:%s/metrics", port)
    # One line for supervisors and tests that bind port 0 and need the real address.
    print(f"ROUTER_READY {app.address}", flush=True)
    sig = await wait_for_signal()
    log.info("router received %s, shutting down", sig.name)
    await app.stop()


def run() -> None:
    settings = RouterSettings()
    setup_logging("router", settings.log_level, settings.log_json)
    install_uvloop()
    asyncio.run(main(settings))


if __name__ == "__main__":
    run()
