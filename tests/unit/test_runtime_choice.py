"""Which TFLite runtime the agent runs on, and its refusal when it has none.

The refusal names the platform's way out: the runtime extras on a platform PyPI
serves, LiteRT where tflite-runtime's aarch64 wheels need a newer glibc, a newer
OS image or the board vendor's runtime where no wheel fits, and a 64-bit OS on
32-bit ARM (no numpy, cffi or runtime wheels there).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from model_runtime import TFLiteRuntime
from model_runtime.platforms import missing_runtime_message, this_platform_message

LEAD = "no TFLite runtime installed (neither tflite_runtime nor ai_edge_litert imports)"


def test_where_pypi_serves_a_runtime_the_refusal_names_the_extras() -> None:
    for machine, libc in (("x86_64", ("glibc", "2.31")), ("aarch64", ("glibc", "2.36"))):
        text = missing_runtime_message(machine, libc)
        assert text.startswith(LEAD), text
        assert "pip install 'edgefleet[agent]'" in text and "'edgefleet[litert]'" in text


def test_on_aarch64_with_glibc_older_than_2_34_the_refusal_offers_litert() -> None:
    text = missing_runtime_message("aarch64", ("glibc", "2.31"))
    assert text.startswith(LEAD), text
    assert "tflite-runtime's aarch64 wheels need glibc 2.34 and this system has 2.31" in text
    assert "pip install 'edgefleet[litert]' instead" in text
    assert "newer OS image (glibc 2.34 or later" in text and "board's vendor" in text


def test_on_aarch64_with_glibc_older_than_2_27_nothing_on_pypi_fits() -> None:
    text = missing_runtime_message("aarch64", ("glibc", "2.17"))
    assert "glibc 2.17 is older than any runtime's aarch64 wheels on PyPI need" in text
    assert "newer OS image (glibc 2.34 or later" in text and "board's vendor" in text
    assert "edgefleet[litert]'" not in text


@pytest.mark.parametrize("machine", ["armv7l", "armv6l"])
def test_on_32_bit_arm_the_refusal_says_pypi_has_no_wheels(machine: str) -> None:
    text = missing_runtime_message(machine, ("glibc", "2.36"))
    assert f"on 32-bit ARM ({machine}) PyPI has no wheels of numpy, cffi or any TFLite" in text
    assert "64-bit (aarch64) OS image" in text and "vendor" in text


def test_an_unknown_c_library_gets_the_plain_advice() -> None:
    text = missing_runtime_message("aarch64", ("", ""))
    assert text == f"{LEAD}: " + (
        "install the agent with a runtime: pip install 'edgefleet[agent]' (tflite-runtime, "
        "numpy 1.26) or 'edgefleet[litert]' (LiteRT, numpy 2)"
    )


def test_the_runtime_is_whichever_is_installed() -> None:
    runtime = TFLiteRuntime()
    # tflite-runtime 2.14 needs numpy 1.x; LiteRT is installed with numpy 2.
    expected = "tflite_runtime" if np.__version__.startswith("1.") else "ai_edge_litert"
    assert runtime.name == expected


# The runtimes are hidden from this process only (a fault injected at import).
WITHOUT_RUNTIME = """
import sys
sys.modules["tflite_runtime"] = sys.modules["ai_edge_litert"] = None
from agent.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_an_agent_without_a_runtime_refuses_to_start_and_says_what_to_do(tmp_path: Path) -> None:
    config = tmp_path / "agent.toml"
    config.write_text(
        f'device_id = "pump-bare"\nhardware_id = "rpi4-arm64"\ndata_dir = "{tmp_path}"\n'
        f'[image_repository]\nurl = "{tmp_path / "repo"}"\n'
        f'root = "{tmp_path / "1.root.json"}"\nname = "pump-health"\n'
        "[api]\nport = 0\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", WITHOUT_RUNTIME, "run", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1, done.stderr
    lines = done.stderr.strip().splitlines()
    assert "Traceback" not in done.stderr
    assert lines[-1].startswith(f"edge-agent: {LEAD}"), done.stderr
    assert lines[-1] == f"edge-agent: {this_platform_message()}", done.stderr
