"""The fleet server's HTTP face: the operators' REST API and the devices' file hosting.

``app.build_app(server)`` assembles the aiohttp application; ``routes`` holds
the REST operations, and a feature's own module adds its part (drift's in
:mod:`fleet_server.drift.routes`); each declares its role and bodies, from which
``openapi`` writes the OpenAPI document; ``hosting`` serves the image
repository and director metadata to devices; ``client`` is the REST client
``fleetctl`` uses.
"""
