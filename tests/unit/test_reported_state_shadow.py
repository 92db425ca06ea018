"""The shadow in the device's reported state: optional both ways between older and newer parts."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import BaseModel, ValidationError, create_model

from agent.mqtt.reports import reported_state, same_state, shadow_ref, state_payload
from agent.ota.journal import Journal
from protocol.manifest import Manifest
from protocol.messages import DEVICE_MESSAGE, BundleRef, ReportedState
from testbed.images import make_bundle

DIGEST = "e" * 64


def _older_state_model() -> type[BaseModel]:
    """ReportedState as servers read it before the shadow field: unknown fields refused."""
    base = {"v", "device_id", "message_id", "sent_at"}
    fields: dict[str, Any] = {
        name: (info.annotation, info)
        for name, info in ReportedState.model_fields.items()
        if name != "shadow" and name not in base
    }
    older = create_model(  # type: ignore[call-overload]
        "OlderReportedState", __base__=ReportedState.__mro__[1], **fields
    )
    assert "shadow" not in older.model_fields and older.model_config["extra"] == "forbid"
    return older  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def manifest(tmp_path_factory: pytest.TempPathFactory) -> Manifest:
    from protocol.bundle import read_bundle

    path = make_bundle(tmp_path_factory.mktemp("b"), "v1", "1.0.1")
    with path.open("rb") as f:
        return read_bundle(f)[0]


def _state(shadow: BundleRef | None) -> ReportedState:
    return reported_state(
        device_id="pump-7",
        hardware_id="rpi4-arm64",
        agent_version="0.1.0",
        journal=Journal(),
        active=None,
        previous=None,
        sent_at=1_800_000_000.0,
        shadow=shadow,
    )


def test_the_running_shadow_is_named_by_its_manifest_and_bundle_id(manifest: Manifest) -> None:
    ref = shadow_ref(f"sha256:{DIGEST}", manifest)
    assert (ref.name, ref.version, ref.release_counter, ref.sha256) == (
        "pump-health",
        "1.0.1",
        manifest.release_counter,
        DIGEST,
    )
    assert shadow_ref(f"sha512:{'f' * 128}", manifest).sha256 is None  # no sha256 to give
    assert not same_state(_state(ref), _state(None)), "a shadow change is a state change"


def test_a_newer_server_reads_the_shadow_and_an_older_devices_state_without_it(
    manifest: Manifest,
) -> None:
    ref = shadow_ref(f"sha256:{DIGEST}", manifest)
    parsed = DEVICE_MESSAGE.validate_json(state_payload(_state(ref)))
    assert isinstance(parsed, ReportedState) and parsed.shadow == ref
    # What an agent from before the field sends: the same state, no shadow key at all.
    older_device = _older_state_model()(**_state(None).model_dump(exclude={"shadow"}))
    parsed = DEVICE_MESSAGE.validate_json(older_device.model_dump_json())
    assert isinstance(parsed, ReportedState) and parsed.shadow is None


def test_an_older_server_reads_the_state_of_a_device_running_no_shadow(manifest: Manifest) -> None:
    older_server = _older_state_model()
    state = _state(None)
    payload = state_payload(state)
    assert b"shadow" not in payload
    assert older_server.model_validate_json(payload).model_dump() == state.model_dump(
        exclude={"shadow"}
    )
    # Only a server that lists shadows ever makes a device run one; a server from before
    # the field would refuse that state, by the field's name.
    with pytest.raises(ValidationError, match="shadow"):
        older_server.model_validate_json(
            state_payload(_state(shadow_ref("sha256:" + DIGEST, manifest)))
        )
