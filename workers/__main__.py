"""`python -m workers`: settings -> logging -> worker -> serve until SIGTERM -> drain -> exit 0."""

from __future__ import annotations

import asyncio

from mesh.logging import setup_logging
from mesh.server import install_uvloop
from workers.app import serve
from workers.settings import WorkerSettings


def main() -> None:
    settings = WorkerSettings()
    setup_logging("worker", settings.log_level, settings.log_json)
    if settings.uvloop:
        install_uvloop()
    asyncio.run(serve(settings))


if __name__ == "__main__":
    main()
