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
