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
    below_installed,
    counter_refusal,
    parse_assignment_id,
    plan_sync,
    refusal_of,
    refusal_warning,
    rule_label,
    winning_rule,
)
from fleet_server.assignments.service import AssignmentService

__all__ = [
    "Assigned",
    "AssignmentConflict",
    "AssignmentError",
    "AssignmentNotFound",
    "AssignmentResult",
    "AssignmentService",
    "Cancelled",
    "Committed",
    "Refusal",
    "ReleaseAlreadyYanked",
    "ReleaseYanked",
    "SyncStep",
    "YankOutcome",
    "below_installed",
    "counter_refusal",
    "parse_assignment_id",
    "plan_sync",
    "refusal_of",
    "refusal_warning",
    "rule_label",
    "winning_rule",
]
