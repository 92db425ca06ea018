"""Rollouts: a release going out to a selection of devices in waves, gated on the field.

Pure rules so far: :mod:`~fleet_server.rollouts.waves` (which devices each
wave reaches: consistent hashing, stratified, stable as the fleet changes),
:mod:`~fleet_server.rollouts.pacing` (how many installs may start, an
exponential ramp) and :mod:`~fleet_server.rollouts.maintenance` (when a
device's maintenance window is open), :mod:`~fleet_server.rollouts.evidence`
(device aggregates to each gate's evidence) and
:mod:`~fleet_server.rollouts.gates` (anytime-valid verdicts on it). The spec is
:class:`protocol.api.rollouts.RolloutSpec`.
"""

from fleet_server.rollouts.evidence import DeviceAggregate, InstallRecord, gather, install_tally
from fleet_server.rollouts.gates import GateSpec, evaluate_all, gate_specs, required, srm_log_e
from fleet_server.rollouts.maintenance import in_window, next_open
from fleet_server.rollouts.pacing import allowed_installs
from fleet_server.rollouts.waves import (
    DeviceFacts,
    Population,
    StratumPlan,
    WavePlan,
    bucket,
    control,
    fix_cutoffs,
    matches,
    preview,
    reached,
    waves,
)

__all__ = [
    "DeviceAggregate",
    "DeviceFacts",
    "GateSpec",
    "InstallRecord",
    "Population",
    "StratumPlan",
    "WavePlan",
    "allowed_installs",
    "bucket",
    "control",
    "evaluate_all",
    "fix_cutoffs",
    "gate_specs",
    "gather",
    "in_window",
    "install_tally",
    "matches",
    "next_open",
    "preview",
    "reached",
    "required",
    "srm_log_e",
    "waves",
]
