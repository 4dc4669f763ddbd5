"""Every exception raised while serving a request, as the OpenAI-shaped error it is answered with."""

from __future__ import annotations

import logging

from jinja2 import TemplateError, TemplateSyntaxError

from core.chat import ChatTemplateChangesContents
from serving.schemas import APIError

# Serve sends a replica's "ray.serve" records to its log file.
logger = logging.getLogger("ray.serve")


def api_error(e: Exception, request_id: str) -> APIError:
    """The answer to an exception raised while serving a request.

    Mistakes in the request (vLLM's validation, a chat template that refuses the messages) are
    400s with their message; anything else is a 500 that names the request id and nothing of the
    server's internals, and its traceback goes to the replica's log.
    """
    from vllm.exceptions import GracefulHTTPError, VLLMClientError, VLLMValidationError  # vLLM only in the replica

    if isinstance(e, APIError):
        return e
    if isinstance(e, TimeoutError):
        return APIError(408, "the request timed out (serve.request_timeout_s)", type="timeout")
    if isinstance(e, VLLMValidationError):
        return APIError(400, str(e), param=e.parameter, code="invalid_value")
    if isinstance(e, VLLMClientError):
        return APIError(400, str(e))
    if isinstance(e, GracefulHTTPError):  # the engine's own admission control: overload, not a bug
        return APIError(int(e.http_status), e.message, type="server_error" if e.http_status >= 500 else
                        "invalid_request_error")  # fmt: skip
    if isinstance(e, ChatTemplateChangesContents):
        return APIError(400, str(e), param="messages")
    if isinstance(e, TemplateError) and not isinstance(e, TemplateSyntaxError):
        # raise_exception() in a chat template: the template's own words about the messages.
        return APIError(400, f"the chat template refused these messages: {e}", param="messages")
    logger.error("request %s failed", request_id, exc_info=e)
    return APIError(500, f"internal error in request {request_id}; the server log has the details",
                    type="server_error")  # fmt: skip

