"""The testbed: real parts started for the tests, the demo and the benchmarks.

Free ports and deadline waits (:mod:`testbed.waiting`), a directory HTTP server
with Range (:mod:`testbed.http_repo`), brokers (:mod:`testbed.mosquitto`,
:mod:`testbed.embedded_broker`), fleet servers as processes or threads
(:mod:`testbed.server_process`, :mod:`testbed.api_server`), sample bundles
(:mod:`testbed.images`) and agents with an image repository and a director
(:mod:`testbed.fleet`). It may import the agent, the server and the protocol;
they never import it.
"""
