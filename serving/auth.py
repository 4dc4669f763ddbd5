"""Optional bearer-token authentication of the HTTP API.

Replicas never hold the key itself, only its SHA-256 digest: the digest is what travels through
Ray Serve's stored deployment arguments, so the plaintext key never lands in the cluster's state.
Comparing digests with :func:`hmac.compare_digest` keeps the check constant-time. A key variable
that is set but empty is an error, and so is serving beyond loopback without a key, unless the
config says ``allow_unauthenticated: true``: neither switches authentication off silently.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import os

from serving.schemas import APIError

# The shortest key accepted, from the environment as from serve.api_key.
MIN_KEY_CHARS = 8


def key_digest(key: str) -> str:
    """SHA-256 hex digest of an API key."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def resolve_api_key(api_key: str | None, api_key_env: str) -> str | None:
    """The configured key: the environment variable wins over the config value; None: no auth.

    Raises:
        ValueError: the variable is set but empty or shorter than 8 characters (an empty
            ``KILN_API_KEY=`` means a key was meant, so it must not switch authentication off), or
            ``serve.api_key`` is, once its surrounding whitespace is cut (never shown).
    """
    env = os.environ.get(api_key_env)
    if env is None:
        if api_key is not None and len(api_key.strip()) < MIN_KEY_CHARS:
            raise ValueError(f"serve.api_key is shorter than {MIN_KEY_CHARS} characters without its surrounding "
                             "whitespace")  # fmt: skip
        return _printable(api_key.strip(), "serve.api_key") if api_key is not None else None  # a YAML block's newline
    if len(env.strip()) < MIN_KEY_CHARS:
        what = "empty" if not env.strip() else f"shorter than {MIN_KEY_CHARS} characters"
        raise ValueError(
            f"the environment variable {api_key_env} is set but {what}: put the API key in it, or unset it "
            f"(then serve.api_key, if any, is the key)"
        )
    return _printable(env.strip(), f"the environment variable {api_key_env}")  # a key file's trailing newline


def _printable(key: str, where: str) -> str:
    """``key`` if it is printable ASCII. An HTTP header is read as Latin-1, so a client's ``é``
    never equals the UTF-8 the digest was made of: such a key could never authenticate."""
    if not (key.isascii() and key.isprintable()):
        raise ValueError(f"{where} holds a character that is not printable ASCII: HTTP clients cannot send such a "
                         "key in a header as written (the key is not shown)")  # fmt: skip
    return key


def is_loopback(host: str) -> bool:
    """True for an interface only this machine reaches (127.0.0.0/8, ::1, localhost)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything


def check_exposure(host: str, key: str | None, allow_unauthenticated: bool, api_key_env: str,
                   ingress: str = "proxy") -> None:  # fmt: skip
    """Refuse to serve beyond this machine without an API key, unless the config says so.

    Raises:
        ValueError: ``host`` is not a loopback interface, or the ingress is HAProxy (a precaution:
            more ports, its stats and metrics ones on every interface), there is no key and
            ``allow_unauthenticated`` is false; the message names the ways out.
    """
    if key is None and not allow_unauthenticated and ingress == "haproxy":
        raise ValueError(
            "serve.ingress is haproxy, which opens more ports (each replica's own, HAProxy's stats and metrics "
            "ports on every interface), and there is no API key; kiln asks for one as a precaution. Set one "
            f"in the environment variable {api_key_env} (or serve.api_key), use serve.ingress: proxy, or set "
            "serve.allow_unauthenticated: true on purpose"
        )
    if key is None and not allow_unauthenticated and not is_loopback(host):
        raise ValueError(
            f"serve.host is {host}, reachable from other machines, and there is no API key: anyone who reaches "
            f"the port could use the model. Set one in the environment variable {api_key_env} (or serve.api_key), "
            f"bind to 127.0.0.1, or set serve.allow_unauthenticated: true to serve without a key on purpose"
        )


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
