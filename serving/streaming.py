"""What a replica reads and streams over HTTP, and how it lets go of it however a request ends.

``read_body`` bounds a request body as it arrives. ``holding`` gives the admission ticket back when
the engine's outputs end or are closed. ``ClosingStream`` is Starlette's ``StreamingResponse``
that closes what it streams when the response ends: Starlette (1.x, under the ASGI spec versions
uvicorn and Ray Serve speak) sends in a task that it cancels when the client leaves, and leaves the
body generator parked at a ``yield``. Nothing then closed it until the garbage collector did: the
engine request under it ran to its end, the admission ticket stayed taken and the request was
never counted (or counted as a 200).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Callable
from typing import Any

from fastapi import Request
from fastapi.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from serving.admission import Ticket
from serving.schemas import APIError


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 as soon as it is over ``limit`` bytes: a declared
    Content-Length over it before any byte is read, a chunked body at the chunk that passes it."""
    too_large = APIError(413, f"the request body is over {limit} bytes (serve.max_request_bytes)",
                         code="request_too_large")  # fmt: skip
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_large
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise too_large
    return bytes(body)


async def holding(ticket: Ticket, outputs: AsyncGenerator[Any, None]) -> AsyncGenerator[Any, None]:
    """The engine's outputs, giving the admission ticket back when they end or are closed."""
    try:
        async for out in outputs:
            yield out
    finally:
        ticket.release()
        await outputs.aclose()


class ClosingStream(StreamingResponse):
    """A ``StreamingResponse`` of Server-Sent Events that closes its body and the engine's outputs
    when the response ends, whichever way: sent whole, the client gone mid-stream (its body's
    ``finally`` counts the request and aborts the generation), or gone before the first chunk
    (``on_unstarted`` counts it; closing the outputs aborts the generation and frees the ticket).

    Args:
        body: the events (a generator that closes ``outputs`` itself once it has begun).
        outputs: the engine's outputs under ``body``.
        on_unstarted: called when the response ends before ``body`` began.
    """

    def __init__(self, body: AsyncGenerator[str, None], outputs: AsyncGenerator[Any, None],
                 on_unstarted: Callable[[], None]) -> None:  # fmt: skip
        self.began = False
        self._body, self._outputs, self._on_unstarted = body, outputs, on_unstarted
        self._events = self._tracked()
        super().__init__(self._events, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})  # fmt: skip

    async def _tracked(self) -> AsyncGenerator[str, None]:
        self.began = True
        try:
            async for event in self._body:
                yield event
        finally:
            await self._body.aclose()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            # Shielded: a request task cancelled as the client left still closes everything.
            await asyncio.shield(self._close())

    async def _close(self) -> None:
        if not self.began:
            self._on_unstarted()
        await self._events.aclose()  # closes the body once it has begun
        await self._outputs.aclose()  # a body that never began never closed them
