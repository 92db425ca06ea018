"""Alert notifications to a webhook: a signed JSON POST when an alert opens or closes.

Rules:

- Only the replica that opened or closed an alert sends its notification (the
  alert's unique ``open_key`` and the conditional close make that one
  replica), after the change is committed. Acknowledged and silenced alerts
  are not notified.
- The body is JSON; ``X-Edgefleet-Signature`` is ``sha256=`` and the hex
  HMAC-SHA256 of the raw body under the shared secret, as GitHub signs its
  webhooks; ``X-Edgefleet-Timestamp`` is the Unix time of the attempt, which
  the signed body repeats as ``sent_at``; ``X-Edgefleet-Delivery`` stays the
  same across the attempts of one notification, so a receiver can drop
  duplicates.
- A connection failure, a timeout, a 408, a 429 or a 5xx is tried again after
  a delay that doubles (``backoff_s``, 2x, 4x, ...), up to ``attempts`` tries
  in all; any other answer ends the delivery.
- Deliveries run in their own task from a bounded queue: evaluation and
  ingest never wait for the receiver. A full queue drops the notification
  and says so in the log and the counter.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import aiohttp

if TYPE_CHECKING:
    from fleet_server.metrics import Metrics

log = logging.getLogger(__name__)

SIGNATURE_HEADER = "X-Edgefleet-Signature"
TIMESTAMP_HEADER = "X-Edgefleet-Timestamp"
DELIVERY_HEADER = "X-Edgefleet-Delivery"
EVENT_HEADER = "X-Edgefleet-Event"
_RETRIED_STATUSES = frozenset({408, 429})


def signature(secret: bytes, body: bytes) -> str:
    """The ``X-Edgefleet-Signature`` value of ``body``: ``sha256=`` and the hex HMAC."""
    return "sha256=" + hmac.new(secret, body, hashlib.sha256).hexdigest()


def signature_matches(secret: bytes, body: bytes, header: str) -> bool:
    """Whether ``header`` is the signature of ``body`` (constant-time), as a receiver checks."""
    return hmac.compare_digest(signature(secret, body), header)


@dataclass(frozen=True)
class Notification:
    """One alert change to deliver: ``event`` (``alert.opened``, ``alert.closed``) and the alert."""

    event: str
    alert: dict[str, Any]
    delivery: str = field(default_factory=lambda: uuid.uuid4().hex)


@dataclass
class WebhookNotifier:
    """Delivers :class:`Notification` s to ``url`` (see the module's rules) until stopped."""

    url: str
    secret: bytes
    metrics: Metrics | None = None
    attempts: int = 5
    backoff_s: float = 1.0
    timeout_s: float = 10.0
    queue_size: int = 1000
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep
    clock: Callable[[], float] = time.time
    _queue: asyncio.Queue[Notification] = field(init=False)

    def __post_init__(self) -> None:
        self._queue = asyncio.Queue(self.queue_size)

    def notify(self, notification: Notification) -> None:
        """Queue ``notification`` for delivery; never waits."""
        try:
            self._queue.put_nowait(notification)
        except asyncio.QueueFull:
            log.error(
                "alert webhook: queue full (%d), %s of alert %s not sent",
                self.queue_size,
                notification.event,
                notification.alert.get("id"),
            )
            self._count("dropped")

    def _count(self, result: str) -> None:
        if self.metrics is not None:
            self.metrics.alert_notifications.labels(result).inc()

    def body(self, notification: Notification, attempt: int) -> tuple[bytes, dict[str, str]]:
        """The signed body and headers of one attempt."""
        sent_at = int(self.clock())
        body = json.dumps(
            {
                "event": notification.event,
                "delivery": notification.delivery,
                "attempt": attempt,
                "sent_at": sent_at,
                "alert": notification.alert,
            },
            sort_keys=True,
            default=str,
        ).encode()
        headers = {
            "Content-Type": "application/json",
            SIGNATURE_HEADER: signature(self.secret, body),
            TIMESTAMP_HEADER: str(sent_at),
            DELIVERY_HEADER: notification.delivery,
            EVENT_HEADER: notification.event,
        }
        return body, headers

    async def deliver(self, http: aiohttp.ClientSession, notification: Notification) -> bool:
        """Send one notification, retrying as the module's rules say; whether it arrived."""
        delay = self.backoff_s
        problem = ""
        for attempt in range(1, self.attempts + 1):
            body, headers = self.body(notification, attempt)
            try:
                async with http.post(self.url, data=body, headers=headers) as response:
                    if 200 <= response.status < 300:
                        self._count("delivered")
                        return True
                    problem = f"answered {response.status}"
                    if response.status < 500 and response.status not in _RETRIED_STATUSES:
                        break
            except (aiohttp.ClientError, TimeoutError) as exc:
                problem = f"{type(exc).__name__}: {exc}".rstrip(": ")
            if attempt < self.attempts:
                log.info(
                    "alert webhook: %s of alert %s %s; trying again in %.3g s",
                    notification.event,
                    notification.alert.get("id"),
                    problem,
                    delay,
                )
                await self.sleep(delay)
                delay *= 2
        log.error(
            "alert webhook: %s of alert %s not delivered to %s: %s",
            notification.event,
            notification.alert.get("id"),
            self.url,
            problem,
        )
        self._count("failed")
        return False

    async def run(self, stop: asyncio.Event) -> None:
        """Deliver queued notifications until ``stop``, one at a time, in order."""
        timeout = aiohttp.ClientTimeout(total=self.timeout_s)
        async with aiohttp.ClientSession(timeout=timeout) as http:
            while not stop.is_set():
                get = asyncio.ensure_future(self._queue.get())
                stopped = asyncio.ensure_future(stop.wait())
                await asyncio.wait({get, stopped}, return_when=asyncio.FIRST_COMPLETED)
                stopped.cancel()
                if not get.done():
                    get.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await get
                    break
                try:
                    await self.deliver(http, get.result())
                except Exception:
                    log.exception("alert webhook: delivery failed")
