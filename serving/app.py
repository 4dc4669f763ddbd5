"""An OpenAI-compatible HTTP endpoint for one model (and its LoRA adapters): Ray Serve around vLLM.

Each replica owns one vLLM ``AsyncLLM`` engine (its engine-core process runs beside the replica
actor) and a FastAPI ingress with ``/v1/completions``, ``/v1/chat/completions`` (both streaming as
Server-Sent Events), ``/v1/models``, ``/tokenize``, ``/detokenize`` and ``/healthz``. LoRA
adapters (``serve.adapters``, ``serving.adapters``) are each a model id of their own in that
engine. Ray Serve routes requests to replicas and scales them; each replica bounds its in-flight
and waiting requests itself (``serving.admission``: overload is refused with an OpenAI-shaped 503, never queued
forever); a client that disconnects cancels its request, which aborts the generation. The engine's
own metrics (queue, KV cache, time to first token, ...) go to Ray's Prometheus endpoint as
``vllm_*`` beside kiln's ``kiln_serve_*``.

Every request is bounded: its body by ``max_request_bytes`` (413 as soon as it is passed), its
reading, tokenisation and generation together by ``request_timeout_s`` (408). Every error answer
has OpenAI's shape, ``{"error": {"message", "type", "param", "code"}}``: client mistakes are 4xx,
anything else a 500 that names the request id and no internals (the traceback goes to the log).

Usage:
    Python:      ``serve.run(build_app({"model": "runs/x/sft/model"}))``
    CLI:         ``kiln serve runs/x/sft/model``  (or a kiln config with a ``serve:`` section)
    Ray Serve:   ``serve run serving/serve_config.yaml`` / ``serve deploy serving/serve_config.yaml``
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ValidationError
from ray import serve
from ray.serve import metrics
from ray.serve.deployment import Application
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from core.chat import chat_stop_ids, tokenize_chat
from core.config import format_errors
from serving.adapters import Adapter, check_adapters, lora_engine_args, model_cards
from serving.admission import Admission, Ticket, check_work, serve_limits
from serving.auth import check_bearer, check_exposure, key_digest, resolve_api_key
from serving.config import ServeConfig
from serving.errors import api_error
from serving.openai_format import chat_logprobs, completion_logprobs, sse, structured_outputs_args, usage
from serving.schemas import (
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    SamplingFields,
    TokenizeRequest,
    template_messages,
    validation_error,
)
from serving.streaming import ClosingStream, holding, read_body

if TYPE_CHECKING:
    from vllm import SamplingParams
    from vllm.lora.request import LoRARequest
    from vllm.outputs import CompletionOutput

# No /docs or /openapi.json: the API is OpenAI's, documented there, and a smaller surface.
api = FastAPI(title="kiln", docs_url=None, redoc_url=None, openapi_url=None)
# Serve sends a replica's "ray.serve" records to its log file.
logger = logging.getLogger("ray.serve")

_LATENCY_BUCKETS_S = [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120]
_TOKENS_PER_S_BUCKETS = [1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000]


@api.exception_handler(HTTPException)
async def _http_error(request: Request, e: HTTPException) -> JSONResponse:
    """FastAPI's own answers (unknown path 404, wrong method 405) in OpenAI's error shape."""
    body = APIError(e.status_code, f"{request.method} {request.url.path}: {e.detail}", code="not_found" if e.status_code == 404 else None).body()
    return JSONResponse(body, status_code=e.status_code, headers=e.headers)


@dataclass
class _Job:
    """One validated generation request, ready for the engine."""

    chat: bool
    request_id: str
    # The model id the request named (the base model's or an adapter's) and its vLLM LoRA request.
    model: str
    lora: LoRARequest | None
    created: int
    # Token ids of each prompt (one for chat; completions may bring several).
    prompts: list[list[int]]
    # One per prompt: they differ only in max_tokens (the room each prompt leaves).
    params: list[SamplingParams]
    # Top log-probabilities per token; None: no logprobs in the answer.
    logprobs: int | None
    include_usage: bool
    stream: bool
    # Completions' echo: each prompt's text, prepended to its choices' text; None: no echo.
    echo_texts: list[str] | None = None
    # Echo without generation (max_tokens 0): the engine makes one token, the answer shows none.
    echo_only: bool = False

    @property
    def n(self) -> int:
        return self.params[0].n

    @property
    def prompt_tokens(self) -> int:
        return sum(len(p) for p in self.prompts)


# Everything the route methods use is defined above the class: serve.ingress pickles the FastAPI
# app (and with it the methods, by value) when the decorator runs, before the rest of the module.


def _parse(raw: bytes, schema: type[BaseModel]) -> Any:
    """Validate a JSON body into ``schema``; malformed JSON and bad fields are 400s."""
    try:
        return schema.model_validate_json(raw)
    except ValidationError as e:
        raise validation_error(e) from None


@serve.deployment
@serve.ingress(api)
class LLMServer:
    """One vLLM engine behind the OpenAI HTTP API (a Ray Serve replica)."""

    async def __init__(self, cfg: ServeConfig, model_dir: str, model_name: str, api_key_sha256: str | None,
                       adapters: list[Adapter]) -> None:  # fmt: skip
        # vLLM is imported here, in the replica, so building the app stays light for the driver.
        from transformers import AutoTokenizer
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.lora.request import LoRARequest
        from vllm.v1.engine.async_llm import AsyncLLM
        from vllm.v1.metrics.ray_wrappers import RayPrometheusStatLogger

        self.cfg = cfg
        self.model_name = model_name
        self.key_sha256 = api_key_sha256
        self.created = int(time.time())
        self.engine = AsyncLLM.from_engine_args(
            AsyncEngineArgs(model=model_dir, served_model_name=model_name, **cfg.engine.vllm_args(),
                            **lora_engine_args(adapters)),
            # The engine's own metrics as Ray metrics: Ray's Prometheus endpoint exports them.
            stat_loggers=[RayPrometheusStatLogger],
        )
        self.max_model_len: int = self.engine.model_config.max_model_len
        # Every adapter is loaded now: a bad one fails the replica's start, not a request.
        self.adapters = adapters
        self.loras = {a.name: LoRARequest(lora_name=a.name, lora_int_id=i, lora_path=a.path)
                      for i, a in enumerate(adapters, start=1)}  # fmt: skip
        for lora in self.loras.values():
            await self.engine.add_lora(lora)
        # Token ids up to the larger of the tokenizer's and the model's vocabulary are valid.
        self.vocab_size: int = self.engine.model_config.get_vocab_size()
        # Our own tokenizer: prompts are tokenised here so context limits are checked (and
        # answered 400) before the engine sees the request. Parsing and tokenising run on one
        # thread of their own: off the event loop (a 1 MiB prompt takes a while, and /healthz and
        # the streams must not wait for it) and one at a time (tokenize_chat switches a flag on
        # the tokenizer, which two threads must not do at once).
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.vocab_size = max(self.vocab_size, len(self.tokenizer))
        self.chat_stop_ids = chat_stop_ids(self.tokenizer)
        self.prepare_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kiln-prepare")
        self.admission = Admission(cfg.max_ongoing_requests, cfg.max_queued_requests)

        tags = ("route", "status")
        self.m_requests = metrics.Counter("kiln_serve_requests", "HTTP requests answered.", tag_keys=tags)
        self.m_latency = metrics.Histogram(
            "kiln_serve_request_latency_s", "Request latency (to the last byte).", _LATENCY_BUCKETS_S, tag_keys=tags
        )
        self.m_tokens = metrics.Counter("kiln_serve_generated_tokens", "Tokens generated.", tag_keys=("route",))
        self.m_tokens_per_s = metrics.Histogram(
            "kiln_serve_tokens_per_s", "Generated tokens/s of each request.", _TOKENS_PER_S_BUCKETS, tag_keys=("route",)
        )

    async def check_health(self) -> None:
        """Serve's periodic replica health check: a dead engine gets the replica replaced."""
        await self.engine.check_health()

    # ---- routes -------------------------------------------------------------------------------

    @api.get("/healthz")
    async def healthz(self) -> Response:
        """200 while the engine is alive (no auth: load balancers and probes call it, so the
        reason for a 503 goes to the log, not to whoever asks)."""
        try:
            await self.engine.check_health()
        except Exception as e:  # noqa: BLE001 - any failure means unhealthy
            logger.error("health check failed", exc_info=e)
            return JSONResponse({"status": "unhealthy"}, status_code=503)
        return JSONResponse({"status": "ok", "unfinished_requests": self.engine.get_num_unfinished_requests()})

    @api.get("/v1/models")
    async def models(self, request: Request) -> Response:
        """The model this app serves, and each of its LoRA adapters."""
        try:
            check_bearer(request.headers.get("authorization"), self.key_sha256)
        except APIError as e:
            return JSONResponse(e.body(), status_code=e.status)
        cards = model_cards(self.model_name, self.created, self.max_model_len, self.adapters)
        return JSONResponse({"object": "list", "data": cards})

    @api.post("/v1/completions")
    async def completions(self, request: Request) -> Response:
        """OpenAI text completions, optionally streamed."""
        return await self._answer(request, CompletionRequest)

    @api.post("/v1/chat/completions")
    async def chat_completions(self, request: Request) -> Response:
        """OpenAI chat completions with the tokenizer's chat template, optionally streamed."""
        return await self._answer(request, ChatCompletionRequest)

    @api.post("/tokenize")
    async def tokenize(self, request: Request) -> Response:
        """vLLM's ``/tokenize``: a prompt's (or chat messages') token ids, as generation sees them."""
        return await self._tokenizer_route(request, self._tokenize)

    @api.post("/detokenize")
    async def detokenize(self, request: Request) -> Response:
        """vLLM's ``/detokenize``: token ids back to text."""
        return await self._tokenizer_route(request, self._detokenize)

    # ---- request handling ---------------------------------------------------------------------

    async def _answer(self, request: Request, schema: type[SamplingFields]) -> Response:
        started = time.perf_counter()
        route = "chat" if schema is ChatCompletionRequest else "completions"
        request_id = f"{'chatcmpl' if schema is ChatCompletionRequest else 'cmpl'}-{uuid.uuid4().hex}"
        loop = asyncio.get_running_loop()
        # One deadline for waiting, reading, tokenising and generating (a stream's too: see _stream).
        deadline = loop.time() + self.cfg.request_timeout_s
        ticket: Ticket | None = None
        streaming = False
        try:
            # Authenticate before reading the body: an anonymous caller learns nothing else.
            check_bearer(request.headers.get("authorization"), self.key_sha256)
            ticket = self.admission.admit()  # 503 at once when the replica is full
            async with asyncio.timeout_at(deadline):
                raw = await read_body(request, self.cfg.max_request_bytes)
                job = await loop.run_in_executor(self.prepare_thread, self._prepare, raw, schema, request_id)
                await ticket.start()
                outputs = holding(ticket, self._generate(job))
                if job.stream:
                    # The first output before the 200: the engine's own checks of the request run
                    # when it is added, and their 400 must come as a status, not inside a stream.
                    first = await anext(outputs)
                    streaming = True
                    return ClosingStream(self._stream(job, first, outputs, deadline, route, started), outputs,
                                         lambda: self._observe(route, 499, started, 0))  # fmt: skip
                body = await self._complete(job, outputs)
        except ClientDisconnect:
            self._observe(route, 499, started, 0)  # nobody left to answer
            return Response(status_code=499)
        except asyncio.CancelledError:  # the client left and Serve cancelled the request
            self._observe(route, 499, started, 0)
            raise
        except Exception as e:  # noqa: BLE001 - every failure is answered in OpenAI's shape
            err = api_error(e, request_id)
            self._observe(route, err.status, started, 0)
            return JSONResponse(err.body(), status_code=err.status)
        finally:
            if ticket is not None and not streaming:
                ticket.release()  # a stream gives it back when its outputs end (_holding)
        self._observe(route, 200, started, body["usage"]["completion_tokens"])
        return JSONResponse(body)

    def _prepare(self, raw: bytes, schema: type[SamplingFields], request_id: str) -> _Job:
        """Parse the body, tokenise the prompts, check them against the context and build the
        sampling parameters (on the prepare thread)."""
        from vllm import SamplingParams  # vLLM only in the replica (see __init__)
        from vllm.sampling_params import RequestOutputKind, StructuredOutputsParams

        req = _parse(raw, schema)
        lora = self._check_model(req.model)
        echo_texts = None
        if isinstance(req, ChatCompletionRequest):
            chat, prompt_param, max_tokens = True, "messages", req.max_new_tokens
            tokens_param = "max_tokens" if req.max_completion_tokens is None else "max_completion_tokens"
            messages = template_messages(req.messages, self.tokenizer.chat_template)
            # Contents as plain text: "<|im_start|>" typed in a message cannot open a turn.
            prompts = [tokenize_chat(self.tokenizer, messages, add_generation_prompt=True).ids]
            logprobs = (req.top_logprobs or 0) if req.logprobs else None
            stop_ids = [*self.chat_stop_ids, *(req.stop_token_ids or [])]
        else:
            assert isinstance(req, CompletionRequest)
            chat, prompt_param, max_tokens, tokens_param = False, "prompt", req.max_tokens, "max_tokens"
            prompts = [self.tokenizer.encode(p) if isinstance(p, str) else self._known_ids(p) for p in req.prompts]
            if req.echo:
                echo_texts = [p if isinstance(p, str) else self.tokenizer.decode(p) for p in req.prompts]
            logprobs, stop_ids = req.logprobs, req.stop_token_ids or []

        longest = max(len(p) for p in prompts)
        room = self.max_model_len - longest
        if room < 1:
            raise APIError(
                400,
                f"This model's maximum context length is {self.max_model_len} tokens; the prompt has "
                f"{longest} tokens, leaving no room for a completion.",
                param=prompt_param,
                code="context_length_exceeded",
            )
        # More to generate than the whole context is refused; what only the prompt's length leaves
        # no room for is cut to the room, as vLLM's server does (finish_reason "length").
        if max_tokens is not None and max_tokens > self.max_model_len:
            raise APIError(
                400,
                f"This model's maximum context length is {self.max_model_len} tokens; max_tokens "
                f"({max_tokens}) cannot be greater.",
                param=tokens_param,
                code="context_length_exceeded",
            )
        echo_only = echo_texts is not None and max_tokens == 0
        if logprobs is not None and logprobs > self.cfg.engine.max_logprobs:
            raise APIError(400, f"at most {self.cfg.engine.max_logprobs} logprobs", param="logprobs")
        # Unset (chat: one prompt; completions default to 16): the room each prompt leaves; more
        # than that room: the room (each prompt's own, as vLLM's server computes it).
        limits = [(self.max_model_len - len(p)) if max_tokens is None else 1 if echo_only else
                  min(max_tokens, self.max_model_len - len(p)) for p in prompts]  # fmt: skip
        # Counted: the tokens asked for (an unset max_tokens is not the whole context) and echoed.
        asked = (sum(limits) if max_tokens is not None else 0) + (sum(map(len, prompts)) if echo_texts else 0)
        check_work(len(prompts) * req.n, logprobs, asked, req.n)
        structured = structured_outputs_args(req.response_format)
        common = dict(
            n=req.n,
            temperature=req.temperature,
            top_p=req.top_p,
            top_k=req.top_k,
            seed=req.seed,
            stop=req.stop_list,
            stop_token_ids=stop_ids,
            presence_penalty=req.presence_penalty,
            frequency_penalty=req.frequency_penalty,
            repetition_penalty=req.repetition_penalty,
            min_tokens=req.min_tokens,
            ignore_eos=req.ignore_eos,
            logprobs=logprobs,
            # Echo with logprobs: the prompt tokens' log-probabilities too, as vLLM's server gives them.
            prompt_logprobs=logprobs if echo_texts is not None else None,
            structured_outputs=StructuredOutputsParams(**structured) if structured else None,
            # Streams get each new piece once; whole answers only the final state.
            output_kind=RequestOutputKind.DELTA if req.stream else RequestOutputKind.FINAL_ONLY,
        )
        params = [SamplingParams(max_tokens=limit, **common) for limit in limits]
        return _Job(chat, request_id, req.model or self.model_name, lora, int(time.time()), prompts, params, logprobs,
                    req.include_usage, req.stream, echo_texts, echo_only)  # fmt: skip

    def _check_model(self, model: str | None) -> LoRARequest | None:
        """The adapter a request's ``model`` names (None: the base model, or no name); 404 if none."""
        if model is None or model == self.model_name:
            return None
        if model not in self.loras:
            raise APIError(404, f"The model '{model}' does not exist.", param="model", code="model_not_found")
        return self.loras[model]

    def _known_ids(self, ids: list[int]) -> list[int]:
        """Token ids given by the client, each checked against the vocabulary (400 if not in it)."""
        if ids and max(ids) >= self.vocab_size:
            raise APIError(400, f"Token id {max(ids)} is out of vocabulary", param="prompt", code="invalid_value")
        return ids

    def _generate(self, job: _Job) -> AsyncGenerator[tuple[int, Any], None]:
        """The engine's outputs of every prompt, as ``(prompt index, RequestOutput)``, interleaved."""
        from vllm.inputs.engine import tokens_input  # see __init__
        from vllm.utils.async_utils import merge_async_iterators

        if len(job.prompts) == 1:
            ids = [job.request_id]
        else:
            ids = [f"{job.request_id}-{i}" for i in range(len(job.prompts))]
        # Already tokenised: the engine skips its own rendering step. Closing the merged iterator
        # closes (and so aborts) every prompt's request.
        return merge_async_iterators(*(
            self.engine.generate(tokens_input(prompt), params, request_id, lora_request=job.lora)
            for prompt, params, request_id in zip(job.prompts, job.params, ids)
        ))  # fmt: skip

    async def _complete(self, job: _Job, outputs: AsyncIterator[tuple[int, Any]]) -> dict[str, Any]:
        """Run one request to the end (under the caller's deadline: a timeout that cancels us
        makes the engine abort the request)."""
        finals: dict[int, tuple[CompletionOutput, Any]] = {}
        async for i, out in outputs:
            for o in out.outputs:
                finals[i * job.n + o.index] = (o, out.prompt_logprobs)
        choices = [self._choice(job, index, o, prompt_lp, offset=0) for index, (o, prompt_lp) in sorted(finals.items())]
        completion_tokens = sum(len(o.token_ids) for o, _ in finals.values())
        return {
            "id": job.request_id,
            "object": "chat.completion" if job.chat else "text_completion",
            "created": job.created,
            "model": job.model,
            "choices": choices,
            "usage": usage(job.prompt_tokens, completion_tokens),
        }

    async def _stream(
        self, job: _Job, first: Any, outputs: AsyncGenerator[Any, None], deadline: float, route: str, started: float
    ) -> AsyncGenerator[str, None]:
        """Server-Sent Events: one chunk per engine step, then usage (if asked) and ``[DONE]``.

        The 200 is sent by now, so an error travels as the last event, as in OpenAI's API.
        """
        head = {
            "id": job.request_id,
            "object": "chat.completion.chunk" if job.chat else "text_completion",
            "created": job.created,
            "model": job.model,
        }
        completion_tokens, status = 0, 200
        # Characters streamed so far per choice (completions' logprobs.text_offset continues);
        # a choice's first chunk carries its echoed prompt.
        offsets = [0] * (len(job.prompts) * job.n)
        begun = [False] * len(offsets)
        # Each prompt's own log-probabilities (echo + logprobs): in delta mode vLLM attaches them to
        # one output only, and every choice of the prompt echoes them.
        prompt_lps: dict[int, Any] = {}
        try:
            if job.chat:
                # OpenAI opens each chat choice with the role and empty content.
                roles = [{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                          "finish_reason": None} for i in range(job.n)]
                yield sse({**head, "choices": roles})
            item = first
            while item is not None:
                i, out = item
                if out.prompt_logprobs is not None:
                    prompt_lps.setdefault(i, out.prompt_logprobs)
                choices = []
                for o in out.outputs:
                    index = i * job.n + o.index
                    completion_tokens += len(o.token_ids)
                    choice = self._choice(job, index, o, prompt_lps.get(i), offsets[index], delta=True,
                                          echo=not begun[index])  # fmt: skip
                    begun[index] = True
                    offsets[index] += len(choice["text"]) if not job.chat else 0
                    choices.append(choice)
                yield sse({**head, "choices": choices})
                # The deadline covers the wait for the engine, never a yield: held across one, it
                # would fire in the consumer (a slow client's send) and cancel it, with no 408 event.
                async with asyncio.timeout_at(deadline):
                    item = await anext(outputs, None)
            if job.include_usage:
                yield sse({**head, "choices": [], "usage": usage(job.prompt_tokens, completion_tokens)})
        except (asyncio.CancelledError, GeneratorExit):
            # The client went away (the send cancelled, or ClosingStream closing this generator):
            # vLLM's generate() aborts the request when it is closed below.
            status = 499
            raise
        except Exception as e:  # noqa: BLE001 - answered as the stream's last event
            err = api_error(e, job.request_id)
            status = err.status
            yield sse(err.body())
        finally:
            # Counted before any await: a cancelled stream's next await is cancelled too. Closing the
            # engine's generator aborts the request if it is still running (shielded, to get that far).
            self._observe(route, status, started, completion_tokens)
            await asyncio.shield(outputs.aclose())
        yield "data: [DONE]\n\n"

    # ---- response pieces ----------------------------------------------------------------------

    def _choice(self, job: _Job, index: int, o: CompletionOutput, prompt_logprobs: Any, offset: int,
                delta: bool = False, echo: bool = True) -> dict[str, Any]:  # fmt: skip
        """One entry of ``choices`` (a chunk's when ``delta``; ``echo``: this piece is the first
        of its choice, which carries the echoed prompt)."""
        finish = o.finish_reason
        if job.chat:
            lp = ({"content": chat_logprobs(o.token_ids, o.logprobs or [], job.logprobs, self._token_text)}
                  if job.logprobs is not None else None)  # fmt: skip
            if delta:
                return {"index": index, "delta": {"content": o.text} if o.text or not finish else {},
                        "logprobs": lp, "finish_reason": finish}
            return {"index": index, "message": {"role": "assistant", "content": o.text}, "logprobs": lp,
                    "finish_reason": finish}
        # Echo without generation: the prompt alone (the engine's one token is counted, not shown).
        text, token_ids, positions = o.text, list(o.token_ids), list(o.logprobs or [])
        if job.echo_only:
            text, token_ids, positions = "", [], []
        if job.echo_texts is not None and echo:
            prompt = job.prompts[index // job.n]
            text = job.echo_texts[index // job.n] + text
            token_ids, positions = prompt + token_ids, [*(prompt_logprobs or [None] * len(prompt)), *positions]
        lp = (completion_logprobs(token_ids, positions, job.logprobs, offset, self._token_text)
              if job.logprobs is not None else None)  # fmt: skip
        return {"index": index, "text": text, "logprobs": lp, "finish_reason": finish, "stop_reason": o.stop_reason}

    def _token_text(self, token_id: int, logprob: Any) -> str:
        if logprob is not None and logprob.decoded_token is not None:
            return logprob.decoded_token
        return self.tokenizer.decode([token_id])

    # ---- /tokenize, /detokenize ---------------------------------------------------------------

    async def _tokenizer_route(self, request: Request, work: Callable[[bytes], dict[str, Any]]) -> Response:
        """Authenticate, admit, read the body and run ``work(raw)`` on the prepare thread. Admitted
        like a completion (a place, never an engine slot): completions' prompts wait for the same
        thread, so a flood of large bodies here must be refused (503), not queued ahead of them."""
        try:
            check_bearer(request.headers.get("authorization"), self.key_sha256)
            with self.admission.place():
                async with asyncio.timeout(self.cfg.request_timeout_s):
                    raw = await read_body(request, self.cfg.max_request_bytes)
                    body = await asyncio.get_running_loop().run_in_executor(self.prepare_thread, work, raw)
        except ClientDisconnect:
            return Response(status_code=499)  # nobody left to answer
        except Exception as e:  # noqa: BLE001 - every failure is answered in OpenAI's shape
            err = api_error(e, f"tokenize-{uuid.uuid4().hex}")
            return JSONResponse(err.body(), status_code=err.status)
        return JSONResponse(body)

    def _tokenize(self, raw: bytes) -> dict[str, Any]:
        req = _parse(raw, TokenizeRequest)
        self._check_model(req.model)
        if req.messages is not None:
            messages = template_messages(req.messages, self.tokenizer.chat_template)
            ids = tokenize_chat(self.tokenizer, messages, add_generation_prompt=req.add_generation_prompt).ids
        else:
            ids = self.tokenizer.encode(req.prompt)
        strs = self.tokenizer.convert_ids_to_tokens(ids) if req.return_token_strs else None
        return {"count": len(ids), "max_model_len": self.max_model_len, "tokens": ids, "token_strs": strs}

    def _detokenize(self, raw: bytes) -> dict[str, Any]:
        req = _parse(raw, DetokenizeRequest)
        self._check_model(req.model)
        if req.tokens and max(req.tokens) >= self.vocab_size:
            raise APIError(400, f"Token id {max(req.tokens)} is out of vocabulary", param="tokens",
                           code="invalid_value")  # fmt: skip
        return {"prompt": self.tokenizer.decode(req.tokens)}

    def _observe(self, route: str, status: int, started: float, tokens: int) -> None:
        elapsed = time.perf_counter() - started
        tags = {"route": route, "status": str(status)}
        self.m_requests.inc(tags=tags)
        self.m_latency.observe(elapsed, tags=tags)
        if tokens:
            self.m_tokens.inc(tokens, tags={"route": route})
            self.m_tokens_per_s.observe(tokens / max(elapsed, 1e-6), tags={"route": route})


def build_app(args: dict[str, Any] | ServeConfig) -> Application:
    """Build the Serve application for one model directory.

    Args:
        args: a :class:`ServeConfig` or the mapping of its fields (as ``serve run`` / ``serve
            deploy`` pass a YAML ``args:`` block). ``model`` must name an HF-format directory.

    Returns:
        The application, for ``serve.run`` or a Serve config file.

    Raises:
        ValueError: the arguments do not validate, the model directory is missing, an adapter is
            not a servable LoRA directory (``serving.adapters``), the API key variable is set but
            empty, or ``host`` is not loopback and there is no key (unless
            ``allow_unauthenticated``); all before anything of Ray Serve starts.
    """
    try:
        cfg = args if isinstance(args, ServeConfig) else ServeConfig.model_validate(args)
    except ValidationError as e:  # pydantic's own text repeats every value given, an api_key too
        raise ValueError(format_errors(e, "serve application args", ServeConfig)) from None
    if cfg.model is None:
        raise ValueError("serve.model: name the model directory to serve")
    model_dir = Path(cfg.model).expanduser().resolve()
    if not (model_dir / "config.json").is_file():
        raise ValueError(f"serve.model: {model_dir} is not a Hugging Face model directory (no config.json)")
    model_name = cfg.model_name or model_dir.name
    adapters = check_adapters(cfg.adapters, model_name)
    key = resolve_api_key(cfg.api_key, cfg.api_key_env)
    check_exposure(cfg.host, key, cfg.allow_unauthenticated, cfg.api_key_env, cfg.ingress)
    scaling: dict[str, Any] = (
        {"autoscaling_config": cfg.autoscaling.model_dump()}
        if cfg.autoscaling is not None
        else {"num_replicas": cfg.num_replicas}
    )
    # The replica gets the key's digest only (below): not the variable that holds it, either.
    engine_env = {k: v for k, v in cfg.engine.vllm_env().items() if k != cfg.api_key_env}
    env = {"TOKENIZERS_PARALLELISM": "false", **engine_env, **cfg.ingress_env()}
    # The replica refuses overload itself (in OpenAI's shape); Serve's limits are looser.
    max_ongoing, max_queued = serve_limits(cfg.max_ongoing_requests, cfg.max_queued_requests)
    return LLMServer.options(
        max_ongoing_requests=max_ongoing,
        max_queued_requests=max_queued,
        ray_actor_options={"num_cpus": cfg.num_cpus, "num_gpus": cfg.num_gpus, "runtime_env": {"env_vars": env}},
        # vLLM start-up (weights, KV cache, warm-up) outlasts Serve's default health-check timeout.
        health_check_timeout_s=60,
        **scaling,
    ).bind(
        # The replica gets the key's digest only; the plaintext stays out of Serve's stored state.
        cfg.model_copy(update={"api_key": None}),
        str(model_dir),
        model_name,
        key_digest(key) if key else None,
        adapters,
    )
