"""``python -m fleet_server.fleetctl``."""

import sys

from fleet_server.fleetctl import main

sys.exit(main())
