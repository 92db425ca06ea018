"""A small, deterministic writer of TFLite flatbuffers.

:class:`GraphBuilder` assembles a one-subgraph float32 model from a handful of
operators and serialises it with the ``tflite`` package's generated builder
functions. The same calls always give the same bytes: nothing depends on the
clock, the host or dict ordering, and constant data is 16-byte aligned so the
runtime can map it in place.

The conventions the runtime relies on, all kept here:

* buffer 0 is the empty sentinel; tensors computed at run time point to it;
* inputs and intermediates carry ``shape_signature`` with ``-1`` for the batch
  dimension, so ``Interpreter.resize_tensor_input`` can run batches;
* operator codes set both ``deprecated_builtin_code`` (capped at 127, what old
  readers look at) and ``builtin_code``;
* the file identifier is ``TFL3`` and the schema version 3;
* an int8 tensor carries one ``(scale, zero_point)`` (per-tensor, affine:
  ``real = scale * (q - zero_point)``); an int32 bias of a quantized dense
  layer has scale ``input_scale * weight_scale`` and zero point 0.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import flatbuffers
import numpy as np
import tflite
from numpy.typing import ArrayLike

__all__ = ["GraphBuilder", "GraphError", "TensorRef", "build_unresolved_custom_op_model"]

SCHEMA_VERSION = 3
_FILE_IDENTIFIER = b"TFL3"
_BUFFER_ALIGNMENT = 16
_DEPRECATED_CODE_LIMIT = 127

_FLOAT32: np.dtype[Any] = np.dtype(np.float32)
_TENSOR_TYPES: dict[np.dtype[Any], int] = {
    np.dtype(np.float32): tflite.TensorType.FLOAT32,
    np.dtype(np.int8): tflite.TensorType.INT8,
    np.dtype(np.int32): tflite.TensorType.INT32,
    np.dtype(np.int64): tflite.TensorType.INT64,
}


class GraphError(ValueError):
    """The requested graph is malformed (unknown tensor, bad shape, no outputs)."""


@dataclass(frozen=True)
class TensorRef:
    """A handle to a tensor of the graph being built: its index, shape and type."""

    index: int
    shape: tuple[int, ...]
    dtype: np.dtype[Any]


@dataclass
class _Tensor:
    name: str
    shape: tuple[int, ...]
    signature: tuple[int, ...] | None
    dtype: np.dtype[Any]
    buffer: int
    quantization: tuple[float, int] | None = None


@dataclass
class _Operator:
    opcode: int
    inputs: tuple[int, ...]
    outputs: tuple[int, ...]
    options_type: int
    options: tuple[str, dict[str, object]] | None


class GraphBuilder:
    """Builds a single-subgraph TFLite model, one operator at a time.

    Tensors are referred to by the :class:`TensorRef` each method returns. The
    first dimension of every input may be dynamic (the batch); shapes of
    computed tensors follow from their operator, and a dynamic batch
    propagates through them.
    """

    def __init__(self, description: str = "") -> None:
        self._description = description
        self._tensors: list[_Tensor] = []
        self._buffers: list[bytes] = [b""]  # buffer 0: the empty sentinel
        self._operators: list[_Operator] = []
        self._opcodes: list[tuple[int, str, int]] = []
        self._inputs: list[int] = []
        self._outputs: list[int] = []

    # -- tensors -------------------------------------------------------------

    def add_input(
        self,
        name: str,
        shape: Sequence[int],
        dtype: type | np.dtype[Any] = np.float32,
        *,
        dynamic_batch: bool = True,
    ) -> TensorRef:
        """Declare a graph input; with ``dynamic_batch`` its first dimension may be resized."""
        shape = tuple(int(d) for d in shape)
        if not shape or min(shape) < 1:
            raise GraphError(
                f"input {name!r} needs a non-empty shape of positive sizes, got {shape}"
            )
        signature = (-1, *shape[1:]) if dynamic_batch else None
        ref = self._new_tensor(name, shape, signature, np.dtype(dtype), buffer=0)
        self._inputs.append(ref.index)
        return ref

    def add_constant(
        self, name: str, value: ArrayLike, quantization: tuple[float, int] | None = None
    ) -> TensorRef:
        """Store ``value`` (float32, int8, int32 or int64) in a buffer and return its tensor.

        ``quantization`` is the tensor's ``(scale, zero_point)`` when it holds
        quantized values.
        """
        value = np.asarray(value)
        dtype = value.dtype
        if dtype not in _TENSOR_TYPES:
            raise GraphError(f"constant {name!r} has unsupported dtype {dtype}")
        data = np.ascontiguousarray(value, dtype=dtype.newbyteorder("<")).tobytes()
        self._buffers.append(data)
        return self._new_tensor(
            name,
            tuple(value.shape),
            None,
            dtype,
            buffer=len(self._buffers) - 1,
            quantization=quantization,
        )

    def mark_output(self, tensor: TensorRef) -> None:
        """Make ``tensor`` an output of the graph (in the order of calls)."""
        self._check(tensor)
        self._outputs.append(tensor.index)

    # -- operators -----------------------------------------------------------

    def fully_connected(
        self, x: TensorRef, weights: ArrayLike, bias: ArrayLike, name: str
    ) -> TensorRef:
        """``x @ weights.T + bias`` for ``x`` of shape ``[batch, in]``.

        ``weights`` is ``[out, in]`` (TFLite's layout) and ``bias`` ``[out]``;
        both are stored as float32 constants. ``keep_num_dims`` is false, no
        fused activation.
        """
        self._check(x)
        weights = np.asarray(weights, dtype=np.float32)
        bias = np.asarray(bias, dtype=np.float32)
        if len(x.shape) != 2 or weights.ndim != 2 or weights.shape[1] != x.shape[1]:
            raise GraphError(f"{name}: weights {weights.shape} do not fit input {x.shape}")
        if bias.shape != (weights.shape[0],):
            raise GraphError(f"{name}: bias {bias.shape} does not fit weights {weights.shape}")
        w = self.add_constant(f"{name}/weights", weights)
        b = self.add_constant(f"{name}/bias", bias)
        out = self._derived(name, (x.shape[0], weights.shape[0]), x)
        self._add_op(
            tflite.BuiltinOperator.FULLY_CONNECTED,
            (x, w, b),
            out,
            tflite.BuiltinOptions.FullyConnectedOptions,
            ("FullyConnectedOptions", {"FusedActivationFunction": 0, "KeepNumDims": False}),
        )
        return out

    def quantize(self, x: TensorRef, scale: float, zero_point: int, name: str) -> TensorRef:
        """float32 ``x`` to int8: ``clamp(round(x / scale) + zero_point, -128, 127)``."""
        self._check(x)
        out = self._derived(name, x.shape, x, np.dtype(np.int8), (scale, zero_point))
        self._add_op(tflite.BuiltinOperator.QUANTIZE, (x,), out, 0, None, version=2)
        return out

    def dequantize(self, x: TensorRef, name: str) -> TensorRef:
        """int8 ``x`` back to float32: ``scale * (q - zero_point)``."""
        self._check(x)
        if x.dtype != np.dtype(np.int8):
            raise GraphError(f"{name}: DEQUANTIZE needs an int8 input, got {x.dtype}")
        out = self._derived(name, x.shape, x)
        self._add_op(tflite.BuiltinOperator.DEQUANTIZE, (x,), out, 0, None, version=2)
        return out

    def fully_connected_int8(
        self,
        x: TensorRef,
        weights: ArrayLike,
        weight_scale: float,
        bias: ArrayLike,
        output: tuple[float, int],
        name: str,
        *,
        relu: bool = False,
    ) -> TensorRef:
        """An int8 dense layer: int8 ``x`` and ``weights`` ``[out, in]``, int32 ``bias``.

        ``weights`` are symmetric (zero point 0) with one ``weight_scale``;
        ``bias`` has scale ``input_scale * weight_scale``; the int8 result has
        ``output = (scale, zero_point)``. With ``relu`` the activation is fused.
        """
        self._check(x)
        quantization = self._tensors[x.index].quantization
        if x.dtype != np.dtype(np.int8) or quantization is None:
            raise GraphError(f"{name}: the input of an int8 dense layer must be quantized int8")
        weights = np.asarray(weights)
        bias = np.asarray(bias)
        if weights.dtype != np.int8 or bias.dtype != np.int32:
            raise GraphError(f"{name}: weights must be int8 and bias int32")
        if len(x.shape) != 2 or weights.ndim != 2 or weights.shape[1] != x.shape[1]:
            raise GraphError(f"{name}: weights {weights.shape} do not fit input {x.shape}")
        if bias.shape != (weights.shape[0],):
            raise GraphError(f"{name}: bias {bias.shape} does not fit weights {weights.shape}")
        w = self.add_constant(f"{name}/weights", weights, (weight_scale, 0))
        b = self.add_constant(f"{name}/bias", bias, (quantization[0] * weight_scale, 0))
        out = self._derived(
            name, (x.shape[0], weights.shape[0]), x, np.dtype(np.int8), (output[0], output[1])
        )
        self._add_op(
            tflite.BuiltinOperator.FULLY_CONNECTED,
            (x, w, b),
            out,
            tflite.BuiltinOptions.FullyConnectedOptions,
            (
                "FullyConnectedOptions",
                {
                    "FusedActivationFunction": tflite.ActivationFunctionType.RELU if relu else 0,
                    "KeepNumDims": False,
                },
            ),
            version=4,
        )
        return out

    def relu(self, x: TensorRef, name: str) -> TensorRef:
        """Elementwise ``max(x, 0)``."""
        out = self._derived(name, x.shape, x)
        self._add_op(tflite.BuiltinOperator.RELU, (x,), out, 0, None)
        return out

    def softmax(self, x: TensorRef, name: str, beta: float = 1.0) -> TensorRef:
        """Softmax over the last dimension."""
        out = self._derived(name, x.shape, x)
        self._add_op(
            tflite.BuiltinOperator.SOFTMAX,
            (x,),
            out,
            tflite.BuiltinOptions.SoftmaxOptions,
            ("SoftmaxOptions", {"Beta": beta}),
        )
        return out

    def add(self, a: TensorRef, b: TensorRef, name: str) -> TensorRef:
        """Elementwise ``a + b`` with numpy broadcasting."""
        return self._binary(
            tflite.BuiltinOperator.ADD, tflite.BuiltinOptions.AddOptions, "AddOptions", a, b, name
        )

    def mul(self, a: TensorRef, b: TensorRef, name: str) -> TensorRef:
        """Elementwise ``a * b`` with numpy broadcasting."""
        return self._binary(
            tflite.BuiltinOperator.MUL, tflite.BuiltinOptions.MulOptions, "MulOptions", a, b, name
        )

    def div(self, a: TensorRef, b: TensorRef, name: str) -> TensorRef:
        """Elementwise ``a / b`` with numpy broadcasting (IEEE: x/0 is ±inf, 0/0 NaN)."""
        return self._binary(
            tflite.BuiltinOperator.DIV, tflite.BuiltinOptions.DivOptions, "DivOptions", a, b, name
        )

    def mean(
        self, x: TensorRef, axes: Sequence[int], name: str, *, keep_dims: bool = True
    ) -> TensorRef:
        """Mean over ``axes`` (non-negative, not the batch axis)."""
        self._check(x)
        axes = sorted({int(a) for a in axes})
        if not axes or axes[0] < 1 or axes[-1] >= len(x.shape):
            raise GraphError(f"{name}: axes {axes} must lie in 1..{len(x.shape) - 1}")
        axes_ref = self.add_constant(f"{name}/axes", np.asarray(axes, dtype=np.int32))
        if keep_dims:
            shape = tuple(1 if i in axes else d for i, d in enumerate(x.shape))
        else:
            shape = tuple(d for i, d in enumerate(x.shape) if i not in axes)
        out = self._derived(name, shape, x)
        self._add_op(
            tflite.BuiltinOperator.MEAN,
            (x, axes_ref),
            out,
            tflite.BuiltinOptions.ReducerOptions,
            ("ReducerOptions", {"KeepDims": keep_dims}),
        )
        return out

    def reshape(self, x: TensorRef, shape: Sequence[int], name: str) -> TensorRef:
        """Reshape to ``shape``; a leading ``-1`` keeps the batch dynamic."""
        self._check(x)
        new_shape = tuple(int(d) for d in shape)
        static = tuple(x.shape[0] if (i == 0 and d == -1) else d for i, d in enumerate(new_shape))
        if int(np.prod(static)) != int(np.prod(x.shape)):
            raise GraphError(f"{name}: cannot reshape {x.shape} to {new_shape}")
        shape_ref = self.add_constant(f"{name}/shape", np.asarray(new_shape, dtype=np.int32))
        out = self._derived(name, static, x)
        self._add_op(tflite.BuiltinOperator.RESHAPE, (x, shape_ref), out, 0, None)
        return out

    def custom(
        self, op_name: str, inputs: Sequence[TensorRef], output_shape: Sequence[int], name: str
    ) -> TensorRef:
        """A CUSTOM operator called ``op_name``; the runtime must provide it to run the model."""
        if not op_name:
            raise GraphError("a custom operator needs a name")
        for t in inputs:
            self._check(t)
        first = inputs[0] if inputs else None
        out = self._derived(name, tuple(int(d) for d in output_shape), first)
        opcode = self._opcode(tflite.BuiltinOperator.CUSTOM, op_name)
        self._operators.append(
            _Operator(opcode, tuple(t.index for t in inputs), (out.index,), 0, None)
        )
        return out

    # -- serialisation -------------------------------------------------------

    def to_bytes(self) -> bytes:
        """Serialise the model; the same graph always yields the same bytes."""
        if not self._inputs or not self._outputs:
            raise GraphError("a model needs at least one input and one output")
        b = flatbuffers.Builder(1024)

        # Children before parents: flatbuffers are written back to front.
        buffer_offsets = [self._write_buffer(b, data) for data in self._buffers]
        tensor_offsets = [self._write_tensor(b, t) for t in self._tensors]
        operator_offsets = [self._write_operator(b, op) for op in self._operators]

        name = b.CreateString("main")
        tensors = _table_vector(b, tflite.SubGraphStartTensorsVector, tensor_offsets)
        inputs = _int32_vector(b, tflite.SubGraphStartInputsVector, self._inputs)
        outputs = _int32_vector(b, tflite.SubGraphStartOutputsVector, self._outputs)
        operators = _table_vector(b, tflite.SubGraphStartOperatorsVector, operator_offsets)
        tflite.SubGraphStart(b)
        tflite.SubGraphAddTensors(b, tensors)
        tflite.SubGraphAddInputs(b, inputs)
        tflite.SubGraphAddOutputs(b, outputs)
        tflite.SubGraphAddOperators(b, operators)
        tflite.SubGraphAddName(b, name)
        subgraph = tflite.SubGraphEnd(b)

        opcode_offsets = []
        for code, custom, version in self._opcodes:
            custom_name = b.CreateString(custom) if custom else None
            tflite.OperatorCodeStart(b)
            tflite.OperatorCodeAddDeprecatedBuiltinCode(b, min(code, _DEPRECATED_CODE_LIMIT))
            tflite.OperatorCodeAddBuiltinCode(b, code)
            tflite.OperatorCodeAddVersion(b, version)
            if custom_name is not None:
                tflite.OperatorCodeAddCustomCode(b, custom_name)
            opcode_offsets.append(tflite.OperatorCodeEnd(b))

        opcodes = _table_vector(b, tflite.ModelStartOperatorCodesVector, opcode_offsets)
        subgraphs = _table_vector(b, tflite.ModelStartSubgraphsVector, [subgraph])
        buffers = _table_vector(b, tflite.ModelStartBuffersVector, buffer_offsets)
        description = b.CreateString(self._description)
        tflite.ModelStart(b)
        tflite.ModelAddVersion(b, SCHEMA_VERSION)
        tflite.ModelAddOperatorCodes(b, opcodes)
        tflite.ModelAddSubgraphs(b, subgraphs)
        tflite.ModelAddDescription(b, description)
        tflite.ModelAddBuffers(b, buffers)
        model = tflite.ModelEnd(b)
        b.Finish(model, file_identifier=_FILE_IDENTIFIER)
        return bytes(b.Output())

    # -- internals -----------------------------------------------------------

    def _new_tensor(
        self,
        name: str,
        shape: tuple[int, ...],
        signature: tuple[int, ...] | None,
        dtype: np.dtype[Any],
        buffer: int,
        quantization: tuple[float, int] | None = None,
    ) -> TensorRef:
        if dtype not in _TENSOR_TYPES:
            raise GraphError(f"tensor {name!r} has unsupported dtype {dtype}")
        if any(t.name == name for t in self._tensors):
            raise GraphError(f"tensor name {name!r} is already used")
        if quantization is not None and not quantization[0] > 0:
            raise GraphError(f"tensor {name!r} needs a positive quantization scale")
        self._tensors.append(_Tensor(name, shape, signature, dtype, buffer, quantization))
        return TensorRef(len(self._tensors) - 1, shape, dtype)

    def _derived(
        self,
        name: str,
        shape: tuple[int, ...],
        like: TensorRef | None,
        dtype: np.dtype[Any] = _FLOAT32,
        quantization: tuple[float, int] | None = None,
    ) -> TensorRef:
        """A computed tensor (float32 unless told) whose batch is dynamic if ``like``'s is."""
        dynamic = like is not None and self._tensors[like.index].signature is not None
        signature = (-1, *shape[1:]) if dynamic and shape else None
        return self._new_tensor(name, shape, signature, dtype, buffer=0, quantization=quantization)

    def _binary(
        self, code: int, options_type: int, options_name: str, a: TensorRef, c: TensorRef, name: str
    ) -> TensorRef:
        self._check(a)
        self._check(c)
        try:
            shape = tuple(int(d) for d in np.broadcast_shapes(a.shape, c.shape))
        except ValueError as exc:
            raise GraphError(f"{name}: shapes {a.shape} and {c.shape} do not broadcast") from exc
        # The batch stays dynamic if either operand carries it.
        like = a if self._tensors[a.index].signature is not None else c
        out = self._derived(name, shape, like)
        self._add_op(
            code, (a, c), out, options_type, (options_name, {"FusedActivationFunction": 0})
        )
        return out

    def _add_op(
        self,
        code: int,
        inputs: Sequence[TensorRef],
        out: TensorRef,
        options_type: int,
        options: tuple[str, dict[str, object]] | None,
        version: int = 1,
    ) -> None:
        for t in inputs:
            self._check(t)
        self._operators.append(
            _Operator(
                self._opcode(code, "", version),
                tuple(t.index for t in inputs),
                (out.index,),
                options_type,
                options,
            )
        )

    def _opcode(self, code: int, custom: str, version: int = 1) -> int:
        key = (int(code), custom, version)
        if key not in self._opcodes:
            self._opcodes.append(key)
        return self._opcodes.index(key)

    def _check(self, t: TensorRef) -> None:
        if not 0 <= t.index < len(self._tensors):
            raise GraphError(f"tensor {t.index} does not belong to this graph")

    @staticmethod
    def _write_buffer(b: flatbuffers.Builder, data: bytes) -> int:
        if not data:
            tflite.BufferStart(b)
            return int(tflite.BufferEnd(b))
        # Written by hand rather than with CreateByteVector to get 16-byte alignment.
        b.StartVector(1, len(data), _BUFFER_ALIGNMENT)
        b.head = b.head - len(data)
        b.Bytes[b.head : b.head + len(data)] = data
        vector = b.EndVector()
        tflite.BufferStart(b)
        tflite.BufferAddData(b, vector)
        return int(tflite.BufferEnd(b))

    def _write_tensor(self, b: flatbuffers.Builder, t: _Tensor) -> int:
        name = b.CreateString(t.name)
        shape = _int32_vector(b, tflite.TensorStartShapeVector, t.shape)
        signature = (
            _int32_vector(b, tflite.TensorStartShapeSignatureVector, t.signature)
            if t.signature is not None
            else None
        )
        quantization = None
        if t.quantization is not None:
            scale_vector = _float32_vector(
                b, tflite.QuantizationParametersStartScaleVector, [t.quantization[0]]
            )
            b.StartVector(8, 1, 8)
            b.PrependInt64(int(t.quantization[1]))
            zero_point_vector = b.EndVector()
            tflite.QuantizationParametersStart(b)
            tflite.QuantizationParametersAddScale(b, scale_vector)
            tflite.QuantizationParametersAddZeroPoint(b, zero_point_vector)
            quantization = tflite.QuantizationParametersEnd(b)
        tflite.TensorStart(b)
        tflite.TensorAddShape(b, shape)
        tflite.TensorAddType(b, _TENSOR_TYPES[t.dtype])
        tflite.TensorAddBuffer(b, t.buffer)
        tflite.TensorAddName(b, name)
        if signature is not None:
            tflite.TensorAddShapeSignature(b, signature)
        if quantization is not None:
            tflite.TensorAddQuantization(b, quantization)
        return int(tflite.TensorEnd(b))

    @staticmethod
    def _write_operator(b: flatbuffers.Builder, op: _Operator) -> int:
        options = None
        if op.options is not None:
            kind, fields = op.options
            getattr(tflite, f"{kind}Start")(b)
            for field_name, value in fields.items():
                getattr(tflite, f"{kind}Add{field_name}")(b, value)
            options = getattr(tflite, f"{kind}End")(b)
        inputs = _int32_vector(b, tflite.OperatorStartInputsVector, op.inputs)
        outputs = _int32_vector(b, tflite.OperatorStartOutputsVector, op.outputs)
        tflite.OperatorStart(b)
        tflite.OperatorAddOpcodeIndex(b, op.opcode)
        tflite.OperatorAddInputs(b, inputs)
        tflite.OperatorAddOutputs(b, outputs)
        if options is not None:
            tflite.OperatorAddBuiltinOptionsType(b, op.options_type)
            tflite.OperatorAddBuiltinOptions(b, options)
        return int(tflite.OperatorEnd(b))


_VectorStart = Callable[[flatbuffers.Builder, int], object]


def _int32_vector(b: flatbuffers.Builder, start: _VectorStart, values: Sequence[int]) -> int:
    start(b, len(values))
    for v in reversed(values):
        b.PrependInt32(int(v))
    return int(b.EndVector())


def _float32_vector(b: flatbuffers.Builder, start: _VectorStart, values: Sequence[float]) -> int:
    start(b, len(values))
    for v in reversed(values):
        b.PrependFloat32(float(v))
    return int(b.EndVector())


def _table_vector(b: flatbuffers.Builder, start: _VectorStart, offsets: Sequence[int]) -> int:
    start(b, len(offsets))
    for off in reversed(offsets):
        b.PrependUOffsetTRelative(off)
    return int(b.EndVector())


def build_unresolved_custom_op_model(op_name: str = "EdgefleetMysteryOp") -> bytes:
    """A well-formed model whose only operator is a CUSTOM op no runtime provides.

    It parses, but creating an interpreter for it fails with an error that
    names ``op_name``: the case an agent must survive when a bundle needs an
    operator its runtime lacks.
    """
    g = GraphBuilder(description=f"edgefleet test model: needs custom op {op_name}")
    x = g.add_input("features", (1, 16))
    y = g.custom(op_name, [x], (1, 4), name="scores")
    g.mark_output(y)
    return g.to_bytes()


def build_image_model() -> bytes:
    """A 1x128x128x3 RGB image in, two heads out (4 class scores, a brightness).

    Not one of the trained sample models: an image input of 49,152 elements,
    to exercise per-channel summaries and the agent's memory bounds.
    """
    rng = np.random.default_rng(3)
    g = GraphBuilder("image classifier with a brightness head")
    image = g.add_input("image", [1, 128, 128, 3])
    pooled = g.mean(image, [1, 2], "pooled", keep_dims=False)
    logits = g.fully_connected(pooled, rng.normal(size=(4, 3)), np.zeros(4), "logits")
    g.mark_output(g.softmax(logits, "class_scores"))
    g.mark_output(g.fully_connected(pooled, np.ones((1, 3)) / 3, np.zeros(1), "brightness"))
    return g.to_bytes()
