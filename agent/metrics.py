"""The agent's own metrics, as Prometheus text on the local API's ``GET /metrics``.

Every figure lives where the agent already keeps it, or in a plain count
here, and is turned into metric families only when scraped: the inference
path pays an addition and a bisection per request (prometheus-client's
``Histogram.observe`` and ``Counter.inc`` take a lock each, about five times
as long; see ``benchmarks/BENCHMARKS.md``), the outbox and the MQTT link are
read at scrape time, never updated on writes. Each agent has its own
:class:`~prometheus_client.CollectorRegistry` (tests run several agents in one
process), and no ``_created`` series (they would double the series a small
device sends).

Metrics, all named ``edgefleet_agent_*``:

- ``inference_requests_total{stage, outcome}``: requests the fallback chain
  answered, by the stage that answered (``active``, ``previous``, ``cloud``,
  ``safe_default``; outcome ``ok``), and those it could not take (stage
  ``none``; outcome ``client_error`` for a request that breaks the model's
  contract or names an unknown model or version, ``unavailable`` when no
  model is installed or the API's memory budget is taken);
- ``inference_duration_seconds{stage}``: the answered requests' time in the
  chain (validation and every stage tried), 100 µs to 5 s;
- ``installs_total{result}``: ``installed`` (the new model went active),
  ``committed``, ``rolled_back``, ``refused``, ``fleet_rolled_back`` (the fleet
  sent it back to the bundle its other slot held);
- ``install_refusals_total{reason}`` and ``install_rollbacks_total{reason}``:
  by the installer's reason code (a bounded set; anything else counts as
  ``other``);
- ``telemetry_outbox_windows`` and ``telemetry_outbox_bytes``: windows waiting
  for the server's acknowledgement; ``telemetry_outbox_dropped_windows_total{reason}``;
- ``mqtt_connected`` (1 or 0) and ``mqtt_reconnects_total``, with a broker;
- ``model_info{slot, name, version}``: 1 for each model the chain serves
  (``slot`` is ``active`` or ``previous``);
- with a shadow model running beside the active one (a rollout's shadow
  stage): ``shadow_info{bundle_id, version}`` 1, and
  ``shadow_requests_total{outcome}``, the active model's answers offered to
  it since it was loaded: ``ran``, ``skipped`` (drawn while it was busy) and
  ``not_drawn`` (outside its share);
- ``hybrid_requests_total{route}``: requests served under a hybrid plan, by
  route: ``local`` (answered on the device as the plan says), ``escalated``
  (sent to the cloud), ``kept_local_quota`` (would have gone, but the quota,
  a back-off or the cloud's open breaker said no), and ``audit`` (confident
  requests also sent to the cloud to measure agreement; not requests of their own);
- ``hybrid_cloud_errors_total{kind}``: cloud calls under a plan that gave no
  usable answer, by kind (``rate_limited``, ``timeout``, ``unavailable``,
  ``server_error``, ``bad_answer``);
- ``hybrid_plan_info{plan_id, mode}``: 1 while the device follows a plan
  (none before one arrives or after it expired);
- ``update_questions_total{answered_by}``: the questions of the update polls
  (the plan, the assignment, the shadow, a download), by who answered:
  ``fetcher`` (a child process verified the metadata) or ``poll_gate`` (the
  metadata was unchanged: the last child's answer, :mod:`agent.ota.poll_gate`).

The counts are kept on the agent's event loop and are not locked.
"""

from __future__ import annotations

import logging
from bisect import bisect_left
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Final, Literal

from agent.ota.errors import refusal_kinds
from agent.serving.hybrid import ROUTES, AuditResult, Route
from protocol.hybrid import CLOUD_ERROR_KINDS, CloudErrorKind
from protocol.inference import STAGE_NAMES, StageName

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry
    from prometheus_client.metrics_core import Metric

    from agent.mqtt import MqttLink
    from agent.ota.poll_gate import PollGate
    from agent.serving.chain import FallbackChain
    from agent.telemetry.outbox import Outbox

logger = logging.getLogger(__name__)

