"""The serving stage over real HTTP: Ray Serve + vLLM (CPU) + a tiny Llama, no mocks.

One Serve instance runs two applications for the whole module (vLLM start-up dominates the cost):
``open`` (no API key, generous limits) at ``/`` and ``secure`` (API key, one request at a time, a
queue of one, a 3 s timeout) at ``/secure``, which also exercises overload and timeouts. That the
served greedy answers equal vLLM's own is test_serving_parity.py's (against vLLM's OpenAI server).
"""

from __future__ import annotations

import asyncio
import json
import shutil
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydantic import ValidationError
from conftest import save_tiny_llama

MODEL = "tiny"
KEY = "kiln-test-key-0123456789"
# Context of the served model: long enough that a 16 x 4000-token request runs for seconds.
CONTEXT = 4096
ENGINE = {"dtype": "float32", "max_model_len": CONTEXT, "gpu_memory_utilization": 0.3, "cpu_kv_cache_gib": 1}


@dataclass
class Server:
    url: str


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def serve_model_dir(tiny_tokenizer_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The conftest tiny Llama with a context long enough for the too-long-prompt checks."""
    return save_tiny_llama(tiny_tokenizer_dir, tmp_path_factory.mktemp("serve-model") / "tiny-llama", CONTEXT)


@pytest.fixture(scope="module")
def server(ray_local: None, serve_model_dir: Path) -> Iterator[Server]:
    from ray import serve

    from serving.app import build_app

    port = _free_port()
    # A busy 2-CPU machine can take longer than Serve's 5 s to start the proxy actor; the controller
    # would then kill it and serve.start fail.
    slow_ok = {"RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S": "60", "RAY_SERVE_PROXY_HEALTH_CHECK_TIMEOUT_S": "60"}
    serve.start(http_options={"host": "127.0.0.1", "port": port},
                controller_options={"runtime_env": {"env_vars": slow_ok}})

    # api_key_env names an unset variable so a developer's own KILN_API_KEY cannot leak in.
    common = {"model": str(serve_model_dir), "model_name": MODEL, "num_cpus": 0.5, "engine": ENGINE,
              "api_key_env": "KILN_TEST_NO_SUCH_VAR"}
    # Serve counts requests it is still assigning to a replica as queued: a burst of 32 needs room.
    open_app = build_app({**common, "max_ongoing_requests": 48, "max_queued_requests": 64})
    secure_app = build_app({**common, "api_key": KEY, "max_ongoing_requests": 1, "max_queued_requests": 1,
                            "request_timeout_s": 3.0})
    try:
        serve.run_many([serve.RunTarget(open_app, name="open", route_prefix="/"),
                        serve.RunTarget(secure_app, name="secure", route_prefix="/secure")])
        yield Server(f"http://127.0.0.1:{port}")
    finally:
        serve.shutdown()


@pytest.fixture(scope="module")
def http(server: Server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=120) as client:
        yield client


def _complete(http: httpx.Client, prompt: str, **kw: object) -> dict:
    r = http.post("/v1/completions", json={"model": MODEL, "prompt": prompt, **kw})
    assert r.status_code == 200, r.text
    return r.json()


def _sse_events(lines: list[str]) -> list[str]:
    """Payloads of a Server-Sent Events body; every non-blank line must be a ``data:`` line."""
    events = [line for line in lines if line]
    assert all(e.startswith("data: ") for e in events), events
    return [e[len("data: "):] for e in events]


# ---- the API through the official client ---------------------------------------------------------


def test_openai_client_completions_chat_models(server: Server) -> None:
    import openai

    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
    assert [m.id for m in client.models.list()] == [MODEL]

    c = client.completions.create(model=MODEL, prompt="What is 1 + 2?", max_tokens=5, temperature=0)
    assert c.object == "text_completion" and len(c.choices) == 1
    assert c.usage.completion_tokens == 5 and c.usage.prompt_tokens > 0
    assert c.usage.total_tokens == c.usage.prompt_tokens + 5
    assert c.choices[0].finish_reason == "length"

    chat = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=6, temperature=0
    )
    assert chat.object == "chat.completion" and chat.choices[0].message.role == "assistant"
    assert chat.usage.completion_tokens <= 6
    assert chat.choices[0].finish_reason in ("stop", "length")


def test_openai_client_streaming_equals_whole_answer(server: Server) -> None:
    import openai

    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
    whole = client.completions.create(model=MODEL, prompt="The lazy dog", max_tokens=12, temperature=0)
    stream = client.completions.create(model=MODEL, prompt="The lazy dog", max_tokens=12, temperature=0,
                                       stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == whole.choices[0].text
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 12

    messages = [{"role": "system", "content": "Add."}, {"role": "user", "content": "2 + 2"}]
    whole_chat = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=10, temperature=0)
    streamed = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=10, temperature=0,
                                              stream=True)
    deltas = [ch.choices[0].delta for ch in streamed]
    assert deltas[0].role == "assistant"
    assert "".join(d.content or "" for d in deltas) == whole_chat.choices[0].message.content


# ---- raw HTTP ------------------------------------------------------------------------------------


def test_raw_http_health_models_and_sse_framing(http: httpx.Client) -> None:
    health = http.get("/healthz")
    assert health.status_code == 200 and health.json()["status"] == "ok"
    models = http.get("/v1/models").json()
    assert models["object"] == "list" and models["data"][0]["id"] == MODEL
    assert models["data"][0]["max_model_len"] == CONTEXT

    body = {"model": MODEL, "messages": [{"role": "user", "content": "hello"}], "max_tokens": 4, "stream": True,
            "stream_options": {"include_usage": True}}
    with http.stream("POST", "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        payloads = _sse_events(list(r.iter_lines()))
    assert payloads[-1] == "[DONE]"
    chunks = [json.loads(p) for p in payloads[:-1]]
    assert all(c["object"] == "chat.completion.chunk" and c["id"] == chunks[0]["id"] for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 4


def test_sampling_parameters(http: httpx.Client) -> None:
    prompt = "What is 7 + 8?"
    # seed: the same seed samples the same text; n: that many choices, each counted in usage.
    a = _complete(http, prompt, max_tokens=8, temperature=1.0, top_p=0.9, top_k=50, seed=123, n=3)
    b = _complete(http, prompt, max_tokens=8, temperature=1.0, top_p=0.9, top_k=50, seed=123, n=3)
    assert [c["index"] for c in a["choices"]] == [0, 1, 2]
    assert [c["text"] for c in a["choices"]] == [c["text"] for c in b["choices"]]
    assert a["usage"]["completion_tokens"] == 24

    # stop: the answer ends before the stop string (taken from the greedy answer itself).
    greedy = _complete(http, prompt, max_tokens=16, temperature=0)["choices"][0]["text"]
    stop = next((greedy[i:i + 2] for i in range(3, len(greedy) - 1) if greedy[i:i + 2].strip()), None)
    if stop is not None:
        stopped = _complete(http, prompt, max_tokens=16, temperature=0, stop=[stop])["choices"][0]
        assert stopped["finish_reason"] == "stop" and stop not in stopped["text"]
        assert greedy.startswith(stopped["text"])

    # logprobs: one entry per generated token, the greedy token is the most likely one. (Top entries
    # are keyed by text, and byte-level pieces of one character all decode to "": keys can collide.)
    lp = _complete(http, prompt, max_tokens=4, temperature=0, logprobs=2)["choices"][0]["logprobs"]
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == 4
    for chosen, top in zip(lp["token_logprobs"], lp["top_logprobs"]):
        assert 1 <= len(top) <= 2 and chosen >= max(top.values()) - 1e-5
    chat = http.post("/v1/chat/completions", json={"model": MODEL, "messages": [{"role": "user", "content": "x"}],
                                                   "max_tokens": 3, "logprobs": True, "top_logprobs": 2}).json()
    content = chat["choices"][0]["logprobs"]["content"]
    assert len(content) == 3 and all(len(c["top_logprobs"]) == 2 for c in content)


def test_32_concurrent_requests(http: httpx.Client, server: Server) -> None:
    prompts = [f"What is {i} + {i}?" for i in range(4)]
    expected = {p: _complete(http, p, max_tokens=10, temperature=0)["choices"][0]["text"] for p in prompts}

    async def main() -> list[tuple[str, httpx.Response]]:
        async with httpx.AsyncClient(base_url=server.url, timeout=300) as client:
            async def one(i: int) -> tuple[str, httpx.Response]:
                p = prompts[i % 4]
                if i % 2:  # half of them as chat streams, to mix both paths in one batch
                    body = {"model": MODEL, "messages": [{"role": "user", "content": p}], "max_tokens": 10,
                            "temperature": 0, "stream": True}
                    return "", await client.post("/v1/chat/completions", json=body)
                body = {"model": MODEL, "prompt": p, "max_tokens": 10, "temperature": 0}
                return p, await client.post("/v1/completions", json=body)

            return await asyncio.gather(*(one(i) for i in range(32)))

    results = asyncio.run(main())
    assert all(r.status_code == 200 for _, r in results), [r.text for _, r in results if r.status_code != 200]
    for prompt, r in results:
        if prompt:
            assert r.json()["choices"][0]["text"] == expected[prompt]
        else:
            assert _sse_events(r.text.splitlines())[-1] == "[DONE]"


# ---- the API of vLLM's server (issue 12) -----------------------------------------------------------


def test_several_prompts_echo_and_suffix(http: httpx.Client) -> None:
    prompts = ["What is 1 + 1?", "The quick brown fox"]
    singles = [_complete(http, p, max_tokens=6, temperature=0)["choices"][0]["text"] for p in prompts]
    ids = http.post("/tokenize", json={"model": MODEL, "prompt": prompts[1]}).json()["tokens"]
    # A list of strings, a list of token-id lists, and a single token-id list (one prompt).
    for prompt, expected in ((prompts, singles), ([http.post("/tokenize", json={"prompt": prompts[0]}).json()["tokens"],
                                                   ids], singles), (ids, singles[1:])):
        body = _complete(http, prompt, max_tokens=6, temperature=0)
        assert [c["index"] for c in body["choices"]] == list(range(len(expected)))
        assert [c["text"] for c in body["choices"]] == expected
        assert body["usage"]["completion_tokens"] == 6 * len(expected)
    # n > 1 (sampled: vLLM refuses n > 1 with greedy): choice i * n + j is prompt i's j-th sample.
    sampled = {"max_tokens": 6, "temperature": 1.0, "seed": 11, "n": 2}
    alone = [[c["text"] for c in _complete(http, p, **sampled)["choices"]] for p in prompts]
    both = _complete(http, prompts, **sampled)["choices"]
    assert [c["index"] for c in both] == [0, 1, 2, 3] and [c["text"] for c in both] == alone[0] + alone[1]
    streamed: dict[int, str] = {}
    with http.stream("POST", "/v1/completions", json={"model": MODEL, "prompt": prompts, "max_tokens": 6,
                                                     "temperature": 0, "stream": True}) as r:
        for payload in _sse_events(list(r.iter_lines()))[:-1]:
            for c in json.loads(payload)["choices"]:
                streamed[c["index"]] = streamed.get(c["index"], "") + c["text"]
    assert [streamed[0], streamed[1]] == singles

    # echo: the prompt before the answer; with logprobs, the prompt tokens' too (the first has none).
    echo = _complete(http, prompts[1], max_tokens=6, temperature=0, echo=True, logprobs=1)["choices"][0]
    assert echo["text"] == prompts[1] + singles[1]
    lp = echo["logprobs"]
    assert len(lp["tokens"]) == len(ids) + 6 and lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    assert all(isinstance(x, float) for x in lp["token_logprobs"][1:])
    # (A token that is part of a UTF-8 sequence may show as "" or U+FFFD, in the text as U+FFFD.)
    assert "".join(lp["tokens"]).replace("\ufffd", "") == echo["text"].replace("\ufffd", "")
    assert lp["text_offset"][0] == 0
    with http.stream("POST", "/v1/completions", json={"model": MODEL, "prompt": prompts[1], "max_tokens": 6,
                                                     "temperature": 0, "echo": True, "stream": True}) as r:
        text = "".join(json.loads(p)["choices"][0]["text"] for p in _sse_events(list(r.iter_lines()))[:-1])
    # (An incomplete UTF-8 sequence may show as U+FFFD in one and be held back in the other.)
    assert text.replace("\ufffd", "") == (prompts[1] + singles[1]).replace("\ufffd", "")
    # Streamed with n > 1: every choice's first chunk echoes the prompt with its log-probabilities
    # (vLLM attaches them to one output of the request only; the second choice's were all None).
    firsts: dict[int, dict] = {}
    with http.stream("POST", "/v1/completions", json={"model": MODEL, "prompt": prompts[1], "echo": True,
                                                     "logprobs": 1, "stream": True, **sampled}) as r:  # fmt: skip
        for payload in _sse_events(list(r.iter_lines()))[:-1]:
            for c in json.loads(payload)["choices"]:
                firsts.setdefault(c["index"], c["logprobs"])
    assert sorted(firsts) == [0, 1]
    for first in firsts.values():
        assert first["token_logprobs"][:len(ids)] == lp["token_logprobs"][:len(ids)]  # the same prompt tokens

    # Echo without generation (max_tokens 0): the prompt alone, streamed too; the engine's one token counted.
    scored = _complete(http, prompts[1], max_tokens=0, echo=True, logprobs=1)
    assert scored["choices"][0]["text"] == prompts[1] and scored["usage"]["completion_tokens"] == 1
    assert scored["choices"][0]["logprobs"]["token_logprobs"] == lp["token_logprobs"][: len(ids)]
    with http.stream("POST", "/v1/completions", json={"model": MODEL, "prompt": prompts[1], "max_tokens": 0,
                                                     "echo": True, "stream": True}) as r:  # fmt: skip
        assert "".join(json.loads(p)["choices"][0]["text"] for p in _sse_events(list(r.iter_lines()))[:-1]) == prompts[1]

    for body, param in (({"suffix": "end"}, "suffix"), ({"prompt": []}, "prompt"), ({"prompt": [[1], "x"]}, "prompt"),
                        ({"prompt": [10**6]}, "prompt")):
        r = http.post("/v1/completions", json={"model": MODEL, "prompt": "x", **body})
        assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text


def test_tokenize_detokenize_and_request_id(http: httpx.Client) -> None:
    t = http.post("/tokenize", json={"model": MODEL, "prompt": "hello world", "return_token_strs": True}).json()
    assert t["count"] == len(t["tokens"]) == len(t["token_strs"]) > 0 and t["max_model_len"] == CONTEXT
    assert http.post("/detokenize", json={"model": MODEL, "tokens": t["tokens"]}).json() == {"prompt": "hello world"}
    chat = http.post("/tokenize", json={"messages": [{"role": "user", "content": "hi"}]}).json()
    assert chat["count"] > 3 and chat["token_strs"] is None
    for path, body in (("/tokenize", {}), ("/tokenize", {"prompt": "x", "messages": []}),
                       ("/detokenize", {"tokens": [-1]}), ("/detokenize", {"tokens": [10**6]}),
                       ("/detokenize", {"tokens": "1 2"})):
        r = http.post(path, json=body)
        assert r.status_code == 400 and set(r.json()["error"]) == {"message", "type", "param", "code"}, r.text
    assert http.post("/tokenize", json={"model": "gpt-4", "prompt": "x"}).status_code == 404

    # X-Request-Id: the client's comes back (once); without one, the server names one.
    r = http.post("/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 1},
                  headers={"X-Request-Id": "my-id-42"})
    assert r.headers.get_list("x-request-id") == ["my-id-42"]
    r = http.post("/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 1})
    assert len(r.headers.get_list("x-request-id")) == 1 and r.headers["x-request-id"]


def test_more_sampling_parameters(http: httpx.Client) -> None:
    prompt = "What is 7 + 8?"
    greedy = _complete(http, prompt, max_tokens=12, temperature=0)["choices"][0]
    # stop_token_ids: the greedy answer's first token (found through its text) ends it at once.
    first = _complete(http, prompt, max_tokens=1, temperature=0)["choices"][0]["text"]
    first_ids = http.post("/tokenize", json={"prompt": first}).json()["tokens"]
    assert len(first_ids) == 1, first
    stopped = _complete(http, prompt, max_tokens=12, temperature=0, stop_token_ids=first_ids)
    assert stopped["choices"][0]["finish_reason"] == "stop" and stopped["choices"][0]["stop_reason"] == first_ids[0]
    assert stopped["usage"]["completion_tokens"] == 1
    # min_tokens: no stop before that many tokens.
    short = _complete(http, prompt, max_tokens=30, temperature=0, min_tokens=30, stop_token_ids=first_ids)
    assert short["usage"]["completion_tokens"] == 30
    # repetition_penalty changes the greedy answer of a tiny random model (it repeats itself a lot).
    penalised = _complete(http, prompt, max_tokens=12, temperature=0, repetition_penalty=2.0)["choices"][0]["text"]
    assert penalised != greedy["text"]
    for bad in ({"repetition_penalty": 0}, {"min_tokens": -1}, {"stop_token_ids": [-1]}, {"min_tokens": 20}):
        r = http.post("/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 5, **bad})
        assert r.status_code == 400, (bad, r.text)


def test_structured_output(http: httpx.Client) -> None:
    import jsonschema

    # Short by construction: enums and a boolean (a random model may wander for long in a free string).
    schema = {"type": "object", "properties": {"name": {"enum": ["ann", "bob"]}, "ok": {"type": "boolean"}},
              "required": ["name", "ok"], "additionalProperties": False}
    messages = [{"role": "user", "content": "Give me a person as JSON."}]
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": schema}}
    answer = http.post("/v1/chat/completions", json={"model": MODEL, "messages": messages, "max_tokens": 200,
                                                     "temperature": 0, "response_format": fmt}).json()
    # A random model may spend max_tokens on the whitespace JSON allows; the parity test checks that
    # vLLM's own server gives the identical constrained answer. A finished answer matches the schema.
    content = answer["choices"][0]["message"]["content"]
    assert content.lstrip().startswith("{"), content
    if answer["choices"][0]["finish_reason"] == "stop":
        jsonschema.validate(json.loads(content), schema)
    # json_object: any object, so a random model may not close it within max_tokens; if it does, it parses.
    choice = _complete(http, "A JSON object:", max_tokens=200, temperature=0,
                       response_format={"type": "json_object"})["choices"][0]
    assert choice["text"].lstrip().startswith("{")
    if choice["finish_reason"] == "stop":
        assert isinstance(json.loads(choice["text"]), dict)
    r = http.post("/v1/completions", json={"model": MODEL, "prompt": "x", "response_format": {"type": "json_schema"}})
    assert r.status_code == 400 and r.json()["error"]["param"] == "response_format"


def test_chat_features(server: Server) -> None:
    import openai

    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
    messages = [{"role": "system", "content": "You add."}, {"role": "user", "content": "1 + 1"},
                {"role": "assistant", "content": "2"}, {"role": "user", "content": "and 2 + 2?"}]
    # n > 1 needs sampling (vLLM refuses it with greedy); the seed makes the stream comparable.
    whole = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=5, temperature=1.0, seed=5,
                                           n=2, logprobs=True, top_logprobs=3)
    assert [c.index for c in whole.choices] == [0, 1]
    content = whole.choices[0].logprobs.content
    assert sum(len(c.logprobs.content) for c in whole.choices) == whole.usage.completion_tokens
    assert all(len(c.top_logprobs) == 3 for c in content)
    assert all(c.top_logprobs[0].logprob >= c.top_logprobs[-1].logprob for c in content)
    stream = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=5, temperature=1.0, seed=5,
                                            n=2, stream=True, stream_options={"include_usage": True}, logprobs=True)
    texts, logprob_counts = ["", ""], [0, 0]
    chunks = list(stream)
    for ch in chunks:
        for c in ch.choices:
            texts[c.index] += c.delta.content or ""
            logprob_counts[c.index] += len(c.logprobs.content) if c.logprobs else 0
    assert texts == [c.message.content for c in whole.choices]
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens == sum(logprob_counts)


def _scrape(wanted: tuple[str, ...], timeout: float = 90.0) -> str:
    """This node's Prometheus text once it has every ``wanted`` series (or at the timeout).

    Ray's metrics agent exports each replica's series on an interval, so one app's series can
    appear before another's: poll until everything asserted is there.
    """
    import ray

    port = ray._private.worker.global_worker.node.metrics_export_port
    deadline, text = time.monotonic() + timeout, ""
    while time.monotonic() < deadline:
        text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
        if all(w in text for w in wanted):
            break
        time.sleep(2)
    return text


def test_engine_metrics_exported_to_prometheus(http: httpx.Client) -> None:
    _complete(http, "metrics", max_tokens=3)
    wanted = ("vllm_num_requests_waiting", "vllm_kv_cache_usage_perc", "vllm_time_to_first_token_seconds_bucket",
              "vllm_inter_token_latency_seconds_bucket")
    text = _scrape(wanted)
    assert [w for w in wanted if w not in text] == []


def test_admission_limits() -> None:
    from serving.admission import UNLIMITED, Admission, serve_limits
    from serving.schemas import APIError

    # No queue limit: Serve passes every request on to the replica, which queues generations on its
    # slots, so /healthz never waits behind them in Serve's own queue.
    assert serve_limits(4, 2) == (12, 24) and serve_limits(4, -1) == (UNLIMITED, -1)

    async def main() -> None:
        admission = Admission(running=1, waiting=1)
        first, second = admission.admit(), admission.admit()
        with pytest.raises(APIError) as refused:
            admission.admit()
        assert refused.value.status == 503 and refused.value.body()["error"]["code"] == "overloaded"
        await first.start()
        waiter = asyncio.create_task(second.start())
        await asyncio.sleep(0.01)
        assert not waiter.done()  # the one slot is taken
        first.release()
        first.release()  # twice is harmless
        await asyncio.wait_for(waiter, 1)
        third = admission.admit()  # room again
        timed_out = asyncio.create_task(third.start())
        await asyncio.sleep(0.01)
        timed_out.cancel()  # a timeout while waiting gives nothing back twice
        third.release()
        second.release()
        assert admission.admitted == 0
        with admission.place(), admission.place():  # /tokenize's: a place, no slot
            assert admission.admitted == 2
            with pytest.raises(APIError):
                admission.admit()
        assert admission.admitted == 0
        assert [admission.admit() for _ in range(2)]

    asyncio.run(main())


def test_template_messages_and_inert_unsupported_fields() -> None:
    """Pure: vLLM's server renames developer to system unless the template names the role, and joins
    text parts with newlines; an unsupported field at its do-nothing value is no reason to refuse."""
    from serving.schemas import ChatCompletionRequest, ChatMessage, CompletionRequest, template_messages

    msgs = [ChatMessage(role="developer", content="Be terse."),
            ChatMessage.model_validate({"role": "user", "content": [{"type": "text", "text": "a"},
                                                                     {"type": "text", "text": "b"}]})]  # fmt: skip
    assert template_messages(msgs, "{{ m.role }}") == [{"role": "system", "content": "Be terse."},
                                                       {"role": "user", "content": "a\nb"}]  # fmt: skip
    assert template_messages(msgs, "{% if m.role == 'developer' %}")[0]["role"] == "developer"
    ok = {"model": MODEL, "prompt": "x", "best_of": 1, "logit_bias": {}, "min_p": 0.0, "use_beam_search": False,
          "bad_words": [], "allowed_token_ids": [], "logits_processors": None}  # fmt: skip
    assert CompletionRequest.model_validate(ok).prompt == "x"
    with pytest.raises(ValidationError, match="best_of: not supported"):
        CompletionRequest.model_validate({**ok, "best_of": 2})
    with pytest.raises(ValidationError, match="tool_choice: not supported"):
        ChatCompletionRequest.model_validate({"model": MODEL, "messages": [{"role": "user", "content": "x"}],
                                              "tool_choice": "required"})  # fmt: skip


# ---- bad input -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "body", "status", "param"),
    [
        ("/v1/completions", b'{"model": "tiny", "prompt": ', 400, None),  # malformed JSON
        ("/v1/completions", {"model": "gpt-4", "prompt": "x"}, 404, "model"),
        ("/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": "5"}, 400, "max_tokens"),
        ("/v1/completions", {"model": MODEL, "prompt": 12}, 400, "prompt"),
        ("/v1/completions", {"model": MODEL, "prompt": "x", "temperature": "hot"}, 400, "temperature"),
        ("/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
        ("/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": -3}, 400, "max_tokens"),
        ("/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": CONTEXT + 1}, 400, "max_tokens"),
        ("/v1/completions", {"model": MODEL, "prompt": "x " * (CONTEXT + 10)}, 400, "prompt"),
        ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "y " * CONTEXT}]}, 400,
         "messages"),
        ("/v1/chat/completions", {"model": MODEL, "messages": []}, 400, "messages"),
        ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "wizard", "content": "x"}]}, 400,
         "messages.0.role"),
        ("/v1/chat/completions", {"model": MODEL, "messages": "hello"}, 400, "messages"),
        # Found in review: the param named max_tokens, which the request did not send.
        ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "x"}],
                                  "max_completion_tokens": CONTEXT + 1}, 400, "max_completion_tokens"),
        # Fields that change the answer, not implemented: refused, not silently ignored.
        ("/v1/completions", {"model": MODEL, "prompt": "x", "logit_bias": {"5": -100}}, 400, "logit_bias"),
        ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "x"}],
                                  "tools": [{"type": "function", "function": {"name": "f"}}]}, 400, "tools"),
        # One admitted request may not bring unbounded work: 512 engine sequences, or an answer of
        # 16 x 4,000 echoed tokens x 21 log-probabilities built on the replica's event loop.
        ("/v1/completions", {"model": MODEL, "prompt": [[5]] * 256, "n": 2}, 400, "n"),
        ("/v1/completions", {"model": MODEL, "prompt": [[5] * 4000] * 16, "echo": True, "logprobs": 20,
                             "max_tokens": 0}, 400, "logprobs"),
    ],
)
def test_bad_input_gets_openai_error(http: httpx.Client, path: str, body: object, status: int,
                                     param: str | None) -> None:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = http.post(path, content=content, headers={"Content-Type": "application/json"})
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["param"] == param
    assert http.get("/healthz").status_code == 200  # and the server stays up


def test_client_disconnect_aborts_generation(http: httpx.Client) -> None:
    # 16 x 4000 tokens would take many seconds; after the client hangs up they must be gone at once.
    body = {"model": MODEL, "prompt": "x", "max_tokens": CONTEXT - 50, "n": 16, "ignore_eos": True,
            "stream": True}
    with http.stream("POST", "/v1/completions", json=body) as r:
        assert r.status_code == 200
        lines = r.iter_lines()  # one iterator: dropping it would close the stream early
        first = next(line for line in lines if line.startswith("data: "))
        assert '"error"' not in first, first
        next(lines)
        assert http.get("/healthz").json()["unfinished_requests"] >= 1
    deadline = time.monotonic() + 5
    while http.get("/healthz").json()["unfinished_requests"] and time.monotonic() < deadline:
        time.sleep(0.1)
    assert http.get("/healthz").json()["unfinished_requests"] == 0


# ---- auth, overload, timeout (the "secure" app) ----------------------------------------------------


def test_api_key(server: Server) -> None:
    import openai

    url = f"{server.url}/secure"
    body = {"model": MODEL, "prompt": "x", "max_tokens": 2}
    for headers in ({}, {"Authorization": "Bearer wrong-key"}, {"Authorization": KEY},
                    {"Authorization": f"Basic {KEY}"}):
        r = httpx.post(f"{url}/v1/completions", json=body, headers=headers, timeout=60)
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    assert httpx.get(f"{url}/v1/models", timeout=60).status_code == 401
    # Auth comes first: an anonymous caller's malformed body is still a 401.
    assert httpx.post(f"{url}/v1/completions", content=b"{", timeout=60).status_code == 401
    assert httpx.get(f"{url}/healthz", timeout=60).status_code == 200  # probes need no key

    client = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0)
    assert client.completions.create(model=MODEL, prompt="x", max_tokens=2).usage.completion_tokens == 2
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{url}/v1", api_key="nope", max_retries=0).models.list()


def test_overload_is_refused_fast_and_timeout_is_408(server: Server) -> None:
    # The secure app takes one request at a time, queues one more and times out after 3 s: the long
    # requests that got in run into the timeout (408), the others are refused at once (503).
    body = {"model": MODEL, "prompt": "x", "max_tokens": CONTEXT - 50, "n": 16, "ignore_eos": True}
    headers = {"Authorization": f"Bearer {KEY}"}

    async def main() -> list[Any]:
        async with httpx.AsyncClient(base_url=f"{server.url}/secure", timeout=60, headers=headers) as client:
            async def one(delay: float) -> tuple[int, float, dict | None]:
                await asyncio.sleep(delay)
                t0 = time.monotonic()
                r = await client.post("/v1/completions", json=body)
                is_json = r.headers.get("content-type", "").startswith("application/json")
                return r.status_code, time.monotonic() - t0, r.json() if is_json else None

            async def tokenize(delay: float) -> tuple[int, dict]:
                await asyncio.sleep(delay)
                r = await client.post("/tokenize", json={"model": MODEL, "prompt": "x"})
                return r.status_code, r.json()

            # The first request gets a head start so it holds the only slot; by 1.5 s another
            # waits for it, and /tokenize (which shares the prepare thread) is admitted like them.
            return await asyncio.gather(one(0.0), *(one(1.0) for _ in range(5)), tokenize(1.5))

    *results, tokenized = asyncio.run(main())
    assert tokenized[0] == 503 and tokenized[1]["error"]["code"] == "overloaded", tokenized
    first, rest = results[0], results[1:]
    assert first[0] == 408 and first[2]["error"]["type"] == "timeout", first
    refused = [elapsed for status, elapsed, _ in rest if status == 503]
    assert len(refused) >= 3 and max(refused) < 2.0, rest
    # Refused by the replica itself, at once (Serve's own backstop queue is further out).
    assert all(body is not None and body["error"]["code"] == "overloaded" for status, _, body in rest
               if status == 503), rest
    assert all(status in (408, 503) for status, _, _ in rest), rest
    ok = httpx.post(f"{server.url}/secure/v1/completions", json={**body, "max_tokens": 2, "n": 1}, headers=headers,
                    timeout=60)
    assert ok.status_code == 200  # and it serves again afterwards


def test_serves_own_timeout_has_the_openai_shape(server: Server, http: httpx.Client) -> None:
    """Serve's proxy answers a client's ``x-request-timeout-seconds`` itself, before any replica
    does; kiln's middleware in the proxy (``serving/proxy_errors.py``, loaded through Ray's callback
    variable that every kiln cluster sets) gives that answer OpenAI's error shape."""
    body = {"model": MODEL, "prompt": "x", "max_tokens": CONTEXT - 50, "ignore_eos": True}
    r = httpx.post(f"{server.url}/v1/completions", json=body, headers={"x-request-timeout-seconds": "0.2"},
                   timeout=60)  # fmt: skip
    assert r.status_code == 408 and r.headers["content-type"] == "application/json", (r.status_code, r.text[:300])
    error = r.json()["error"]
    assert error["type"] == "timeout" and "timed out after 0.2s" in error["message"], error
    assert _complete(http, "x", max_tokens=2)["usage"]["completion_tokens"] == 2  # and it serves again


