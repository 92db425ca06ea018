"""Files ``fleetctl`` reads secrets from and writes answers to.

Writes are atomic (a temporary file, then a rename); a secret's file is readable
by its owner only from the start.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from fleet_server.fleetctl.errors import CommandError


def read_secret(path: str, what: str) -> str:
    """The secret (``what``, for the error) held in the file ``path``, without its line end."""
    try:
        secret = Path(path).read_text().rstrip("\r\n")
    except OSError as exc:
        raise CommandError(f"cannot read the {what} from {path}: {exc.strerror}") from None
    if not secret:
        raise CommandError(f"{path} is empty; it should hold the {what}")
    return secret


def write_file(path: Path, text: str, *, private: bool = False, what: str | None = None) -> None:
    """Write ``text`` to ``path`` atomically; ``private``: readable by its owner only (0600)."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.unlink(missing_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600 if private else 0o666)
        with os.fdopen(fd, "w") as f:
            if private:
                os.fchmod(f.fileno(), 0o600)
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise CommandError(f"cannot write {what or path}: {exc.strerror or exc}") from None


def check_out_folder(args: argparse.Namespace, what: str) -> None:
    """Refuse an --out whose folder does not exist before the server makes a secret."""
    if args.out and not Path(args.out).absolute().parent.is_dir():
        raise CommandError(f"--out {args.out}: its folder does not exist; no {what}")


def secret_out(args: argparse.Namespace, answer: dict[str, Any], key: str) -> dict[str, Any] | None:
    """With ``--out FILE``: the secret ``answer[key]`` written there (0600), and the answer to
    show in its place; without ``--out``, None (the secret is shown)."""
    if not args.out:
        return None
    write_file(Path(args.out), answer[key] + "\n", private=True)
    return {**{k: v for k, v in answer.items() if k != key}, "out": args.out}
