"""Input validation against the manifest, and Open Inference Protocol tensor decoding."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest

from agent.serving.validation import (
    InputContract,
    InvalidInput,
    check_declared_shapes,
    validate_inputs,
)
from protocol.bundle import read_bundle
from protocol.inference import (
    DATATYPES,
    InferenceRequest,
    InferenceRequestError,
    InferenceResponse,
    RequestInput,
    check_input_datatypes,
    check_shape,
    datatype_of,
    decode_inputs,
    decode_outputs,
    decode_tensor,
    describe_validation_error,
    dtype_of,
    encode_request,
    encode_response,
    model_metadata,
    select_outputs,
)
from protocol.manifest import Manifest, TensorSpec
from testbed.images import MODELS

BASELINE = np.load(MODELS / "baseline.npy")


@pytest.fixture(scope="module")
def manifest(bundles: dict[str, Path]) -> Manifest:
    with bundles["v2"].open("rb") as f:
        return read_bundle(f)[0]


def rows(n: int = 1) -> npt.NDArray[np.float32]:
    return np.array(BASELINE[:n], dtype=np.float32)


def refused(manifest: Manifest, tensors: dict[str, object]) -> InvalidInput:
    with pytest.raises(InvalidInput) as caught:
        validate_inputs(manifest, tensors)  # type: ignore[arg-type]
    return caught.value


# -- validation against the manifest ---------------------------------------------------------


def test_a_valid_batch_passes_unchanged_as_float32(manifest: Manifest) -> None:
    x = rows(3)
    out = validate_inputs(manifest, {"features": x})
    assert list(out) == ["features"]
    assert out["features"].dtype == np.float32
    np.testing.assert_array_equal(out["features"], x)


def test_integers_for_a_float_input_are_accepted(manifest: Manifest) -> None:
    x = np.rint(rows(2)).astype(np.int64)
    x[:, 9:11] = np.maximum(x[:, 9:11], 1)  # crest factor and kurtosis start at 1
    out = validate_inputs(manifest, {"features": x})
    assert out["features"].dtype == np.float32
    np.testing.assert_array_equal(out["features"], x.astype(np.float32))


def test_a_value_below_its_feature_minimum_is_named(manifest: Manifest) -> None:
    x = rows()
    x[0, 0] = -5.0
    error = refused(manifest, {"features": x})
    assert str(error) == (
        "input 'features': feature 'shaft_rpm' (element 0) is -5.0, below its valid minimum 0.0"
    )
    assert error.tensor == "features"
    assert isinstance(error, ValueError)


def test_a_value_above_its_feature_maximum_names_the_row_in_a_batch(manifest: Manifest) -> None:
    x = rows(4)
    x[2, 15] = 141.5
    error = refused(manifest, {"features": x})
    assert str(error) == (
        "input 'features': feature 'acoustic_db' (element 15) of row 2 is 141.5, "
        "above its valid maximum 140.0"
    )


def test_a_float32_value_is_reported_as_it_was_sent(manifest: Manifest) -> None:
    x = rows()
    x[0, 0] = -2113.1
    assert "is -2113.1, below" in str(refused(manifest, {"features": x}))


def test_range_bounds_themselves_are_valid(manifest: Manifest) -> None:
    x = rows(2)
    x[0, 0], x[1, 0] = 0.0, 6000.0  # shaft_rpm at both ends of its range
    validate_inputs(manifest, {"features": x})


@pytest.mark.parametrize(("value", "word"), [(np.nan, "NaN"), (np.inf, "Inf"), (-np.inf, "Inf")])
def test_nan_and_inf_are_named_by_feature(manifest: Manifest, value: float, word: str) -> None:
    x = rows()
    x[0, 5] = value
    assert str(refused(manifest, {"features": x})) == (
        f"input 'features': feature 'vib_rms_x' (element 5) is {word}"
    )


def test_a_wrong_shape_says_what_the_model_takes(manifest: Manifest) -> None:
    error = refused(manifest, {"features": rows(2)[:, :15]})
    assert str(error) == "input 'features': has shape [2, 15], the model takes [batch, 16]"


def test_a_missing_batch_dimension_gets_a_hint(manifest: Manifest) -> None:
    error = refused(manifest, {"features": rows()[0]})
    assert "has shape [16]" in str(error)
    assert "add the batch dimension" in str(error)


def test_an_empty_batch_is_refused(manifest: Manifest) -> None:
    assert "no rows" in str(refused(manifest, {"features": np.zeros((0, 16), np.float32)}))


def test_unknown_and_missing_inputs_are_named(manifest: Manifest) -> None:
    unknown = refused(manifest, {"features": rows(), "image": rows()})
    assert unknown.tensor == "image"
    assert "is not an input of model 'pump-health'" in str(unknown)
    assert "['features']" in str(unknown)
    missing = refused(manifest, {})
    assert str(missing) == "input 'features': is missing from the request"


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ([["1.0"] * 16], "holds <U3 values"),
        (np.ones((1, 16), dtype=bool), "holds booleans"),
        ([[1.0] * 16, [1.0] * 15], "not a numeric array"),
        (np.full((1, 16), 1e300), "is 1e+300, out of range for float32"),
    ],
)
def test_values_that_are_not_float32_numbers_are_refused(
    manifest: Manifest, value: object, expected: str
) -> None:
    error = refused(manifest, {"features": value})
    assert error.tensor == "features"
    assert expected in str(error)


@pytest.mark.parametrize("value", [1e300, -1e300])
def test_a_float64_value_beyond_float32_is_out_of_range_not_inf(
    manifest: Manifest, value: float
) -> None:
    x = rows(2).astype(np.float64)
    x[1, 15] = value
    error = refused(manifest, {"features": x})
    assert str(error) == (
        f"input 'features': feature 'acoustic_db' (element 15) of row 1 is {value!r}, "
        "out of range for float32"
    )


def int8_manifest(manifest: Manifest) -> Manifest:
    spec = TensorSpec(name="codes", dtype="int8", shape=[1, 3], shape_signature=[-1, 3])
    return manifest.model_copy(update={"inputs": [spec], "derivations": [], "features": []})


def test_whole_floats_are_accepted_for_an_integer_input(manifest: Manifest) -> None:
    out = validate_inputs(int8_manifest(manifest), {"codes": np.array([[1.0, -2.0, 127.0]])})
    assert out["codes"].dtype == np.int8
    assert out["codes"].tolist() == [[1, -2, 127]]


def test_a_fraction_for_an_integer_input_is_refused(manifest: Manifest) -> None:
    error = refused(int8_manifest(manifest), {"codes": np.array([[1.0, 2.5, 3.0]])})
    assert str(error) == "input 'codes': element [1] is 2.5, not a whole number as int8 needs"


def test_an_integer_outside_the_input_dtype_is_refused(manifest: Manifest) -> None:
    error = refused(int8_manifest(manifest), {"codes": np.array([[0, 0, 0], [1, 300, 2]])})
    assert (
        str(error) == "input 'codes': element [1] of row 1 is 300, outside int8's range -128..127"
    )


def test_a_prepared_contract_gives_the_same_answers(manifest: Manifest) -> None:
    contract = InputContract(manifest)
    assert contract.input_names == ["features"]
    x = rows(1000)
    np.testing.assert_array_equal(contract.validate({"features": x})["features"], x)
    x[999, 3] = 250.0
    with pytest.raises(InvalidInput, match=r"'bearing_temp_c' \(element 3\) of row 999 is 250.0"):
        contract.validate({"features": x})


# -- Open Inference Protocol tensors ----------------------------------------------------------


def test_every_datatype_maps_to_a_manifest_dtype_and_back() -> None:
    for datatype, dtype in DATATYPES.items():
        assert dtype_of(datatype) == dtype
        assert datatype_of(dtype) == datatype
    assert datatype_of(np.dtype(np.float32)) == "FP32"


def test_flat_and_nested_data_decode_to_the_same_array() -> None:
    flat = decode_tensor("x", [2, 3], "FP32", [1, 2, 3, 4, 5, 6])
    nested = decode_tensor("x", [2, 3], "FP32", [[1, 2, 3], [4, 5, 6]])
    assert flat.dtype == np.float32
    assert flat.shape == (2, 3)
    np.testing.assert_array_equal(flat, nested)


@pytest.mark.parametrize(
    ("shape", "datatype", "data", "expected"),
    [
        ([2, 3], "FP32", [1, 2, 3], "data has 3 elements, shape [2, 3] needs 6"),
        ([2], "BYTES", ["a", "b"], "datatype 'BYTES' is not supported"),
        ([2], "FP32", ["1", "2"], "data holds values that are not FP32"),
        ([2], "FP32", [None, "a"], "data holds values that are not FP32"),
        ([2], "INT32", [1, None], "data holds values that are not INT32"),
        ([2], "FP32", [True, False], "data holds true/false"),
        ([2], "INT32", [1, 1.5], "element 1 is 1.5, not an integer as datatype INT32 needs"),
        ([2], "UINT8", [1, 256], "element 1 is 256, outside UINT8's range 0..255"),
        ([2], "BOOL", [0, 1], "datatype BOOL needs true/false"),
        ([2, 2], "FP32", [[1, 2], [3]], "ragged"),
        ([-1, 2], "FP32", [1, 2], "negative dimension"),
    ],
)
def test_tensor_data_that_does_not_match_its_declaration_is_refused(
    shape: list[int], datatype: str, data: list[object], expected: str
) -> None:
    with pytest.raises(InferenceRequestError) as caught:
        decode_tensor("features", shape, datatype, data)
    assert caught.value.tensor == "features"
    assert str(caught.value).startswith("input 'features': ")
    assert expected in str(caught.value)


@pytest.mark.parametrize(
    ("shape", "datatype", "expected"),
    [
        ([1] * 33, "FP32", "shape has 33 dimensions, at most 32 are supported"),
        ([1] * 100_000, "FP32", "shape has 100000 dimensions, at most 32 are supported"),
        ([0, 2**63], "FP32", "shape [0, 9223372036854775808] is larger than any array can be"),
        ([2**63, 0], "FP32", "shape [9223372036854775808, 0] is larger than any array can be"),
        ([0, 2**40, 2**40, 3], "FP32", "shape [0, 1099511627776, 1099511627776, 3] is larger"),
        # 2**63 bytes of float32, of float64
        ([0, 2**61], "FP32", "shape [0, 2305843009213693952] is larger than any array can be"),
        ([0, 2**60], "FP64", "shape [0, 1152921504606846976] is larger than any array can be"),
        ([0, -3], "FP32", "shape [0, -3] has a negative dimension"),
        ([0, 10**30], "UINT8", "shape [0, 1000000000000000000000000000000] is larger"),
    ],
)
def test_a_shape_no_array_can_have_is_refused_before_numpy_sees_it(
    shape: list[int], datatype: str, expected: str
) -> None:
    with pytest.raises(InferenceRequestError) as caught:
        decode_tensor("image", shape, datatype, [])
    assert caught.value.tensor == "image"
    assert str(caught.value).startswith(f"input 'image': {expected}")
    assert len(str(caught.value)) < 300


def test_empty_tensors_of_any_addressable_shape_decode() -> None:
    # Just inside numpy's limit: 2**60 float32 (2**62 bytes) is addressable when empty.
    assert decode_tensor("image", [0, 2**60], "FP32", []).shape == (0, 2**60)
    assert decode_tensor("image", [1] * 32, "FP32", [1.5]).shape == (1,) * 32
    assert decode_tensor("image", [0, 0, 3], "INT8", []).dtype == np.int8


def test_check_shape_counts_elements_without_allocating() -> None:
    assert check_shape("x", [2, 3, 4]) == 24
    assert check_shape("x", []) == 1
    assert check_shape("x", [0, 2**40]) == 0
    with pytest.raises(InferenceRequestError, match=r"^output 'y': shape has 33 dimensions"):
        check_shape("y", [1] * 33, role="output")


def test_an_output_with_an_impossible_shape_is_refused_by_name() -> None:
    response = InferenceResponse.model_validate(
        {
            "model_name": "m",
            "outputs": [{"name": "scores", "shape": [0, 2**63], "datatype": "FP32", "data": []}],
        }
    )
    with pytest.raises(InferenceRequestError, match=r"^output 'scores': shape .* is larger"):
        decode_outputs(response)


@pytest.mark.parametrize(
    ("shape", "expected"),
    [
        ([1] * 33, "input 'features': has 33 dimensions, the model takes [batch, 16]"),
        (
            [0, 2**63],
            "input 'features': has shape [0, 9223372036854775808], the model takes [batch, 16]",
        ),
        ([2**40, 2**40, 16], "input 'features': has shape [1099511627776, 1099511627776, 16]"),
        ([16], "input 'features': has shape [16], the model takes [batch, 16] (add the batch"),
        ([-2, 16], "input 'features': has a negative dimension in its shape [-2, 16]"),
        ([0, 16], "input 'features': holds no rows (the batch dimension is 0)"),
    ],
)
def test_declared_shapes_are_checked_against_the_model_before_decoding(
    manifest: Manifest, shape: list[int], expected: str
) -> None:
    with pytest.raises(InvalidInput) as caught:
        check_declared_shapes(manifest, [("features", shape)])
    assert caught.value.tensor == "features"
    assert str(caught.value).startswith(expected)


def test_declared_shapes_the_model_takes_pass_and_unknown_inputs_are_named(
    manifest: Manifest,
) -> None:
    check_declared_shapes(manifest, [("features", [1, 16]), ("features", [2**40, 16])])
    with pytest.raises(InvalidInput, match="'image': is not an input of model 'pump-health'"):
        check_declared_shapes(manifest, [("image", [1, 128, 128, 3])])


def declared(datatype: str, name: str = "features") -> RequestInput:
    return RequestInput(name=name, shape=[1, 16], datatype=datatype, data=[0] * 16)


@pytest.mark.parametrize(
    ("datatype", "expected"),
    [
        # FP64 is refused too: the protocol has no implicit conversions, as Triton shows.
        ("INT64", "input 'features': unexpected datatype INT64, the model takes FP32"),
        ("FP64", "input 'features': unexpected datatype FP64, the model takes FP32"),
        ("FP16", "input 'features': unexpected datatype FP16, the model takes FP32"),
        ("BOOL", "input 'features': unexpected datatype BOOL, the model takes FP32"),
        ("BYTES", "input 'features': datatype 'BYTES' is not supported; the model takes FP32"),
        ("fp32", "input 'features': datatype 'fp32' is not supported; the model takes FP32"),
    ],
)
def test_a_datatype_other_than_the_models_is_refused_naming_both(
    manifest: Manifest, datatype: str, expected: str
) -> None:
    with pytest.raises(InferenceRequestError) as caught:
        check_input_datatypes(manifest, [declared(datatype)])
    assert caught.value.tensor == "features"
    assert str(caught.value) == expected


def test_the_models_datatype_passes_and_unknown_inputs_are_left_to_the_shape_check(
    manifest: Manifest,
) -> None:
    check_input_datatypes(manifest, [declared("FP32"), declared("INT64", name="image")])


@pytest.mark.parametrize(
    ("datatype", "data", "expected"),
    [
        ("FP32", [1.0, 1e300, 2.0], "input 'x': element 1 is 1e+300, out of range for FP32"),
        ("FP32", [-1e300, 1.0, 2.0], "input 'x': element 0 is -1e+300, out of range for FP32"),
        ("FP16", [1.0, 2.0, 70000.0], "input 'x': element 2 is 70000.0, out of range for FP16"),
    ],
)
def test_a_finite_value_beyond_a_float_datatype_is_out_of_range(
    datatype: str, data: list[float], expected: str
) -> None:
    with pytest.raises(InferenceRequestError) as caught:
        decode_tensor("x", [3], datatype, data)
    assert caught.value.tensor == "x"
    assert str(caught.value) == expected


def test_float_datatypes_keep_every_value_they_can_hold() -> None:
    largest = float(np.finfo(np.float32).max)
    decoded = decode_tensor("x", [3], "FP32", [largest, -largest, 1e-50])
    assert decoded.tolist() == [largest, -largest, 0.0]
    assert decode_tensor("x", [1], "FP64", [1e300]).tolist() == [1e300]


def test_an_answer_with_a_value_beyond_its_datatype_is_refused_by_output_name() -> None:
    # The cloud stage decodes its answers this way: such an answer is malformed, never Inf.
    response = InferenceResponse.model_validate(
        {
            "model_name": "m",
            "outputs": [
                {"name": "scores", "shape": [1, 2], "datatype": "FP32", "data": [0, 1e300]}
            ],
        }
    )
    with pytest.raises(InferenceRequestError) as caught:
        decode_outputs(response)
    assert str(caught.value) == "output 'scores': element 1 is 1e+300, out of range for FP32"


def test_json_nan_and_overflow_decode_to_non_finite_values_for_validation_to_refuse() -> None:
    body = '{"inputs": [{"name": "x", "shape": [3], "datatype": "FP32", "data": [NaN, 1e400, 1]}]}'
    tensors = decode_inputs(InferenceRequest.model_validate_json(body))
    assert np.isnan(tensors["x"][0])
    assert np.isposinf(tensors["x"][1])


def test_null_in_float_data_decodes_as_nan() -> None:
    decoded = decode_tensor("x", [2, 2], "FP32", [[1, None], [None, 2.5]])
    np.testing.assert_array_equal(np.isnan(decoded), [[False, True], [True, False]])
    assert decoded[1, 1] == np.float32(2.5)


def test_a_repeated_input_is_refused() -> None:
    tensor = {"name": "x", "shape": [1], "datatype": "FP32", "data": [1]}
    request = InferenceRequest.model_validate({"inputs": [tensor, tensor]})
    with pytest.raises(InferenceRequestError, match="input 'x' appears twice"):
        decode_inputs(request)


def test_a_request_round_trips_through_json() -> None:
    x = rows(2)
    request = encode_request({"features": x}, id="r1", outputs=["scores"])
    parsed = InferenceRequest.model_validate_json(request.model_dump_json(exclude_none=True))
    assert parsed.id == "r1"
    assert [o.name for o in parsed.outputs or []] == ["scores"]
    np.testing.assert_array_equal(decode_inputs(parsed)["features"], x)


def test_a_response_carries_who_answered_and_round_trips() -> None:
    scores = np.array([[0.25, 0.75]], dtype=np.float32)
    response = encode_response(
        {"scores": scores},
        model_name="pump-health",
        model_version="1.0.0",
        stage="previous",
        escalated=False,
        id="abc",
    )
    parsed = InferenceResponse.model_validate_json(response.model_dump_json())
    assert parsed.model_version == "1.0.0"
    assert parsed.parameters == {"stage": "previous", "model_version": "1.0.0", "escalated": False}
    answer = parsed.answer()
    assert answer is not None and answer.stage == "previous"
    out = decode_outputs(parsed)["scores"]
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, scores)


def test_asking_for_an_output_the_model_lacks_is_refused() -> None:
    request = InferenceRequest.model_validate(
        {
            "inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [1]}],
            "outputs": [{"name": "logits"}],
        }
    )
    with pytest.raises(InferenceRequestError, match=r"output 'logits' is not an output"):
        select_outputs({"scores": np.zeros((1, 4))}, request.outputs)


def test_model_metadata_comes_from_the_manifest(manifest: Manifest) -> None:
    metadata = model_metadata(manifest, ["2.0.0", "1.0.0"])
    assert metadata.name == "pump-health"
    assert metadata.versions == ["2.0.0", "1.0.0"]
    assert [(t.name, t.datatype, t.shape) for t in metadata.inputs] == [
        ("features", "FP32", [-1, 16])
    ]
    assert [(t.name, t.datatype, t.shape) for t in metadata.outputs] == [
        ("scores", "FP32", [-1, 4])
    ]


def test_a_body_that_is_not_json_is_described_in_one_line() -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError) as caught:
        InferenceRequest.model_validate_json(b'{"inputs": [')
    assert describe_validation_error(caught.value).startswith("the body is not valid JSON")
    with pytest.raises(ValidationError) as caught:
        InferenceRequest.model_validate_json(b'{"inputs": [{"name": "x"}]}')
    assert describe_validation_error(caught.value) == "inputs.0.shape: Field required"
