"""Prometheus metrics of one server process (text at ``/metrics``)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class Metrics:
    """The server's metrics in their own registry (tests run several servers in one process)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.devices_online = Gauge(
            "edgefleet_devices_online", "Devices whose presence is online", registry=self.registry
        )
        self.devices_registered = Gauge(
            "edgefleet_devices_registered",
            "Registered devices (decommissioned ones not counted)",
            registry=self.registry,
        )
        self.messages_ingested = Counter(
            "edgefleet_mqtt_messages_ingested_total",
            "Device messages stored, by channel",
            ["channel"],
            registry=self.registry,
        )
        self.messages_dropped = Counter(
            "edgefleet_mqtt_messages_dropped_total",
            "Device messages dropped, by reason",
            ["reason"],
            registry=self.registry,
        )
        self.api_latency = Histogram(
            "edgefleet_api_request_seconds",
            "REST API latency",
            ["method", "route", "status"],
            registry=self.registry,
        )
        self.audit_chain_intact = Gauge(
            "edgefleet_audit_chain_intact",
            "1 while the audit log extends the last head the server recorded, 0 once it does not",
            registry=self.registry,
        )
        self.drift_alerts_open = Gauge(
            "edgefleet_drift_alerts_open",
            "Open drift alerts (one per scope and model version), every scope",
            registry=self.registry,
        )
        self.accuracy_alerts_open = Gauge(
            "edgefleet_accuracy_alerts_open",
            "Open estimated-accuracy alerts, every scope",
            registry=self.registry,
        )
        self.estimated_accuracy = Gauge(
            "edgefleet_estimated_accuracy",
            "Accuracy estimated without labels (CBPE) fleet-wide over the trailing range, "
            "by model version",
            ["model", "version"],
            registry=self.registry,
        )
        self.measured_accuracy = Gauge(
            "edgefleet_measured_accuracy",
            "Accuracy measured on the labelled windows fleet-wide over the trailing range, "
            "by model version",
            ["model", "version"],
            registry=self.registry,
        )
        self.drift_features_drifting = Gauge(
            "edgefleet_drift_features_drifting",
            "Features with an open fleet-wide drift alert, by model version",
            ["model", "version"],
            registry=self.registry,
        )
        self.alert_notifications = Counter(
            "edgefleet_alert_notifications_total",
            "Alert webhook notifications, by result (delivered, failed, dropped)",
            ["result"],
            registry=self.registry,
        )
