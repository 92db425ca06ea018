"""The devices of a virtual run: the real recorder and the real models, on the simulated clock.

Each device is a light object: its active and previous model, the real
:class:`~agent.telemetry.window.WindowRecorder` reading the simulated clock,
and the real :class:`~agent.ota.watchdog.Watchdog` over a new model's first
requests. The models are the sample models (``firmware_images/models``) built
into bundles as a release engineer builds them, each run by one interpreter
shared by every device: a device's answers are the real model's outputs on real
rows of :func:`firmware_images.datagen.generate`, drawn once per field condition
into a :class:`RowPool` and answered there in one batch per model.

What a device does with a window's requests follows the agent's rules: the
active model answers; an answer that is not finite is a failure, served by the
previous model (the fallback chain); while a new model is on trial the
watchdog counts those failures and rolls the device back on its own when they
are too many, and the install is committed once its health period has passed
without a rollback (:data:`HEALTH_PERIOD_S`). A device answers each request at its own moment of the
window; an install or a rollback closes the window under way, as the
recorder's rule 1 says.
"""

from __future__ import annotations

import hashlib
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from agent.ota.watchdog import Watchdog
from agent.telemetry.window import WindowPolicy, WindowRecorder
from firmware_images.datagen import FieldConditions, generate
from fleet_server.release.bundle_builder import BundleSpec, build_bundle, load_feature_file
from model_runtime.tflite import TFLiteModel, TFLiteRuntime
from protocol.manifest import Manifest
from protocol.messages import DeviceEvent
from protocol.window import WindowSummary
from simulator.scenario import Cohort, Scenario
from testbed.images import MODELS, temperature

NAME = "pump-health"
VERSIONS = {"v1": "1.0.0", "v2": "2.0.0", "v3-bad": "3.0.0"}
"""The version a sample model is released as unless a step names another."""

IDLE_SHARE = 0.05
"""The share of requests taken while a machine stands still, unless a cohort's drift says.

Real machines stop now and then; the sample models never saw such rows in
training, and v3-bad answers them with NaN — what its watchdog must catch."""

POOL_ROWS = 65_536
"""Rows drawn once per field condition, from which every window picks its requests."""

HEALTH_PERIOD_S = 300.0
"""How long a new model runs on trial before it is committed (the agent's ``health_period_s``).

A device is judged healthy at the end of a window: the first window to end at
least this long after the install commits it. The commit and the new model's
first window reach the server together, as they would with the agent's
one-minute windows; with longer windows a device committed mid-window would
report nothing on the new version for up to a window, which the sample-ratio
test rightly takes for a wave that does not report."""

BASE_LATENCY_MS = 5.0
"""A request's latency on a hardware profile without ``inference_ms``; times a log-normal."""

LATENCY_SIGMA = 0.25


