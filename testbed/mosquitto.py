"""A private Mosquitto: its own process, configuration and ports.

Never the machine's shared broker. The configuration under test is used as
written; only what running inside a test needs goes in front of it (stay the
current user rather than drop to ``mosquitto`` when run as root, so the 0600
files stay readable). A missing ``mosquitto`` binary fails the test, with
what to install: a security test that skips is a test nobody runs. The demo
uses :func:`find_mosquitto` and falls back to an embedded broker instead.
"""

from __future__ import annotations

import contextlib
import getpass
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from testbed.waiting import free_port

__all__ = ["BrokerError", "Mosquitto", "free_port", "running_mosquitto"]

START_TIMEOUT = 10.0


class BrokerError(AssertionError):
    """The private broker is not installed, or did not start."""


def find_mosquitto() -> str | None:
    """The installed ``mosquitto``, if any (Debian puts it in /usr/sbin, often not on PATH)."""
    found = shutil.which("mosquitto")
    if found:
        return found
    for path in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto"):
        if os.access(path, os.X_OK):
            return path
    return None


def mosquitto_binary() -> str:
    """The path of ``mosquitto``; fails the test when it is not installed."""
    path = find_mosquitto()
    if path is None:
        raise BrokerError(
            "the mosquitto broker is not installed (apt-get install mosquitto, or "
            "brew install mosquitto); the broker security tests need the real broker"
        )
    return path


class Mosquitto:
    """A running ``mosquitto -c CONF``; see :func:`running_mosquitto`."""

    def __init__(self, conf: Path, ports: Sequence[int], log: Path) -> None:
        self.conf = conf
        self.ports = tuple(ports)
        self.log = log
        self._log_file = log.open("wb")
        self.process = subprocess.Popen(
            [mosquitto_binary(), "-c", str(conf)],
            stdin=subprocess.DEVNULL,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
        )

    def wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        waiting = list(self.ports)
        while waiting:
            if self.process.poll() is not None:
                self._fail(f"mosquitto exited with status {self.process.returncode}")
            try:
                with socket.create_connection(("127.0.0.1", waiting[0]), timeout=0.2):
                    waiting.pop(0)
            except OSError:
                if time.monotonic() > deadline:
                    self._fail(f"mosquitto did not listen on port {waiting[0]} in time")
                time.sleep(0.02)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log_file.close()

    def output(self) -> str:
        self._log_file.flush()
        return self.log.read_text(errors="replace")

    def _fail(self, why: str) -> None:
        self.stop()
        raise BrokerError(f"{why}; its output:\n{self.output()}")


@contextlib.contextmanager
def running_mosquitto(conf: Path, ports: Sequence[int]) -> Iterator[Mosquitto]:
    """Run Mosquitto with ``conf`` until the block ends; ready once ``ports`` accept."""
    test_conf = conf.with_name(conf.stem + ".test.conf")
    preamble = ["# test harness, then the configuration under test"]
    if os.geteuid() == 0:
        preamble.append(f"user {getpass.getuser()}")
    test_conf.write_text("\n".join(preamble) + "\n\n" + conf.read_text())
    broker = Mosquitto(test_conf, ports, conf.with_name("mosquitto.log"))
    try:
        broker.wait_ready()
        yield broker
    finally:
        broker.stop()