PREFIX: Final = "edgefleet_agent_"
# Edge models answer in tens of microseconds to seconds.
LATENCY_BUCKETS_S: Final = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
)
RequestOutcome = Literal["client_error", "unavailable"]
REQUEST_OUTCOMES: Final[tuple[RequestOutcome, ...]] = ("client_error", "unavailable")
INSTALL_RESULTS: Final = ("installed", "committed", "rolled_back", "refused", "fleet_rolled_back")
# The installer's event for each result.
_INSTALL_EVENTS: Final = {
    "switched": "installed",
    "committed": "committed",
    "rolled-back": "rolled_back",
    "refused": "refused",
    "fleet-rolled-back": "fleet_rolled_back",
}
ROLLBACK_REASONS: Final = ("watchdog", "crash-loop", "other")


def refusal_reasons() -> tuple[str, ...]:
    """Every reason code an install can be refused for, and ``other``."""
    codes = {cls.reason for cls in refusal_kinds()}
    codes.add("staging-failed")  # the device's storage failed while staging
    return (*sorted(codes), "other")


class InferenceMetrics:
    """Requests the chain answered or could not take, and the answered ones' latency.

    :meth:`answered` and :meth:`refused` are the hot path: a few list and dict
    operations, no lock (they are called on the event loop).
    """

    def __init__(self) -> None:
        self._bounds = LATENCY_BUCKETS_S
        self._le = tuple(repr(float(bound)) for bound in self._bounds)  # 0.0001, ..., 5.0
        # Per stage: observations per bucket (the last past the largest bound), and their sum.
        self._buckets: dict[StageName, list[int]] = {
            stage: [0] * (len(self._bounds) + 1) for stage in STAGE_NAMES
        }
        self._sums: dict[StageName, float] = dict.fromkeys(STAGE_NAMES, 0.0)
        self._refused: dict[RequestOutcome, int] = dict.fromkeys(REQUEST_OUTCOMES, 0)

    def answered(self, stage: StageName, seconds: float) -> None:
        """Count a request ``stage`` answered after ``seconds`` in the chain."""
        self._buckets[stage][bisect_left(self._bounds, seconds)] += 1
        self._sums[stage] += seconds

    def refused(self, outcome: RequestOutcome) -> None:
        """Count a request no stage ran for."""
        self._refused[outcome] += 1

    def answered_by(self) -> dict[StageName, int]:
        """Requests answered so far, per stage."""
        return {stage: sum(counts) for stage, counts in self._buckets.items()}

    def collect(self) -> Iterator[Metric]:
        from prometheus_client.metrics_core import CounterMetricFamily, HistogramMetricFamily

        requests = CounterMetricFamily(
            PREFIX + "inference_requests",
            "Inference requests, by the fallback-chain stage that answered (none: refused "
            "before any stage ran) and outcome",
            labels=["stage", "outcome"],
        )
        latency = HistogramMetricFamily(
            PREFIX + "inference_duration_seconds",
            "Time answered requests spent in the fallback chain, by the stage that answered",
            labels=["stage"],
        )
        for stage, counts in self._buckets.items():
            counts = list(counts)
            cumulative, buckets = 0, []
            for le, count in zip(self._le, counts, strict=False):
                cumulative += count
                buckets.append((le, cumulative))
            buckets.append(("+Inf", cumulative + counts[-1]))
            requests.add_metric([stage, "ok"], buckets[-1][1])
            latency.add_metric([stage], buckets, self._sums[stage])
        for outcome, count in self._refused.items():
            requests.add_metric(["none", outcome], count)
        yield requests
        yield latency


