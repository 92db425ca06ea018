"""The operators' web dashboard, served by ``fleet-server`` itself (``/dashboard``).

Server-rendered HTML with SVG charts and one small script for live updates;
every asset ships in this package. :func:`add_routes` registers it.
"""

from fleet_server.dashboard.pages import add_routes, routes

__all__ = ["add_routes", "routes"]
