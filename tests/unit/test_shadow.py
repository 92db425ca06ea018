"""The shadow stage: its pure rules, its folder, and its runner with real models and runtime."""

from __future__ import annotations

import asyncio
import hashlib
import math
import shutil
import threading
from collections.abc import Collection
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from agent.config import ShadowConfig
from agent.ota import shadow_steps as st
from agent.ota.answers import (
    NoShadow,
    Refused,
    ShadowAnswer,
    ShadowDownloaded,
    ShadowKept,
    Unavailable,
)
from agent.ota.director_client import DirectorTarget, split_targets
from agent.ota.errors import UntrustedMetadata
from agent.ota.journal import InstallTarget
from agent.ota.shadow import ShadowKeeper
from agent.ota.shadow_store import ShadowStore
from agent.serving import FallbackChain, ModelSlot, ShadowResult, ShadowRunner
from agent.serving.shadow import compare
from agent.telemetry import WindowPolicy, WindowRecorder, WindowRecordError
from model_runtime import LoadedModel, default_runtime
from protocol.bundle import read_bundle
from protocol.manifest import Manifest, ResourceBudget
from protocol.window import decode_window, encode_window
from testbed.images import MODELS, make_bundle

RUNTIME = default_runtime()
BASELINE = np.load(MODELS / "baseline.npy").astype(np.float32)

SHADOW = InstallTarget(
    path="pump-health/pump-health-2.0.0.bundle",
    name="pump-health",
    version="2.0.0",
    release_counter=2_000_999,
    hashes={"sha256": "b" * 64},
    length=10,
)
OTHER = SHADOW.model_copy(update={"version": "3.0.0", "hashes": {"sha256": "c" * 64}})


# -- the director's listing -----------------------------------------------------------


def _listed(path: str, *, shadow: bool = False, rollback_of: str | None = None) -> DirectorTarget:
    return DirectorTarget(path, 10, {"sha256": "a" * 64}, "d1", "hw", 1, rollback_of, shadow)


def test_an_assignment_and_one_shadow_are_told_apart() -> None:
    split = split_targets([_listed("s", shadow=True), _listed("a")])
    assert split.assignment is not None and split.assignment.path == "a"
    assert split.shadow is not None and split.shadow.path == "s"
    assert split_targets([_listed("s", shadow=True)]).assignment is None
    assert split_targets([]).shadow is None


@pytest.mark.parametrize(
    ("listed", "message"),
    [
        ([_listed("s1", shadow=True), _listed("s2", shadow=True)], "2 shadow bundles (s1, s2)"),
        ([_listed("a1"), _listed("a2")], "assigns 2 bundles (a1, a2)"),
        (
            [_listed("a"), _listed("s1", shadow=True), _listed("s2", shadow=True)],
            "names 3 bundles (a, s1, s2)",
        ),
        (
            [_listed("s", shadow=True, rollback_of="sha256:" + "1" * 64)],
            "shadow s is marked as a fleet rollback",
        ),
    ],
)
def test_a_listing_beyond_one_assignment_and_one_shadow_is_refused_by_name(
    listed: list[DirectorTarget], message: str
) -> None:
    with pytest.raises(UntrustedMetadata, match=message.replace("(", r"\(").replace(")", r"\)")):
        split_targets(listed)


def test_a_shadow_mark_other_than_true_is_refused() -> None:
    from tuf.api.metadata import TargetFile

    custom = {"device_id": "d1", "hardware_id": "hw", "release_counter": 1, "shadow": "yes"}
    target = TargetFile(10, {"sha256": "a" * 64}, "p", unrecognized_fields={"custom": custom})
    with pytest.raises(UntrustedMetadata, match="shadow must be true, not 'yes'"):
        DirectorTarget.from_target(target)


# -- the rules ---------------------------------------------------------------------------


POLICY = st.ShadowPolicy(poll_interval_s=10.0)


def _run(
    state: st.ShadowState, *events: st.ShadowEvent, now: float = 0.0
) -> tuple[st.ShadowState, list[Any]]:
    effects: list[Any] = []
    for event in events:
        state, more = st.decide_shadow(state, event, now, POLICY)
        effects += more
    return state, effects


