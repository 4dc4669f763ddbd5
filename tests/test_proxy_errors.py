"""``serving.proxy_errors``: the middleware in Serve's proxy, on fake ASGI apps (named as such).
Through a real Serve proxy: ``tests/test_serving.py::test_serves_own_timeout_has_the_openai_shape``."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from cluster.runtime import worker_env
from serving.proxy_errors import CALLBACK, CALLBACK_ENV, OpenAIErrorBodies, error_body, middlewares


def _fake_app(*messages: dict[str, Any], fail: bool = False) -> Any:
    """A fake ASGI app that sends ``messages`` (and then raises, with ``fail``)."""

    async def app(scope: Any, receive: Any, send: Any) -> None:
        for m in messages:
            await send(m)
        if fail:
            raise RuntimeError("the fake app failed")

    return app


def _run(app: Any, path: str = "/v1/completions") -> list[dict[str, Any]]:
    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    asyncio.run(OpenAIErrorBodies(app)({"type": "http", "path": path}, receive, send))
    return sent


def _start(status: int, content_type: bytes, *extra: tuple[bytes, bytes]) -> dict[str, Any]:
    return {"type": "http.response.start", "status": status, "headers": [(b"content-type", content_type), *extra]}


def _answer(sent: list[dict[str, Any]]) -> tuple[int, dict[bytes, bytes], dict[str, Any]]:
    assert [m["type"] for m in sent] == ["http.response.start", "http.response.body"], sent
    headers = dict(sent[0]["headers"])
    body = sent[1]["body"]
    assert headers[b"content-type"] == b"application/json" and int(headers[b"content-length"]) == len(body)
    return sent[0]["status"], headers, json.loads(body)


def test_a_plain_backpressure_503_in_chunks_becomes_an_openai_error_keeping_its_headers() -> None:
    text = "Request dropped due to backpressure (num_queued_requests=8, max_queued_requests=8)."
    sent = _run(_fake_app(_start(503, b"text/plain; charset=utf-8", (b"retry-after", b"1"), (b"content-length", b"83")),
                          {"type": "http.response.body", "body": text[:20].encode(), "more_body": True},
                          {"type": "http.response.body", "body": text[20:].encode()}))  # fmt: skip
    status, headers, body = _answer(sent)
    assert status == 503 and headers[b"retry-after"] == b"1"
    assert body == {"error": {"message": text, "type": "server_error", "param": None, "code": "overloaded"}}


@pytest.mark.parametrize(("status", "text", "kind", "code"), [
    (408, "Request abc timed out after 0.3s.", "timeout", "timeout"),
    (503, "Deployment 'x' has no running replicas.", "server_error", "unavailable"),
    (429, "", "server_error", "overloaded"),
    (500, "Internal Server Error", "server_error", None),
    (404, "Path '/nope' not found.", "invalid_request_error", None),
])  # fmt: skip
def test_error_body_by_status(status: int, text: str, kind: str, code: str | None) -> None:
    body = error_body(status, text)["error"]
    assert (body["type"], body["code"], body["param"]) == (kind, code, None)
    assert body["message"] == (text or f"HTTP {status}")


def test_json_errors_successes_streams_and_the_proxys_own_endpoints_pass_untouched() -> None:
    json_503 = [_start(503, b"application/json"), {"type": "http.response.body", "body": b'{"error": {}}'}]
    stream = [_start(200, b"text/event-stream"), {"type": "http.response.body", "body": b"data: 1\n\n", "more_body": True},
              {"type": "http.response.body", "body": b"data: [DONE]\n\n"}]  # fmt: skip
    health = [_start(503, b"text/plain"), {"type": "http.response.body", "body": b"This node is being drained."}]
    assert _run(_fake_app(*json_503)) == json_503
    assert _run(_fake_app(*stream)) == stream
    assert _run(_fake_app(*health), path="/-/healthz") == health


def test_an_app_that_answers_nothing_or_fails_first_gets_a_json_500() -> None:
    status, _, body = _answer(_run(_fake_app()))
    assert status == 500 and body["error"]["type"] == "server_error"
    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    with pytest.raises(RuntimeError, match="the fake app failed"):
        asyncio.run(OpenAIErrorBodies(_fake_app(fail=True))({"type": "http", "path": "/v1/x"}, None, send))  # type: ignore[arg-type]
    assert _answer(sent)[0] == 500  # answered before the error went on to the server's log


def test_every_kiln_cluster_names_the_callback_and_serve_accepts_what_it_returns(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from ray.serve._private.http_util import validate_http_proxy_callback_return

    # kiln's default, whatever the shell running the tests has set (a caller's own value wins).
    monkeypatch.delenv(CALLBACK_ENV, raising=False)
    assert worker_env()[CALLBACK_ENV] == CALLBACK
    assert validate_http_proxy_callback_return(middlewares())[0].cls is OpenAIErrorBodies
