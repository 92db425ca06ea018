"""Rollouts: a release going out to a selection of devices in waves, gated on the field.

The pure rules: :mod:`~fleet_server.rollouts.waves` (which devices each
wave reaches: consistent hashing, stratified, stable as the fleet changes),
:mod:`~fleet_server.rollouts.pacing` (how many installs may start, an
exponential ramp), :mod:`~fleet_server.rollouts.maintenance` (when a
device's maintenance window is open), :mod:`~fleet_server.rollouts.evidence`
(device aggregates, and the shadow stage's devices and installs, to each
gate's evidence), :mod:`~fleet_server.rollouts.gates` (anytime-valid
verdicts on it) and :mod:`~fleet_server.rollouts.controller`
(the rollout's life as one transition table: ``decide(state, event, spec, now)``
over the plain :class:`RolloutState`). The spec is
:class:`protocol.api.rollouts.RolloutSpec`.

Around them: :mod:`~fleet_server.rollouts.store` (the tables),
:mod:`~fleet_server.rollouts.service` (the only code touching the session:
create, show, operators' actions and the controller's tick, which carries out
the controller's effects) and :mod:`~fleet_server.rollouts.routes` (the REST
operations, which call the service).
"""

from fleet_server.rollouts.controller import (
    Abort,
    ActionRefused,
    AssignDevices,
    AssignStage,
    DropShadows,
    InstallShadow,
    Pause,
    Promote,
    RecordDecision,
    Resume,
    RollbackReached,
    ServeStage,
    Start,
    Tick,
    decide,
)
from fleet_server.rollouts.evidence import (
    DeviceAggregate,
    InstallRecord,
    ShadowDevice,
    ShadowInstall,
    gather,
    gather_shadow,
    install_tally,
    shadow_install_tally,
    shadow_reporting,
)
from fleet_server.rollouts.gates import GateSpec, evaluate_all, gate_specs, required, srm_log_e
from fleet_server.rollouts.maintenance import in_window, next_open
from fleet_server.rollouts.pacing import allowed_installs
from fleet_server.rollouts.state import DecisionRecord, Phase, RolloutState
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
    "Abort",
    "ActionRefused",
    "AssignDevices",
    "AssignStage",
    "DecisionRecord",
    "DeviceAggregate",
    "DeviceFacts",
    "DropShadows",
    "GateSpec",
    "InstallRecord",
    "InstallShadow",
    "Pause",
    "Phase",
    "Population",
    "Promote",
    "RecordDecision",
    "Resume",
    "RollbackReached",
    "RolloutState",
    "ServeStage",
    "ShadowDevice",
    "ShadowInstall",
    "Start",
    "StratumPlan",
    "Tick",
    "WavePlan",
    "allowed_installs",
    "bucket",
    "control",
    "decide",
    "evaluate_all",
    "fix_cutoffs",
    "gate_specs",
    "gather",
    "gather_shadow",
    "in_window",
    "install_tally",
    "matches",
    "next_open",
    "preview",
    "reached",
    "required",
    "shadow_install_tally",
    "shadow_reporting",
    "srm_log_e",
    "waves",
]