def test_a_downloaded_shadow_is_written_tested_then_run_and_reported() -> None:
    state, effects = _run(st.ShadowState(), ShadowDownloaded(target=SHADOW, path="/d/s.bundle"))
    assert state.phase is st.ShadowPhase.INSTALLING and effects == [st.WriteShadow("/d/s.bundle")]
    state, effects = _run(state, st.ShadowWritten())
    assert state.phase is st.ShadowPhase.TESTING and effects == [st.TestShadow()]
    state, effects = _run(state, st.ShadowTestPassed(3.0, 1.25))
    assert state.phase is st.ShadowPhase.SERVING and state.known == SHADOW.bundle_id
    assert effects[0] == st.RunShadow()
    assert effects[1].event == "shadow-installed" and effects[1].details["memory_mb"] == 1.2
    # Still listed: nothing happens.
    assert _run(state, ShadowKept(target=SHADOW))[1] == []


def test_an_unlisted_shadow_is_dropped_and_reported_once() -> None:
    serving = st.ShadowState(phase=st.ShadowPhase.SERVING, held=SHADOW)
    state, effects = _run(serving, NoShadow())
    assert state == st.ShadowState()
    assert effects[0] == st.DropShadow()
    assert effects[1].event == "shadow-dropped" and effects[1].details["reason"] == "unlisted"
    assert _run(state, NoShadow())[1] == []


def test_a_shadow_failing_its_self_test_is_dropped_and_not_downloaded_again() -> None:
    testing = st.ShadowState(phase=st.ShadowPhase.TESTING, held=SHADOW)
    budget = "the model takes 80.0 MB, over the budget of 64 MB"
    state, effects = _run(testing, st.ShadowTestFailed("self-test-failed", budget))
    assert state.phase is st.ShadowPhase.ABSENT and state.held is None
    assert state.known == SHADOW.bundle_id  # the fetcher is told not to download it again
    assert effects[0] == st.DropShadow()
    assert effects[1] == st.KeepRefusal(SHADOW.bundle_id, effects[2].details)  # on disk too
    assert effects[2].event == "shadow-refused"
    assert effects[2].details["message"] == budget
    assert _run(state, ShadowKept(target=SHADOW))[1] == []


def test_a_refused_answer_keeps_the_shadow_held_and_is_reported_once() -> None:
    serving = st.ShadowState(phase=st.ShadowPhase.SERVING, held=SHADOW)
    refusal = Refused(reason="director-mismatch", message="m", about="shadow")
    state, effects = _run(serving, refusal)
    assert state.phase is st.ShadowPhase.SERVING and state.held == SHADOW
    assert [e.event for e in effects] == ["shadow-refused"]
    assert _run(state, refusal, Unavailable(reason="x", message="y"))[1] == []


def test_a_new_shadow_replaces_the_one_running() -> None:
    serving = st.ShadowState(phase=st.ShadowPhase.SERVING, held=SHADOW)
    state, effects = _run(serving, ShadowDownloaded(target=OTHER, path="/d/o.bundle"))
    assert state.held == OTHER and effects == [st.WriteShadow("/d/o.bundle")]
    state, effects = _run(state, st.ShadowWriteFailed("invalid-bundle", "torn", condemned=True))
    assert state.phase is st.ShadowPhase.ABSENT and state.known == OTHER.bundle_id


def test_a_restart_tests_a_whole_shadow_again_before_it_runs() -> None:
    assert _run(st.ShadowState(), st.ShadowStarted(None)) == (st.ShadowState(), [])
    state, effects = _run(st.ShadowState(), st.ShadowStarted(SHADOW))
    assert state.phase is st.ShadowPhase.TESTING and effects == [st.TestShadow()]


def test_events_outside_the_table_are_refused() -> None:
    with pytest.raises(st.InvalidShadowEvent, match="ShadowWritten is not expected in absent"):
        st.decide_shadow(st.ShadowState(), st.ShadowWritten(), 0.0, POLICY)
    installing = st.ShadowState(phase=st.ShadowPhase.INSTALLING, held=SHADOW)
    with pytest.raises(st.InvalidShadowEvent, match="NoShadow is not expected in installing"):
        st.decide_shadow(installing, NoShadow(), 0.0, POLICY)


def _asked(state: st.ShadowState, now: float) -> tuple[str, ...] | None:
    """What a poll at ``now`` asks the fetcher not to download; ``None``: no check at all."""
    after, effects = _run(state, st.ShadowPoll(), now=now)
    assert after == state
    if not effects:
        return None
    [ask] = effects
    assert isinstance(ask, st.AskShadow)
    return ask.known


