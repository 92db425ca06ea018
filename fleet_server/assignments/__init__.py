"""Assignments: which released bundle each device runs; recorded, signed, announced.

:mod:`~fleet_server.assignments.planner` holds the rules as plain functions
(hardware, release counter, yanked, rule precedence, what the director
metadata must come to name); :mod:`~fleet_server.assignments.store` the SQL;
:class:`AssignmentService` joins them and signs through the director
repository; :mod:`~fleet_server.assignments.withdrawal` withdraws
assignments (yank, decommission); :mod:`~fleet_server.assignments.routes`
holds the REST operations.
"""

from fleet_server.assignments.models import (
    Assigned,
    AssignmentConflict,
    AssignmentError,
    AssignmentNotFound,
    AssignmentResult,
    Cancelled,
    Committed,
    Refusal,
    ReleaseAlreadyYanked,
    ReleaseYanked,
    SyncStep,
    YankOutcome,
)
from fleet_server.assignments.planner import (
    NAMED_IN_REFUSAL,
    below_installed,
    check_assignment,
    counter_refusal,
    device_label,
    parse_assignment_id,
    plan_sync,
    refusal_of,
    refusal_warning,
    refuse_yanked,
    rule_label,
    rule_skip_reason,
    rule_to_apply,
    winning_rule,
)
from fleet_server.assignments.service import AssignmentService, PublishDesired
from fleet_server.assignments.store import (
    REFUSAL_EVENTS,
    current_assignment,
    current_assignments,
    recent_refusals,
)
from fleet_server.published.rules import ReleaseNotFound, released_bundle

__all__ = [
    "NAMED_IN_REFUSAL",
    "REFUSAL_EVENTS",
    "Assigned",
    "AssignmentConflict",
    "AssignmentError",
    "AssignmentNotFound",
    "AssignmentResult",
    "AssignmentService",
    "Cancelled",
    "Committed",
    "PublishDesired",
    "Refusal",
    "ReleaseAlreadyYanked",
    "ReleaseNotFound",
    "ReleaseYanked",
    "SyncStep",
    "YankOutcome",
    "below_installed",
    "check_assignment",
    "counter_refusal",
    "current_assignment",
    "current_assignments",
    "device_label",
    "parse_assignment_id",
    "plan_sync",
    "recent_refusals",
    "refusal_of",
    "refusal_warning",
    "refuse_yanked",
    "released_bundle",
    "rule_label",
    "rule_skip_reason",
    "rule_to_apply",
    "winning_rule",
]