@dataclass
class Model:
    """A released sample model: its manifest and the interpreter every device shares."""

    key: str  # v1, v2, v3-bad
    version: str
    manifest: Manifest
    runtime: TFLiteModel
    input_name: str
    output_name: str

    @property
    def label(self) -> str:
        """The bundle as devices report it (``"NAME VERSION"``)."""
        return f"{NAME} {self.version}"

    def scores(self, rows: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        return np.asarray(self.runtime.run({self.input_name: rows})[self.output_name])


def build_model(key: str, version: str, runtime: TFLiteRuntime) -> Model:
    """Build the sample model ``key`` into a bundle of ``version`` (in memory) and load it."""
    features, classes = load_feature_file(MODELS / "features.json")
    built = build_bundle(
        (MODELS / f"{key}.tflite").read_bytes(),
        MODELS / "baseline.npy",
        BundleSpec(
            name=NAME,
            version=version,
            hardware_ids=("rpi4-arm64",),
            feature_specs=features,
            classes=classes,
            temperature=temperature(key),
        ),
        calibration=MODELS / "heldout.npz",
    )
    manifest = built.manifest
    loaded = runtime.load(built.members[manifest.model_file])
    return Model(key, version, manifest, loaded, manifest.inputs[0].name, manifest.outputs[0].name)


def message_id(*parts: object) -> str:
    """A message id that follows from what the message is about: the same in every replay."""
    return hashlib.sha256("/".join(map(str, parts)).encode()).hexdigest()[:32]


class RowPool:
    """Rows of :func:`~firmware_images.datagen.generate` drawn once per field condition, and
    each model's answers to them, run in one batch by the shared interpreter.

    A window's requests are ``requests`` of the pool's rows picked at random (from
    the window's seed): real rows and the real model's real answers, without a
    call to the generator and the interpreter per window, which at 10,000 devices
    cost more than the rest of a device's window.
    """

    def __init__(self, seed: int, size: int = POOL_ROWS) -> None:
        self.seed = seed
        self.size = size
        self._rows: dict[str, npt.NDArray[np.float32]] = {}
        self._answers: dict[
            tuple[str, str], tuple[npt.NDArray[np.float32], npt.NDArray[np.bool_]]
        ] = {}

    def rows(self, conditions: FieldConditions) -> tuple[str, npt.NDArray[np.float32]]:
        key = repr((sorted(conditions.covariate_shift.items()), conditions.class_mix,
                    conditions.idle_share, conditions.noise_scale))  # fmt: skip
        if key not in self._rows:
            seed = int(message_id(self.seed, key)[:15], 16)
            self._rows[key] = generate(self.size, seed, conditions)[0]
        return key, self._rows[key]

    def answers(
        self, key: str, model: Model
    ) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.bool_]]:
        """``model``'s answers to the rows of ``key`` and, per row, whether they are finite."""
        if (key, model.version) not in self._answers:
            out = model.scores(self._rows[key])
            finite = np.isfinite(out).reshape(len(out), -1).all(axis=1)
            self._answers[key, model.version] = (out, finite)
        return self._answers[key, model.version]


@dataclass
class _Window:
    """The window under way: its rows and latencies, drawn once; its answers, by model version."""

    end: float
    pool: RowPool
    key: str
    picked: npt.NDArray[np.int64]  # the pool's rows, one per request
    rows: npt.NDArray[np.float32]
    latencies: npt.NDArray[np.float64]
    next: int = 0
    answers: dict[str, tuple[npt.NDArray[np.float32], list[bool]]] = field(default_factory=dict)

    def scores(self, model: Model) -> tuple[npt.NDArray[np.float32], list[bool]]:
        """``model``'s answers to the window's rows and, per row, whether it is finite."""
        if model.version not in self.answers:
            out, finite = self.pool.answers(self.key, model)
            self.answers[model.version] = (out[self.picked], finite[self.picked].tolist())
        return self.answers[model.version]


@dataclass
class Served:
    """What a device's requests have come to, summed."""

    requests: int = 0
    answered: int = 0
    by_fallback: int = 0
    unserved: int = 0  # answered by no verified model


