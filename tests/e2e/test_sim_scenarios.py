"""The shipped scenarios' short forms, run as a user runs them: ``fleet-sim run FILE --short``.

Each run starts its own broker, fleet server (and cloud endpoint) and
simulated devices, and must exit 0 with every check of its report passed,
its figures and time series agreeing (:func:`tests.support.sim_runs.run_short`);
the reconnect storm and the capacity cut, also looked at in detail, are in
``test_sim_scenarios_in_detail.py``, a module of its own so that it runs beside
this one. (``fleet-sim run``'s options and a run that fails a check:
``test_sim_run_options.py``.)
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.sim_runs import run_short

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("name", ["drift-region", "good-rollout", "bad-model", "power-cuts"])
def test_a_short_scenario_passes_every_check(tmp_path: Path, name: str) -> None:
    run_short(tmp_path, name)
