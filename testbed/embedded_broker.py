"""The demo's own MQTT broker: a private Mosquitto when installed, else amqtt in-process.

The demo never uses a broker it did not start: whatever else runs on the
machine (another server, another demo, a test run on 127.0.0.1:1883) cannot
take its messages. :func:`broker_for_demo` starts one on a free port of
127.0.0.1 and stops it on exit. Mosquitto is preferred when its binary is
installed: it is the broker production runs, and it has shared subscriptions,
so the demo's server runs as a production replica does. Otherwise
``python -m testbed.embedded_broker --port PORT`` serves amqtt until
terminated: MQTT 3.1.1 with retained messages, which is all the demo needs,
but no shared subscriptions, so a server on it runs as one replica.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from testbed.mosquitto import find_mosquitto
from testbed.waiting import free_port

START_TIMEOUT_S = 20.0
START_ATTEMPTS = 3


class BrokerStartError(RuntimeError):
    """The demo's broker did not start; the message says which and where its log is."""


@dataclass(frozen=True)
class DemoBroker:
    """A broker started for the demo: its URL, which broker it is, and whether it has ``$share``."""

    url: str
    kind: str
    shared_subscriptions: bool


def listening(host: str, port: int) -> bool:
    """Whether something accepts connections on ``host:port``."""
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


@contextlib.contextmanager
def broker_for_demo(directory: Path, *, prefer_mosquitto: bool = True) -> Iterator[DemoBroker]:
    """A broker of the demo's own on a free port of 127.0.0.1, files in ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    binary = find_mosquitto() if prefer_mosquitto else None
    host = "127.0.0.1"
    for attempt in range(START_ATTEMPTS):
        port = free_port(host)
        if binary is not None:
            conf = directory / "mosquitto.conf"
            lines = [f"listener {port} {host}", "allow_anonymous true", "persistence false"]
            lines += ["log_dest stderr", "max_queued_messages 100000"]
            if hasattr(os, "geteuid") and os.geteuid() == 0:
                lines.append("user root")  # as root, Mosquitto would switch to its own user
            conf.write_text("\n".join(lines) + "\n")
            command = [binary, "-c", str(conf)]
            kind = "mosquitto"
        else:
            command = [sys.executable, "-m", "testbed.embedded_broker", "--port", str(port)]
            kind = "amqtt"
        log_path = directory / f"{kind}.log"
        with log_path.open("ab") as log:
            proc = subprocess.Popen(
                command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT
            )
        try:
            deadline = time.monotonic() + START_TIMEOUT_S
            while not listening(host, port) and proc.poll() is None:
                if time.monotonic() > deadline:
                    raise BrokerStartError(
                        f"the demo's {kind} broker did not listen on {host}:{port} in "
                        f"{START_TIMEOUT_S:.0f} s (log: {log_path})"
                    )
                time.sleep(0.05)
            if proc.poll() is not None:
                # Most likely the port was taken between choosing and binding it: try another.
                if attempt + 1 < START_ATTEMPTS:
                    continue
                raise BrokerStartError(
                    f"the demo's {kind} broker exited with status {proc.returncode} "
                    f"(log: {log_path})"
                )
            yield DemoBroker(
                f"mqtt://{host}:{port}", kind, shared_subscriptions=kind == "mosquitto"
            )
            return
        finally:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()


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
