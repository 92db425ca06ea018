"""``fleet-sim``: the simulator's command line (``fleet-sim run``, ``fleet-sim demo``)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from pydantic import ValidationError

from protocol.api.rollouts import parse_duration
from protocol.broker_url import parse_broker_url
from protocol.cli import CommandParser, edgefleet_version
from simulator.demo import run_demo
from simulator.scenario import Scenario, ScenarioError, load_scenario

EXIT_PASSED, EXIT_FAILED, EXIT_BAD_SCENARIO = 0, 1, 2


def build_parser() -> argparse.ArgumentParser:
    parser = CommandParser(
        prog="fleet-sim",
        description=__doc__.splitlines()[0].replace("``", ""),
        epilog="examples:\n  fleet-sim run simulator/scenarios/good-rollout.toml --short\n"
        "  fleet-sim run --devices 100\n  fleet-sim demo",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {edgefleet_version()}")
    commands = parser.add_subparsers(dest="command", required=True)
    _run_parser(commands)
    demo = commands.add_parser(
        "demo",
        help="run the end-to-end demo on zero-setup defaults",
        epilog="It needs nothing running: the demo starts its own broker, server and devices\n"
        "on free ports, and exits 0 when every step went as the story says.\n\n"
        "examples:\n  fleet-sim demo\n  fleet-sim demo --workdir /tmp/edgefleet-demo",
    )
    demo.add_argument(
        "--workdir",
        default=".demo",
        help="where the demo writes (emptied first; default %(default)s)",
    )
    return parser


def _run_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    run = commands.add_parser(
        "run",
        help="run a fleet scenario in real time and check how it went",
        epilog="Without --server-url the run starts its own broker, fleet server (SQLite in\n"
        "the work folder) and, when the scenario asks, the cloud endpoint. It exits 0\n"
        "when every check passed, 1 when one failed (each is printed), 2 when the\n"
        "scenario cannot be run.\n\n"
        "examples:\n"
        "  fleet-sim run simulator/scenarios/bad-model.toml --short\n"
        "  fleet-sim run simulator/scenarios/good-rollout.toml --devices 200 --duration 5m\n"
        "  fleet-sim run --devices 50 --metrics-port 9300 --report-json run.json\n\n"
        "Against a fleet server already running, give its URL, an admin token of it and\n"
        "the broker it ingests from (the devices connect there; the server does not say\n"
        "which it is). The run releases sample models under release keys of its own and\n"
        "registers the scenario's devices, so the server must hold neither yet:\n"
        "  fleet-sim run simulator/scenarios/good-rollout.toml --short --server-url "
        "http://fleet.example:8080 --token TOKEN --mqtt mqtt://fleet.example:1883",
    )
    run.add_argument("scenario", nargs="?", type=Path, help="the scenario file (TOML)")
    run.add_argument("--devices", type=int, help="this many devices, split over the cohorts")
    run.add_argument("--short", action="store_true", help="the scenario's short form (for CI)")
    run.add_argument("--seed", type=int, help="the seed (default: the scenario's)")
    run.add_argument("--duration", help="how long the traffic runs (90s, 10m, 1h)")
    run.add_argument(
        "--workdir",
        type=Path,
        default=Path(".fleet-sim"),
        help="where the run writes (emptied first; default %(default)s)",
    )
    run.add_argument("--report-json", type=Path, help="the report (default: WORKDIR/report.json)")
    run.add_argument(
        "--report-csv", type=Path, help="the time series (default: WORKDIR/report.csv)"
    )
    run.add_argument("--metrics-port", type=int, help="serve Prometheus metrics on this port")
    run.add_argument("--server-url", help="a fleet server already running, instead of one's own")
    token = run.add_mutually_exclusive_group()
    token.add_argument("--token", help="an admin token of --server-url")
    token.add_argument(
        "--token-file",
        type=Path,
        metavar="FILE",
        help="a file holding it (kept out of the process list and the shell's history)",
    )
    run.add_argument(
        "--mqtt",
        metavar="BROKER_URL",
        help="the broker the devices connect to: with --server-url, the one that server "
        "ingests from (mqtt://host:port); without, the run's own server uses it",
    )
    run.add_argument("--quiet", action="store_true", help="no progress line")


def scenario_for(args: argparse.Namespace) -> Scenario:
    """The scenario the command line asks for: the file (or the default) with its overrides."""
    from simulator.runner import check_runnable  # the demo needs none of the runner

    scenario = load_scenario(args.scenario) if args.scenario is not None else Scenario()
    where = str(args.scenario) if args.scenario is not None else "the default scenario"
    try:
        if args.short:
            scenario = scenario.shortened()
        if args.devices is not None:
            if args.devices < 1:
                raise ScenarioError(f"--devices {args.devices}: at least one device")
            scenario = scenario.with_devices(args.devices)
        updates: dict[str, object] = {}
        if args.seed is not None:
            updates["seed"] = args.seed
        if args.duration is not None:
            try:
                updates["duration"] = parse_duration(args.duration)
            except ValueError as exc:
                raise ScenarioError(f"--duration {args.duration!r}: {exc}") from None
        if args.token_file is not None:
            args.token = read_token(args.token_file)
        server: dict[str, object] = {}
        if args.server_url is not None:
            missing = []
            if not args.token:
                missing.append(
                    "--token TOKEN or --token-file FILE (server.token: an admin token of that "
                    "server)"
                )
            if not args.mqtt:
                missing.append(
                    "--mqtt BROKER_URL (server.broker: the broker that server ingests from)"
                )
            if missing:
                raise ScenarioError(f"--server-url needs {' and '.join(missing)}")
            server.update(url=args.server_url, token=args.token)
        elif args.token is not None:  # the token of the scenario's server.url
            if scenario.server.url is None:
                raise ScenarioError("--token is the token of --server-url, which was not given")
            server["token"] = args.token
        if args.mqtt is not None:
            try:
                parse_broker_url(args.mqtt)
            except ValueError as exc:
                raise ScenarioError(f"--mqtt {args.mqtt}: {exc}") from None
            server["broker"] = args.mqtt
        if server:
            updates["server"] = {**scenario.server.model_dump(), **server}
        if updates:
            scenario = Scenario.model_validate({**scenario.model_dump(), **updates})
        check_runnable(scenario)
    except ScenarioError as exc:
        raise ScenarioError(f"{where}: {exc}") from None
    except ValidationError as exc:  # the short form's overrides: not a scenario
        raise ScenarioError(
            f"{where}: {'the short form: ' if args.short else ''}{problems(exc)}"
        ) from None
    except ValueError as exc:
        raise ScenarioError(f"{where}: {exc}") from None
    return scenario


def read_token(path: Path) -> str:
    """The token held in ``path`` (``--token-file``), without its line end."""
    try:
        token = path.read_text().strip()
    except OSError as exc:
        raise ScenarioError(f"--token-file {path}: cannot read it: {exc.strerror}") from None
    if not token:
        raise ScenarioError(f"--token-file {path} is empty; it should hold an admin token")
    return token


def problems(exc: ValidationError) -> str:
    """Each refused field of a validation error, by its place in the scenario."""
    return "; ".join(
        f"{'.'.join(str(p) for p in error['loc']) or '(file)'}: {error['msg']}"
        for error in exc.errors()
    )


def run_command(args: argparse.Namespace) -> int:
    try:
        scenario = scenario_for(args)
    except ScenarioError as exc:
        print(f"fleet-sim: {exc}", file=sys.stderr)
        return EXIT_BAD_SCENARIO
    from simulator.runner import run_scenario

    workdir: Path = args.workdir
    try:
        report = run_scenario(
            scenario, workdir, progress=not args.quiet, metrics_port=args.metrics_port
        )
    except ScenarioError as exc:
        print(f"fleet-sim: {exc}", file=sys.stderr)
        return EXIT_BAD_SCENARIO
    json_path = args.report_json or workdir.resolve() / "report.json"
    csv_path = args.report_csv or workdir.resolve() / "report.csv"
    report.write_json(json_path)
    report.write_csv(csv_path)
    print(report.summary())
    print(f"report: {json_path} (time series: {csv_path})")
    return EXIT_PASSED if report.passed else EXIT_FAILED


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "demo":
        return run_demo(Path(args.workdir))
    if args.command == "run":
        return run_command(args)
    return 2  # pragma: no cover - argparse requires a command


if __name__ == "__main__":
    sys.exit(main())
