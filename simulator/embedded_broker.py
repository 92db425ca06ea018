"""The zero-set-up MQTT broker: amqtt, run in its own process when nothing listens.

``python -m simulator.embedded_broker --port 1883`` serves until terminated.
amqtt speaks MQTT 3.1.1 and keeps retained messages, which is all the demo
needs; it has no shared subscriptions, so a server using it runs as one replica.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator


def listening(host: str, port: int) -> bool:
    """Whether something accepts connections on ``host:port``."""
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


@contextlib.contextmanager
def broker_for_demo(host: str = "127.0.0.1", port: int = 1883) -> Iterator[tuple[str, bool]]:
    """The broker URL to use, and whether it was started here (stopped on exit)."""
    if listening(host, port):
        yield f"mqtt://{host}:{port}", False
        return
    proc = subprocess.Popen(
        [sys.executable, "-m", "simulator.embedded_broker", "--host", host, "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 20
        while not listening(host, port):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the embedded MQTT broker did not start on {host}:{port}")
            time.sleep(0.1)
        yield f"mqtt://{host}:{port}", True
    finally:
        proc.terminate()
        proc.wait(timeout=10)


async def serve(host: str, port: int) -> None:
    from amqtt.broker import Broker

    broker = Broker(
        {
            "listeners": {"default": {"type": "tcp", "bind": f"{host}:{port}"}},
            "plugins": {
                "amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}
            },
        }
    )
    await broker.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await broker.shutdown()


def main() -> int:
    parser = argparse.ArgumentParser(prog="edgefleet-broker")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=1883)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    asyncio.run(serve(args.host, args.port))
    return 0


if __name__ == "__main__":
    sys.exit(main())