def test_a_download_garbled_on_the_way_is_retried_after_a_growing_backoff_not_every_poll() -> None:
    garbled = Refused(
        reason="tampered-bundle", message="hash mismatch", about="shadow", target=SHADOW
    )
    state, effects = _run(st.ShadowState(), garbled, now=100.0)
    assert [e.event for e in effects] == ["shadow-refused"]
    assert effects[0].details["bundle"] == "pump-health 2.0.0"
    assert state.refused is None, "a garbled download does not condemn the bundle"
    # Checked on every poll, but the bundle is not downloaded before the poll interval...
    assert _asked(state, 109.0) == (SHADOW.bundle_id,)
    assert _asked(state, 110.0) == ()
    # ...then twice that after a second refusal in a row, reported once.
    state, effects = _run(state, garbled, now=110.0)
    assert effects == []
    assert _asked(state, 129.0) == (SHADOW.bundle_id,) and _asked(state, 130.0) == ()
    # Another bundle named meanwhile is downloaded at once.
    state, effects = _run(state, ShadowDownloaded(target=OTHER, path="/d/o"), now=111.0)
    assert effects == [st.WriteShadow("/d/o")] and SHADOW.bundle_id in state.retries
    # A successful download of the bundle ends its backoff.
    absent = st.ShadowState(retries=state.retries)
    state, _ = _run(absent, ShadowDownloaded(target=SHADOW, path="/d/s"), now=200.0)
    assert state.retries == {}


def test_the_backoff_is_the_installers_and_bounded() -> None:
    from agent.ota.steps import MAX_RETRY_DELAY_S, retry_delay

    assert [retry_delay(10.0, n) for n in range(4)] == [10.0, 20.0, 40.0, 80.0]
    assert retry_delay(10.0, 20) == retry_delay(10.0, 10_000) == MAX_RETRY_DELAY_S
    garbled = Refused(reason="tampered-bundle", message="m", about="shadow", target=SHADOW)
    state = st.ShadowState()
    for n in range(30):
        state, _ = _run(state, garbled, now=float(n))
    assert state.retries[SHADOW.bundle_id].not_before == 29.0 + MAX_RETRY_DELAY_S


def test_a_bundle_whose_signed_bytes_are_unusable_is_never_downloaded_again_while_listed() -> None:
    serving = st.ShadowState(phase=st.ShadowPhase.SERVING, held=SHADOW)
    bad = Refused(
        reason="manifest-mismatch",
        message="m",
        about="shadow",
        condemns_bundle=True,
        target=OTHER,
    )
    state, effects = _run(serving, bad, now=5.0)
    assert state.phase is st.ShadowPhase.SERVING and state.held == SHADOW  # the held one stays
    assert effects[0] == st.KeepRefusal(OTHER.bundle_id, effects[1].details)
    assert effects[1].event == "shadow-refused"
    assert _asked(state, 1e9) == (SHADOW.bundle_id, OTHER.bundle_id)
    # The director names another bundle: downloaded, and the refusal forgotten on disk.
    state, effects = _run(state, ShadowDownloaded(target=SHADOW, path="/d/s"))
    assert effects == [st.KeepRefusal(None), st.WriteShadow("/d/s")] and state.refused is None


def test_an_unreachable_repository_puts_off_the_whole_check_with_a_growing_backoff() -> None:
    down = Unavailable(reason="repository-unavailable", message="connection refused")
    state, effects = _run(st.ShadowState(), down, now=100.0)
    assert effects == []
    assert _asked(state, 109.0) is None and _asked(state, 110.0) == ()
    state, _ = _run(state, down, now=110.0)
    assert _asked(state, 129.0) is None and _asked(state, 130.0) == ()
    # Any answer means it is reachable again: the next poll asks.
    state, _ = _run(state, NoShadow(), now=130.0)
    assert state.unreachable is None and _asked(state, 130.0) == ()


def test_a_refusal_read_back_after_a_restart_is_not_downloaded_and_unlisting_forgets_it() -> None:
    state, effects = _run(st.ShadowState(), st.ShadowStarted(None, SHADOW.bundle_id))
    assert effects == [] and _asked(state, 0.0) == (SHADOW.bundle_id,)
    assert _run(state, ShadowKept(target=SHADOW))[1] == []
    state, effects = _run(state, NoShadow())
    assert state == st.ShadowState() and effects == [st.KeepRefusal(None)]