# ---- metrics -------------------------------------------------------------------------------------


def test_metrics_exported_to_prometheus(http: httpx.Client) -> None:
    _complete(http, "metrics", max_tokens=3)
    wanted = ("kiln_serve_requests", "kiln_serve_request_latency_s_bucket", "kiln_serve_generated_tokens",
              "kiln_serve_tokens_per_s_bucket", 'status="200"', 'status="400"')
    text = _scrape(wanted)
    for w in wanted:
        assert w in text, w


# ---- config, builder, CLI (no server) --------------------------------------------------------------


def test_serve_config_in_the_tree_and_yaml_files() -> None:
    import yaml

    from core.config import ConfigError
    from pipelines.config import load_config, parse_config
    from serving.config import ServeConfig

    cfg = load_config(Path(__file__).parents[1] / "configs" / "quickstart.yaml")
    assert isinstance(cfg.serve, ServeConfig) and cfg.serve.host == "127.0.0.1"
    with pytest.raises(ConfigError, match=r"serve\.engine\.max_num_seqs"):
        parse_config({"run": {"name": "x"}, "serve": {"engine": {"max_num_seqs": "many"}}})
    with pytest.raises(ConfigError, match=r"serve\.autoscaling"):
        parse_config({"run": {"name": "x"}, "serve": {"autoscaling": {"min_replicas": 3, "max_replicas": 2}}})
    with pytest.raises(ConfigError, match=r"serve\.replicas"):
        parse_config({"run": {"name": "x"}, "serve": {"replicas": 2}})
    serve_yaml = yaml.safe_load((Path(__file__).parents[1] / "serving" / "serve_config.yaml").read_text())
    ServeConfig.model_validate(serve_yaml["applications"][0]["args"])


