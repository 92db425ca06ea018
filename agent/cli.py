"""``edge-agent``: the agent's command line.

Every refusal ends in one line on stderr naming what was refused and why, and
a non-zero exit status; never a traceback.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import agent
from agent.pydantic_plugins import DISABLE_PLUGINS, skip_plugin_discovery
from protocol.cli import EXIT_BROKEN_PIPE, CommandParser, silence_stdout
from protocol.cli import examples as _examples

if TYPE_CHECKING:
    # Loaded by the commands that read a configuration: `verify` needs none of it.
    from agent.config import AgentConfig

EXIT_REFUSED = 3
EXIT_ERROR = 1


def cmd_verify(args: argparse.Namespace) -> int:
    from agent.ota.early_copy import EarlyCopy
    from agent.ota.errors import UpdateRefused

    out = Path(args.out)
    metadata_dir = Path(args.metadata_dir) if args.metadata_dir else None
    # Folders this run creates are removed again if it fails: a refusal leaves nothing behind.
    created = [d for d in (out, metadata_dir) if d is not None and not d.exists()]
    # Started before the verifier is imported, so copying the bundle overlaps loading it.
    early = EarlyCopy.start(args.repo, args.name, args.hardware, out, args.version)
    try:
        try:
            # Imported here: the verification machinery stays out of the serving process.
            from agent.ota.transport import FetchConfig
            from agent.ota.verify import verify_bundle

            fetch = FetchConfig(
                connect_timeout=args.timeout,
                read_timeout=args.timeout,
                min_bytes_per_second=args.min_speed,
            )
            verified = verify_bundle(
                trusted_root=Path(args.root),
                repository=args.repo,
                name=args.name,
                hardware_id=args.hardware,
                out_dir=out,
                metadata_dir=metadata_dir,
                installed_counter=args.installed_counter,
                version=args.version,
                fetch=fetch,
                early=early,
            )
        except BaseException:
            if early is not None:
                early.discard()
            for d in created:
                shutil.rmtree(d, ignore_errors=True)
            raise
    except UpdateRefused as exc:
        print(f"edge-agent: refused {args.name} for {args.hardware}: {exc}", file=sys.stderr)
        return EXIT_REFUSED
    t = verified.target
    if args.json:
        print(
            json.dumps(
                {
                    "bundle": str(verified.path),
                    "name": t.name,
                    "version": t.version,
                    "release_counter": t.release_counter,
                    "bundle_id": t.bundle_id,
                    "sha256": t.sha256,
                }
            )
        )
    else:
        print(
            f"Verified {t.name} {t.version} (release counter {t.release_counter}, "
            f"{t.bundle_id[: t.bundle_id.index(':') + 17]}…) -> {verified.path}"
        )
    return 0


def _config(args: argparse.Namespace) -> AgentConfig:
    from agent.config import AgentConfig

    return AgentConfig.load(Path(args.config))


def cmd_run(args: argparse.Namespace) -> int:
    # What the start builds (modules, classes, models) lives as long as the process: the
    # collector would only walk it, over and over. It is off until the API listens
    # (run_agent turns it back on then, without a collection), or until a refusal.
    gc.disable()
    try:
        return _run(args)
    finally:
        gc.enable()


def _run(args: argparse.Namespace) -> int:
    from agent.daemon import run_agent

    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    config = _config(args)
    if config.enrolment is not None:  # a device without [enrolment] never loads the client
        gc.enable()  # enrolling waits on the server, for as long as it takes
        from agent.enrolment import EnrolmentRefused, enrolled_config

        try:
            # The entry point hands the environment over: only it reads one (token_env).
            config = enrolled_config(config, os.environ)
        except EnrolmentRefused as exc:
            print(f"edge-agent: {exc}", file=sys.stderr)
            return EXIT_REFUSED
    return run_agent(config, Path(args.config))


def cmd_status(args: argparse.Namespace) -> int:
    from agent.status import collect_status, describe_status

    status = collect_status(_config(args), events=args.events)
    print(json.dumps(status, indent=2) if args.json else describe_status(status))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = CommandParser(
        prog="edge-agent",
        description="the edgefleet device agent",
        epilog="It reads its settings from the config file. It honours pydantic's\n"
        f"{DISABLE_PLUGINS} as pydantic does, except that unset it means no\n"
        "pydantic plugin (none is looked for); set it empty to load them all.\n\n"
        + _examples("edge-agent run --config agent.toml", "edge-agent status --config agent.toml"),
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {agent.__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser(
        "verify",
        help="download and verify a bundle from an image repository",
        epilog="It checks the bundle as an install would, without installing it: exit 0 with the\n"
        "verified bundle in --out, or exit 3 and one line naming what was refused.\n\n"
        + _examples(
            "edge-agent verify --root 1.root.json --repo https://updates.example/repo "
            "--name pump-health --hardware rpi4-arm64 --out bundles/",
            "edge-agent verify --root repo/metadata/1.root.json --repo repo --name pump-health "
            "--hardware rpi4-arm64 --out bundles/ --installed-counter 1000000999 --json",
        ),
    )
    p.add_argument("--root", required=True, help="the trusted root.json of the image repository")
    p.add_argument("--repo", required=True, help="repository URL or directory")
    p.add_argument("--name", required=True, help="the bundle's name, e.g. pump-health")
    p.add_argument("--hardware", required=True, help="this device's hardware id")
    p.add_argument("--out", required=True, help="directory for the verified bundle")
    p.add_argument("--version", help="a specific version (default: the newest)")
    p.add_argument(
        "--installed-counter",
        type=int,
        default=0,
        help="release counter of the installed bundle; lower ones are refused",
    )
    p.add_argument("--metadata-dir", help="trusted metadata store (default: OUT/.metadata)")
    p.add_argument("--timeout", type=float, default=30.0, help="seconds without data (default 30)")
    p.add_argument(
        "--min-speed",
        type=float,
        default=2048.0,
        help="slowest download in bytes/s before it is given up (default 2048)",
    )
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_verify)

    p = commands.add_parser(
        "run",
        help="run the agent: serve models, install updates",
        epilog=_examples(
            "edge-agent run --config agent.toml",
            "edge-agent run --config /etc/edgefleet/agent.toml --verbose",
        ),
    )
    p.add_argument("--config", required=True, help="the agent's config file (agent.toml)")
    p.add_argument(
        "--verbose",
        action="store_true",
        help="log at DEBUG level, and let the model runtime print its own INFO lines",
    )
    p.set_defaults(func=cmd_run)

    p = commands.add_parser(
        "status",
        help="slots, install journal and recent events",
        epilog=_examples(
            "edge-agent status --config agent.toml",
            "edge-agent status --config agent.toml --events 50 --json",
        ),
    )
    p.add_argument("--config", required=True, help="the agent's config file (agent.toml)")
    p.add_argument(
        "--events", type=int, default=10, help="how many recent events to show (default 10)"
    )
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_status)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; exit 0, 1 (error), 3 (refused), 130 (interrupted), 141 (reader gone)."""
    # Before any model is built: the entry point hands the environment over.
    skip_plugin_discovery(os.environ)
    try:
        args = build_parser().parse_args(argv)
        code: int = args.func(args)
        # Flushed here, not at exit, so a reader that went away is noticed below.
        sys.stdout.flush()
    except BrokenPipeError:
        # The reader (``| head``) has what it wanted: stop quietly, as Unix tools do
        # on SIGPIPE (status 128 + 13). Later flushes go to /dev/null, not to a traceback.
        silence_stdout()
        return EXIT_BROKEN_PIPE
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        # A ConfigError comes only from a command that loaded agent.config.
        config = sys.modules.get("agent.config")
        runtime = sys.modules.get("model_runtime.base")  # no runtime installed: what to do
        known = (config and isinstance(exc, config.ConfigError)) or (
            runtime and isinstance(exc, runtime.RuntimeNotInstalled)
        )
        if not isinstance(exc, OSError) and not known:
            raise
        print(f"edge-agent: {exc}", file=sys.stderr)
        return EXIT_ERROR
    return code


if __name__ == "__main__":
    sys.exit(main())
