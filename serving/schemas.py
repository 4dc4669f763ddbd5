"""Request schemas and error bodies of the OpenAI-compatible API.

Requests are validated strictly (``"max_tokens": "5"`` is a type error, as in the OpenAI API);
fields the API has but kiln does not implement are ignored rather than rejected so that the
official clients, which send a few of them by default, keep working. Responses are plain dicts
built in ``serving.app`` (they are on the hot path of every streamed token).
"""

from __future__ import annotations

import functools
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class APIError(Exception):
    """An error answered as ``{"error": {"message", "type", "param", "code"}}`` with a status."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code

    def body(self) -> dict[str, Any]:
        """The OpenAI-style error body."""
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def _is_field(part: int | str) -> bool:
    # pydantic puts union-member tags ("str", "list[str]", "TextPart") into error locations;
    # the OpenAI ``param`` names only fields and list indices.
    return isinstance(part, int) or (part.isidentifier() and part.islower() and part not in _TYPE_TAGS)


_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "none"}


def validation_error(e: ValidationError) -> APIError:
    """A 400 naming the first offending field, as the OpenAI API does."""
    first = e.errors()[0]
    param = ".".join(str(p) for p in first["loc"] if _is_field(p)) or None
    if first["type"] == "json_invalid":
        return APIError(400, f"request body is not valid JSON: {first['msg']}", code="invalid_json")
    if first["type"] == "value_error" and not first["loc"]:
        # A whole-request rule (a model validator): its message starts with the field it names.
        message = str(first["ctx"]["error"])
        return APIError(400, message, param=message.partition(":")[0] or None, code="invalid_value")
    message = f"{param}: {first['msg']}" if param else first["msg"]
    return APIError(400, message, param=param, code="invalid_value")


class _Request(BaseModel):
    # strict: no "5" -> 5 coercion; ignore: unknown OpenAI fields (user, metadata, ...) are fine.
    model_config = ConfigDict(strict=True, extra="ignore")

    @model_validator(mode="before")
    @classmethod
    def _null_is_not_given(cls, data: Any) -> Any:
        """An explicit null for an optional field with a default is that default, as OpenAI's and
        vLLM's servers read it (the official client sends ``"temperature": null`` for
        ``temperature=None``); a required field's null stays an error. A field of ``UNSUPPORTED``
        set to a value that would change the answer is refused."""
        if not isinstance(data, dict):
            return data
        for key in UNSUPPORTED:
            inert = data.get(key) in (None, [], {}) or data[key] in _INERT.get(key, ())
            if not inert and key not in cls.model_fields:
                raise ValueError(f"{key}: not supported by this server")
        defaulted = _defaulted_fields(cls)
        return {k: v for k, v in data.items() if v is not None or k not in defaulted}


# OpenAI / vLLM fields that change the answer and that kiln does not implement: a request that sets
# one is refused (400), not answered as if it had not (they were ignored as unknown fields).
UNSUPPORTED = ("logit_bias", "best_of", "use_beam_search", "tools", "tool_choice", "functions", "function_call",
               "min_p", "allowed_token_ids", "bad_words", "continue_final_message", "prompt_logprobs",
               "truncate_prompt_tokens", "logits_processors")  # fmt: skip
# Their values that are the same as leaving them out (besides null and an empty list or object).
_INERT: dict[str, tuple[Any, ...]] = {"best_of": (1,), "use_beam_search": (False,), "min_p": (0, 0.0),
                                      "tool_choice": ("none",), "continue_final_message": (False,)}  # fmt: skip


@functools.cache
def _defaulted_fields(cls: type[BaseModel]) -> frozenset[str]:
    """A request schema's optional fields with a non-null default, by their JSON names (once per
    schema, not per request)."""
    return frozenset(f.alias or name for name, f in cls.model_fields.items() if not f.is_required() and f.default is not None)


class StreamOptions(_Request):
    include_usage: bool = False


# A token id (the engine checks it against the vocabulary).
TokenId = Annotated[int, Field(ge=0, le=2**63 - 1)]


class JsonSchema(_Request):
    """``response_format.json_schema``: the schema the answer must match."""

    name: str = Field(min_length=1, max_length=64)
    description: str | None = None
    # "schema" shadows a BaseModel attribute: stored as schema_.
    schema_: dict[str, Any] = Field(alias="schema")
    # OpenAI's flag; the grammar is always enforced here.
    strict: bool | None = None


class ResponseFormat(_Request):
    """``response_format``: plain text, any JSON object, or JSON matching a schema (guided decoding)."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchema | None = None

    @model_validator(mode="after")
    def _schema_iff_json_schema(self) -> "ResponseFormat":
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise ValueError("json_schema is given exactly when type is 'json_schema'")
        return self


