"""kiln's own admission control inside a replica, so that overload is refused in OpenAI's shape.

Ray Serve's proxy refuses requests beyond a deployment's ``max_ongoing_requests`` +
``max_queued_requests`` itself, once its queue has filled. The replica keeps the limits instead:
``running`` requests at work in the engine, ``waiting`` more waiting for a slot, and the rest
refused at once with an OpenAI error body. ``build_app`` gives Serve looser limits (see
``serve_limits``) so that the replica, not the proxy, is the one that says no; the proxy's own
refusal past those is reshaped by ``serving.proxy_errors``.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator

from serving.schemas import APIError


# Work one admitted request may bring (one admission ticket each): choices (prompts x n), each an
# engine sequence, and log-probability entries in the answer, which is built on the event loop
# (so a huge one would stall /healthz and every stream of the replica).
MAX_CHOICES = 256
MAX_LOGPROB_ENTRIES = 1_000_000


def check_work(choices: int, logprobs: int | None, tokens: int, n: int) -> None:
    """Refuse (400) a request past ``MAX_CHOICES`` or, with ``logprobs`` (top-k per token), one
    whose answer could hold more than ``MAX_LOGPROB_ENTRIES`` entries: ``n`` x ``tokens`` (every
    prompt's ``max_tokens`` when given, plus its own tokens when echoed) x (``logprobs`` + 1)."""
    if choices > MAX_CHOICES:
        raise APIError(400, f"n: {choices} choices (prompts x n); at most {MAX_CHOICES} in one request", param="n",
                       code="invalid_value")  # fmt: skip
    entries = 0 if logprobs is None else n * tokens * (logprobs + 1)
    if entries > MAX_LOGPROB_ENTRIES:
        raise APIError(400, f"logprobs: the answer could hold {entries:,} log-probabilities (n x tokens x "
                       f"(logprobs + 1)); at most {MAX_LOGPROB_ENTRIES:,}: send fewer prompts or tokens, a smaller "
                       "n or fewer logprobs", param="logprobs", code="invalid_value")  # fmt: skip


# Serve's max_ongoing_requests for a replica that queues without limit itself: more than any
# burst, so Serve's router never holds a request back (its value only has to be an int).
UNLIMITED = 1 << 20


def serve_limits(running: int, waiting: int) -> tuple[int, int]:
    """Serve's ``(max_ongoing_requests, max_queued_requests)`` around a replica that admits
    ``running`` + ``waiting`` requests itself (``waiting`` -1: no limit).

    Serve lets twice kiln's limit through to each replica: the extra ones are answered 503 by the
    replica in microseconds. Serve's own queue, which counts every request of a burst still being
    assigned, is four times kiln's limit: the backstop for a flood. With no queue limit kiln admits
    every request and queues it on its slots, so Serve hands every request on (``UNLIMITED``): its
    own queue would hold ``/healthz`` and ``/v1/models`` behind a burst of generations.
    """
    if waiting < 0:
        return UNLIMITED, -1
    return 2 * (running + waiting), 4 * (running + waiting)


class Admission:
    """At most ``running`` admitted requests at work at once, ``waiting`` more queued for a slot
    (-1: no limit), any beyond that refused with 503. One per replica, used on its event loop."""

    def __init__(self, running: int, waiting: int) -> None:
        self._slots = asyncio.Semaphore(running)
        self._limit = None if waiting < 0 else running + waiting
        self.admitted = 0

    def admit(self) -> Ticket:
        """A ticket for one more request, or a 503 when ``running`` + ``waiting`` are taken."""
        if self._limit is not None and self.admitted >= self._limit:
            raise APIError(503, f"the server is overloaded ({self._limit} requests admitted); retry later",
                           type="server_error", code="overloaded")  # fmt: skip
        self.admitted += 1
        return Ticket(self)

    @contextlib.contextmanager
    def place(self) -> Iterator[Ticket]:
        """A ticket held for the block, for work that needs no engine slot (``/tokenize``)."""
        ticket = self.admit()
        try:
            yield ticket
        finally:
            ticket.release()


class Ticket:
    """One admitted request: ``await start()`` waits for a running slot; ``release()`` (any number
    of times, started or not) gives back what it holds."""

    def __init__(self, admission: Admission) -> None:
        self._admission = admission
        self._running = False
        self._released = False

    async def start(self) -> None:
        await self._admission._slots.acquire()
        self._running = True

    def release(self) -> None:
        if self._released:
            return
        self._released = True
        self._admission.admitted -= 1
        if self._running:
            self._admission._slots.release()