def test_a_shadow_the_storage_failed_to_write_is_retried_later_not_condemned() -> None:
    installing = st.ShadowState(phase=st.ShadowPhase.INSTALLING, held=SHADOW)
    failed = st.ShadowWriteFailed("staging-failed", "disk full", condemned=False)
    state, effects = _run(installing, failed, now=50.0)
    assert state.phase is st.ShadowPhase.ABSENT and state.refused is None
    assert effects[0] == st.DropShadow() and effects[1].event == "shadow-refused"
    assert not any(isinstance(e, st.KeepRefusal) for e in effects)
    assert _asked(state, 59.0) == (SHADOW.bundle_id,) and _asked(state, 60.0) == ()


# -- the folder ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def manifests(
    bundles: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Manifest]:
    bad = make_bundle(tmp_path_factory.mktemp("v3"), "v3-bad", "3.0.0")
    out = {}
    for name, path in {**bundles, "v3-bad": bad}.items():
        with path.open("rb") as f:
            out[name] = read_bundle(f)[0]
    return out


def test_the_shadow_folder_holds_a_whole_bundle_and_a_damaged_one_is_removed(
    bundles: dict[str, Path], tmp_path: Path
) -> None:
    store = ShadowStore(tmp_path / "shadow")
    assert store.held() is None
    with bundles["v2"].open("rb") as f:
        counter = read_bundle(f)[0].release_counter
    target = SHADOW.model_copy(update={"release_counter": counter})
    store.install(bundles["v2"], target)
    assert store.held() == target
    assert store.manifest().version == "2.0.0"
    model = store.current / store.manifest().model_file
    model.write_bytes(model.read_bytes()[:-1])  # outside damage
    assert store.held() is None
    assert not store.current.exists()


def test_the_refused_bundle_is_kept_on_disk_and_an_unreadable_record_is_dropped(
    tmp_path: Path,
) -> None:
    store = ShadowStore(tmp_path / "shadow")
    assert store.refusal() is None
    store.remember_refusal(SHADOW.bundle_id, {"reason": "self-test-failed"})
    assert ShadowStore(tmp_path / "shadow").refusal() == SHADOW.bundle_id
    store.forget_refusal()
    store.forget_refusal()  # nothing to forget: no error
    assert store.refusal() is None
    (tmp_path / "shadow" / "refused.json").write_text('{"bundle_id": ')  # outside damage
    assert store.refusal() is None
    assert not (tmp_path / "shadow" / "refused.json").exists()


def test_a_power_cut_mid_write_leaves_the_old_shadow_in_place(
    bundles: dict[str, Path], tmp_path: Path
) -> None:
    store = ShadowStore(tmp_path / "shadow")
    with bundles["v1"].open("rb") as f:
        v1 = SHADOW.model_copy(
            update={"version": "1.0.0", "release_counter": read_bundle(f)[0].release_counter}
        )
    store.install(bundles["v1"], v1)

    class PowerCut(Exception):
        pass

    def cut() -> None:
        raise PowerCut

    with pytest.raises(PowerCut):
        store.install(bundles["v2"], SHADOW, on_half_written=cut)
    assert store.held() == v1  # the old shadow, whole
    store.discard_leftovers()
    assert not (tmp_path / "shadow" / ".staging").exists()
    store.remove()
    assert store.held() is None


# -- the runner and the windows -----------------------------------------------------------


def load(model: str) -> LoadedModel:
    return RUNTIME.load(MODELS / f"{model}.tflite")


def test_agreement_is_the_top_class_and_errors_are_non_finite_outputs(
    manifests: dict[str, Manifest],
) -> None:
    manifest = manifests["v1"]
    rows = BASELINE[:16]
    served = load("v1").run({"features": rows})
    assert compare(manifest, served, load("v1").run({"features": rows})) == (True, False, None)
    other = compare(manifest, served, load("v2").run({"features": rows}))
    assert other[1] is False  # v2 is a different model: it may disagree, never an error
    nan = {k: np.full_like(v, math.nan) for k, v in served.items()}
    assert compare(manifest, served, nan)[:2] == (False, True)
    assert compare(manifest, served, {})[:2] == (False, True)
    # Without a score output, values are compared within the golden tolerance.
    plain = manifest.model_copy(
        update={"fallback": manifest.fallback.model_copy(update={"confidence_output": None})}
    )
    nudged = {k: v + manifest.golden.atol / 2 for k, v in served.items()}
    assert compare(plain, served, nudged)[0] is True
    shifted = {k: v + 0.5 for k, v in served.items()}
    agreed, error, reason = compare(plain, served, shifted)
    assert (agreed, error) == (False, False) and reason is not None and "atol" in reason


