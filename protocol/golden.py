"""Golden vectors: inputs and the outputs the model must give for them.

Stored in a bundle as an ``.npz`` archive written deterministically (fixed
member order and timestamps) so that the same vectors give the same bytes.
Arrays are named ``input/NAME`` and ``output/NAME``; loading never unpickles.
"""

from __future__ import annotations

import io
import zipfile
from collections.abc import Mapping

import numpy as np
import numpy.typing as npt

Arrays = dict[str, npt.NDArray[np.generic]]


def pack_golden(inputs: Mapping[str, npt.ArrayLike], outputs: Mapping[str, npt.ArrayLike]) -> bytes:
    """Serialise golden inputs and outputs, each ``[count, *example_shape]``."""
    buffer = io.BytesIO()
    members = [(f"input/{k}", v) for k, v in inputs.items()]
    members += [(f"output/{k}", v) for k, v in outputs.items()]
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_STORED) as archive:
        for name, value in sorted(members, key=lambda item: item[0]):
            array_bytes = io.BytesIO()
            np.lib.format.write_array(  # type: ignore[no-untyped-call]
                array_bytes, np.asarray(value), allow_pickle=False
            )
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            archive.writestr(info, array_bytes.getvalue())
    return buffer.getvalue()


def unpack_golden(data: bytes) -> tuple[Arrays, Arrays]:
    """The inputs and outputs packed by :func:`pack_golden`."""
    inputs: Arrays = {}
    outputs: Arrays = {}
    with np.load(io.BytesIO(data), allow_pickle=False) as archive:
        for key in archive.files:
            kind, _, name = key.partition("/")
            target = inputs if kind == "input" else outputs if kind == "output" else None
            if target is None or not name:
                raise ValueError(f"golden vectors hold an unexpected array {key!r}")
            target[name] = archive[key]
    return inputs, outputs


def golden_disagreement(
    outputs: Mapping[str, npt.ArrayLike],
    expected: Mapping[str, npt.ArrayLike],
    atol: float,
    rtol: float,
) -> tuple[float, str | None]:
    """The largest error of ``outputs`` against golden ``expected``, and what is wrong, if any.

    Every expected output must be present and finite, and within
    ``atol + rtol * |expected|`` of the golden value element by element; the
    problem names the first output at fault (and the worst golden vector).
    """
    worst = 0.0
    for name, want in expected.items():
        if name not in outputs:
            return worst, f"output {name!r} is missing"
        got = np.asarray(outputs[name], dtype=np.float64)
        want64 = np.asarray(want, dtype=np.float64)
        if got.shape != want64.shape:
            return worst, f"output {name!r} has shape {list(got.shape)}, not {list(want64.shape)}"
        if not np.all(np.isfinite(got)):
            return worst, f"output {name!r} is NaN or Inf on a golden vector"
        error = np.abs(got - want64)
        excess = error - (atol + rtol * np.abs(want64))
        if np.any(excess > 0):
            row = int(np.argmax(excess.reshape(len(excess), -1).max(axis=1)))
            return worst, (
                f"golden vector {row}: output {name!r} differs by "
                f"{float(error.max()):.3g}, beyond atol {atol} + rtol {rtol}"
            )
        worst = max(worst, float(error.max()) if error.size else 0.0)
    return worst, None
