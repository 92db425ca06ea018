"""How much of the device the local API may take: connections and bytes in flight.

An edge device has little memory, and a JSON request costs far more once
parsed than its body does, so the API admits work only within fixed limits
and answers the rest at once, cheaply, instead of queueing it in memory:

1. At most ``max_connections`` connections are served at a time. A
   connection beyond that is answered ``503`` with ``Retry-After`` and
   closed; nothing of its request is kept.
2. A body declared (``Content-Length``) or found (chunked) to be over
   ``max_body_bytes`` is answered ``413`` before it is read.
3. Before a body is read, its request is charged :func:`request_cost` — the
   body, its parsed JSON and its tensors at their largest for a body of that
   length — against ``max_inflight_bytes``; the charge is released when the
   response has been sent. A request whose charge does not fit waits up to
   ``admission_wait_s`` for others to finish (its body waits in the kernel's
   socket buffer, not in the process), then gets ``503`` with
   ``Retry-After``. A chunked body, whose length is known only at its end, is
   charged as its bytes arrive, and waits or is refused the same way when the
   next part does not fit.
4. The body must arrive within ``body_timeout_s`` of its admission, or the
   request gets ``408`` and its charge is released: a client that sends
   slowly cannot hold the budget.
5. Before a body is parsed, its structure is read (:mod:`agent.api.jsonscan`):
   JSON nested deeper than :data:`MAX_JSON_DEPTH` is refused (``400``), and a
   body with more arrays and objects than its charge covers is charged
   :func:`parse_cost` — each array and object at what parsing it costs — or
   refused (``413``) when that is more than the whole budget.

So the memory requests take is at most ``max_inflight_bytes`` plus a few
kilobytes per open connection. :class:`Admission` keeps the counts and
makes these decisions; it does no I/O and is not thread-safe (the API runs
on one event loop).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final, Literal

if TYPE_CHECKING:
    from agent.api.jsonscan import JsonStructure
    from agent.config import ApiConfig

# What parsing and decoding a request costs at its peak, measured (peak RSS, in
# a fresh process, `python -m benchmarks.agent_memory parse`) over the shapes
# JSON allows: the body and its parse (Python's json, then pydantic) cost at
# most 16 bytes per body byte for scalars (short strings, "0.0,"-style floats;
# numpy's copies of the tensor included), plus, per array, up to 96 bytes and
# per object up to 100 bytes beyond their share of the body ("[0]," is a list
# of 88 bytes and a slot in its parent). The charge rounds these up.
REQUEST_COST_FACTOR: Final = 20
ARRAY_COST: Final = 128
OBJECT_COST: Final = 256
# A request's own few arrays and objects (the request, its inputs, their shapes
# and data) are covered by the per-byte charge, which is above the scalars'
# worst (at 1.5 KB of body, its 4 spare bytes per byte pay for 16 of each).
ENVELOPE_COST: Final = 16 * (ARRAY_COST + OBJECT_COST)
# The deepest JSON an inference request needs: the request object, its
# "inputs" array and an input object around a tensor's data, which nests one
# array per dimension, at most protocol.inference.MAX_RANK (32; not imported
# here, to keep numpy out of processes that only read the configuration).
MAX_JSON_DEPTH: Final = 3 + 32

RefusalReason = Literal["connections", "inflight_bytes", "body_too_large", "body_timeout"]
REFUSAL_REASONS: Final[tuple[RefusalReason, ...]] = (
    "connections",
    "inflight_bytes",
    "body_too_large",
    "body_timeout",
)


def request_cost(body_bytes: int) -> int:
    """The bytes a request with a body of ``body_bytes`` is charged before its body is read.

    It holds any body of that length whose JSON has no more arrays and objects
    than a request's envelope; :func:`parse_cost` says what one with more costs.
    """
    return body_bytes * REQUEST_COST_FACTOR


def parse_cost(body_bytes: int, structure: JsonStructure) -> int:
    """What a body of ``body_bytes`` with ``structure`` costs to parse and decode, at most."""
    containers = structure.arrays * ARRAY_COST + structure.objects * OBJECT_COST
    return request_cost(body_bytes) + max(0, containers - ENVELOPE_COST)


@dataclass(frozen=True)
class ApiLimits:
    """The local API's limits; see the module docstring for what each bounds.

    ``max_inflight_bytes`` must hold at least one request of ``max_body_bytes``
    (:func:`request_cost`), or such a request could never be served.
    """

    max_connections: int = 64
    max_body_bytes: int = 4 * 1024 * 1024
    max_inflight_bytes: int = 80 * 1024 * 1024
    retry_after_s: int = 1
    admission_wait_s: float = 2.0
    body_timeout_s: float = 10.0

    @classmethod
    def from_config(cls, config: ApiConfig) -> ApiLimits:
        """The limits of the agent's ``[api]`` section (its fields of the same names)."""
        return cls(**{f.name: getattr(config, f.name) for f in dataclasses.fields(cls)})

    def __post_init__(self) -> None:
        if self.max_connections < 1 or self.max_body_bytes < 1:
            raise ValueError("max_connections and max_body_bytes must be at least 1")
        if self.retry_after_s < 1 or self.admission_wait_s < 0 or self.body_timeout_s <= 0:
            raise ValueError(
                "retry_after_s must be at least 1, admission_wait_s at least 0, "
                "body_timeout_s more than 0"
            )
        if self.max_inflight_bytes < request_cost(self.max_body_bytes):
            raise ValueError(
                f"max_inflight_bytes {self.max_inflight_bytes} cannot hold one request of "
                f"max_body_bytes {self.max_body_bytes}, which is charged "
                f"{request_cost(self.max_body_bytes)} (the body and its parsed form); "
                "raise max_inflight_bytes or lower max_body_bytes"
            )


