"""The operations keep their order in the OpenAPI document wherever a feature declares them."""

from __future__ import annotations

from fleet_server.api import app
from fleet_server.assignments import routes as assignment_routes
from fleet_server.devices import routes as device_routes


def test_the_listed_operations_come_first_in_the_listed_order() -> None:
    ids = [op.operation_id for op in app.OPERATIONS]
    assert ids[: len(app.DOCUMENT_ORDER)] == list(app.DOCUMENT_ORDER)
    assert len(ids) == len(set(ids))


def test_the_features_operations_are_served() -> None:
    served = {op.operation_id for op in app.OPERATIONS}
    for feature in (device_routes.OPERATIONS, assignment_routes.OPERATIONS):
        assert {op.operation_id for op in feature} <= served


def test_operations_not_listed_keep_the_order_of_the_table() -> None:
    listed = set(app.DOCUMENT_ORDER)
    rest = [op.operation_id for op in app.OPERATIONS if op.operation_id not in listed]
    ops = app.in_document_order(tuple(reversed(app.OPERATIONS)))
    assert [op.operation_id for op in ops if op.operation_id not in listed] == rest[::-1]
    assert [op.operation_id for op in ops][: len(listed)] == list(app.DOCUMENT_ORDER)
