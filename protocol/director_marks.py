"""The marks a director target's ``custom`` may carry beside its device, hardware and counter.

Both sides read them from here: the server's director writes them
(:mod:`fleet_server.director.repository`), the agent's director client reads
them (:mod:`agent.ota.director_client`).

- ``rollback_of`` (``ALGORITHM:HEX`` of the bundle it replaces): a fleet
  rollback; the device accepts it only for exactly the bundle its other slot
  holds from before.
- ``shadow`` (``true``): a shadow install; the device installs the bundle
  beside its active model and runs it on a share of requests without serving
  its answers. A director lists at most one shadow target beside the device's
  assignment.
- ``hybrid_plan`` (a :class:`protocol.hybrid.HybridPlan` as JSON): not a
  bundle but the device's hybrid-inference plan; the target's hashes and
  length are those of the plan's canonical JSON. A director lists at most one.
  TUF signs metadata as OLPC canonical JSON, which refuses floats, so the value
  is the *text* of :meth:`~protocol.hybrid.HybridPlan.canonical_json` (a JSON
  string); the agent also reads an object whose floats are written as strings.
"""

from __future__ import annotations

import re
from typing import Final

ROLLBACK_OF: Final = "rollback_of"
SHADOW: Final = "shadow"
HYBRID_PLAN: Final = "hybrid_plan"

# The form of a bundle id in a mark: ALGORITHM:HEX.
BUNDLE_ID: Final = re.compile(r"[a-z0-9_-]{1,32}:[0-9a-f]{32,128}")
