"""The shadow install's keeper: carries out its rules with its folder, the runtime and fetcher.

The rules are :mod:`agent.ota.shadow_steps`; the folder, written whole or not
at all, :mod:`agent.ota.shadow_store`. Nothing here touches the A/B slots or
the install journal.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from agent.ota import shadow_steps as st
from agent.ota.answers import ShadowAnswer
from agent.ota.errors import SelfTestFailed, UpdateRefused
from agent.ota.journal import InstallTarget
from agent.ota.selftest import self_test
from agent.ota.shadow_store import ShadowStore, ShadowStoreError
from model_runtime import LoadedModel, Runtime
from protocol.manifest import Manifest


@dataclass(frozen=True)
class ShadowModel:
    """A shadow model loaded and self-tested beside the active model, ready to run."""

    target: InstallTarget
    manifest: Manifest
    model: LoadedModel


class ShadowFetcher(Protocol):
    """Asks the director for this device's shadow and downloads it, verified."""

    async def shadow(self, installed_counter: int, known: Collection[str]) -> ShadowAnswer:
        """The shadow's answer; ``known`` are the bundle ids not to download."""
        ...


class Hold(Protocol):
    def hold(self, step: str) -> None: ...


PublishShadow = Callable[[ShadowModel | None], None]
ReportEvent = Callable[[str, dict[str, object]], None]

_AWAITED = (st.AskShadow, st.WriteShadow, st.TestShadow)


class ShadowKeeper:
    """Carries out :func:`~agent.ota.shadow_steps.decide_shadow`'s effects.

    ``publish`` hands the serving chain the shadow model to run (``None``: stop
    running one); ``report`` records an event; ``installed_counter`` reads the
    installed release counter, below which no shadow is accepted; ``policy``
    paces retries on the agent's ``clock``.
    """

    def __init__(
        self,
        *,
        store: ShadowStore,
        runtime: Runtime,
        fetcher: ShadowFetcher,
        publish: PublishShadow,
        report: ReportEvent,
        installed_counter: Callable[[], int],
        policy: st.ShadowPolicy,
        clock: Callable[[], float] = time.time,
        faults: Hold | None = None,
    ) -> None:
        self.store = store
        self.runtime = runtime
        self.fetcher = fetcher
        self.publish = publish
        self.report = report
        self.installed_counter = installed_counter
        self.policy = policy
        self.clock = clock
        self.faults = faults
        self.state = st.ShadowState()
        self.model: ShadowModel | None = None  # the model running, or the one just tested
        self._lock = asyncio.Lock()

    async def recover(self) -> None:
        """Remove what a power cut left half written; self-test a whole shadow before it runs."""
        async with self._lock:
            held, refused = await asyncio.to_thread(self._held)
            await self._handle(st.ShadowStarted(held, refused))

    def _held(self) -> tuple[InstallTarget | None, str | None]:
        if self.store.directory.exists():
            self.store.discard_leftovers()
        return self.store.held(), self.store.refusal()

    async def poll(self) -> st.ShadowPhase:
        """Ask the director for the shadow (unless backing off) and carry out its answer."""
        async with self._lock:
            await self._handle(st.ShadowPoll())
            return self.state.phase

    async def _handle(self, event: st.ShadowEvent | None) -> None:
        while event is not None:
            self.state, effects = st.decide_shadow(self.state, event, self.clock(), self.policy)
            event = None
            for effect in effects:
                assert event is None, "only the last effect of a step leads to an event"
                if isinstance(effect, _AWAITED):
                    event = await self._awaited(effect)
                else:
                    self._do(effect)

    def _do(self, effect: st.ShadowEffect) -> None:
        match effect:
            case st.RunShadow():
                assert self.model is not None
                self.publish(self.model)
            case st.DropShadow():
                self.publish(None)
                self.model = None
                self.store.remove()
            case st.KeepRefusal():
                if effect.bundle_id is None:
                    self.store.forget_refusal()
                else:
                    self.store.remember_refusal(effect.bundle_id, effect.details)
            case st.ReportShadow():
                self.report(effect.event, dict(effect.details))
            case _:  # pragma: no cover - a new effect without its I/O
                raise AssertionError(f"no I/O for {effect}")

    async def _awaited(self, effect: st.ShadowEffect) -> st.ShadowEvent:
        match effect:
            case st.AskShadow():
                return await self.fetcher.shadow(self.installed_counter(), effect.known)
            case st.WriteShadow():
                return await self._write(Path(effect.bundle_file))
            case st.TestShadow():
                return await self._test()
        raise AssertionError(f"{effect} is not awaited")  # pragma: no cover

    async def _write(self, bundle: Path) -> st.ShadowEvent:
        # The old shadow stops running before its folder is replaced.
        self.publish(None)
        self.model = None
        target = self.state.held
        assert target is not None
        faults = self.faults
        halfway = (lambda: faults.hold("shadow-staging")) if faults is not None else None
        try:
            await asyncio.to_thread(self.store.install, bundle, target, halfway)
        except ShadowStoreError as exc:
            message = f"cannot install the shadow: {exc}"
            return st.ShadowWriteFailed("invalid-bundle", message, condemned=True)
        except OSError as exc:
            # The device's storage failed, not the bundle: tried again after a backoff.
            message = f"cannot install the shadow: {exc}"
            return st.ShadowWriteFailed("staging-failed", message, condemned=False)
        finally:
            bundle.unlink(missing_ok=True)
        return st.ShadowWritten()

    async def _test(self) -> st.ShadowEvent:
        target = self.state.held
        assert target is not None
        try:
            manifest = self.store.manifest()
            model, report = await asyncio.to_thread(
                self_test, self.runtime, self.store.current, manifest
            )
        except (SelfTestFailed, ShadowStoreError) as exc:
            if isinstance(exc, UpdateRefused):
                return st.ShadowTestFailed(exc.reason, exc.detail)
            return st.ShadowTestFailed("invalid-bundle", str(exc))
        self.model = ShadowModel(target, manifest, model)
        return st.ShadowTestPassed(report.latency_p95_ms, report.memory_mb)
