"""asyncio helpers shared by the services."""

from __future__ import annotations

import asyncio


async def wait_event(event: asyncio.Event, timeout: float | None) -> bool:
    """Waits for the event at most ``timeout`` seconds; True when it is set.

    Built on ``asyncio.timeout`` rather than ``asyncio.wait_for``: on Python 3.11 a task cancelled just
    as ``wait_for`` handles its own timeout can stay "cancelling" for ever, so a service's background
    loop never ends and its shutdown hangs (seen in the router's refresh loop).
    """
    if event.is_set():
        return True
    try:
        async with asyncio.timeout(timeout):
            await event.wait()
    except TimeoutError:
        return event.is_set()
    return True
