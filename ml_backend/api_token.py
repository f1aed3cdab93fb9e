"""A Label Studio API token as request headers: a legacy token as ``Token``, an access JWT as ``Bearer``, a
personal access token (a JWT refresh token) exchanged once for short-lived access tokens, shared by every call a
project makes (image fetching and the REST API: ml_backend/label_studio.py)."""
from __future__ import annotations

import base64
import binascii
import json
import threading
import time
from typing import Any, Callable

import requests

TOKEN_REFRESH_PATH = "/api/token/refresh/"  # LS 1.23 route; note the trailing slash
_REFRESH_MARGIN_S = 30.0  # refresh an access token this long before it expires


class TokenError(Exception):
    """Label Studio would not exchange the token; the message says why (never contains the token)."""


LEGACY_OFF = "legacy token authentication has been disabled"  # Label Studio 1.23's 401 detail (jwt_auth/auth.py)


def auth_hint(token: str, detail: str) -> str:
    """What to do about Label Studio refusing `token` (a 401 whose body said `detail`), by what it said: it
    answers "Invalid token." to a legacy token it does not know, whether legacy tokens are on or off, and names
    the switch only for a valid legacy token while they are off."""
    if LEGACY_OFF in detail:
        return ("this is a legacy token and Label Studio has legacy tokens turned off: start it with "
                "LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN=true, or use a personal access token")
    if jwt_claims(token) is not None:
        return ("the personal access token is not valid there: expired, revoked, or made on another Label Studio "
                "(create one under Account & Settings -> Personal Access Token)")
    return ("Label Studio does not know this token: mistyped, reset, or from another Label Studio instance (each "
            "user's legacy token is under Account & Settings)")


def jwt_claims(token: str) -> dict[str, Any] | None:
    """Claims of a JWT (unverified), or None if ``token`` is not a JWT."""
    parts = token.split(".")
    if len(parts) != 3:
        return None
    try:
        payload = json.loads(base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4)))
    except (ValueError, binascii.Error):
        return None
    return payload if isinstance(payload, dict) else None



class ApiToken:
    """LABEL_STUDIO_API_KEY as request headers, for every client of Label Studio (connect, image fetching).

    A legacy token is sent as ``Token <key>``, an access JWT as ``Bearer``; a personal access token (a JWT
    refresh token) is exchanged at TOKEN_REFRESH_PATH for a short-lived access token, cached until shortly
    before it expires (thread-safe). ``post(path, body) -> requests.Response`` sends the exchange with the
    caller's own transport (its timeouts, its connection rules).
    """

    def __init__(self, token: str | None) -> None:
        self.token = token
        self.claims = jwt_claims(token) if token else None
        self._lock = threading.Lock()
        self._access: str | None = None
        self._access_exp = 0.0

    @property
    def refreshes(self) -> bool:
        """A personal access token: its access tokens expire, and a 401 may mean "refresh and retry"."""
        return self.claims is not None and self.claims.get("token_type") != "access"

    def headers(self, post: Callable[[str, dict], requests.Response]) -> dict[str, str]:
        if not self.token:
            return {}
        if self.claims is None:
            return {"Authorization": f"Token {self.token}"}
        if not self.refreshes:
            return {"Authorization": f"Bearer {self.token}"}
        return {"Authorization": f"Bearer {self._access_token(post)}"}

    def forget(self) -> None:
        """Drop the cached access token (after a 401): the next headers() exchanges again."""
        with self._lock:
            self._access = None

    def _access_token(self, post: Callable[[str, dict], requests.Response]) -> str:
        with self._lock:
            if self._access and time.time() < self._access_exp - _REFRESH_MARGIN_S:
                return self._access
            with post(TOKEN_REFRESH_PATH, {"refresh": self.token}) as resp:
                status = resp.status_code
                try:
                    body = resp.json()
                except ValueError:
                    body = None
            if status != 200:
                exp = (self.claims or {}).get("exp")
                expired = isinstance(exp, (int, float)) and exp < time.time()
                hint = " (the personal access token has expired)" if expired else ""
                raise TokenError(f"Label Studio token refresh failed: HTTP {status}{hint}")
            access = body.get("access") if isinstance(body, dict) else None
            if not isinstance(access, str) or not access:
                raise TokenError("Label Studio token refresh returned no access token")
            exp = (jwt_claims(access) or {}).get("exp")
            self._access = access
            self._access_exp = float(exp) if isinstance(exp, (int, float)) else time.time() + 300
            return access
