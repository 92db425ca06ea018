"""Input validation against a manifest's contract: :mod:`protocol.validation`.

The rule lives in ``protocol`` because the fleet's cloud endpoint checks the
requests it is sent by the same contract; the agent's code imports it here.
"""

from protocol.validation import (
    InputContract,
    InvalidInput,
    check_declared_shapes,
    validate_inputs,
)

__all__ = ["InputContract", "InvalidInput", "check_declared_shapes", "validate_inputs"]
