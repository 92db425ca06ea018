"""The dashboard's page shell: landmarks, navigation, the session's CSRF token for scripts."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from html import escape

NAV = (
    ("overview", "/dashboard", "Overview"),
    ("rollouts", "/dashboard/rollouts", "Rollouts"),
    ("drift", "/dashboard/drift", "Drift"),
    ("hybrid", "/dashboard/hybrid", "Hybrid"),
)
_CURRENT = ' aria-current="page"'


def e(value: object) -> str:
    """``value`` as HTML text (``None`` as an em dash)."""
    return "—" if value is None else escape(str(value))


def page(
    title: str,
    main: str,
    *,
    section: str = "",
    role: str | None = None,
    csrf: str | None = None,
    live_s: float | None = 3.0,
    digest: str = "",
) -> str:
    """A whole page: header with navigation and logout, ``main`` in the ``<main>`` landmark;
    its script asks for ``main`` again every ``live_s`` seconds (``None``: never)."""
    nav = "".join(
        f'<li><a href="{href}"{_CURRENT if key == section else ""}>{label}</a></li>'
        for key, href, label in NAV
    )
    header = ""
    if role is not None:
        header = (
            '<header class="top"><a class="brand" href="/dashboard">edgefleet</a>'
            f'<nav aria-label="Dashboard sections"><ul>{nav}</ul></nav>'
            '<form class="search" role="search" action="/dashboard/devices" method="get">'
            '<label for="device-search" class="sr-only">Search devices</label>'
            '<input id="device-search" name="q" type="search" placeholder="device id, tag…">'
            '<button type="submit">Search</button></form>'
            f'<span class="who">signed in as {e(role)}</span>'
            '<form method="post" action="/dashboard/logout">'
            f'<input type="hidden" name="csrf" value="{e(csrf)}">'
            '<button type="submit">Log out</button></form></header>'
        )
    return (
        '<!doctype html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{e(title)} · edgefleet</title>"
        '<link rel="icon" href="data:,">'  # no favicon request, no 404 in the console
        '<link rel="stylesheet" href="/dashboard/static/dashboard.css">'
        f'<meta name="csrf-token" content="{e(csrf or "")}">'
        '<script src="/dashboard/static/dashboard.js" defer></script></head>'
        + (f'<body data-live="{round(live_s * 1000)}">' if live_s else "<body>")
        + '<a class="skip" href="#main">Skip to content</a>'
        f'{header}<main id="main" tabindex="-1" data-digest="{e(digest)}">'
        f"<h1>{e(title)}</h1>{main}</main>"
        '<p class="status" role="status" aria-live="polite" id="live-status"></p>'
        "</body></html>"
    )


def table(
    caption: str, headers: Sequence[str], rows: Iterable[Sequence[str]], *, cls: str = ""
) -> str:
    """A table of already-escaped cells, its caption and column headers for screen readers."""
    head = "".join(f'<th scope="col">{e(h)}</th>' for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    if not body:
        body = f'<tr><td colspan="{len(headers)}" class="empty">none</td></tr>'
    return (
        f'<div class="scroll"><table class="{cls}"><caption>{e(caption)}</caption>'
        f"<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>"
    )


def section(heading: str, body: str, *, ident: str) -> str:
    """A titled region of a page (a landmark named by its heading)."""
    return f'<section aria-labelledby="{ident}"><h2 id="{ident}">{e(heading)}</h2>{body}</section>'
