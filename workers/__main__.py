"""`python -m workers`: settings -> logging -> worker -> serve until SIGTERM -> drain -> exit 0."""

from __future__ import annotations

import asyncio

from mesh.logging import setup_logging
from mesh.server import install_uvloop
from workers.app import serve
from workers.runtimes import hold_inference_mode
from workers.settings import WorkerSettings


def main() -> None:
    settings = WorkerSettings()
    setup_logging("worker", settings.log_level, settings.log_json)
    if settings.uvloop:
        install_uvloop()
    # The event loop runs on this thread, and cheap forward passes run inline on it.
    hold_inference_mode()
    asyncio.run(serve(settings))


if __name__ == "__main__":
    main()
