"""Release engineering: release keys, the bundle builder, the image repository and its checks.

``fleetctl`` uses it offline, where the release keys are kept; the server
reads and verifies the image repository it hosts with it
(:mod:`fleet_server.published`) but never holds those keys.
"""
