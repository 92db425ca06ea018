"""The dashboard in a real browser against a real ``fleet-server`` process.

Each page loads without console errors and shows what the REST API answers; a live
update brings a device's new event in without a reload; a viewer has no action to
press and a forged action is refused; an operator's pause reaches the rollout.
Deadlines in these tests guard against hangs; none asserts a speed.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from datetime import UTC, datetime, timedelta

import pytest
from playwright.sync_api import Browser, expect

from protocol.messages import DeviceEvent
from protocol.topics import device_topic
from testbed.server_process import INGESTED, DeviceClient
from tests.browser.conftest import (
    DRIFT_TAG,
    HYBRID_DEVICE,
    SHARED_BROKER,
    Served,
    log_in,
    screenshot,
)

pytestmark = [pytest.mark.integration, pytest.mark.browser]

PHONE = {"width": 390, "height": 844}


def test_pages_need_a_session_and_the_cookie_is_httponly_strict(
    browser: Browser, served: Served
) -> None:
    # The server says where its dashboard is when it starts.
    assert f"dashboard: {served.server.url}/dashboard" in served.server.log()
    ctx = browser.new_context()
    page = ctx.new_page()
    for path in ("/", "/ui", "/dashboard", f"/dashboard/rollouts/{served.rollout_id}"):
        page.goto(served.server.url + path)
        assert "/dashboard/login" in page.url, (path, page.url)
    page.get_by_label("Token (ID.SECRET)").fill("tok-nothing.wrong")
    page.get_by_role("button", name="Log in").click()
    expect(page.get_by_role("alert")).to_be_visible()
    screenshot(served, page, "login")
    ctx.close()

    tab = log_in(browser, served, served.viewer)
    (cookie,) = [c for c in tab.context.cookies() if c["name"] == "edgefleet_session"]
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict" and not cookie["secure"]
    assert served.viewer not in cookie["value"]
    # Logged out, the same cookie opens nothing.
    tab.page.get_by_role("button", name="Log out").click()
    tab.page.wait_for_url(re.compile(r".*/dashboard/login"))
    r = tab.context.request.get(f"{served.server.url}/dashboard", max_redirects=0)
    assert r.status == 303 and "/dashboard/login" in r.headers["location"]
    assert tab.errors == []
    tab.context.close()


def test_each_page_shows_what_the_api_answers_without_console_errors(
    browser: Browser, served: Served
) -> None:
    tab = log_in(browser, served, served.viewer)
    page = tab.page

    devices = served.api("/devices")["devices"]
    alerts = served.api("/alerts?state=open")["alerts"]
    expect(page.locator("#device-total")).to_have_text(str(len(devices)))
    expect(page.locator("#alert-total")).to_have_text(str(len(alerts)))
    assert len(alerts) >= 1
    for state, expected in (("failed", 1), ("rolled back", 1), ("installing", 1)):
        expect(page.locator(f'.figure[data-state="{state}"]')).to_have_text(str(expected))
    expect(page.get_by_role("region", name="Open alerts")).to_contain_text(served.drifting_device)
    screenshot(served, page, "overview")

    page.get_by_label("Search devices").fill("press")
    page.get_by_label("Search devices").press("Enter")
    expect(page.get_by_role("table")).to_contain_text("3 devices")
    screenshot(served, page, "device-search")
    page.get_by_label("Search devices").fill(served.refusing_device)
    page.get_by_label("Search devices").press("Enter")
    expect(page.get_by_role("heading", level=1)).to_have_text(f"Device {served.refusing_device}")

    page.get_by_role("link", name="Rollouts").click()
    expect(page.get_by_role("link", name=served.rollout_id)).to_be_visible()
    screenshot(served, page, "rollouts")

    rollout = served.api(f"/rollouts/{served.rollout_id}")
    page.get_by_role("link", name=served.rollout_id).click()
    expect(page.locator("#rollout-phase")).to_have_text(rollout["phase"])
    expect(page.locator("#matched")).to_have_text(str(rollout["matched"]))
    expect(page.locator("#reached")).to_have_text(str(rollout["reached"]))
    decisions = page.locator("table.decisions tbody tr")
    expect(decisions).to_have_count(len(rollout["decisions"]))
    for gate in rollout["evaluations"]:
        figure = page.locator(f'figure.gate[data-gate="{gate["gate"]}"]')
        expect(figure).to_contain_text(f"n={gate['n_devices']}")
        assert figure.locator("svg .estimate, svg .no-data").count() >= 4  # one per tick
    for d in rollout["decisions"]:
        expect(page.locator("table.decisions")).to_contain_text(d["rule"])
    screenshot(served, page, "rollout")

    stopped = served.api(f"/rollouts/{served.stopped_id}")
    page.goto(f"{served.server.url}/dashboard/rollouts/{served.stopped_id}")
    expect(page.locator("#rollout-phase")).to_have_text(stopped["phase"])
    fired = stopped["decisions"][-1]["rule"]
    assert fired == "harm shown", stopped["decisions"][-1]
    expect(page.locator("table.decisions tbody tr").first).to_contain_text(fired)
    failed = [g["gate"] for g in stopped["evaluations"] if g["decision"] == "fail"]
    assert failed
    for gate in failed:
        figure = page.locator(f'figure.gate[data-gate="{gate}"]')
        expect(figure).to_contain_text("fail")
        assert figure.locator('svg .estimate[fill="#c53030"]').count() >= 1
    screenshot(served, page, "rollout-stopped")

    device = served.api(f"/devices/{served.refusing_device}")
    events = served.api(f"/devices/{served.refusing_device}/events")["events"]
    page.goto(f"{served.server.url}/dashboard/devices/{served.refusing_device}")
    expect(page.locator("#device-state")).to_have_text("failed")
    expect(page.get_by_role("region", name="Slots")).to_contain_text(
        f"{device['reported']['active']['name']} {device['reported']['active']['version']}"
    )
    expect(page.locator("table.events tbody tr")).to_have_count(len(events))
    expect(page.get_by_role("region", name="Install journal and events")).to_contain_text(
        "signature-invalid"
    )
    screenshot(served, page, "device")

    since = (datetime.now(UTC) - timedelta(hours=24)).isoformat().replace("+00:00", "Z")
    (drift,) = [
        m for m in served.api(f"/drift?fleet=true&since={since}")["models"] if m["features"]
    ]
    shaft = next(f for f in drift["features"] if f["name"] == "shaft_rpm")
    page.get_by_role("link", name="Drift").click()
    fleet_cell = page.locator("table.heat tbody tr", has_text="shaft_rpm").locator("td").first
    expect(fleet_cell).to_have_text(f"{shaft['statistic']:.3g} / {shaft['threshold']:.3g}")
    expect(page.locator("table.heat td.nodata").first).to_have_text("no data")
    accuracy = drift["accuracy"]
    assert accuracy is not None and accuracy["estimated"] is not None
    expect(page.locator("table.accuracy tbody tr").first).to_contain_text(
        f"{accuracy['estimated']:.4g}"
    )
    # Accuracy over time: each period's estimate and labelled accuracy, as the API gives
    # them for the query the chart names.
    history = page.locator("figure.accuracy-history").filter(
        has_text=f"tag:{DRIFT_TAG} · pump-health 1.0.0"
    )
    expect(history).to_have_count(1)
    (series,) = served.api(f"/accuracy/history?{history.get_attribute('data-query')}")["series"]
    points = series["points"]
    assert len(points) >= 3 and all(p["estimated"] is not None for p in points), points
    labelled = [p for p in points if p["labelled"] is not None]
    assert len(labelled) >= 3 and len({p["labelled"] for p in labelled}) > 1, points
    chart = history.locator("svg.accuracy")
    expect(chart.locator("circle.estimate")).to_have_count(len(points))
    expect(chart.locator("rect.labelled")).to_have_count(len(labelled))
    for p, mark in zip(points, chart.locator("circle.estimate").all(), strict=True):
        said = mark.locator("title").text_content() or ""
        assert f"estimated {p['estimated']:.3f} [{p['low']:.3f}, {p['high']:.3f}]" in said
        if p["labelled"] is not None:
            assert f"labelled {p['labelled']:.3f} ({p['labelled_rows']} rows)" in said
    last = points[-1]
    expect(history.locator("figcaption")).to_contain_text(
        f"latest: estimated {last['estimated']:.4g}"
    )
    screenshot(served, page, "drift")
    fleet_cell.get_by_role("link").click()
    expect(page.get_by_role("heading", level=1)).to_have_text("shaft_rpm in fleet")
    histogram = page.locator("svg.histogram")
    expect(histogram).to_have_count(1)
    assert histogram.locator("rect.baseline").count() == histogram.locator("rect.field").count()
    screenshot(served, page, "drift-histogram")

    capacity = served.api("/cloud/capacity")
    plans = served.api("/plans")["plans"]
    assert len(plans) == len(devices)
    page.get_by_role("link", name="Hybrid").click()
    expect(page.locator("#capacity")).to_have_text(f"{capacity['capacity']:g}")
    rows = page.locator("table.plans tbody tr")
    expect(rows).to_have_count(len(plans))
    followed = next(p for p in plans if p["device_id"] == HYBRID_DEVICE)
    observed = followed["observed"]
    assert observed["requests"] == 120 and observed["offloaded"] > 0, followed
    row = rows.filter(has_text=HYBRID_DEVICE)
    expect(row).to_contain_text(f"{followed['share']:.4g}")
    expect(row).to_contain_text(f"{observed['offloaded']} of 120")
    screenshot(served, page, "hybrid")
    page.goto(f"{served.server.url}/dashboard/devices/{HYBRID_DEVICE}")
    expect(page.get_by_role("region", name="Hybrid plan")).to_contain_text(followed["plan_id"])
    expect(page.get_by_role("region", name="Hybrid plan")).to_contain_text(
        f"{observed['offload']:.4g} ({observed['offloaded']} of 120)"
    )
    assert tab.errors == []

    # The same pages at a phone's width: nothing wider than the screen.
    tab.page.set_viewport_size(PHONE)
    for name, path in (
        ("overview", "/dashboard"),
        ("rollout", f"/dashboard/rollouts/{served.rollout_id}"),
        ("device", f"/dashboard/devices/{served.refusing_device}"),
    ):
        page.goto(served.server.url + path)
        width = page.evaluate("document.documentElement.scrollWidth")
        assert width <= PHONE["width"], (name, width)
        screenshot(served, page, f"{name}-phone")
    assert tab.errors == []
    tab.context.close()


def test_a_viewer_has_no_action_and_a_forged_one_is_refused(
    browser: Browser, served: Served
) -> None:
    tab = log_in(browser, served, served.viewer)
    page = tab.page
    page.goto(f"{served.server.url}/dashboard/rollouts/{served.rollout_id}")
    expect(page.locator("#rollout-phase")).to_be_visible()
    assert page.locator("button[data-action]").count() == 0
    before = served.api(f"/rollouts/{served.rollout_id}")
    csrf = page.locator('meta[name="csrf-token"]').get_attribute("content")
    assert csrf
    url = f"{served.server.url}/dashboard/rollouts/{served.rollout_id}/pause"
    refused = page.request.post(url, headers={"X-CSRF-Token": csrf}, form={"reason": "x"})
    assert refused.status == 403
    message = refused.json()["error"]
    assert "pause" in message and served.rollout_id in message and "operator" in message
    # Without the session's CSRF token even an operator's session is refused.
    operator = log_in(browser, served, served.operator)
    forged = operator.page.request.post(url, form={"csrf": "not-the-token"})
    assert forged.status == 403 and "CSRF" in forged.json()["error"]
    # Nor from another site's page, even with the token.
    token = operator.page.locator('meta[name="csrf-token"]').get_attribute("content")
    assert token
    crossed = operator.page.request.post(
        url, headers={"X-CSRF-Token": token, "Origin": "http://elsewhere.example"}
    )
    assert crossed.status == 403 and "another origin" in crossed.json()["error"]
    after = served.api(f"/rollouts/{served.rollout_id}")
    assert after["phase"] == before["phase"] and after["decisions"] == before["decisions"]
    # No page of the dashboard can be framed by another to have its buttons pressed.
    shown = operator.page.goto(f"{served.server.url}/dashboard/rollouts/{served.rollout_id}")
    assert shown is not None
    assert "frame-ancestors 'none'" in shown.headers["content-security-policy"]
    missing = operator.page.goto(f"{served.server.url}/dashboard/devices/no-such-device")
    assert missing is not None and missing.status == 404
    expect(operator.page.get_by_role("heading", level=1)).to_have_text("Not found")
    assert tab.errors == []
    # The 404 page itself is the one error the operator's console saw.
    assert [e for e in operator.errors if "404" not in e] == []
    tab.context.close()
    operator.context.close()


def test_an_operators_pause_reaches_the_rollout(browser: Browser, served: Served) -> None:
    tab = log_in(browser, served, served.operator)
    page = tab.page
    page.goto(f"{served.server.url}/dashboard/rollouts/{served.rollout_id}")
    page.evaluate("window.__sameDocument = true")
    page.get_by_label("Reason (optional)").fill("checking the gates by hand")
    # Reached by keyboard: focus the button and press Enter.
    pause = page.get_by_role("button", name="Pause")
    pause.focus()
    pause.press("Enter")
    expect(page.locator("#rollout-phase")).to_have_text("paused")
    expect(page.locator(".action-result")).to_have_text("Pause: rollout is paused")
    assert page.evaluate("window.__sameDocument") is True  # updated in place
    screenshot(served, page, "rollout-paused")
    shown = served.api(f"/rollouts/{served.rollout_id}", served.viewer)
    assert shown["phase"] == "paused"
    last = shown["decisions"][-1]
    assert last["event"] == "pause" and "checking the gates by hand" in last["reason"]
    assert "dash-operator" in (last["by"] or "")
    page.get_by_role("button", name="Resume").click()
    expect(page.locator("#rollout-phase")).not_to_have_text("paused")
    assert served.api(f"/rollouts/{served.rollout_id}")["phase"] != "paused"
    assert tab.errors == []
    tab.context.close()


def test_a_new_device_event_appears_without_a_reload(browser: Browser, served: Served) -> None:
    tab = log_in(browser, served, served.viewer)
    page = tab.page
    device = served.drifting_device
    page.goto(f"{served.server.url}/dashboard/devices/{device}")
    page.evaluate("window.__sameDocument = true")
    name = f"probe-{uuid.uuid4().hex[:8]}"
    event = DeviceEvent(
        device_id=device,
        message_id=uuid.uuid4().hex,
        sent_at=time.time(),
        event=name,
        at=time.time(),
        details={"reason": "live-check"},
    )
    client = DeviceClient(SHARED_BROKER, device)
    try:
        client.publish(
            device_topic(served.server.namespace, device, "events"),
            event.model_dump_json().encode(),
        )
        client.flush()
    finally:
        client.close()
    # A deadline against a hang, not a speed requirement.
    expect(page.locator("table.events")).to_contain_text(name, timeout=30_000)
    assert page.evaluate("window.__sameDocument") is True
    listed = served.api(f"/devices/{device}/events")["events"]
    assert listed[0]["event"] == name, json.dumps(listed[:2])
    # The overview's ingest health is the server's own counters.
    ingested = served.server.counter(INGESTED, "channel")
    assert ingested.get("events", 0) >= 1
    page.goto(f"{served.server.url}/dashboard")
    health = page.get_by_role("region", name="Ingest health (this server)")
    for channel, count in ingested.items():
        expect(health.locator("tr", has_text=channel)).to_contain_text(str(int(count)))
    assert tab.errors == []
    tab.context.close()


def test_pages_have_landmarks_labelled_controls_and_a_skip_link(
    browser: Browser, served: Served
) -> None:
    tab = log_in(browser, served, served.operator)
    page = tab.page
    for path in (
        "/dashboard",
        "/dashboard/rollouts",
        f"/dashboard/rollouts/{served.rollout_id}",
        f"/dashboard/devices/{served.refusing_device}",
        "/dashboard/drift",
        "/dashboard/hybrid",
    ):
        page.goto(served.server.url + path)
        expect(page.get_by_role("main")).to_have_count(1)
        expect(page.get_by_role("navigation", name="Dashboard sections")).to_have_count(1)
        expect(page.get_by_role("heading", level=1)).to_have_count(1)
        unlabelled = page.evaluate(
            """() => [...document.querySelectorAll('input:not([type=hidden]), button')]
                .filter(el => !(el.labels && el.labels.length) && !el.getAttribute('aria-label')
                              && !el.textContent.trim())
                .map(el => el.outerHTML)"""
        )
        assert unlabelled == [], (path, unlabelled)
        charts = page.locator("svg")
        for i in range(charts.count()):
            assert charts.nth(i).get_attribute("role") == "img", path
            assert charts.nth(i).get_attribute("aria-label"), path
        for i in range(page.locator("table").count()):
            assert page.locator("table").nth(i).locator("caption").count() == 1, path
        # The first Tab reaches the skip link, which leads to the content.
        page.keyboard.press("Tab")
        focused = page.evaluate("document.activeElement.textContent")
        assert focused == "Skip to content", (path, focused)
    assert tab.errors == []
    tab.context.close()
