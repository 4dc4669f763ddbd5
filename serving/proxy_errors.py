"""Serve's own refusals in OpenAI's error shape, inside Serve's HTTP proxy.

Ray Serve's proxy answers some requests itself, before or instead of a replica, with a plain-text
body: its backstop queue is full (503), no replica is up (503), the client's
``x-request-timeout-seconds`` ran out (408), or the replica failed before answering (500). Clients
of an OpenAI-compatible server parse ``{"error": {"message", "type", "param", "code"}}`` from every
error. ``OpenAIErrorBodies`` is a pure ASGI middleware in front of the proxy's app that rewrites
exactly those answers: an error status whose body is not JSON, on any path but the proxy's own
``/-/`` endpoints. Whatever a replica answers (always JSON for errors, streams included) passes
through untouched, one ``send`` wrapper call per message.

Serve loads it through ``RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH`` (``middlewares`` below), read
by each proxy process at start: ``cluster.runtime.worker_env`` puts it into every kiln cluster's
environment. The variable is Ray's, not in its documentation; ``tests/test_serving.py`` sends
Serve's own 408 through a real Serve proxy, so a Ray that drops the variable fails there (the other
refusals are covered on fake apps in ``tests/test_proxy_errors.py``).
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

CALLBACK_ENV = "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"
CALLBACK = "serving.proxy_errors:middlewares"


def error_body(status: int, text: str) -> dict[str, Any]:
    """The OpenAI error body for a plain-text answer of ``status``."""
    if status == 408:
        kind, code = "timeout", "timeout"
    elif status in (429, 503):
        kind, code = "server_error", "overloaded" if status == 429 or "backpressure" in text.lower() else "unavailable"
    elif status >= 500:
        kind, code = "server_error", None
    else:
        kind, code = "invalid_request_error", None
    message = text.strip() or f"HTTP {status}"
    return {"error": {"message": message, "type": kind, "param": None, "code": code}}


def _is_json(headers: list[tuple[bytes, bytes]]) -> bool:
    return any(k.lower() == b"content-type" and b"json" in v.lower() for k, v in headers)


class OpenAIErrorBodies:
    """ASGI middleware: a non-JSON error answer becomes an OpenAI error body (see the module)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("path", "").startswith("/-/"):
            await self.app(scope, receive, send)
            return
        held: Message | None = None  # a plain error's start, until its body is complete
        chunks: list[bytes] = []
        started = False

        async def wrapped(message: Message) -> None:
            nonlocal held, started
            if message["type"] == "http.response.start":
                started = True
                if message["status"] >= 400 and not _is_json(message.get("headers", [])):
                    held = message
                    return
            elif message["type"] == "http.response.body" and held is not None:
                chunks.append(message.get("body", b""))
                if message.get("more_body", False):
                    return
                start, held = held, None
                await _send_error(send, start["status"], b"".join(chunks).decode("utf-8", "replace"),
                                  [(k, v) for k, v in start.get("headers", [])
                                   if k.lower() not in (b"content-type", b"content-length")])  # fmt: skip
                return
            await send(message)

        try:
            await self.app(scope, receive, wrapped)
        except Exception:
            if not started:  # answered here, then raised on for the server's log
                await _send_error(send, 500, "the server failed before answering this request", [])
            raise
        if not started:  # the app gave no answer (uvicorn would send a plain-text 500)
            await _send_error(send, 500, "the server failed before answering this request", [])


async def _send_error(send: Send, status: int, text: str, headers: list[tuple[bytes, bytes]]) -> None:
    body = json.dumps(error_body(status, text)).encode()
    headers = [*headers, (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def middlewares() -> list[Any]:
    """What Serve's proxy calls through ``RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH``."""
    from starlette.middleware import Middleware

    return [Middleware(OpenAIErrorBodies)]
