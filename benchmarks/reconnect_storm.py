"""A reconnect storm through the fault proxy against the same storm straight to Mosquitto.

``N`` (default 1,000) light MQTT clients on one event loop are connected,
then their links end all at once and every client reconnects at once: a new
TCP connection, an MQTT 3.1.1 CONNECT (clean session, its own client id, the
same as before), and the broker's CONNACK. The figure is the storm's connect
rate, ``N`` over the time from the links' end to the last CONNACK, with the
median and 99th percentile of a client's time to be back.

- *bare*: the clients connect straight to a private Mosquitto; the storm is
  each client resetting its own connection (an abortive close, RST), then
  reconnecting. The baseline: Mosquitto's own rate with these clients.
- *proxy*: the clients connect through :class:`simulator.proxy.FaultProxy`
  (one group, no faults), and the storm is ``FaultProxy.cut()``: the proxy
  resets every connection both ways, the clients see the reset and reconnect
  through it. Every reconnect then costs the proxy an accept and a connect
  to the broker before the CONNECT can pass.

The clients are the same code in both arms (wait for the link to end,
reconnect, count the CONNACK) and run in this process; the broker is a
private Mosquitto on a free port (``max_connections -1``, persistence and
connection messages off, otherwise its defaults); the proxy runs as a process
of its own (``--proxy-in-process`` puts it on the clients' loop instead, as a
simulator run in one process has it), told to cut over a pipe; the time of
the cut includes that message. Arms alternate round by round (the first
round's order is swapped every round), and every round checks that every
client was back and the proxy cut exactly ``N``.

Run: ``python -m benchmarks.reconnect_storm [--clients N] [--rounds R] [--proxy-in-process]``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import socket
import statistics
import struct
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from simulator.proxy import FaultProxy
from testbed.server_process import private_broker

CLIENTS = 1_000
ROUNDS = 5
STORM_TIMEOUT_S = 120.0
CONNACK_ACCEPTED = b"\x20\x02\x00\x00"
_LINGER_RESET = struct.pack("ii", 1, 0)
BROKER_CONF = ["max_connections -1", "persistence false", "connection_messages false"]


def connect_packet(client_id: str) -> bytes:
    """An MQTT 3.1.1 CONNECT: clean session, 60 s keep-alive, ``client_id``."""
    name = client_id.encode()
    body = b"\x00\x04MQTT\x04\x02\x00\x3c" + len(name).to_bytes(2, "big") + name
    return bytes([0x10, len(body)]) + body


class StormClient:
    """A device's MQTT connection, no more: CONNECT, CONNACK, then wait until the link ends."""

    def __init__(self, port: int, client_id: str) -> None:
        self.port = port
        self.client_id = client_id
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def connect(self) -> None:
        self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)
        self.writer.write(connect_packet(self.client_id))
        answer = await self.reader.readexactly(4)
        if answer != CONNACK_ACCEPTED:
            raise RuntimeError(f"{self.client_id}: the broker answered {answer!r}, not CONNACK 0")

    async def ride_out_the_storm(self) -> float:
        """Wait for the link to end, reconnect; the moment the broker accepted again."""
        assert self.reader is not None
        with contextlib.suppress(ConnectionError):
            await self.reader.read(1)
        await self.hang_up()
        await self.connect()
        return time.perf_counter()

    def reset(self) -> None:
        """End the link abortively (RST), as a cut does."""
        assert self.writer is not None
        transport = self.writer.transport
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
        transport.abort()

    async def hang_up(self) -> None:
        if self.writer is not None:
            self.writer.close()
            with contextlib.suppress(ConnectionError):
                await self.writer.wait_closed()
            self.writer = None


@dataclass(frozen=True)
class Storm:
    """One storm: how long until every client was back, and each client's time."""

    arm: str
    round_no: int
    clients: int
    seconds: float
    back_s: list[float]
    proxy_cpu_ms_per_connect: float | None = None
    proxy_kib_per_connection: float | None = None

    @property
    def rate(self) -> float:
        return self.clients / self.seconds

    def percentile(self, q: float) -> float:
        ordered = sorted(self.back_s)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


