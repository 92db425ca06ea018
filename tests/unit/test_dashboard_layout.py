"""The dashboard's page shell: what it escapes, the landmarks and the session's CSRF token."""

from __future__ import annotations

from fleet_server.dashboard.layout import page, section, table


def test_the_title_and_cells_are_escaped_where_text_is_given() -> None:
    html = page("<script>x</script>", "", role="viewer", csrf='"><b>')
    assert "<script>x</script>" not in html and "&lt;script&gt;x&lt;/script&gt;" in html
    assert 'content="&quot;&gt;&lt;b&gt;"' in html
    assert "&lt;caption&gt;" in table("<caption>", ["<th>"], [])


def test_a_logged_in_page_has_navigation_search_logout_and_the_csrf_token() -> None:
    html = page("Rollouts", "<p>x</p>", section="rollouts", role="operator", csrf="tok")
    assert '<nav aria-label="Dashboard sections">' in html
    assert '<a href="/dashboard/rollouts" aria-current="page">Rollouts</a>' in html
    assert 'role="search"' in html and '<label for="device-search"' in html
    assert '<input type="hidden" name="csrf" value="tok">' in html  # the logout form
    assert '<meta name="csrf-token" content="tok">' in html
    assert '<main id="main"' in html and 'href="#main"' in html
    assert 'data-live="3000"' in html
    assert 'data-live="60000"' in page("Drift", "", role="viewer", csrf="t", live_s=60)


def test_the_login_page_has_no_navigation_and_does_not_poll() -> None:
    html = page("Log in", "<form></form>", live_s=None)
    assert "<nav" not in html and "data-live" not in html and "Log out" not in html


def test_an_empty_table_says_none_across_its_columns() -> None:
    html = table("devices", ["Device", "State"], [])
    assert '<td colspan="2" class="empty">none</td>' in html


def test_a_section_is_named_by_its_heading() -> None:
    html = section("Open alerts", "<p></p>", ident="alerts")
    assert '<section aria-labelledby="alerts"><h2 id="alerts">Open alerts</h2>' in html