def _chain(manifests: dict[str, Manifest]) -> FallbackChain:
    return FallbackChain(ModelSlot(manifests["v1"], load("v1")))


def test_the_chain_offers_answers_to_the_shadow_which_never_changes_them(
    manifests: dict[str, Manifest],
) -> None:
    results: list[ShadowResult] = []

    async def main() -> tuple[list[Any], list[Any], ShadowRunner]:
        chain = _chain(manifests)
        rows = [BASELINE[i : i + 1] for i in range(20)]
        plain = [(await chain.infer({"features": r})).outputs for r in rows]
        runner = ShadowRunner(
            "sha256:" + "e" * 64,
            manifests["v3-bad"],
            load("v3-bad"),
            share=1.0,
            max_in_flight=64,
            on_result=results.append,
        )
        chain.set_shadow(runner)
        shadowed = []
        for r in rows:
            shadowed.append((await chain.infer({"features": r})).outputs)
            await runner.idle()
        return plain, shadowed, runner

    plain, shadowed, runner = asyncio.run(main())
    for a, b in zip(plain, shadowed, strict=True):
        assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    assert len(results) == 20 == runner.ran and runner.skipped == 0
    assert all(r.model_version == "3.0.0" and r.latency_s >= 0 for r in results)


class Stalled:
    """An injected fault: the real model, whose runs wait until ``release`` is set."""

    def __init__(self, model: LoadedModel) -> None:
        self.model = model
        self.release = threading.Event()
        self.inputs = model.inputs
        self.outputs = model.outputs

    def run(self, tensors: Any) -> Any:
        assert self.release.wait(30)
        return self.model.run(tensors)


def test_a_busy_shadow_skips_requests_and_counts_them_instead_of_queueing(
    manifests: dict[str, Manifest],
) -> None:
    results: list[ShadowResult] = []
    rows = BASELINE[:1]
    served = load("v1").run({"features": rows})
    stalled = Stalled(load("v1"))

    async def main() -> ShadowRunner:
        runner = ShadowRunner(
            "sha256:" + "e" * 64,
            manifests["v1"],
            stalled,
            share=1.0,
            max_in_flight=2,
            on_result=results.append,
        )
        # While two runs are stuck in their threads, the answers that follow are skipped.
        started = [runner.offer({"features": rows}, served, "active") for _ in range(30)]
        assert started == [True, True] + [False] * 28
        stalled.release.set()
        await runner.idle()
        # Answers of other stages are never offered: there is no active answer to compare.
        assert not runner.offer({"features": rows}, served, "previous")
        # Free again: the next answer is run (on the loop or in a thread, by its measured time).
        assert runner.offer({"features": rows}, served, "active")
        await runner.idle()
        assert len(results) == 3
        return runner

    runner = asyncio.run(main())
    assert (runner.offered, runner.ran, runner.skipped) == (31, 3, 28)
    assert all(r.agreed and not r.error for r in results)


def test_a_share_of_requests_is_run_and_a_closed_runner_takes_none(
    manifests: dict[str, Manifest],
) -> None:
    async def main() -> tuple[ShadowRunner, int]:
        chain = _chain(manifests)
        runner = ShadowRunner(
            "sha256:" + "e" * 64,
            manifests["v1"],
            load("v1"),
            share=0.25,
            max_in_flight=64,
            on_result=lambda _: None,
            seed=7,
        )
        chain.set_shadow(runner)
        for i in range(400):
            await chain.infer({"features": BASELINE[i : i + 1]})
        await runner.idle()
        chain.set_shadow(None)  # closes it
        await chain.infer({"features": BASELINE[:1]})
        return runner, runner.offered

    runner, offered = asyncio.run(main())
    assert offered == 400
    assert 60 <= runner.ran <= 140  # a quarter of 400, drawn at random
    with pytest.raises(ValueError, match="share must be between 0 and 1"):
        ShadowRunner("x", runner.manifest, runner.model, share=1.5, on_result=lambda _: None)


