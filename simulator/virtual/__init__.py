"""The virtual-clock mode of the fleet simulator: thousands of devices, a week in minutes.

:func:`run_virtual` runs a scenario (``mode = "virtual"``) on a simulated
clock: the devices' own recorder, watchdog and models, the server's own ingest
and rollout rules, seeded, and written to a trace that :func:`replay` runs
again to the same report.
"""

from simulator.virtual.run import replay, run_virtual, same_report
from simulator.virtual.trace import TraceError

__all__ = ["TraceError", "replay", "run_virtual", "same_report"]
