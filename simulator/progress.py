"""What a running simulation shows: a progress line on the terminal, Prometheus metrics.

:class:`ProgressLine` rewrites one line in place on a terminal (devices
online, installs under way, windows produced and stored, faults active) and,
when its stream is no terminal (a CI log), prints a plain line every
:data:`PLAIN_EVERY_S` seconds instead. :class:`Metrics` exposes the same
figures on an HTTP port for Prometheus, from a registry of its own, so
nothing else of the process leaks into them.
"""

from __future__ import annotations

import time
from typing import Any, TextIO

from prometheus_client import CollectorRegistry, Gauge, start_http_server

from simulator.report import Sample
from simulator.scenario import FAULT_KINDS

PLAIN_EVERY_S = 10.0


def progress_text(sample: Sample, devices: int, duration_s: float) -> str:
    """One line: where the run is and what the fleet does."""
    text = (
        f"{sample.t:5.0f}/{duration_s:.0f} s  online {sample.online}/{devices}  "
        f"serving {sample.serving}  installing {sample.installing}  "
        f"requests {sample.requests:,}  windows {sample.windows_stored:,}/"
        f"{sample.windows_produced:,} stored"
    )
    if sample.cloud_answers:
        text += f"  cloud {sample.cloud_answers:,}"
    if sample.versions:
        text += f"  [{sample.versions}]"
    if sample.faults_active:
        text += f"  faults: {sample.faults_active}"
    return text


class ProgressLine:
    """The run's progress on ``stream``: in place on a terminal, else a plain line now and then."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.tty = stream.isatty()
        self._last_plain = -PLAIN_EVERY_S
        self._shown = False

    def show(self, sample: Sample, devices: int, duration_s: float) -> None:
        text = progress_text(sample, devices, duration_s)
        if self.tty:
            self.stream.write("\r\x1b[2K" + text)
            self._shown = True
        elif time.monotonic() - self._last_plain >= PLAIN_EVERY_S:
            self._last_plain = time.monotonic()
            self.stream.write(text + "\n")
        self.stream.flush()

    def done(self) -> None:
        """End the line in place, so what follows starts on its own."""
        if self.tty and self._shown:
            self.stream.write("\n")
            self.stream.flush()
            self._shown = False


class Metrics:
    """The run's figures for Prometheus on ``port`` (``/metrics``), from their own registry."""

    def __init__(self, port: int, host: str = "127.0.0.1") -> None:
        self.registry = CollectorRegistry()

        def gauge(name: str, doc: str, labels: tuple[str, ...] = ()) -> Gauge:
            return Gauge(f"fleetsim_{name}", doc, labels, registry=self.registry)

        self.devices = gauge("devices", "simulated devices in the run")
        self.online = gauge("devices_online", "devices connected to the broker")
        self.serving = gauge("devices_serving", "devices with a verified model to serve")
        self.installing = gauge("devices_installing", "devices with an install under way")
        self.requests = gauge("requests_answered", "requests answered so far")
        self.produced = gauge("windows_produced", "telemetry windows the devices closed")
        self.stored = gauge("windows_stored", "telemetry windows the server stored")
        self.cloud = gauge("cloud_answers", "answers the cloud endpoint gave")
        self.faults = gauge("fault_active", "1 while a fault of this kind is active", ("kind",))
        self.versions = gauge("devices_version", "devices running each version", ("version",))
        self.elapsed = gauge("elapsed_seconds", "seconds since the traffic started")
        self._server: Any
        self._server, self._thread = start_http_server(port, host, registry=self.registry)
        self.port = port

    def update(self, sample: Sample, devices: int) -> None:
        self.devices.set(devices)
        self.online.set(sample.online)
        self.serving.set(sample.serving)
        self.installing.set(sample.installing)
        self.requests.set(sample.requests)
        self.produced.set(sample.windows_produced)
        self.stored.set(sample.windows_stored)
        self.cloud.set(sample.cloud_answers)
        self.elapsed.set(sample.t)
        active = set(filter(None, sample.faults_active.split(";")))
        for kind in FAULT_KINDS:
            self.faults.labels(kind).set(1 if kind in active else 0)
        for item in filter(None, sample.versions.split(";")):
            version, _, count = item.partition("=")
            self.versions.labels(version).set(float(count))

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
