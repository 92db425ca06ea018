"""The model-runtime adapter the agent, the bundle builder and the benchmarks share."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from firmware_images.tflite_writer import GraphBuilder, build_unresolved_custom_op_model
from model_runtime import ModelLoadError, ModelRunError, TFLiteRuntime

MODELS = Path(__file__).resolve().parents[2] / "firmware_images" / "models"
ROWS = np.load(MODELS / "baseline.npy")[:8]


def static_batch_model() -> bytes:
    g = GraphBuilder("a model whose batch cannot be resized")
    x = g.add_input("features", [1, 4], dynamic_batch=False)
    weights = np.arange(8, dtype=np.float32).reshape(2, 4)
    g.mark_output(g.fully_connected(x, weights, np.zeros(2, dtype=np.float32), "out"))
    return g.to_bytes()


def test_a_model_runs_alike_from_its_file_and_from_its_bytes() -> None:
    runtime = TFLiteRuntime()
    from_file = runtime.load(MODELS / "v1.tflite").run({"features": ROWS})
    from_bytes = runtime.load((MODELS / "v1.tflite").read_bytes()).run({"features": ROWS})
    assert from_file.keys() == from_bytes.keys() == {"scores"}
    assert from_file["scores"].shape == (8, 4)
    np.testing.assert_array_equal(from_file["scores"], from_bytes["scores"])


def test_a_model_without_a_dynamic_batch_runs_row_by_row() -> None:
    model = TFLiteRuntime().load(static_batch_model())
    x = np.arange(12, dtype=np.float32).reshape(3, 4)
    batch = model.run({"features": x})["out"]
    rows = [model.run({"features": x[i : i + 1]})["out"] for i in range(3)]
    np.testing.assert_array_equal(batch, np.concatenate(rows))
    np.testing.assert_array_equal(batch, x @ np.arange(8, dtype=np.float32).reshape(2, 4).T)


def test_a_model_the_runtime_cannot_load_is_refused_naming_it(tmp_path: Path) -> None:
    runtime = TFLiteRuntime()
    with pytest.raises(ModelLoadError, match=r"^the TFLite runtime cannot run this model: "):
        runtime.load(build_unresolved_custom_op_model())
    (tmp_path / "junk.tflite").write_bytes(b"not a model")
    with pytest.raises(ModelLoadError, match=r"^junk\.tflite: "):
        runtime.load(tmp_path / "junk.tflite")


@pytest.mark.parametrize(
    "inputs",
    [{"other": ROWS}, {"features": ROWS[:, :3]}, {"features": ROWS.astype(np.float64)}],
    ids=["missing input", "wrong shape", "wrong dtype"],
)
def test_inputs_the_model_cannot_take_are_a_run_error(inputs: dict[str, Any]) -> None:
    model = TFLiteRuntime().load(MODELS / "v1.tflite")
    with pytest.raises(ModelRunError, match=r"^the model failed to run: "):
        model.run(inputs)


LOAD = (
    "import logging, sys\n"
    "from pathlib import Path\n"
    "if sys.argv[2] == 'debug':\n"
    "    logging.basicConfig(level=logging.DEBUG)\n"
    "import numpy as np\n"
    "from model_runtime import TFLiteRuntime\n"
    "TFLiteRuntime().load(Path(sys.argv[1])).run({'features': np.zeros((1, 16), np.float32)})\n"
)


@pytest.mark.parametrize(("level", "shown"), [("info", False), ("debug", True)])
def test_the_runtimes_own_info_lines_show_only_at_debug(level: str, shown: bool) -> None:
    done = subprocess.run(
        [sys.executable, "-c", LOAD, str(MODELS / "v1.tflite"), level],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert ("INFO: Created TensorFlow Lite XNNPACK delegate" in done.stderr) is shown, done.stderr
