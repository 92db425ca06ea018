"""``edge-agent status``: what the device runs and what happened lately, from its files."""

from __future__ import annotations

import time
from typing import Any

from agent.config import AgentConfig
from agent.ota.journal_store import JournalStore
from agent.ota.shadow_store import ShadowStore, ShadowStoreError
from agent.ota.slots import SLOT_NAMES, SlotError, Slots


def collect_status(config: AgentConfig, events: int = 10) -> dict[str, Any]:
    """Slots, the journal and the last ``events`` events, as plain data."""
    slots = Slots(config.data_dir / "slots")
    pointer = slots.pointer()
    store = JournalStore(config.data_dir)
    journal = store.load()
    slot_info: dict[str, Any] = {}
    for name in SLOT_NAMES:
        try:
            m = slots.manifest(name)
            slot_info[name] = {
                "name": m.name,
                "version": m.version,
                "release_counter": m.release_counter,
            }
        except SlotError:
            slot_info[name] = None
    shadow: dict[str, Any] | None = None
    try:
        m = ShadowStore(config.data_dir / "shadow").manifest()
        shadow = {"name": m.name, "version": m.version, "release_counter": m.release_counter}
    except ShadowStoreError:
        pass
    shadow_refused = ShadowStore(config.data_dir / "shadow").refusal_record()
    if config.director is not None:
        updates: dict[str, str | None] = {"from": "director", "url": config.director.url}
    else:
        updates = {
            "from": "image-repository",
            "url": config.image_repository.url,
            "name": config.image_repository.name,
        }
    return {
        "device_id": config.device_id,
        "hardware_id": config.hardware_id,
        "updates": updates,
        "active_slot": pointer.active,
        "previous_slot": pointer.previous,
        "slots": slot_info,
        "shadow": shadow,
        "shadow_refused": shadow_refused,
        "journal": journal.model_dump(mode="json", exclude={"rejected"}),
        "rejected": journal.rejected,
        "events": store.events(events),
    }


def describe_status(status: dict[str, Any]) -> str:
    """Human text for :func:`collect_status`'s data."""
    journal = status["journal"]
    lines = [f"device {status['device_id']} ({status['hardware_id']})"]
    updates = status["updates"]
    if updates["from"] == "director":
        lines.append(f"  updates: what the director at {updates['url']} assigns")
    else:
        lines.append(
            f"  updates: the newest {updates['name']} release in {updates['url']} (standalone)"
        )
    for name, info in status["slots"].items():
        role = (
            "active"
            if name == status["active_slot"]
            else "previous"
            if name == status["previous_slot"]
            else ""
        )
        what = f"{info['name']} {info['version']}" if info else "empty"
        lines.append(f"  slot {name}: {what:<24} {role}")
    shadow = status.get("shadow")
    if shadow:
        lines.append(f"  shadow: {shadow['name']} {shadow['version']} (answers not served)")
    refused = status.get("shadow_refused")
    if refused:
        what = refused.get("bundle") or refused["bundle_id"]
        lines.append(
            f"  shadow refused: {what} ({refused.get('reason')}); "
            "not tried again while the director lists it"
        )
    target = journal.get("target")
    doing = f" {target['name']} {target['version']}" if target else ""
    lines.append(
        f"  install: {journal['phase']}{doing}; release counter {journal['installed_counter']}"
    )
    outcome = journal.get("last_outcome")
    if outcome:
        why = f" ({outcome['reason']}: {outcome['message']})" if outcome.get("reason") else ""
        lines.append(
            f"  last install: {outcome['result']} {outcome['target']['name']} "
            f"{outcome['target']['version']}{why}"
        )
    if status["events"]:
        lines.append("  recent events:")
        for e in status["events"]:
            when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(e["at"])))
            extra = {k: v for k, v in e.items() if k not in ("at", "event", "phase") and v}
            lines.append(f"    {when}  {e['event']:<20} {extra if extra else ''}")
    return "\n".join(lines)