@dataclass
class VirtualDevice:
    """One device: its models, recorder, trial and the install it is waiting for."""

    device_id: str
    cohort: Cohort
    hardware_ms: float
    active: Model
    clock_epoch: float
    pool: RowPool
    previous: Model | None = None
    desired: Model | None = None  # what the server assigned, when it differs from active
    fetched: bool = False  # the desired model is downloaded and verified: installed next
    trial: Watchdog | None = None
    trial_started: float = 0.0  # seconds into the run
    upcoming: deque[tuple[float, int, int]] = field(default_factory=deque)
    current: _Window | None = None
    now: float = 0.0  # seconds since the epoch, on the simulated clock
    served: Served = field(default_factory=Served)
    installs: dict[str, int] = field(default_factory=dict)
    links_down: int = 0  # link-down faults on the device now: it sends nothing while any is
    held: list[WindowSummary | DeviceEvent] = field(default_factory=list)  # its outbox
    held_fetch: str | None = None  # a download that could not finish while the link was down
    power_cuts: int = 0
    lost_requests: int = 0  # answered, but in a window a power cut lost
    recorder: WindowRecorder = field(init=False)

    def __post_init__(self) -> None:
        self.recorder = self._boot()

    def _boot(self) -> WindowRecorder:
        """The agent's recorder as it starts: an empty window of the active model."""
        policy = WindowPolicy(
            max_requests=1_000_000, max_seconds=1e9, buffer_rows=64, max_overhead=None
        )
        return WindowRecorder(self.active.manifest, self.device_id, policy, clock=lambda: self.now)

    def power_cut(self, t: float, window_s: float, events: list[DeviceEvent]) -> None:
        """Power fails at ``t`` (seconds into the run) and comes back at once: the window
        under way, kept in memory, is lost; the outbox, on disk, is not, and the model on
        trial stays on trial (the install journal is on disk too)."""
        self.serve_until(t, window_s, events)
        self.now = self.clock_epoch + t
        self.lost_requests += self.recorder.requests
        self.recorder = self._boot()
        self.power_cuts += 1

    def conditions(self, t: float) -> FieldConditions:
        drift = self.cohort.drift
        if drift is None or t < drift.at.total_seconds():
            return FieldConditions(idle_share=IDLE_SHARE)
        return FieldConditions(
            covariate_shift=dict(drift.covariate_shift),
            idle_share=drift.idle_share or IDLE_SHARE,
            noise_scale=drift.noise_scale,
        )

    def expect_window(self, t: float, requests: int, seed: int) -> None:
        """The device's next window ends at ``t`` with ``requests`` requests drawn from ``seed``."""
        self.upcoming.append((t, requests, seed))

    def serve_until(self, t: float, window_s: float, events: list[DeviceEvent]) -> None:
        """Answer the requests of the window under way that come at ``t`` (seconds into the
        run) or before; their rows and latencies are drawn when the window is first touched."""
        if not self.upcoming:
            return
        end, requests, seed = self.upcoming[0]
        if self.current is None:
            rng = np.random.default_rng(seed)
            key, rows = self.pool.rows(self.conditions(end))
            picked = rng.integers(0, len(rows), requests)
            latencies = self.hardware_ms * rng.lognormal(0.0, LATENCY_SIGMA, requests) / 1000.0
            self.current = _Window(end, self.pool, key, picked, rows[picked], latencies)
        window = self.current
        step = window_s / requests
        start = end - window_s
        i = window.next
        if self.trial is None:
            # No model on trial, so none changes mid-window: the active model's answers
            # hold for every request, and a finite one is recorded here without the
            # general path's look-ups (the same calls, in the same order).
            active, served, record = self.active, self.served, self.recorder.record
            answers, finite = window.scores(active)
            rows, latencies = window.rows, window.latencies
            inputs, outputs = active.input_name, active.output_name
            while i < requests and start + (i + 1) * step <= t + 1e-9:
                window.next = i + 1
                self.now = self.clock_epoch + start + (i + 1) * step
                if finite[i]:
                    served.requests += 1
                    served.answered += 1
                    record({inputs: rows[i : i + 1]}, {outputs: answers[i : i + 1]}, "active",
                           float(latencies[i]))  # fmt: skip
                else:
                    self._answer(rows[i : i + 1], window.scores, i, float(latencies[i]), events)
                i += 1
            return
        while i < requests and start + (i + 1) * step <= t + 1e-9:
            window.next = i + 1
            self.now = self.clock_epoch + start + (i + 1) * step
            self._answer(window.rows[i : i + 1], window.scores, i, float(window.latencies[i]),
                         events)  # fmt: skip
            i += 1

    def end_window(
        self, t: float, window_s: float
    ) -> tuple[list[WindowSummary], list[DeviceEvent]]:
        """Answer the rest of the window ending at ``t`` and hand out its summaries."""
        events: list[DeviceEvent] = []
        self.serve_until(t, window_s, events)
        self.upcoming.popleft()
        self.current = None
        self.now = self.clock_epoch + t
        if self.trial is not None and t - self.trial_started >= HEALTH_PERIOD_S:
            # Its health period passed without a rollback: committed, told at the window's
            # end, with the first window of the new model.
            events.append(self._committed())
        self.recorder.close_window(self.now)
        windows = []
        while (summary := self.recorder.poll(self.now)) is not None:
            windows.append(summary)
        return windows, events

    def _answer(
        self,
        row: npt.NDArray[np.float32],
        scores: Callable[[Model], tuple[npt.NDArray[np.float32], list[bool]]],
        i: int,
        latency_s: float,
        events: list[DeviceEvent],
    ) -> None:
        self.served.requests += 1
        active = self.active
        answers, finite = scores(active)  # the window's answers, one batch per model
        ok = finite[i]
        if self.trial is not None:
            why = self.trial.observe(ok, None if ok else "nan")
            if why is not None:
                events.append(self._rolled_back(why))
                active = self.active  # the model that ran before answers from now on
                answers, finite = scores(active)
                ok = finite[i]
        if ok:
            self.served.answered += 1
            self.recorder.record({active.input_name: row},
                                 {active.output_name: answers[i : i + 1]}, "active",
                                 latency_s)  # fmt: skip
            return
        previous = self.previous
        if previous is not None:
            fallback, fine = scores(previous)
            if fine[i]:
                self.served.answered += 1
                self.served.by_fallback += 1
                self.recorder.record(
                    {active.input_name: row}, {previous.output_name: fallback[i : i + 1]},
                    "previous", latency_s, model_version=previous.version,
                )  # fmt: skip
                return
        self.served.unserved += 1
        self.recorder.record_error(latency_s)

    # -- installs ------------------------------------------------------------------

    def install(self, t: float, window_s: float) -> list[DeviceEvent]:
        """Switch to the fetched model at ``t`` (seconds into the run); a return to the previous
        model (a fleet rollback) needs no trial: it ran here before."""
        events: list[DeviceEvent] = []
        desired = self.desired
        if desired is None or not self.fetched:
            return events
        self.serve_until(t, window_s, events)
        self.now = self.clock_epoch + t
        self.desired, self.fetched = None, False
        back = self.previous is not None and desired.version == self.previous.version
        self.previous, self.active = self.active, desired
        self.recorder.set_manifest(desired.manifest)
        if back:
            self.trial = None
            events.append(self._event("fleet-rolled-back", desired))
        else:
            self.trial = Watchdog()
            self.trial_started = t
        return events

    def _committed(self) -> DeviceEvent:
        self.trial = None
        self._count("committed")
        return self._event("committed", self.active)

    def _rolled_back(self, why: str) -> DeviceEvent:
        failed = self.active
        self.trial = None
        if self.previous is not None:
            self.active, self.previous = self.previous, failed
            self.recorder.set_manifest(self.active.manifest)
        self._count("rolled-back")
        return self._event("rolled-back", failed, reason=why)

    def _count(self, outcome: str) -> None:
        self.installs[outcome] = self.installs.get(outcome, 0) + 1

    def _event(self, event: str, model: Model, **details: Any) -> DeviceEvent:
        return DeviceEvent(
            device_id=self.device_id,
            message_id=message_id(self.device_id, event, model.version, self.now),
            sent_at=self.now,
            event=event,
            at=self.now,
            details={"bundle": model.label, **details},
        )


def hardware_ms(scenario: Scenario, cohort: Cohort) -> float:
    profile = next(h for h in scenario.hardware if h.id == cohort.hardware)
    return profile.inference_ms or BASE_LATENCY_MS