def test_build_app_options(serve_model_dir: Path, tmp_path: Path) -> None:
    from serving.app import build_app
    from serving.auth import key_digest

    with pytest.raises(ValueError, match="serve.model"):
        build_app({})
    # serve run / serve deploy pass a YAML's args: a mistake is named, a key is never repeated.
    with pytest.raises(ValueError, match=r"api_key: String should have at least 8 characters \(got \*\*\*\)") as bad:
        build_app({"model": str(serve_model_dir), "api_key": "hunter2"})
    assert "hunter2" not in str(bad.value)
    with pytest.raises(ValueError, match="not a Hugging Face model directory"):
        build_app({"model": str(tmp_path)})
    app = build_app({"model": str(serve_model_dir), "api_key": KEY, "api_key_env": "KILN_TEST_NO_SUCH_VAR",
                     "autoscaling": {"min_replicas": 1, "max_replicas": 3, "target_ongoing_requests": 8.0},
                     "max_ongoing_requests": 7, "max_queued_requests": 5})
    deployment = app._bound_deployment
    # The replica admits 7 + 5 itself; Serve lets twice that through, so the replica does the refusing.
    assert deployment.max_ongoing_requests == 24 and deployment.max_queued_requests == 48
    assert deployment._deployment_config.autoscaling_config.max_replicas == 3
    # Only the key's digest reaches the replica's (stored) arguments.
    assert KEY not in repr(deployment.init_args) and key_digest(KEY) in deployment.init_args


def test_cli_serve_resolves_targets(serve_model_dir: Path, tmp_path: Path) -> None:
    from core.config import ConfigError
    from pipelines.cli import resolve_serve_target as resolve_target

    _, cfg = resolve_target(serve_model_dir)
    assert cfg.model == str(serve_model_dir)
    config = tmp_path / "run.yaml"
    config.write_text(f"run: {{name: r, root: {tmp_path}}}\nserve: {{port: 9001}}\n")
    with pytest.raises(ConfigError, match="no final model"):
        resolve_target(config)
    shutil.copytree(serve_model_dir, tmp_path / "r" / "sft" / "model")
    _, cfg = resolve_target(config)
    assert cfg.model == str(tmp_path / "r" / "sft" / "model") and cfg.port == 9001