Trigger = Callable[[list["StormClient"]], Awaitable[None]]


class ProcessMeter:
    """CPU time and resident memory of another process, read from /proc."""

    def __init__(self, pid: int) -> None:
        self.pid = pid

    def cpu_s(self) -> float:
        fields = Path(f"/proc/{self.pid}/stat").read_text().rpartition(")")[2].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def rss_kib(self) -> int:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise RuntimeError(f"no VmRSS for process {self.pid}")


async def storm(
    arm: str,
    port: int,
    clients: int,
    round_no: int,
    trigger: Trigger,
    proxy: ProcessMeter | None = None,
) -> Storm:
    """Connect ``clients``, end their links with ``trigger``, time them all being back.

    With ``proxy``, also what the proxy process spent: CPU per reconnect
    relayed, and resident memory per open connection (its RSS with the
    clients connected less its RSS before).
    """
    fleet = [StormClient(port, f"storm-{arm}-{round_no}-{i}") for i in range(clients)]
    idle_kib = proxy.rss_kib() if proxy else 0
    for start in range(0, clients, 100):  # a gentle ramp-in: this is not what is timed
        await asyncio.gather(*(c.connect() for c in fleet[start : start + 100]))
    waiting = [asyncio.create_task(c.ride_out_the_storm()) for c in fleet]
    await asyncio.sleep(0.2)  # every client is waiting on its link
    busy_kib = proxy.rss_kib() if proxy else 0
    cpu_before = proxy.cpu_s() if proxy else 0.0
    started = time.perf_counter()
    await trigger(fleet)
    async with asyncio.timeout(STORM_TIMEOUT_S):
        back = await asyncio.gather(*waiting)
    cpu_ms = (proxy.cpu_s() - cpu_before) * 1000 / clients if proxy else None
    await asyncio.gather(*(c.hang_up() for c in fleet))
    return Storm(
        arm,
        round_no,
        clients,
        max(back) - started,
        [t - started for t in back],
        proxy_cpu_ms_per_connect=cpu_ms,
        proxy_kib_per_connection=(busy_kib - idle_kib) / clients if proxy else None,
    )


class ProxyProcess:
    """The proxy as a process of its own, cut on command over its stdin."""

    def __init__(self, process: asyncio.subprocess.Process, port: int) -> None:
        self.process = process
        self.port = port

    @classmethod
    @contextlib.asynccontextmanager
    async def running(cls, broker_port: int) -> AsyncIterator[ProxyProcess]:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "benchmarks.reconnect_storm",
            "--serve-proxy",
            str(broker_port),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
        )
        try:
            assert process.stdout is not None
            port = int(await process.stdout.readline())
            yield cls(process, port)
        finally:
            if process.stdin is not None:
                process.stdin.close()
            try:
                async with asyncio.timeout(10):
                    await process.wait()
            except TimeoutError:
                process.kill()
                await process.wait()

    async def cut(self) -> int:
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.write(b"cut\n")
        await self.process.stdin.drain()
        return int(await self.process.stdout.readline())


async def serve_proxy(broker_port: int) -> None:
    """The proxy process: print the group's port, cut on each ``cut`` line, stop at end of input."""
    proxy = FaultProxy("127.0.0.1", broker_port, name="storm")
    port = await proxy.open("storm")
    print(port, flush=True)
    loop = asyncio.get_running_loop()
    while line := await loop.run_in_executor(None, sys.stdin.readline):
        if line.strip() == "cut":
            print(proxy.cut("storm"), flush=True)
    await proxy.close()


