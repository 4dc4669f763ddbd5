"""Request schemas and error bodies of the OpenAI-compatible API.

Requests are validated strictly (``"max_tokens": "5"`` is a type error, as in the OpenAI API);
fields the API has but kiln does not implement are ignored rather than rejected so that the
official clients, which send a few of them by default, keep working. Responses are plain dicts
built in ``serving.app`` (they are on the hot path of every streamed token).
"""

from __future__ import annotations

from typing import Any, Literal

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


class StreamOptions(_Request):
    include_usage: bool = False


class SamplingFields(_Request):
    """Sampling parameters shared by completions and chat completions."""

    model: str
    # null: up to the end of the context.
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    # vLLM extension: 0 or -1 switch it off.
    top_k: int = Field(default=0, ge=-1)
    stop: str | list[str] | None = None
    # A non-negative int64: the engine's generators take no more, and vLLM reads -1 as "no seed".
    seed: int | None = Field(default=None, ge=0, le=2**63 - 1)
    n: int = Field(default=1, ge=1, le=16)
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    # vLLM extension: keep generating past the EOS token (benchmarks use it for fixed lengths).
    ignore_eos: bool = False
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


class CompletionRequest(SamplingFields):
    """``POST /v1/completions``."""

    # One prompt per request (a list of one string is accepted, as clients sometimes send it).
    prompt: str | list[str]
    # OpenAI's default for completions; null: up to the end of the context.
    max_tokens: int | None = Field(default=16, ge=1)
    # Top log-probabilities per generated token (OpenAI allows 0-5; the engine caps it).
    logprobs: int | None = Field(default=None, ge=0)
    echo: bool = False

    @model_validator(mode="after")
    def _one_prompt(self) -> "CompletionRequest":
        if isinstance(self.prompt, list) and len(self.prompt) != 1:
            raise ValueError("prompt: send one prompt per request")
        if self.echo:
            raise ValueError("echo: not supported")
        return self

    @property
    def prompt_text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]


class TextPart(_Request):
    type: Literal["text"]
    text: str


class ChatMessage(_Request):
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[TextPart]
    name: str | None = None

    @property
    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatCompletionRequest(SamplingFields):
    """``POST /v1/chat/completions``."""

    messages: list[ChatMessage] = Field(min_length=1)
    # Return the log-probability of each generated token ...
    logprobs: bool = False
    # ... and this many alternatives per position.
    top_logprobs: int | None = Field(default=None, ge=0)
    # Newer name of max_tokens; either may be given.
    max_completion_tokens: int | None = Field(default=None, ge=1)

    @property
    def max_new_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
