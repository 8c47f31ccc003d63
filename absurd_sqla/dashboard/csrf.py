"""Protection of the dashboard's POSTs against cross-site request forgery.

A signed double-submit token: the token is a random nonce and its HMAC under
the dashboard's secret; it is set in a cookie and repeated in a hidden field
of every form. A POST passes only when both are present, equal and correctly
signed, so a site that cannot read the cookie (or set one with a valid
signature) cannot forge it. When the browser sends ``Origin`` (or, failing
that, ``Referer``), its host must also be the dashboard's own.

The same secret signs flash messages carried in redirect URLs, so a crafted
link cannot make the dashboard display text of someone else's choosing.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from urllib.parse import urlsplit

from starlette.requests import Request

COOKIE = "absurd_dashboard_csrf"
FIELD = "csrf_token"


class Signer:
    """HMAC-SHA256 signatures under one secret (random unless given)."""

    def __init__(self, secret: str | bytes | None = None) -> None:
        if secret is None:
            self._key = secrets.token_bytes(32)
        else:
            self._key = secret.encode() if isinstance(secret, str) else secret
            if len(self._key) < 16:
                raise ValueError("the dashboard secret must be at least 16 bytes")

    def sign(self, message: str, purpose: str) -> str:
        data = f"{purpose}\x00{message}".encode()
        return hmac.new(self._key, data, hashlib.sha256).hexdigest()

    def verify(self, message: str, signature: str, purpose: str) -> bool:
        return hmac.compare_digest(self.sign(message, purpose), signature)

    def new_token(self) -> str:
        nonce = secrets.token_urlsafe(24)
        return f"{nonce}.{self.sign(nonce, 'csrf')}"

    def token_is_valid(self, token: str | None) -> bool:
        if not token or token.count(".") != 1:
            return False
        nonce, signature = token.split(".")
        return self.verify(nonce, signature, "csrf")


def token_for(request: Request, signer: Signer) -> tuple[str, bool]:
    """The request's valid cookie token, or a new one; True if it is new (to set)."""
    current = request.cookies.get(COOKIE)
    if current is not None and signer.token_is_valid(current):
        return current, False
    return signer.new_token(), True


def refusal(request: Request, form_token: str | None, signer: Signer) -> str | None:
    """Why a POST is refused, or None when it passes the checks."""
    cookie = request.cookies.get(COOKIE)
    if not cookie or not form_token:
        return "the form's security token is missing: reload the page and try again"
    if not (hmac.compare_digest(cookie, form_token) and signer.token_is_valid(cookie)):
        return "the form's security token is not valid: reload the page and try again"
    return _foreign_origin(request)


def _foreign_origin(request: Request) -> str | None:
    host = request.headers.get("host", "").lower()
    origin = request.headers.get("origin")
    if origin is not None:
        if origin == "null" or urlsplit(origin).netloc.lower() != host:
            return f"the request came from another site ({origin})"
        return None
    referer = request.headers.get("referer")
    if referer is not None and urlsplit(referer).netloc.lower() != host:
        return "the request came from another site"
    return None
