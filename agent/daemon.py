"""``edge-agent run``: the agent's one event loop.

Tasks, all owned by one ``TaskGroup`` and stopped together on SIGTERM:
the local Open Inference Protocol API, the update loop (poll the director
through the child fetcher, which the poll gate spares while the director's
and the image repository's metadata are unchanged; install), the trial clock (commit after the
health period) and, when ``server.broker`` is set, the MQTT link. The
installer publishes models to the fallback chain; the chain reports every
stage attempt back to the installer's watchdog. A device with a director
also keeps the director's shadow (:mod:`agent.ota.shadow`), asked after each
update check, and runs it beside the active model on ``shadow.share`` of the
requests (:mod:`agent.serving.shadow`), its results counted in the windows.
It also follows the hybrid plan its director signs (:mod:`agent.ota.plan`),
asked at each update check before the install, dropped when it expires:
:meth:`AgentDaemon._follow_plan` is the one place the plan reaches the
serving chain.
The installer's events go to the link; a new desired state from the link
wakes the update loop early. The cloud stage (``[cloud] url``) authenticates
with the device id and the credential of its MQTT connection; under a hybrid
plan (``chain.set_hybrid_plan``) every request's route and every audit's
outcome are counted in the windows and the metrics.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import gc
import importlib
import json
import logging
import os
import signal
import sys
import time
from collections import deque
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent.api.admission import ApiLimits
from agent.api.http import LocalApi
from agent.config import AgentConfig
from agent.metrics import AgentMetrics
from agent.mqtt.settings import read_password
from agent.ota.durable import atomic_write
from agent.ota.faults import Faults
from agent.ota.installer import Installer
from agent.ota.parts import ProcessFetcher, SlotModel
from agent.ota.poll_gate import PollGate
from agent.serving.chain import Answer, ChainConfig, FallbackChain, ModelSlot
from agent.serving.cloud import CloudStage
from agent.serving.hybrid import AuditResult
from agent.serving.shadow import ShadowResult, ShadowRunner
from model_runtime import Runtime, default_runtime

if TYPE_CHECKING:
    # The parts that do not answer requests are built once the API listens (see
    # ``AgentDaemon.run``): their modules load then, not before the device serves.
    from agent.mqtt import MqttLink
    from agent.ota.answers import Why
    from agent.ota.plan import PlanKeeper
    from agent.ota.shadow import ShadowKeeper, ShadowModel
    from agent.telemetry import Outbox, WindowRecorder
    from protocol.hybrid import HybridPlan
    from protocol.messages import HybridPlanState

log = logging.getLogger(__name__)

SLOW_STOP_S = 5.0  # a stop taking longer logs what it still waits for
TICK_S = 0.2
TELEMETRY_TICK_S = 1.0
# Answers, audits and installer events kept for the telemetry and the link while they
# are built after the API listens (a fraction of a second); beyond this, the oldest go.
EARLY_KEPT = 1024
# The GIL's switch interval while those parts' modules load in a thread beside the API
# (benchmarks/BENCHMARKS.md, "Agent start without pydantic's plugin discovery").
BACKGROUND_SWITCH_INTERVAL_S = 0.0005


def _slot(model: SlotModel | None) -> ModelSlot | None:
    return ModelSlot(model.manifest, model.model) if model is not None else None


class AgentDaemon:
    """The running agent: serving, updates and the trial clock.

    What answers requests (the chain, the installer that recovers and checks
    the installed models, the local API) is built by the constructor. The
    parts that do not (telemetry, the shadow, the hybrid plan, the MQTT link)
    are built by the constructor too, unless ``serving_first``: then
    :meth:`run` builds them once the API listens, their modules loaded in a
    thread meanwhile, and the answers, audits and installer events of those
    first moments are kept for them (at most :data:`EARLY_KEPT` of each).
    No update check starts before they are built.
    """

    def __init__(
        self,
        config: AgentConfig,
        config_path: Path,
        runtime: Runtime | None = None,
        *,
        serving_first: bool = False,
    ) -> None:
        self.config = config
        cloud = None
        if config.cloud.url:
            # The endpoint knows the device by the credentials of its MQTT connection.
            cloud = CloudStage(
                config.cloud.url,
                config.cloud.model,
                timeout_s=config.cloud.timeout_s,
                username=config.device_id,
                password=read_password(config.credentials.password_file),
            )
        self.metrics = AgentMetrics()
        self.chain = FallbackChain(
            cloud=cloud,
            config=ChainConfig(max_audits_in_flight=config.cloud.max_audits_in_flight),
            counter=self.metrics.inference,
            hybrid_counter=self.metrics.hybrid,
        )
        self.recorder: WindowRecorder | None = None
        self.outbox: Outbox | None = None
        self.shadow: ShadowKeeper | None = None
        self.plan: PlanKeeper | None = None
        self.link: MqttLink | None = None
        self._plan_metrics_registered = False
        self._background_built = False
        # What the parts built after the API listens missed meanwhile (see the class).
        self._early_answers: deque[tuple[dict[str, Any], Answer, float]] = deque(maxlen=EARLY_KEPT)
        self._early_audits: deque[AuditResult] = deque(maxlen=EARLY_KEPT)
        self._early_events: deque[dict[str, object]] = deque(maxlen=EARLY_KEPT)
        if config.telemetry.enabled:
            self.chain.on_answer(self._record)
            self.chain.on_audit(self._record_audit)
        self.runtime = runtime or default_runtime()
        # One fetcher for the three questions of a poll: a child process, asked only
        # when the director's or the image repository's metadata may have changed.
        self.fetcher = PollGate(ProcessFetcher(config_path), config)
        self.installer = Installer.from_config(
            config,
            config_path,
            self.runtime,
            publish=self._serve_models,
            on_event=self._install_event,
            fetcher=self.fetcher,
        )
        self.chain.subscribe(self.installer.observe)
        # Set when the server says the assignment changed: check for updates now.
        self.wake = asyncio.Event()
        self._check_after_trial = False
        self.metrics.watch(chain=self.chain, gate=self.fetcher)
        self.api = LocalApi(
            self.chain,
            config.api.host,
            config.api.port,
            limits=ApiLimits.from_config(config.api),
            metrics=self.metrics,
        )
        self.started = time.monotonic()
        self._listening_after_s: float | None = None
        if not serving_first:
            self._build_background_parts()
        elif config.server.broker:
            # Read now what the link reads once: a file it cannot use stops the agent
            # before it serves, as when the link was built here.
            from agent.mqtt.settings import check_link_files

            check_link_files(config)

    def _build_background_parts(self) -> None:
        """Telemetry, the shadow keeper, the hybrid plan keeper and the MQTT link."""
        from agent.ota.plan import PlanKeeper
        from agent.ota.shadow import ShadowKeeper
        from agent.ota.shadow_steps import ShadowPolicy
        from agent.ota.shadow_store import ShadowStore
        from agent.telemetry import Outbox, WindowPolicy, WindowRecorder

        config = self.config
        telemetry = config.telemetry
        if telemetry.enabled:
            self.recorder = WindowRecorder(
                None,
                config.device_id,
                WindowPolicy(
                    max_requests=telemetry.window_max_requests,
                    max_seconds=telemetry.window_max_seconds,
                    max_overhead=telemetry.max_overhead or None,  # 0: summarise every request
                ),
            )
            if self.chain.manifest is not None:  # models were published before it existed
                self.recorder.set_manifest(self.chain.manifest)
            self.outbox = Outbox(
                config.data_dir / "outbox.db",
                max_bytes=telemetry.outbox_max_bytes,
                max_age_s=telemetry.outbox_max_age_s,
            )
        if config.director is not None:  # only a director lists a shadow
            installer = self.installer
            self.shadow = ShadowKeeper(
                store=ShadowStore(config.data_dir / "shadow"),
                runtime=self.runtime,
                fetcher=self.fetcher,
                publish=self._run_shadow,
                report=installer.record_event,
                installed_counter=lambda: installer.journal.installed_counter,
                policy=ShadowPolicy(config.update.poll_interval_s),
                faults=Faults(config.faults.hold_at),
            )
            # Only a director signs a hybrid plan; without one the device serves locally only.
            self.plan = PlanKeeper(
                fetcher=self.fetcher,
                on_plan=self._follow_plan,
                report=self.installer.record_event,
            )
        if config.server.broker:
            # Imported here: a device without a broker does not carry paho (about 2 MB).
            from agent.mqtt import MqttLink

            self.link = MqttLink(
                config,
                self.installer,
                self.chain,
                on_desired=lambda _: self.wake.set(),
                outbox=self.outbox,
                hybrid_plan=self._plan_state,
            )
        self.metrics.watch(outbox=self.outbox, link=self.link)
        self._background_built = True
        answers, self._early_answers = self._early_answers, deque(maxlen=EARLY_KEPT)
        for inputs, answer, seconds in answers:
            self._record(inputs, answer, seconds)
        audits, self._early_audits = self._early_audits, deque(maxlen=EARLY_KEPT)
        for audit in audits:
            self._record_audit(audit)
        events, self._early_events = self._early_events, deque(maxlen=EARLY_KEPT)
        if self.link is not None:
            for event in events:
                self.link.record(event)

    async def run(self, stop: asyncio.Event) -> None:
        """Serve until ``stop`` is set.

        The API listens as soon as the installed models are checked and
        loaded (:meth:`Installer.recover`); the rest is started behind it, and
        ``agent.json`` written once all of it runs (``ready_after_s``: when the API
        listened, from the constructor's end; ``started_after_s``: when all of it ran).
        A garbage collector the start held off is back on once the API listens
        (:func:`_collector_back_on`).
        """
        await self.installer.recover()
        await self.api.start()
        self._listening_after_s = time.monotonic() - self.started
        held = _collector_back_on()
        slow_stop: asyncio.Task[None] | None = None
        try:
            if not self._background_built:
                # The thread holds the GIL while it imports: a request served meanwhile
                # waits for it after each system call, up to the switch interval (5 ms by
                # default). Shorter while it runs, so the first answers are not held up.
                interval = sys.getswitchinterval()
                sys.setswitchinterval(min(interval, BACKGROUND_SWITCH_INTERVAL_S))
                try:
                    await asyncio.to_thread(_load_background_modules, self.config)
                finally:
                    sys.setswitchinterval(interval)
                self._build_background_parts()
            if held:
                gc.unfreeze()  # the start's objects collected as usual from now on
            if self.shadow is not None:
                await self.shadow.recover()
            self._announce()
            async with asyncio.TaskGroup() as tasks:
                tasks.create_task(self._update_loop(stop))
                tasks.create_task(self._trial_clock(stop))
                if self.recorder is not None:
                    tasks.create_task(self._telemetry(stop))
                if self.link is not None:
                    tasks.create_task(self.link.run(stop))
                await stop.wait()
                slow_stop = asyncio.create_task(_report_slow_stop(SLOW_STOP_S))
            # Only a clean stop gets here: a restart that follows is no crash of the model.
            self.installer.shutting_down_cleanly()
        finally:
            if held:
                gc.unfreeze()  # a stop before the parts were built: nothing stays frozen
            await self.api.close()
            if slow_stop is not None:
                slow_stop.cancel()

    def _announce(self) -> None:
        info = {
            "pid": os.getpid(),
            "api": self.api.url,
            # The API answered from ready_after_s; the parts behind it ran from started_after_s.
            "ready_after_s": round(self._listening_after_s or 0.0, 3),
            "started_after_s": round(time.monotonic() - self.started, 3),
        }
        atomic_write(self.config.data_dir / "agent.json", json.dumps(info).encode())
        log.info("ready: %s", info)

    def _serve_models(self, active: SlotModel | None, previous: SlotModel | None) -> None:
        self.chain.set_models(active=_slot(active), previous=_slot(previous))
        if self.recorder is not None:
            # A new model version starts a new window: summaries never mix versions.
            self.recorder.set_manifest(self.chain.manifest)
        _return_freed_memory()

    def _run_shadow(self, model: ShadowModel | None) -> None:
        runner = None
        if model is not None:
            runner = ShadowRunner(
                model.target.bundle_id,
                model.manifest,
                model.model,
                share=self.config.shadow.share,
                max_in_flight=self.config.shadow.max_in_flight,
                on_result=self._record_shadow,
            )
        self.chain.set_shadow(runner)

    def _record_shadow(self, result: ShadowResult) -> None:
        if self.recorder is None:
            return
        try:
            self.recorder.record_shadow(
                result.bundle_id,
                result.model_version,
                agreed=result.agreed,
                error=result.error,
                latency_s=result.latency_s,
            )
        except _window_record_error() as exc:
            log.debug("shadow result not counted: %s", exc)

    def _follow_plan(self, plan: HybridPlan | None, refusal: Why | None) -> None:
        """Hand the serving chain the hybrid plan to follow (``None``: serve locally only).

        Called by the plan keeper on every change (a new plan, one refused, one
        expired or withdrawn), never for a plan it did not check. ``refusal``
        says why a plan the director listed is not followed; the state reports it.
        """
        set_hybrid_plan = getattr(self.chain, "set_hybrid_plan", None)
        if set_hybrid_plan is not None:
            set_hybrid_plan(plan)
        elif plan is not None and plan.mode != "local":
            log.warning("plan %s: this chain cannot escalate; serving locally", plan.plan_id)
        if self.plan is not None and not self._plan_metrics_registered:
            # Registered with the first plan: a device that never gets one never imports
            # prometheus-client for it.
            self.metrics.registry.register(self.plan.metrics)
            self._plan_metrics_registered = True
        if self.link is not None:
            self.link.state_changed()

    def _plan_state(self) -> HybridPlanState | None:
        """The hybrid plan as the reported state names it (``None``: the director lists none)."""
        if self.plan is None:
            return None
        from agent.ota.plan import reported

        return reported(self.plan.state)

    async def _poll(self) -> str:
        """One update check, then the shadow's (a failing shadow check never stops updates).

        The hybrid plan is asked first: it takes a refresh, not a download, and
        applies whether or not a bundle changes.
        """
        if self.plan is not None:
            try:
                await self.plan.poll()
            except Exception:
                log.exception("plan check failed")
        outcome = await self.installer.poll()
        if self.shadow is not None:
            try:
                await self.shadow.poll()
            except Exception:
                log.exception("shadow check failed")
        return outcome

    def _record(self, inputs: dict[str, Any], answer: Answer, seconds: float) -> None:
        if self.recorder is None:  # telemetry is being built: count it once it is
            self._early_answers.append((inputs, answer, seconds))  # the oldest go beyond EARLY_KEPT
            return
        try:
            self.recorder.record(
                inputs,
                answer.outputs,
                answer.stage,
                seconds,
                model_version=answer.model_version,
                hybrid=answer.hybrid,
            )
        except _window_record_error() as exc:  # e.g. a request that straddled a model switch
            log.debug("not summarised: %s", exc)

    def _record_audit(self, result: AuditResult) -> None:
        if self.recorder is None:
            self._early_audits.append(result)
            return
        self.recorder.record_audit(result)

    async def _telemetry(self, stop: asyncio.Event) -> None:
        """Move closed windows into the outbox and tell the link; at the end, the last one."""
        from protocol.window import encode_window

        assert self.recorder is not None and self.outbox is not None
        while True:
            stopping = stop.is_set()
            if stopping:
                self.recorder.close_window()
            stored = False
            while (window := self.recorder.poll()) is not None:
                await asyncio.to_thread(
                    self.outbox.put, window.window_id, encode_window(window), window.end
                )
                stored = True
            if stored and self.link is not None:
                self.link.windows_waiting()
            if stopping:
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), TELEMETRY_TICK_S)

    def _install_event(self, event: dict[str, object]) -> None:
        self.metrics.installs.record(event)
        if self.link is not None:
            self.link.record(event)
        elif not self._background_built and self.config.server.broker:
            self._early_events.append(event)  # the link is being built: it sends them

    async def _update_loop(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            self.wake.clear()  # a desired state arriving during the poll wakes the next one
            poll = asyncio.create_task(self._poll())
            await _first_set(stop, done=poll)
            if not poll.done():
                # Stopping mid-check or mid-download: the journal makes it resumable,
                # as after a power cut, so the stop does not wait for the network.
                poll.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await poll
                log.info("update check interrupted by the stop; resumed at the next start")
                return
            try:
                outcome = poll.result()
                log.debug("update check: %s", outcome)
                if self.installer.in_trial and outcome == "trial in progress":
                    self._check_after_trial = True
            except Exception:  # one bad poll must not stop serving
                log.exception("update check failed")
            await _first_set(stop, self.wake, timeout=self.config.update.poll_interval_s)

    async def _trial_clock(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            self.installer.tick()
            if self.plan is not None:
                self.plan.tick()  # a plan past its expiry is dropped at once
            if self._check_after_trial and not self.installer.in_trial:
                # A check was put off by the trial (committed or rolled back by now):
                # do it now rather than at the next poll.
                self._check_after_trial = False
                self.wake.set()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), TICK_S)


# The modules of the parts built after the API listens (AgentDaemon._build_background_parts).
_BACKGROUND_MODULES = (
    "agent.telemetry.window",
    "agent.telemetry.outbox",
    "protocol.window",
    "agent.ota.shadow",
    "agent.ota.shadow_store",
    "agent.ota.plan",
    "protocol.messages",
)


def _load_background_modules(config: AgentConfig) -> None:
    """Import what the parts built after the API listens need (in a thread, while it serves)."""
    for name in _BACKGROUND_MODULES:
        importlib.import_module(name)
    if config.server.broker:
        importlib.import_module("agent.mqtt.link")


def _collector_back_on() -> bool:
    """Turn the garbage collector back on if the start held it off (``edge-agent run``).

    Everything the start built is frozen first (``gc.freeze``): turned on as it
    was, the collector's first pass would walk all of it while the API answers
    its first requests. :meth:`AgentDaemon.run` unfreezes it once the parts
    behind the API are built, so the start's garbage is collected as usual.
    Returns whether it was held off.
    """
    if gc.isenabled():
        return False
    gc.freeze()
    gc.enable()
    return True


def _window_record_error() -> type[Exception]:
    from agent.telemetry import WindowRecordError

    return WindowRecordError


def _return_freed_memory() -> None:
    """Give the heap's free pages back to the system (glibc's ``malloc_trim``; elsewhere nothing).

    Staging reads a whole bundle and the self-test runs the model on its golden
    vectors; what they freed stays in the process's heap unless trimmed (about
    1 MB after an install: benchmarks/BENCHMARKS.md, "Device side without pydantic").
    """
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return
    trim(0)


async def _report_slow_stop(after_s: float) -> None:
    """Log where each task still is when a stop takes longer than ``after_s``."""
    await asyncio.sleep(after_s)
    me = asyncio.current_task()
    for task in asyncio.all_tasks():
        if task is not me:
            frames = task.get_stack(limit=1)
            where = f"{frames[0].f_code.co_filename}:{frames[0].f_lineno}" if frames else "?"
            log.warning("stopping for over %.0f s; still running: %s at %s", after_s, task, where)


async def _first_set(
    *events: asyncio.Event, timeout: float | None = None, done: asyncio.Task[Any] | None = None
) -> None:
    """Return when any of ``events`` is set, ``done`` has finished, or after ``timeout`` s."""
    waiters: list[asyncio.Task[Any]] = [asyncio.create_task(e.wait()) for e in events]
    try:
        await asyncio.wait(
            [*waiters, *([done] if done is not None else [])],
            timeout=timeout,
            return_when=asyncio.FIRST_COMPLETED,
        )
    finally:
        for waiter in waiters:
            waiter.cancel()


def run_agent(config: AgentConfig, config_path: Path) -> int:
    """Run the agent until SIGTERM or SIGINT; returns the exit status.

    Called with the garbage collector disabled (as ``edge-agent run`` does from
    its start), it turns it back on once the API listens.
    """
    config.data_dir.mkdir(parents=True, exist_ok=True)

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        # The API answers as soon as the installed model is checked and loaded; the parts
        # that do not serve start behind it.
        await AgentDaemon(config, config_path, serving_first=True).run(stop)

    asyncio.run(main())
    return 0
