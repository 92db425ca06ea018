"""Hybrid inference planning: which of each device's requests go to the cloud model.

:mod:`fleet_server.hybrid.planner` is the pure planner (arrays in, arrays out);
the rest of the package stores plans, signs them into each device's director
metadata, watches how devices follow them and re-plans.
"""
