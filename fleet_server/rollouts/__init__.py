"""Rollouts: a release going out to a selection of devices in waves, gated on the field.

Pure rules so far: :mod:`~fleet_server.rollouts.waves` (which devices each
wave reaches: consistent hashing, stratified, stable as the fleet changes),
:mod:`~fleet_server.rollouts.pacing` (how many installs may start, an
exponential ramp) and :mod:`~fleet_server.rollouts.maintenance` (when a
device's maintenance window is open). The spec is
:class:`protocol.api.rollouts.RolloutSpec`.
"""
