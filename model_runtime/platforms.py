"""What to do when no TFLite runtime is installed, for the platform the agent runs on.

PyPI serves the runtimes for some platforms only (the README's platform table):
tflite-runtime 2.14's aarch64 wheels need glibc 2.34 (manylinux_2_34); LiteRT 2.1.6 and
numpy 2.4's need glibc 2.27; 32-bit ARM has no wheels of numpy, cffi or either runtime.
"""

from __future__ import annotations

import platform

# The oldest glibc each runtime's aarch64 wheels (the pinned versions) install on.
TFLITE_RUNTIME_AARCH64_GLIBC = (2, 34)
LITERT_AARCH64_GLIBC = (2, 27)
ARM32 = frozenset({"armv7l", "armv6l", "armv8l", "arm"})

INSTALL = (
    "install the agent with a runtime: pip install 'edgefleet[agent]' (tflite-runtime, "
    "numpy 1.26) or 'edgefleet[litert]' (LiteRT, numpy 2)"
)


def _version(text: str) -> tuple[int, ...] | None:
    try:
        return tuple(int(part) for part in text.split(".")[:2])
    except ValueError:
        return None


def missing_runtime_message(machine: str, libc: tuple[str, str]) -> str:
    """The refusal when neither runtime imports, on CPU ``machine`` with C library ``libc``.

    ``libc`` is :func:`platform.libc_ver`'s answer, e.g. ``("glibc", "2.31")``.
    """
    lead = "no TFLite runtime installed (neither tflite_runtime nor ai_edge_litert imports)"
    glibc = _version(libc[1]) if libc[0] == "glibc" else None
    if machine in ARM32:
        return (
            f"{lead}; on 32-bit ARM ({machine}) PyPI has no wheels of numpy, cffi or any "
            "TFLite runtime: use a 64-bit (aarch64) OS image, or numpy, cryptography and a "
            "TFLite runtime built for this board (from its vendor or the OS)"
        )
    if machine in ("aarch64", "arm64") and glibc is not None:
        shown = ".".join(map(str, glibc))
        if glibc < LITERT_AARCH64_GLIBC:
            return (
                f"{lead}; this system's glibc {shown} is older than any runtime's aarch64 "
                "wheels on PyPI need (2.27 for LiteRT, 2.34 for tflite-runtime): use a newer "
                "OS image (glibc 2.34 or later: Debian 12, Ubuntu 22.04, JetPack 6), or the "
                "TFLite runtime from the board's vendor"
            )
        if glibc < TFLITE_RUNTIME_AARCH64_GLIBC:
            return (
                f"{lead}; tflite-runtime's aarch64 wheels need glibc 2.34 and this system has "
                f"{shown}: pip install 'edgefleet[litert]' instead (LiteRT, numpy 2; its "
                "wheels need glibc 2.27; on aarch64 it is not yet checked on hardware, and "
                "under emulation its self-test refused a sample release), or use a newer OS "
                "image (glibc 2.34 or later: "
                "Debian 12, Ubuntu 22.04, JetPack 6), or the TFLite runtime from the board's "
                "vendor"
            )
    return f"{lead}: {INSTALL}"


def this_platform_message() -> str:
    """:func:`missing_runtime_message` for the machine this process runs on."""
    return missing_runtime_message(platform.machine(), platform.libc_ver())