async def proxy_storm(broker_port: int, clients: int, round_no: int, in_process: bool) -> Storm:
    if in_process:
        proxy = FaultProxy("127.0.0.1", broker_port, name="storm")
        port = await proxy.open("storm")
        cut: list[int] = []

        async def trigger(_: list[StormClient]) -> None:
            cut.append(proxy.cut("storm"))

        try:
            result = await storm("proxy", port, clients, round_no, trigger)
        finally:
            await proxy.close()
    else:
        async with ProxyProcess.running(broker_port) as child:
            cut = []

            async def trigger(_: list[StormClient]) -> None:
                cut.append(await child.cut())

            meter = ProcessMeter(child.process.pid)
            result = await storm("proxy", child.port, clients, round_no, trigger, meter)
    if cut != [clients]:
        raise RuntimeError(f"the proxy cut {cut} connections, not {clients}")
    return result


async def bare_storm(broker_port: int, clients: int, round_no: int) -> Storm:
    async def trigger(fleet: list[StormClient]) -> None:
        for client in fleet:
            client.reset()

    return await storm("bare", broker_port, clients, round_no, trigger)


def report(storms: list[Storm], clients: int, in_process: bool) -> None:
    where = "on the clients' loop" if in_process else "in a process of its own"
    print(f"{clients} clients reconnecting at once; the proxy {where}")
    print(
        f"{'round':>5} {'arm':>6} {'connects/s':>11} {'all back s':>10} {'p50 s':>7} {'p99 s':>7}"
    )
    for s in storms:
        print(
            f"{s.round_no:>5} {s.arm:>6} {s.rate:>11.0f} {s.seconds:>10.3f}"
            f" {s.percentile(0.5):>7.3f} {s.percentile(0.99):>7.3f}"
        )
    bare = statistics.median(s.rate for s in storms if s.arm == "bare")
    proxied = statistics.median(s.rate for s in storms if s.arm == "proxy")
    print(f"median connects/s: bare {bare:.0f}, through the proxy {proxied:.0f}")
    print(f"ratio proxy/bare: {proxied / bare:.2f}x")
    bare_p50 = statistics.median(s.percentile(0.5) for s in storms if s.arm == "bare")
    proxy_p50 = statistics.median(s.percentile(0.5) for s in storms if s.arm == "proxy")
    print(f"half the clients back (median of p50s): bare {bare_p50:.3f} s, proxy {proxy_p50:.3f} s")
    cpu = [s.proxy_cpu_ms_per_connect for s in storms if s.proxy_cpu_ms_per_connect is not None]
    kib = [s.proxy_kib_per_connection for s in storms if s.proxy_kib_per_connection is not None]
    if cpu and kib:
        print(
            f"the proxy process: {statistics.median(cpu):.3f} ms CPU per reconnect relayed, "
            f"{statistics.median(kib):.1f} KiB resident per open connection (medians)"
        )


async def run(clients: int, rounds: int, in_process: bool, workdir: Path) -> list[Storm]:
    storms: list[Storm] = []
    with private_broker(workdir, BROKER_CONF) as broker:
        broker_port = int(broker.url.rsplit(":", 1)[1])
        await bare_storm(broker_port, min(clients, 100), 0)  # warm-up, not counted
        for round_no in range(1, rounds + 1):
            arms = ["bare", "proxy"] if round_no % 2 else ["proxy", "bare"]
            for arm in arms:
                if arm == "bare":
                    storms.append(await bare_storm(broker_port, clients, round_no))
                else:
                    storms.append(await proxy_storm(broker_port, clients, round_no, in_process))
    return storms


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--clients", type=int, default=CLIENTS)
    parser.add_argument("--rounds", type=int, default=ROUNDS)
    parser.add_argument("--proxy-in-process", action="store_true")
    parser.add_argument("--serve-proxy", type=int, metavar="BROKER_PORT", help=argparse.SUPPRESS)
    args = parser.parse_args(argv if argv is not None else [])
    if args.serve_proxy:
        asyncio.run(serve_proxy(args.serve_proxy))
        return
    if args.clients < 1 or args.rounds < 1:
        parser.error("--clients and --rounds must be at least 1")
    with tempfile.TemporaryDirectory() as work:
        storms = asyncio.run(run(args.clients, args.rounds, args.proxy_in_process, Path(work)))
    report(storms, args.clients, args.proxy_in_process)


if __name__ == "__main__":
    main(sys.argv[1:])
