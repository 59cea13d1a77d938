"""`python -m compressor`: settings -> logging -> build -> serve until SIGTERM/SIGINT -> graceful stop."""

from __future__ import annotations

import asyncio
import logging

from compressor.app import start_compressor
from compressor.settings import CompressorSettings
from mesh.logging import setup_logging
from mesh.server import install_uvloop, start_metrics_server, wait_for_signal

log = logging.getLogger("compressor")


async def main(settings: CompressorSettings) -> None:
    app = await start_compressor(settings)
    # One parseable line for whoever started this process with port 0.
    print(f"compressor listening on {app.address}", flush=True)
    if settings.metrics_port:
        port = start_metrics_server(settings.metrics_port)
        log.info("compressor metrics on http://127.0.0.1:%s/metrics", port)
    sig = await wait_for_signal()
    log.info("compressor received %s, shutting down", sig.name)
    await app.stop()


def run() -> None:
    settings = CompressorSettings()
    setup_logging("compressor", settings.log_level, settings.log_json)
    if settings.torch_threads > 0:
        import torch

        torch.set_num_threads(settings.torch_threads)
    install_uvloop()
    asyncio.run(main(settings))


if __name__ == "__main__":
    run()