def test_windows_carry_the_shadow_section_only_when_a_shadow_ran(
    manifests: dict[str, Manifest],
) -> None:
    recorder = WindowRecorder(manifests["v1"], "d1", WindowPolicy(max_overhead=None))
    served = load("v1").run({"features": BASELINE[:1]})
    recorder.record({"features": BASELINE[:1]}, served, "active", 0.001)
    recorder.close_window()
    plain = recorder.poll()
    assert plain is not None and plain.shadow is None
    bundle = "sha256:" + "e" * 64
    recorder.record({"features": BASELINE[:1]}, served, "active", 0.001)
    recorder.record_shadow(bundle, "2.0.0", agreed=True, error=False, latency_s=0.002)
    recorder.record_shadow(bundle, "2.0.0", agreed=False, error=True, latency_s=0.004)
    # Another shadow's result closes the window first: a section never mixes two.
    recorder.record_shadow(
        "sha256:" + "f" * 64, "3.0.0", agreed=False, error=False, latency_s=0.001
    )
    first = recorder.poll()
    assert first is not None and first.shadow is not None
    assert (first.shadow.bundle_id, first.shadow.requests, first.shadow.agreements) == (
        bundle,
        2,
        1,
    )
    assert first.shadow.errors == 1 and first.shadow.latency_ms.count == 2
    assert decode_window(encode_window(first)).shadow == first.shadow
    recorder.record({"features": BASELINE[:1]}, served, "active", 0.001)
    recorder.close_window()
    second = recorder.poll()
    assert (
        second is not None and second.shadow is not None and second.shadow.model_version == "3.0.0"
    )
    with pytest.raises(WindowRecordError, match="cannot both agree and fail"):
        recorder.record_shadow(bundle, "2.0.0", agreed=True, error=True, latency_s=0.001)
    with pytest.raises(WindowRecordError, match="latency must be a finite number"):
        recorder.record_shadow(bundle, "2.0.0", agreed=True, error=False, latency_s=math.nan)


