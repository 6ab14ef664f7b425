"""Bearer-token authentication, for every protocol front end.

Tokens come from a file (one per line) and/or the environment (TSERVE_AUTH_TOKEN). A presented
token is compared with every configured one in constant time, and never logged.
"""

from __future__ import annotations

import hmac
import logging

from service.errors import Unauthenticated
from service.settings import Settings

log = logging.getLogger(__name__)


class TokenAuth:
    def __init__(self, tokens: list[str]) -> None:
        self._tokens = [t.encode() for t in tokens if t]

    @classmethod
    def from_settings(cls, settings: Settings) -> TokenAuth | None:
        """None when no token is configured (authentication off)."""
        tokens = []
        if settings.auth_tokens_file is not None:
            tokens += [
                line.strip()
                for line in settings.auth_tokens_file.read_text().splitlines()
                if line.strip() and not line.startswith("#")
            ]
            if not tokens:
                raise ValueError(f"auth_tokens_file {str(settings.auth_tokens_file)!r} holds no token")
        if settings.auth_token is not None and settings.auth_token.get_secret_value():
            tokens.append(settings.auth_token.get_secret_value())
        return cls(tokens) if tokens else None

    def check(self, authorization: str | None) -> None:
        """Raise Unauthenticated unless `authorization` is "Bearer <a configured token>"."""
        if not authorization:
            raise Unauthenticated("this server requires a bearer token (authorization: Bearer <token>)")
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise Unauthenticated("the authorization header must be 'Bearer <token>'")
        presented = token.strip().encode()
        ok = False
        for known in self._tokens:  # compare with all of them: the time does not say which matched
            ok |= hmac.compare_digest(presented, known)
        if not ok:
            raise Unauthenticated("the bearer token was not accepted")