@dataclass
class AdmissionCounters:
    """What the API admitted and refused since it started (cumulative, for ``/metrics``)."""

    connections_accepted: int = 0
    requests_admitted: int = 0
    refused: dict[RefusalReason, int] = dataclasses.field(
        default_factory=lambda: dict.fromkeys(REFUSAL_REASONS, 0)
    )
    peak_connections: int = 0
    peak_inflight_bytes: int = 0


class Admission:
    """The open connections and the bytes charged to requests in flight, against the limits."""

    def __init__(self, limits: ApiLimits) -> None:
        self.limits = limits
        self.connections = 0
        self.inflight_bytes = 0
        self._counters = AdmissionCounters()

    @property
    def counters(self) -> AdmissionCounters:
        """A copy of the counters."""
        c = self._counters
        return dataclasses.replace(c, refused=dict(c.refused))

    def open_connection(self) -> bool:
        """Take a connection slot; ``False`` (counted as refused) when all are taken."""
        if self.connections >= self.limits.max_connections:
            self.refuse("connections")
            return False
        self.connections += 1
        self._counters.connections_accepted += 1
        self._counters.peak_connections = max(self._counters.peak_connections, self.connections)
        return True

    def close_connection(self) -> None:
        """Give back a slot :meth:`open_connection` took."""
        if self.connections <= 0:
            raise RuntimeError("close_connection() without an open connection")
        self.connections -= 1

    def body_allowed(self, body_bytes: int) -> bool:
        """Whether a body of ``body_bytes`` is within ``max_body_bytes`` (counted when not)."""
        if body_bytes > self.limits.max_body_bytes:
            self.refuse("body_too_large")
            return False
        return True

    def try_charge(self, cost: int, *, more: bool = False) -> bool:
        """Charge ``cost`` bytes if they fit in the budget now; the caller waits or refuses.

        ``more``: the bytes add to the charge of a request already admitted
        (its chunked body grew, or its JSON has more arrays than its charge
        covers), which is not counted as another admission.
        """
        if cost < 0:
            raise ValueError(f"a charge cannot be negative: {cost}")
        if self.inflight_bytes + cost > self.limits.max_inflight_bytes:
            return False
        self.inflight_bytes += cost
        if not more:
            self._counters.requests_admitted += 1
        self._counters.peak_inflight_bytes = max(
            self._counters.peak_inflight_bytes, self.inflight_bytes
        )
        return True

    def release(self, cost: int) -> None:
        """Give back a charge :meth:`try_charge` made."""
        if cost < 0 or cost > self.inflight_bytes:
            raise RuntimeError(f"release of {cost} bytes, {self.inflight_bytes} are charged")
        self.inflight_bytes -= cost

    def refuse(self, reason: RefusalReason) -> None:
        """Count a request refused for ``reason``."""
        self._counters.refused[reason] += 1

    def metrics(self) -> str:
        """The figures as Prometheus text (``GET /metrics``)."""
        c = self._counters
        lines = [
            "# HELP edgefleet_agent_api_connections Connections the local API serves now.",
            "# TYPE edgefleet_agent_api_connections gauge",
            f"edgefleet_agent_api_connections {self.connections}",
            "# HELP edgefleet_agent_api_max_connections Connections it serves at most.",
            "# TYPE edgefleet_agent_api_max_connections gauge",
            f"edgefleet_agent_api_max_connections {self.limits.max_connections}",
            "# HELP edgefleet_agent_api_inflight_bytes Bytes charged to requests in flight.",
            "# TYPE edgefleet_agent_api_inflight_bytes gauge",
            f"edgefleet_agent_api_inflight_bytes {self.inflight_bytes}",
            "# HELP edgefleet_agent_api_max_inflight_bytes The budget for requests in flight.",
            "# TYPE edgefleet_agent_api_max_inflight_bytes gauge",
            f"edgefleet_agent_api_max_inflight_bytes {self.limits.max_inflight_bytes}",
            "# HELP edgefleet_agent_api_peak_inflight_bytes The most ever charged at once.",
            "# TYPE edgefleet_agent_api_peak_inflight_bytes gauge",
            f"edgefleet_agent_api_peak_inflight_bytes {c.peak_inflight_bytes}",
            "# HELP edgefleet_agent_api_connections_accepted_total Connections served.",
            "# TYPE edgefleet_agent_api_connections_accepted_total counter",
            f"edgefleet_agent_api_connections_accepted_total {c.connections_accepted}",
            "# HELP edgefleet_agent_api_requests_admitted_total Request bodies admitted.",
            "# TYPE edgefleet_agent_api_requests_admitted_total counter",
            f"edgefleet_agent_api_requests_admitted_total {c.requests_admitted}",
            "# HELP edgefleet_agent_api_refused_total Requests refused over a limit, by limit.",
            "# TYPE edgefleet_agent_api_refused_total counter",
            *(
                f'edgefleet_agent_api_refused_total{{limit="{reason}"}} {count}'
                for reason, count in c.refused.items()
            ),
        ]
        return "\n".join(lines) + "\n"
