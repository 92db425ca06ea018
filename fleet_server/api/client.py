"""A small blocking client of the REST API (what ``fleetctl`` uses), on urllib3.

Every failure becomes an :class:`ApiClientError` whose message is one line a
person can act on: the server's own ``{"error": ...}`` when it answered, or
why it could not be reached.
"""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import quote, urlencode

import urllib3

from protocol.api.base import API_PREFIX


class ApiClientError(Exception):
    """A request failed; ``status`` is the HTTP status, or ``None`` if there was no answer."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


def path_segment(value: str) -> str:
    """``value`` quoted as one URL path segment."""
    return quote(value, safe="")


class ApiClient:
    """Calls ``{server}/api/v1/...`` with a bearer token."""

    def __init__(
        self,
        server: str,
        token: str | None = None,
        *,
        ca_file: str | None = None,
        # Generous: assigning a large tag signs every device's metadata (about 3 ms each).
        timeout_s: float = 300.0,
    ) -> None:
        if not server.startswith(("http://", "https://")):
            raise ApiClientError(f"the server URL {server!r} must start with http:// or https://")
        self.server = server.rstrip("/")
        self.token = token
        self._http = urllib3.PoolManager(
            ca_certs=ca_file,
            retries=False,
            timeout=urllib3.Timeout(connect=10.0, read=timeout_s),
        )

    def request(
        self,
        method: str,
        path: str,
        *,
        body: Any = None,
        params: dict[str, Any] | None = None,
    ) -> Any:
        """Send one request to ``/api/v1{path}``; the decoded JSON answer."""
        url = f"{self.server}{API_PREFIX}{path}"
        query = {k: _query_value(v) for k, v in (params or {}).items() if v is not None}
        if query:
            url += "?" + urlencode(query)
        headers = {"Accept": "application/json"}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        try:
            response = self._http.request(method, url, body=data, headers=headers)
        except urllib3.exceptions.HTTPError as exc:
            raise ApiClientError(
                f"cannot reach the server at {self.server}: {_reason(exc)}"
            ) from None
        return _decode(response)

    def get(self, path: str, **params: Any) -> Any:
        return self.request("GET", path, params=params)

    def post(self, path: str, body: Any) -> Any:
        return self.request("POST", path, body=body)


def _query_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _reason(exc: urllib3.exceptions.HTTPError) -> str:
    reason = getattr(exc, "reason", None)
    return str(reason or exc).splitlines()[0]


def _decode(response: urllib3.BaseHTTPResponse) -> Any:
    text = response.data.decode("utf-8", errors="replace")
    try:
        payload = json.loads(text) if text else None
    except json.JSONDecodeError:
        payload = None
    if response.status >= 400:
        message = payload.get("error") if isinstance(payload, dict) else None
        if not isinstance(message, str):
            message = text.strip().splitlines()[0][:200] if text.strip() else response.reason
        raise ApiClientError(f"the server refused ({response.status}): {message}", response.status)
    if payload is None and text:
        raise ApiClientError(f"the server answered {response.status} with something not JSON")
    return payload
