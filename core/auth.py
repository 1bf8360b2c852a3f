"""Who may call what: bearer tokens with scopes, loaded hashed from a file, checked in one place.

The tokens file (TOML) lists one table per token; only the SHA-256 of each token is stored, so
the file reveals nothing usable (`abstream token NAME --scopes ingest,query` makes one):

    [[token]]
    name = "checkout-ingest"        # shows in logs and metrics, never the token
    sha256 = "9f86d0818…"
    scopes = ["ingest", "query"]    # ingest, query, admin
    test_prefix = "checkout_"       # optional: only tests whose id starts with this
    ingest_rate = 50000             # optional: events per second, averaged over a second

Which scope each operation needs is the transports' to say (service/interceptors.py, the HTTP
layer's routes); health checking stays open everywhere.
"""

from __future__ import annotations

import contextvars
import hashlib
import secrets
import tomllib
from dataclasses import dataclass
from pathlib import Path

from abstream.core.errors import PermissionDenied, Unauthenticated

SCOPES = ("ingest", "query", "admin")


@dataclass(frozen=True)
class Principal:
    name: str
    scopes: frozenset[str]
    test_prefix: str = ""
    ingest_rate: float = 0.0  # events per second; 0: unlimited

    def may_use(self, test_id: str) -> bool:
        return test_id.startswith(self.test_prefix)


#: Everyone, when no tokens are configured (the server then listens on loopback only).
ANYONE = Principal("anonymous", frozenset(SCOPES))
#: The caller of the RPC being served, set by the interceptor for its handler (and its threads).
PRINCIPAL: contextvars.ContextVar[Principal] = contextvars.ContextVar("principal", default=ANYONE)


def hash_token(token: str) -> str:
    """Its SHA-256; a token not UTF-8 as sent (an HTTP header's bytes kept as surrogates) is
    hashed as its bytes, and so is no token of the file's."""
    return hashlib.sha256(token.encode("utf-8", "surrogateescape")).hexdigest()


def new_token() -> str:
    return "abs_" + secrets.token_urlsafe(32)


class Tokens:
    """Who a bearer token is, and whether they may do what they ask (the same answer for every
    transport). Without a tokens file everyone is `ANYONE` (the server then listens on loopback)."""

    def __init__(self, by_hash: dict[str, Principal] | None) -> None:
        self._by_hash = by_hash

    @property
    def enabled(self) -> bool:
        return self._by_hash is not None

    @property
    def prefixes(self) -> tuple[str, ...]:
        """The test-id prefixes tokens are limited to."""
        return tuple(sorted({p.test_prefix for p in (self._by_hash or {}).values() if p.test_prefix}))

    def principal(self, token: str, scope: str, how: str) -> Principal:
        """The caller behind `token`, if it has `scope` (any scope for ""); `how` says how to send
        a token (the transport's words) in the error when none came."""
        if self._by_hash is None:
            return ANYONE
        principal = self._by_hash.get(hash_token(token)) if token else None
        if principal is None:
            raise Unauthenticated(f"{'no token' if not token else 'unknown token'}: {how}")
        if scope and scope not in principal.scopes:
            raise PermissionDenied(f"token {principal.name!r} lacks the {scope!r} scope this call needs")
        return principal


def load_tokens(path: str | Path) -> dict[str, Principal]:
    """SHA-256 of each token -> who it is. Raises ValueError naming what is wrong in the file."""
    try:
        config = tomllib.loads(Path(path).read_text())
    except (OSError, tomllib.TOMLDecodeError) as error:
        raise ValueError(f"tokens file {path}: {error}") from error
    tokens = {}
    for i, entry in enumerate(config.get("token", [])):
        where = f"tokens file {path}, token {i + 1}"
        digest = str(entry.get("sha256", "")).lower()
        if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
            raise ValueError(f"{where}: sha256 must be 64 hex digits")
        scopes = frozenset(entry.get("scopes", []))
        if not scopes or not scopes <= set(SCOPES):
            raise ValueError(f"{where}: scopes must be some of {', '.join(SCOPES)}")
        tokens[digest] = Principal(str(entry.get("name", f"token-{i + 1}")), scopes, str(entry.get("test_prefix", "")),
                                   float(entry.get("ingest_rate", 0)))
    if not tokens:
        raise ValueError(f"tokens file {path} defines no [[token]]")
    return tokens