class HybridMetrics:
    """Requests by hybrid route, audits and cloud errors by kind (the chain's ``HybridCounter``)."""

    def __init__(self) -> None:
        self.routes: dict[str, int] = dict.fromkeys((*ROUTES, "audit"), 0)
        self.cloud_errors: dict[CloudErrorKind, int] = dict.fromkeys(CLOUD_ERROR_KINDS, 0)

    def route(self, route: Route) -> None:
        """Count one request served under a plan."""
        self.routes[route.route] += 1
        if route.cloud_error is not None:
            self.cloud_errors[route.cloud_error] += 1

    def audit(self, result: AuditResult) -> None:
        """Count one audit sent to the cloud."""
        self.routes["audit"] += 1
        if result.cloud_error is not None:
            self.cloud_errors[result.cloud_error] += 1

    def collect(self) -> Iterator[Metric]:
        from prometheus_client.metrics_core import CounterMetricFamily

        routes = CounterMetricFamily(
            PREFIX + "hybrid_requests",
            "Requests served under a hybrid plan, by route: local, escalated, kept_local_quota; "
            "audit: confident requests also sent to the cloud",
            labels=["route"],
        )
        for name, count in self.routes.items():
            routes.add_metric([name], count)
        errors = CounterMetricFamily(
            PREFIX + "hybrid_cloud_errors",
            "Cloud calls under a hybrid plan that gave no usable answer, by kind",
            labels=["kind"],
        )
        for kind, count in self.cloud_errors.items():
            errors.add_metric([kind], count)
        yield from (routes, errors)


class InstallMetrics:
    """Install results and reasons, counted from the installer's events."""

    def __init__(self) -> None:
        self._results = dict.fromkeys(INSTALL_RESULTS, 0)
        self._refusals = dict.fromkeys(refusal_reasons(), 0)
        self._rollbacks = dict.fromkeys(ROLLBACK_REASONS, 0)

    def record(self, event: Mapping[str, object]) -> None:
        """Count one installer event (``{"event": ..., "reason": ...}``); others are ignored."""
        result = _INSTALL_EVENTS.get(str(event.get("event")))
        if result is None:
            return
        self._results[result] += 1
        reason = str(event.get("reason"))
        if result == "refused":
            self._refusals[reason if reason in self._refusals else "other"] += 1
        elif result == "rolled_back":
            self._rollbacks[reason if reason in self._rollbacks else "other"] += 1

    def collect(self) -> Iterator[Metric]:
        from prometheus_client.metrics_core import CounterMetricFamily

        results = CounterMetricFamily(
            PREFIX + "installs",
            "Installs by result: installed (the new model went active), committed, "
            "rolled_back, refused, fleet_rolled_back",
            labels=["result"],
        )
        for result, count in self._results.items():
            results.add_metric([result], count)
        refusals = CounterMetricFamily(
            PREFIX + "install_refusals", "Installs refused, by reason code", labels=["reason"]
        )
        for reason, count in self._refusals.items():
            refusals.add_metric([reason], count)
        rollbacks = CounterMetricFamily(
            PREFIX + "install_rollbacks", "Installs rolled back, by reason", labels=["reason"]
        )
        for reason, count in self._rollbacks.items():
            rollbacks.add_metric([reason], count)
        yield from (results, refusals, rollbacks)