class SamplingFields(_Request):
    """Sampling parameters shared by completions and chat completions."""

    model: str
    # null: up to the end of the context.
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    # vLLM extension: 0 or -1 switch it off.
    top_k: int = Field(default=0, ge=-1, le=2**63 - 1)  # past int64 vLLM's encoder failed after registering the request
    stop: str | list[str] | None = None
    # A non-negative int64: the engine's generators take no more, and vLLM reads -1 as "no seed".
    seed: int | None = Field(default=None, ge=0, le=2**63 - 1)
    n: int = Field(default=1, ge=1, le=16)
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    # vLLM extension: keep generating past the EOS token (benchmarks use it for fixed lengths).
    ignore_eos: bool = False
    # vLLM extensions: stop at any of these tokens (the token is generated, not shown) ...
    stop_token_ids: list[TokenId] | None = None
    # ... divide (> 1) or multiply (< 1) the logits of tokens already in the prompt or answer ...
    repetition_penalty: float = Field(default=1.0, gt=0.0, le=2.0)
    # ... and generate at least this many tokens before EOS or a stop may end the answer.
    min_tokens: int = Field(default=0, ge=0)
    response_format: ResponseFormat | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None

    @model_validator(mode="after")
    def _stop_list(self) -> "SamplingFields":
        if isinstance(self.stop, list) and len(self.stop) > 4:
            raise ValueError("stop: at most 4 stop sequences")
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options: only allowed when stream is true")
        return self

    @property
    def stop_list(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


# Most prompts one completions request may carry (each is its own engine request, times n).
MAX_PROMPTS = 256


class CompletionRequest(SamplingFields):
    """``POST /v1/completions``."""

    # One prompt (a string, or a list of token ids) or several (a list of either): one choice per
    # prompt and n, in order, as vLLM's server answers.
    prompt: str | list[str] | list[TokenId] | list[list[TokenId]]
    # OpenAI's default for completions, also when sent as null (as vLLM's server takes it). 0 with
    # echo: the prompt scored, nothing generated (vLLM's server's "echo without generation").
    max_tokens: int = Field(default=16, ge=0)
    # Top log-probabilities per generated token (OpenAI allows 0-5; the engine caps it).
    logprobs: int | None = Field(default=None, ge=0)
    # Prepend the prompt to each answer (with logprobs: the prompt tokens' log-probabilities too).
    echo: bool = False
    # Fill-in-the-middle; refused, as vLLM's server refuses it for models without FIM rendering.
    suffix: str | None = None

    @model_validator(mode="after")
    def _prompts(self) -> "CompletionRequest":
        if self.max_tokens == 0 and not self.echo:
            raise ValueError("max_tokens: must be at least 1 (0 only with echo: the prompt scored, nothing generated)")
        if isinstance(self.prompt, list) and not self.prompt:
            raise ValueError("prompt: must not be empty")
        if isinstance(self.prompt, list) and len(self.prompt) > MAX_PROMPTS:
            raise ValueError(f"prompt: at most {MAX_PROMPTS} prompts per request")
        if self.suffix is not None:
            raise ValueError("suffix: echo is unsupported with suffix" if self.echo else
                             "suffix: only supported for models with FIM completion rendering")  # fmt: skip
        return self

    @property
    def prompts(self) -> list[str | list[int]]:
        """The prompts, each a string or a list of token ids."""
        if isinstance(self.prompt, str):
            return [self.prompt]
        if all(isinstance(p, int) for p in self.prompt):
            return [list(self.prompt)]  # type: ignore[arg-type]
        return list(self.prompt)  # type: ignore[arg-type]


class TextPart(_Request):
    type: Literal["text"]
    text: str


class ChatMessage(_Request):
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[TextPart]
    name: str | None = None

    @property
    def text(self) -> str:
        """The content as one string: text parts joined by newlines, as vLLM's server joins them."""
        return self.content if isinstance(self.content, str) else "\n".join(p.text for p in self.content)


def template_messages(messages: list[ChatMessage], chat_template: str | None) -> list[dict[str, str]]:
    """Messages as the chat template gets them. A ``developer`` message is a ``system`` one unless
    the template names the role (vLLM's server does the same): kiln's ChatML template would
    otherwise render a role no training record has."""
    knows = chat_template is not None and ('"developer"' in chat_template or "'developer'" in chat_template)
    return [{"role": "system" if m.role == "developer" and not knows else m.role, "content": m.text} for m in messages]


class ChatCompletionRequest(SamplingFields):
    """``POST /v1/chat/completions``."""

    messages: list[ChatMessage] = Field(min_length=1)
    # Return the log-probability of each generated token ...
    logprobs: bool = False
    # ... and this many alternatives per position.
    top_logprobs: int | None = Field(default=None, ge=0)
    # Newer name of max_tokens; either may be given.
    max_completion_tokens: int | None = Field(default=None, ge=1)

    @model_validator(mode="after")
    def _top_logprobs_need_logprobs(self) -> "ChatCompletionRequest":
        if self.top_logprobs and not self.logprobs:  # as vLLM's server (and OpenAI's) refuse it
            raise ValueError("top_logprobs: when using `top_logprobs`, `logprobs` must be set to true")
        return self

    @property
    def max_new_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class TokenizeRequest(_Request):
    """``POST /tokenize`` (vLLM's server's): a prompt, or chat messages through the chat template."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    # Chat only: end with the assistant's opening, as a chat completion's prompt does.
    add_generation_prompt: bool = True
    # Also return each token's string (the tokenizer's own pieces).
    return_token_strs: bool = False

    @model_validator(mode="after")
    def _one_input(self) -> "TokenizeRequest":
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("prompt: give either prompt or messages")
        return self


class DetokenizeRequest(_Request):
    """``POST /detokenize``: token ids back to text."""

    model: str | None = None
    tokens: list[TokenId]
