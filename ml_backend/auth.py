"""Optional authentication of the backend's own routes (all but ``/health``).

Two schemes, either or both enabled:

* HTTP basic auth with ``BASIC_AUTH_USER`` / ``BASIC_AUTH_PASS``: what Label Studio sends when
  the ML backend connection has "Use basic auth" on;
* a bearer token (``Authorization: Bearer <AUTH_TOKEN>``) for scripts and other clients.

With neither configured, nothing is checked (the backend is meant to sit on a private network next
to Label Studio). Comparisons are constant-time (``hmac.compare_digest`` on UTF-8 bytes; the
user and the password are both compared, whichever is wrong). A refused request gets
``401 {"error": ...}`` with a ``WWW-Authenticate`` challenge per enabled scheme; the check runs
before routing, so unknown paths answer 401 too and reveal nothing. Credentials are never logged:
a refusal is logged with the method, path, client address and the scheme tried.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import logging

from flask import Flask, Response, jsonify, request

log = logging.getLogger("ml_backend.auth")

OPEN_PATHS = frozenset({"/health"})
REALM = "label-studio-ml-backend"


def _eq(given: bytes, expected: bytes) -> bool:
    return hmac.compare_digest(given, expected)


def _basic_ok(credentials: str, user: bytes, password: bytes) -> bool:
    try:
        decoded = base64.b64decode(credentials.strip(), validate=True)
    except (binascii.Error, ValueError):
        return False
    given_user, sep, given_password = decoded.partition(b":")
    if not sep:
        return False
    user_ok = _eq(given_user, user)
    password_ok = _eq(given_password, password)  # always compared: no early exit on a wrong user
    return user_ok and password_ok


def install_auth(app: Flask, user: str | None, password: str | None, token: str | None) -> None:
    """Require basic auth (``user``/``password``) or a bearer ``token`` on every route but
    ``/health``. Does nothing when neither is given; ValueError if only one of user/password is."""
    user = user or None
    password = password or None
    token = token or None
    if (user is None) != (password is None):
        raise ValueError("BASIC_AUTH_USER and BASIC_AUTH_PASS must be set together")
    if user is None and token is None:
        return
    user_b = user.encode() if user is not None else None
    password_b = password.encode() if password is not None else None
    token_b = token.encode() if token is not None else None
    challenges = []
    if user_b is not None:
        challenges.append(f'Basic realm="{REALM}", charset="UTF-8"')
    if token_b is not None:
        challenges.append(f'Bearer realm="{REALM}"')

    def authorized(header: str) -> tuple[bool, str]:
        scheme, _, credentials = header.strip().partition(" ")
        scheme = scheme.lower()
        if scheme == "basic" and user_b is not None and password_b is not None:
            return _basic_ok(credentials, user_b, password_b), scheme
        if scheme == "bearer" and token_b is not None:
            return _eq(credentials.strip().encode(), token_b), scheme
        return False, scheme if scheme in ("basic", "bearer") else ("none" if not header else "other")

    @app.before_request
    def require_auth() -> Response | None:
        if request.path in OPEN_PATHS:
            return None
        ok, scheme = authorized(request.headers.get("Authorization", ""))
        if ok:
            return None
        log.warning("authentication failed", extra={"method": request.method, "path": request.path,
                                                    "remote": request.remote_addr, "scheme": scheme})
        error = "authentication required" if scheme == "none" else "invalid credentials"
        response = jsonify(error=error)
        response.status_code = 401
        for challenge in challenges:
            response.headers.add("WWW-Authenticate", challenge)
        return response
