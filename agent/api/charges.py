"""The bytes each request is charged against the local API's budget, waiting for room.

:class:`~agent.api.admission.Admission` decides whether a charge fits now;
:class:`RequestCharges` makes a request wait up to ``admission_wait_s`` for
room, raises its charge as its body and its parse turn out to cost more, gives
the charge back when its response has been sent, and words the refusals (the
rules are in :mod:`agent.api.admission`).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Literal

from agent.api.admission import MAX_JSON_DEPTH, Admission, parse_cost, request_cost
from agent.api.jsonscan import scan_structure
from agent.api.responses import Response, error_response, retry_later


@dataclass
class Charge:
    """The bytes charged to one request; released when its response has been sent."""

    amount: int = 0


class RequestCharges:
    """Charges requests to ``admission``'s bytes in flight; one per API, on its event loop."""

    def __init__(self, admission: Admission) -> None:
        self.admission = admission
        self.limits = admission.limits
        self._freed = asyncio.Event()
        self._waiting = 0  # requests waiting in _raise for room

    async def admit(
        self, charge: Charge, body_bytes: int | None, *, chunked: bool
    ) -> Response | None:
        """Charge a request whose body declares ``body_bytes``; the refusal to send, if any.

        A body without a length or chunking costs nothing; a chunked body's size
        is known only at its end, so it is charged as it arrives (:meth:`grow`).
        """
        if body_bytes is not None and not self.admission.body_allowed(body_bytes):
            return self.too_large()
        if not chunked and not body_bytes:
            return None
        first = 0 if chunked or body_bytes is None else body_bytes
        total = request_cost(first)
        if not (
            self._raise_now(charge, total, more=False)
            or await self._raise(charge, total, more=False)
        ):
            return self._over_budget()
        return None

    def admit_now(
        self, charge: Charge, body_bytes: int | None, *, chunked: bool
    ) -> Response | Literal[False] | None:
        """:meth:`admit` when it need not wait: its refusal or ``None``; ``False``: it must wait."""
        if body_bytes is not None and not self.admission.body_allowed(body_bytes):
            return self.too_large()
        if not chunked and not body_bytes:
            return None
        first = 0 if chunked or body_bytes is None else body_bytes
        return None if self._raise_now(charge, request_cost(first), more=False) else False

    async def grow(self, charge: Charge, body_bytes: int) -> Response | None:
        """Charge a chunked body that has grown to ``body_bytes``; the refusal, if any."""
        return None if await self._raise(charge, request_cost(body_bytes)) else self._over_budget()

    async def charge_parse(self, charge: Charge, body: bytearray) -> Response | None:
        """Refuse JSON nested too deep; charge what parsing ``body`` costs, or refuse it."""
        structure = scan_structure(body, MAX_JSON_DEPTH)
        if structure.depth > MAX_JSON_DEPTH:
            return error_response(
                400,
                f"the body nests arrays and objects more than {MAX_JSON_DEPTH} deep; an "
                "inference request needs 3 levels around a tensor's data, and the data one "
                f"per dimension, at most {MAX_JSON_DEPTH - 3}",
            )
        cost = parse_cost(len(body), structure)
        if cost > self.limits.max_inflight_bytes:
            self.admission.refuse("body_too_large")
            return error_response(
                413,
                f"the body holds {structure.arrays} arrays and {structure.objects} objects, "
                f"which would take {cost} bytes to parse, more than the "
                f"{self.limits.max_inflight_bytes} the local API has for requests in flight",
                close=True,
            )
        if self._raise_now(charge, cost) or await self._raise(charge, cost):
            return None
        return self._over_budget()

    def release(self, charge: Charge) -> None:
        """Give back what ``charge`` holds and wake every request waiting for room."""
        if not charge.amount:
            return
        self.admission.release(charge.amount)
        charge.amount = 0
        if self._waiting:
            # Each waiting request tries its own charge again.
            self._freed.set()
            self._freed = asyncio.Event()

    def too_large(self) -> Response:
        """The refusal of a body over ``max_body_bytes``."""
        return error_response(
            413, f"the request body is over {self.limits.max_body_bytes} bytes", close=True
        )

    def _raise_now(self, charge: Charge, total: int, *, more: bool = True) -> bool:
        """:meth:`_raise` when there is room now, without waiting; ``False``: there is none."""
        cost = total - charge.amount
        if cost <= 0 and more:
            return True
        if not self.admission.try_charge(max(0, cost), more=more):
            return False
        charge.amount = total
        return True

    async def _raise(self, charge: Charge, total: int, *, more: bool = True) -> bool:
        """Raise ``charge`` to ``total`` bytes, waiting up to ``admission_wait_s`` for room.

        ``more``: the request was admitted before (see :meth:`Admission.try_charge`).
        """
        cost = max(0, total - charge.amount)
        if cost == 0 and more:
            return True
        if not self.admission.try_charge(cost, more=more):
            self._waiting += 1
            try:
                async with asyncio.timeout(self.limits.admission_wait_s):
                    while True:
                        await self._freed.wait()
                        if self.admission.try_charge(cost, more=more):
                            break
            except TimeoutError:
                return False
            finally:
                self._waiting -= 1
        charge.amount = total
        return True

    def _over_budget(self) -> Response:
        self.admission.refuse("inflight_bytes")
        return retry_later(
            f"the local API has {self.limits.max_inflight_bytes} bytes for requests in flight "
            f"and they are taken; retry after {self.limits.retry_after_s} s",
            self.limits.retry_after_s,
        )