class AgentMetrics:
    """One agent's metrics in a registry of its own; :meth:`exposition` renders them."""

    def __init__(self) -> None:
        self.inference = InferenceMetrics()
        self.installs = InstallMetrics()
        self.hybrid = HybridMetrics()
        self._chain: FallbackChain | None = None
        self._outbox: Outbox | None = None
        self._link: MqttLink | None = None
        self._gate: PollGate | None = None
        self._registry: CollectorRegistry | None = None

    @property
    def registry(self) -> CollectorRegistry:
        """The agent's own registry; made, and prometheus-client imported, when first needed."""
        if self._registry is None:
            from prometheus_client import CollectorRegistry

            self._registry = CollectorRegistry()
            self._registry.register(self)
        return self._registry

    def watch(
        self,
        *,
        chain: FallbackChain | None = None,
        outbox: Outbox | None = None,
        link: MqttLink | None = None,
        gate: PollGate | None = None,
    ) -> None:
        """At each scrape, read what ``chain`` serves, ``outbox``'s depth, ``link``'s state,
        and who answered ``gate``'s questions."""
        self._chain = chain or self._chain
        self._outbox = outbox or self._outbox
        self._link = link or self._link
        self._gate = gate or self._gate

    def exposition(self) -> bytes:
        """The metrics as Prometheus text (format 0.0.4)."""
        from prometheus_client.exposition import generate_latest

        return generate_latest(self.registry)

    def collect(self) -> Iterator[Metric]:
        """Every family, read now (the registry calls this at each scrape)."""
        from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily

        yield from self.inference.collect()
        yield from self.installs.collect()
        yield from self.hybrid.collect()
        if self._chain is not None:
            yield self._models(self._chain)
            yield from self._shadow(self._chain)
            yield self._plan(self._chain)
        if self._outbox is not None:
            yield from self._outbox_depth(self._outbox)
        if self._link is not None:
            connected = GaugeMetricFamily(
                PREFIX + "mqtt_connected", "1 while connected to the MQTT broker, else 0"
            )
            connected.add_metric([], 1 if self._link.connected else 0)
            reconnects = CounterMetricFamily(
                PREFIX + "mqtt_reconnects", "Connections to the broker after the first"
            )
            reconnects.add_metric([], self._link.reconnects)
            yield from (connected, reconnects)
        if self._gate is not None:
            questions = CounterMetricFamily(
                PREFIX + "update_questions",
                "Questions of the update polls, by who answered: a fetcher child process, "
                "or the poll gate while the metadata was unchanged",
                labels=["answered_by"],
            )
            questions.add_metric(["fetcher"], self._gate.asked)
            questions.add_metric(["poll_gate"], self._gate.repeated)
            yield questions

    @staticmethod
    def _models(chain: FallbackChain) -> Metric:
        from prometheus_client.metrics_core import GaugeMetricFamily

        info = GaugeMetricFamily(
            PREFIX + "model_info",
            "The models the fallback chain serves: 1 per slot (active, previous)",
            labels=["slot", "name", "version"],
        )
        for slot, model in zip(("active", "previous"), chain.slots, strict=True):
            if model is not None:
                info.add_metric([slot, model.manifest.name, model.manifest.version], 1)
        return info

    @staticmethod
    def _plan(chain: FallbackChain) -> Metric:
        from prometheus_client.metrics_core import GaugeMetricFamily

        info = GaugeMetricFamily(
            PREFIX + "hybrid_plan_info",
            "The hybrid plan the device follows (none: no plan, or it expired)",
            labels=["plan_id", "mode"],
        )
        plan = chain.hybrid_plan
        if plan is not None:
            info.add_metric([plan.plan_id, plan.mode], 1)
        return info

    @staticmethod
    def _shadow(chain: FallbackChain) -> Iterator[Metric]:
        from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily

        shadow = chain.shadow
        if shadow is None:
            return
        info = GaugeMetricFamily(
            PREFIX + "shadow_info",
            "The shadow model run beside the active one without serving its answers",
            labels=["bundle_id", "version"],
        )
        info.add_metric([shadow.bundle_id, shadow.version], 1)
        requests = CounterMetricFamily(
            PREFIX + "shadow_requests",
            "Answers of the active model offered to the shadow since it was loaded, by outcome",
            labels=["outcome"],
        )
        not_drawn = shadow.offered - shadow.ran - shadow.skipped
        for outcome, count in (
            ("ran", shadow.ran),
            ("skipped", shadow.skipped),
            ("not_drawn", not_drawn),
        ):
            requests.add_metric([outcome], count)
        yield from (info, requests)

    @staticmethod
    def _outbox_depth(outbox: Outbox) -> Iterator[Metric]:
        from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily

        # Here, not at the top: the outbox (and sqlite3) loads after the API listens.
        from agent.telemetry.outbox import OutboxError

        try:
            stats = outbox.stats()
        except OutboxError as exc:  # the rest of the scrape still answers
            logger.warning("metrics: the outbox cannot be read: %s", exc)
            return
        windows = GaugeMetricFamily(
            PREFIX + "telemetry_outbox_windows",
            "Telemetry windows waiting for the server's acknowledgement",
        )
        windows.add_metric([], stats.pending)
        size = GaugeMetricFamily(
            PREFIX + "telemetry_outbox_bytes", "Bytes of the windows waiting in the outbox"
        )
        size.add_metric([], stats.pending_bytes)
        dropped = CounterMetricFamily(
            PREFIX + "telemetry_outbox_dropped_windows",
            "Windows dropped from the outbox over a bound (size or age), over the outbox's life",
            labels=["reason"],
        )
        for reason, count in stats.dropped.items():
            dropped.add_metric([reason], count)
        yield from (windows, size, dropped)