@pytest.mark.parametrize(
    ("value", "message"),
    [(1.5, "less than or equal to 1"), (-0.1, "greater than or equal to 0"), (True, "share of")],
)
def test_the_shadow_share_is_validated(value: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ShadowConfig.model_validate({"share": value})
    assert ShadowConfig().share == 0.25


# -- the keeper, with the real folder, runtime and self-test ------------------------------


class DirectorWord:
    """The fetcher's answers to ``shadow``, as a director listing ``bundle`` would give them."""

    def __init__(self, downloads: Path) -> None:
        self.downloads = downloads
        self.bundle: Path | None = None
        self.downloaded = 0

    def target(self) -> InstallTarget:
        assert self.bundle is not None
        with self.bundle.open("rb") as f:
            manifest = read_bundle(f)[0]
        data = self.bundle.read_bytes()
        return InstallTarget(
            path=manifest.target_path,
            name=manifest.name,
            version=manifest.version,
            release_counter=manifest.release_counter,
            hashes={"sha256": hashlib.sha256(data).hexdigest()},
            length=len(data),
        )

    async def shadow(self, installed_counter: int, known: Collection[str]) -> ShadowAnswer:
        if self.bundle is None:
            return NoShadow()
        target = self.target()
        if any(k in target.matching_ids() for k in known):
            return ShadowKept(target=target)
        self.downloaded += 1
        self.downloads.mkdir(exist_ok=True)
        path = self.downloads / self.bundle.name
        shutil.copyfile(self.bundle, path)
        return ShadowDownloaded(target=target, path=str(path))


def _keeper(tmp_path: Path, word: DirectorWord) -> tuple[ShadowKeeper, list[Any], list[Any]]:
    published: list[Any] = []
    reported: list[Any] = []
    keeper = ShadowKeeper(
        store=ShadowStore(tmp_path / "shadow"),
        runtime=RUNTIME,
        fetcher=word,
        publish=published.append,
        report=lambda kind, details: reported.append((kind, details)),
        installed_counter=lambda: 1,
        policy=POLICY,
    )
    return keeper, published, reported


def test_a_shadow_over_its_budget_is_refused_naming_the_budget_and_not_fetched_again(
    tmp_path: Path,
) -> None:
    word = DirectorWord(tmp_path / "downloads")
    word.bundle = make_bundle(
        tmp_path, "v2", "2.0.0", budget=ResourceBudget(max_latency_ms=1e-6, max_memory_mb=64)
    )
    keeper, published, reported = _keeper(tmp_path, word)

    async def main() -> None:
        await keeper.recover()
        await keeper.poll()
        await keeper.poll()

    asyncio.run(main())
    assert [kind for kind, _ in reported] == ["shadow-refused"]
    details = reported[0][1]
    assert details["reason"] == "self-test-failed" and details["bundle"] == "pump-health 2.0.0"
    assert "over the budget of 1e-06 ms" in details["message"]
    assert published == [None, None]  # stopped before writing, and on the drop
    assert not (tmp_path / "shadow" / "current").exists()
    assert word.downloaded == 1  # refused once, not fetched again while it is listed
    assert not list((tmp_path / "downloads").iterdir())  # the download file went


def test_a_shadow_refused_for_its_budget_is_not_fetched_again_after_a_restart(
    tmp_path: Path, bundles: dict[str, Path]
) -> None:
    word = DirectorWord(tmp_path / "downloads")
    word.bundle = make_bundle(
        tmp_path, "v2", "2.0.0", budget=ResourceBudget(max_latency_ms=1e-6, max_memory_mb=64)
    )
    keeper, _, reported = _keeper(tmp_path, word)
    asyncio.run(keeper.recover())
    asyncio.run(keeper.poll())
    assert [kind for kind, _ in reported] == ["shadow-refused"] and word.downloaded == 1

    again, _, reported = _keeper(tmp_path, word)  # the agent restarted
    asyncio.run(again.recover())
    asyncio.run(again.poll())
    asyncio.run(again.poll())
    assert reported == [] and word.downloaded == 1, "the refused bundle was tried again"

    word.bundle = bundles["v2"]  # a different bundle is tried as usual
    asyncio.run(again.poll())
    assert [kind for kind, _ in reported] == ["shadow-installed"] and word.downloaded == 2
    assert again.store.refusal() is None


def test_a_shadow_runs_after_its_self_test_again_after_a_restart_and_goes_when_unlisted(
    tmp_path: Path, bundles: dict[str, Path]
) -> None:
    word = DirectorWord(tmp_path / "downloads")
    word.bundle = bundles["v2"]
    keeper, published, reported = _keeper(tmp_path, word)
    asyncio.run(keeper.poll())
    assert [kind for kind, _ in reported] == ["shadow-installed"]
    assert published[-1] is not None and published[-1].manifest.version == "2.0.0"

    again, published, reported = _keeper(tmp_path, word)  # the agent restarted
    asyncio.run(again.recover())
    assert published[-1] is not None and published[-1].target == word.target()
    asyncio.run(again.poll())
    assert word.downloaded == 1  # still listed: kept, not downloaded again

    word.bundle = None
    assert asyncio.run(again.poll()) is st.ShadowPhase.ABSENT
    assert reported[-1][0] == "shadow-dropped" and published[-1] is None
    assert not (tmp_path / "shadow" / "current").exists()


def test_the_agent_metrics_show_the_shadow_and_what_it_ran_and_skipped(
    manifests: dict[str, Manifest],
) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    from agent.metrics import AgentMetrics

    metrics = AgentMetrics()
    chain = _chain(manifests)
    metrics.watch(chain=chain)
    assert b"shadow" not in metrics.exposition()
    stalled = Stalled(load("v1"))
    runner = ShadowRunner(
        "sha256:" + "e" * 64, manifests["v1"], stalled, share=1.0, on_result=lambda _: None
    )
    chain.set_shadow(runner)
    served = load("v1").run({"features": BASELINE[:1]})

    async def offer() -> None:
        for _ in range(3):  # the first runs (and stalls), the others find it busy
            runner.offer({"features": BASELINE[:1]}, served, "active")
        stalled.release.set()
        await runner.idle()

    asyncio.run(offer())
    found = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(metrics.exposition().decode())
        for s in family.samples
    }
    prefix = "edgefleet_agent_shadow_"
    assert found[(prefix + "requests_total", (("outcome", "ran"),))] == 1
    assert found[(prefix + "requests_total", (("outcome", "skipped"),))] == 2
    assert (
        found[(prefix + "info", (("bundle_id", "sha256:" + "e" * 64), ("version", "1.0.0")))] == 1
    )
