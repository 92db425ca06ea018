"""A slot checked against its manifest before a fleet rollback returns to it; the switch back."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.ota.slots import SlotError, SlotPointer, Slots


@pytest.fixture
def slots(tmp_path: Path, bundles: dict[str, Path]) -> Slots:
    s = Slots(tmp_path / "slots")
    s.stage("a", bundles["v1"])
    s.switch("a")
    s.stage("b", bundles["v2"])
    s.switch("b")
    return s


def test_a_whole_slot_passes_and_names_its_bundle(slots: Slots) -> None:
    assert slots.verify("a").version == "1.0.0"


def test_an_altered_missing_or_extra_file_is_named(slots: Slots) -> None:
    model = slots.model_path("a")
    original = model.read_bytes()
    model.write_bytes(original[:-1] + bytes([original[-1] ^ 1]))
    with pytest.raises(SlotError, match=f"{model.name} does not match the hash in its manifest"):
        slots.verify("a")
    model.unlink()
    with pytest.raises(SlotError, match=f"slot a lacks {model.name}"):
        slots.verify("a")
    model.write_bytes(original)
    (slots.path("a") / "extra.so").write_bytes(b"\x7fELF")
    with pytest.raises(SlotError, match=r"slot a holds extra\.so, not in its manifest"):
        slots.verify("a")


def test_returning_to_a_slot_leaves_no_fallback_and_can_be_repeated(slots: Slots) -> None:
    assert slots.pointer() == SlotPointer(active="b", previous="a")
    assert slots.return_to("a") == SlotPointer(active="a", previous=None)
    assert slots.return_to("a") == slots.pointer() == SlotPointer(active="a", previous=None)
