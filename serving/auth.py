"""Optional bearer-token authentication of the HTTP API.

Replicas never hold the key itself, only its SHA-256 digest: the digest is what travels through
Ray Serve's stored deployment arguments, so the plaintext key never lands in the cluster's state.
Comparing digests with :func:`hmac.compare_digest` keeps the check constant-time.
"""

from __future__ import annotations

import hashlib
import hmac
import os

from serving.schemas import APIError


def key_digest(key: str) -> str:
    """SHA-256 hex digest of an API key."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def resolve_api_key(api_key: str | None, api_key_env: str) -> str | None:
    """The configured key: the environment variable wins over the config value; None: no auth."""
    return os.environ.get(api_key_env) or api_key


def check_bearer(authorization: str | None, expected_digest: str | None) -> None:
    """Raise a 401 unless ``authorization`` is ``Bearer <key>`` for the expected key.

    Args:
        authorization: the request's ``Authorization`` header, if any.
        expected_digest: :func:`key_digest` of the key; None switches authentication off.

    Raises:
        APIError: 401 with an OpenAI-style body.
    """
    if expected_digest is None:
        return
    scheme, _, token = (authorization or "").partition(" ")
    # Hash first so the comparison runs over equal-length digests whatever the client sent.
    presented = key_digest(token.strip()) if scheme.lower() == "bearer" else ""
    if not hmac.compare_digest(presented.encode(), expected_digest.encode()):
        raise APIError(401, "invalid or missing API key", type="authentication_error", code="invalid_api_key")
