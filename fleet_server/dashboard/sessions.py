"""Dashboard sessions: a bearer token given once at login, a cookie after, a CSRF token per session.

The cookie carries only a random session id; the token stays on the server
and is authenticated again on every request, so a revoked token ends its
sessions at once. Every action (a POST) must present the session's CSRF token,
in the ``X-CSRF-Token`` header or the ``csrf`` form field; the cookie is
``SameSite=Strict`` besides. Sessions live in the memory of the replica that
opened them: a restart or another replica asks for the token again.
"""

from __future__ import annotations

import hmac
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass

COOKIE = "edgefleet_session"
CSRF_HEADER = "X-CSRF-Token"
CSRF_FIELD = "csrf"
# A session ends this long after it was opened, whatever happens meanwhile.
SESSION_TTL_S = 8 * 3600.0
MAX_SESSIONS = 10_000


@dataclass(frozen=True)
class Session:
    """One logged-in browser: its id (the cookie), the token it logged in with, its CSRF token."""

    id: str
    token: str
    csrf: str
    expires_at: float


class Sessions:
    """The open sessions of this replica, each ending ``ttl_s`` after it opened."""

    def __init__(
        self,
        ttl_s: float = SESSION_TTL_S,
        clock: Callable[[], float] = time.monotonic,
        max_sessions: int = MAX_SESSIONS,
    ) -> None:
        self.ttl_s = ttl_s
        self.clock = clock
        self.max_sessions = max_sessions
        self._open: dict[str, Session] = {}

    def open(self, token: str) -> Session:
        """A new session for ``token`` (the oldest is dropped when there are too many)."""
        now = self.clock()
        self._open = {k: s for k, s in self._open.items() if s.expires_at > now}
        while len(self._open) >= self.max_sessions:
            del self._open[next(iter(self._open))]
        session = Session(
            id=secrets.token_urlsafe(32),
            token=token,
            csrf=secrets.token_urlsafe(32),
            expires_at=now + self.ttl_s,
        )
        self._open[session.id] = session
        return session

    def get(self, session_id: str | None) -> Session | None:
        """The open session ``session_id`` names; ``None`` for an unknown or expired one."""
        if not session_id:
            return None
        session = self._open.get(session_id)
        if session is None:
            return None
        if session.expires_at <= self.clock():
            del self._open[session_id]
            return None
        return session

    def close(self, session_id: str | None) -> None:
        """End a session (logout); nothing happens for an unknown one."""
        if session_id:
            self._open.pop(session_id, None)


def csrf_valid(session: Session, presented: str | None) -> bool:
    """Whether ``presented`` is the session's CSRF token (compared in constant time)."""
    return presented is not None and hmac.compare_digest(session.csrf, presented)


def cookie_attributes(secure: bool) -> dict[str, object]:
    """How the session cookie is set: HttpOnly, SameSite=Strict, Secure only over TLS."""
    return {"httponly": True, "samesite": "Strict", "secure": secure, "path": "/"}
