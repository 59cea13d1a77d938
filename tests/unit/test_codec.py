"""mesh.codec against what tritonclient itself encodes and decodes, plus every malformed input."""

from __future__ import annotations

import struct
import tracemalloc
from collections.abc import Callable
from typing import Any

import ml_dtypes
import numpy as np
import pytest
import tritonclient.grpc as tg
import tritonclient.utils as tu
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from mesh import codec
from mesh.errors import Internal, InvalidArgument
from mesh.v2 import pb
from mesh_pb import common_pb2

NUMERIC = [
    "BOOL",
    "UINT8",
    "UINT16",
    "UINT32",
    "UINT64",
    "INT8",
    "INT16",
    "INT32",
    "INT64",
    "FP16",
    "FP32",
    "FP64",
]
ALL = [*NUMERIC, "BF16", "BYTES"]


def sample(datatype: str, shape: tuple[int, ...] = (2, 3), seed: int = 0) -> np.ndarray:
    """A tensor of the numpy type tritonclient expects for ``datatype`` (ml_dtypes.bfloat16 for BF16)."""
    rng = np.random.default_rng(seed)
    n = int(np.prod(shape))
    if datatype == "BYTES":
        pool = [b"", "é漢字".encode(), b"\x00\xff\x00", b"plain", b"", b"x" * 300]
        out = np.empty(n, dtype=object)
        out[:] = [pool[i % len(pool)] for i in range(n)]
        return out.reshape(shape)
    if datatype == "BOOL":
        return np.asarray(rng.integers(0, 2, size=shape)).astype(bool)
    if datatype == "BF16":
        return np.asarray(rng.standard_normal(shape)).astype(np.float32).astype(ml_dtypes.bfloat16)
    dtype = tu.triton_to_np_dtype(datatype)
    if datatype.startswith("FP"):
        return np.asarray(rng.standard_normal(shape) * 100).astype(dtype)
    info = np.iinfo(dtype)
    return np.asarray(rng.integers(info.min, info.max, size=shape, dtype=dtype, endpoint=True))


def triton_request(*tensors: tuple[str, str, np.ndarray]) -> pb.ModelInferRequest:
    """A ModelInferRequest built the way tritonclient.grpc builds it (InferInput.set_data_from_numpy)."""
    request = pb.ModelInferRequest(model_name="m")
    for name, datatype, arr in tensors:
        inp = tg.InferInput(name, list(arr.shape), datatype)
        inp.set_data_from_numpy(arr)
        request.inputs.append(inp._get_tensor())
        request.raw_input_contents.append(inp._get_content())
    return request


def as_expected(datatype: str, arr: np.ndarray) -> np.ndarray:
    """What our decoder returns for a tritonclient array (BF16 decodes to float32)."""
    return arr.astype(np.float32) if datatype == "BF16" else arr


def assert_same(got: np.ndarray, want: np.ndarray) -> None:
    assert got.shape == want.shape
    if want.dtype == object:
        assert got.dtype == object
        assert got.tolist() == want.tolist()
    else:
        assert got.dtype == want.dtype
        np.testing.assert_array_equal(got, want)


def raises_invalid(prefix: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> InvalidArgument:
    with pytest.raises(InvalidArgument) as info:
        fn(*args, **kwargs)
    assert info.value.message.startswith(prefix), info.value.message
    return info.value


# ---------------------------------------------------------------------------------------------------------
# Datatype table


def test_datatypes_match_tritonclient() -> None:
    assert set(codec.DATATYPES) == set(ALL)
    for datatype in ALL:
        want = np.float32 if datatype == "BF16" else tu.triton_to_np_dtype(datatype)
        assert codec.DATATYPES[datatype] == np.dtype(want), datatype
        if datatype != "BF16":
            assert codec.numpy_to_datatype(codec.DATATYPES[datatype]) == datatype
            assert tu.np_to_triton_dtype(codec.DATATYPES[datatype]) == datatype


def test_element_size() -> None:
    assert codec.element_size("BYTES") is None
    assert codec.element_size("BF16") == 2
    assert codec.element_size("BOOL") == 1
    for datatype in NUMERIC:
        assert codec.element_size(datatype) == codec.DATATYPES[datatype].itemsize
    raises_invalid("datatype: unknown datatype 'FP8'", codec.element_size, "FP8")


def test_numpy_to_datatype_special_cases() -> None:
    assert codec.numpy_to_datatype(ml_dtypes.bfloat16) == "BF16"
    assert codec.numpy_to_datatype(np.dtype("S5")) == "BYTES"
    assert codec.numpy_to_datatype(np.dtype("U3")) == "BYTES"
    assert codec.numpy_to_datatype(np.dtype(">i4")) == "INT32"
    raises_invalid("dtype:", codec.numpy_to_datatype, np.complex64)


# ---------------------------------------------------------------------------------------------------------
# Round trips against tritonclient


@pytest.mark.parametrize("datatype", ALL)
@pytest.mark.parametrize("shape", [(2, 3), (0, 4), (), (1,)])
def test_decode_what_tritonclient_sends(datatype: str, shape: tuple[int, ...]) -> None:
    arr = sample(datatype, shape)
    request = triton_request(("x", datatype, arr))
    got = codec.decode_request(request)
    assert list(got) == ["x"]
    assert_same(got["x"], as_expected(datatype, arr))


@pytest.mark.parametrize("datatype", ALL)
@pytest.mark.parametrize("shape", [(2, 3), (0, 4), ()])
def test_tritonclient_reads_what_we_encode(datatype: str, shape: tuple[int, ...]) -> None:
    arr = sample(datatype, shape)
    response = codec.encode_response(pb.ModelInferResponse(model_name="m"), [("y", arr, datatype)])
    assert len(response.raw_output_contents) == 1
    assert not response.outputs[0].HasField("contents")
    result = tg.InferResult(response)
    got = result.as_numpy("y")
    assert got.shape == arr.shape
    if datatype == "BYTES":
        assert got.tolist() == arr.tolist()
    else:
        assert got.dtype == arr.dtype
        np.testing.assert_array_equal(got, arr)


def test_many_inputs_and_outputs_keep_order() -> None:
    tensors = [(f"t{i}", dt, sample(dt, (2, 2), seed=i)) for i, dt in enumerate(ALL)]
    decoded = codec.decode_request(triton_request(*tensors))
    assert list(decoded) == [name for name, _, _ in tensors]
    for name, datatype, arr in tensors:
        assert_same(decoded[name], as_expected(datatype, arr))
    # Back out with datatypes inferred from the arrays (BF16 explicit: float32 alone means FP32).
    outputs = [(name, decoded[name], "BF16" if dt == "BF16" else None) for name, dt, _ in tensors]
    response = codec.encode_response(pb.ModelInferResponse(), outputs)
    result = tg.InferResult(response)
    for name, datatype, arr in tensors:
        got = result.as_numpy(name)
        assert result.get_output(name).datatype == datatype
        if datatype == "BYTES":
            assert got.tolist() == arr.tolist()
        else:
            np.testing.assert_array_equal(got, arr)


@pytest.mark.parametrize("datatype", ALL)
@pytest.mark.parametrize("shape", [(2, 3), (0, 4)])
def test_decode_validated_request_equals_decode_request(datatype: str, shape: tuple[int, ...]) -> None:
    # Raw contents (plain types take the view path, BOOL/BF16/BYTES the full decode) and typed contents.
    arr = sample(datatype, shape, seed=7)
    raw = triton_request(("x", datatype, arr), ("z", "FP32", sample("FP32", (shape[0], 1))))
    got = codec.decode_validated_request(raw)
    want = codec.decode_request(raw)
    assert list(got) == ["x", "z"]
    for name in want:
        assert_same(got[name], want[name])
    if datatype not in ("BYTES", "BF16", "BOOL"):
        assert not got["x"].flags.writeable  # a view of the message's bytes, as decode_request gives
    if datatype in TYPED_FIELD:
        typed = pb.ModelInferRequest(inputs=[typed_tensor("x", datatype, arr)])
        assert_same(codec.decode_validated_request(typed)["x"], codec.decode_request(typed)["x"])


def test_mapping_outputs_and_inferred_datatypes() -> None:
    outputs = {"logits": np.arange(20, dtype=np.float32).reshape(2, 10), "text": np.array(["héllo", ""])}
    response = codec.encode_response(pb.ModelInferResponse(), outputs)
    assert [o.datatype for o in response.outputs] == ["FP32", "BYTES"]
    result = tg.InferResult(response)
    np.testing.assert_array_equal(result.as_numpy("logits"), outputs["logits"])
    assert result.as_numpy("text").tolist() == ["héllo".encode(), b""]


def test_encode_request_matches_tritonclient() -> None:
    tensors = [(f"t{i}", dt, sample(dt, (3,), seed=i)) for i, dt in enumerate(ALL)]
    ours = codec.encode_request(pb.ModelInferRequest(model_name="m"), [(n, a, dt) for n, dt, a in tensors])
    assert ours == triton_request(*tensors)


def test_bf16_matches_ml_dtypes_rounding() -> None:
    rng = np.random.default_rng(7)
    values = np.concatenate(
        [
            rng.standard_normal(1000).astype(np.float32) * 1e3,
            np.array([0.0, -0.0, np.inf, -np.inf, 1e-45, -1e-45, 3.4028235e38, 1.00390625, 1.01171875]),
        ]
    ).astype(np.float32)
    assert codec.float32_to_bf16(values) == values.astype(ml_dtypes.bfloat16).tobytes()
    nan = codec.bf16_to_float32(codec.float32_to_bf16(np.array([np.nan, -np.nan], dtype=np.float32)))
    assert np.isnan(nan).all()
    # Values exactly representable in bf16 are the upper two bytes of the little-endian float32.
    exact = values.astype(ml_dtypes.bfloat16).astype(np.float32)
    upper = b"".join(struct.pack("<f", float(v))[2:] for v in exact)
    assert codec.float32_to_bf16(exact) == upper
    np.testing.assert_array_equal(codec.bf16_to_float32(upper), exact)


def test_bytes_serialization_matches_tritonclient() -> None:
    arr = sample("BYTES", (3, 4))
    raw = codec.serialize_bytes(arr)
    assert raw == tu.serialize_byte_tensor(arr).item()
    assert codec.deserialize_bytes(raw).tolist() == tu.deserialize_bytes_tensor(raw).tolist()
    assert (
        codec.serialize_bytes(np.array(["é", 7], dtype=object))
        == b"\x02\x00\x00\x00\xc3\xa9\x01\x00\x00\x007"
    )
    assert codec.serialize_bytes(np.empty((0,), dtype=object)) == b""
    assert codec.deserialize_bytes(b"", count=0).shape == (0,)


# ---------------------------------------------------------------------------------------------------------
# Typed contents


TYPED_FIELD = {
    "BOOL": "bool_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}


def typed_tensor(name: str, datatype: str, arr: np.ndarray) -> pb.ModelInferRequest.InferInputTensor:
    tensor = pb.ModelInferRequest.InferInputTensor(name=name, datatype=datatype, shape=arr.shape)
    getattr(tensor.contents, TYPED_FIELD[datatype]).extend(arr.ravel().tolist())
    return tensor


@pytest.mark.parametrize("datatype", sorted(TYPED_FIELD))
def test_typed_contents(datatype: str) -> None:
    arr = sample(datatype, (2, 3), seed=3)
    request = pb.ModelInferRequest(inputs=[typed_tensor("x", datatype, arr)])
    assert_same(codec.decode_request(request)["x"], arr)


def test_typed_and_raw_across_requests_agree() -> None:
    arr = sample("INT64", (4,))
    typed = codec.decode_request(pb.ModelInferRequest(inputs=[typed_tensor("x", "INT64", arr)]))["x"]
    raw = codec.decode_request(triton_request(("x", "INT64", arr)))["x"]
    assert_same(typed, raw)


def test_typed_errors() -> None:
    field = "inputs[0] ('x')"
    t = typed_tensor("x", "INT32", np.arange(3, dtype=np.int32))
    t.shape[:] = [4]
    raises_invalid(
        f"{field}.contents.int_contents: holds 3 elements",
        codec.decode_request,
        pb.ModelInferRequest(inputs=[t]),
    )
    t = pb.ModelInferRequest.InferInputTensor(name="x", datatype="INT32", shape=[1])
    t.contents.fp32_contents.append(1.0)
    raises_invalid(
        f"{field}.contents: the INT32 input carries fp32_contents; INT32 values are expected in int_contents",
        codec.decode_request,
        pb.ModelInferRequest(inputs=[t]),
    )
    t = pb.ModelInferRequest.InferInputTensor(name="x", datatype="FP16", shape=[1])
    t.contents.fp32_contents.append(1.0)
    raises_invalid(
        f"{field}.contents: FP16 has no typed contents",
        codec.decode_request,
        pb.ModelInferRequest(inputs=[t]),
    )
    t = pb.ModelInferRequest.InferInputTensor(name="x", datatype="INT8", shape=[2])
    t.contents.int_contents.extend([1, 300])
    raises_invalid(
        f"{field}.contents.int_contents: value out of range",
        codec.decode_request,
        pb.ModelInferRequest(inputs=[t]),
    )
    t = pb.ModelInferRequest.InferInputTensor(name="x", datatype="FP32", shape=[2])
    raises_invalid(f"{field}: no data", codec.decode_request, pb.ModelInferRequest(inputs=[t]))


# ---------------------------------------------------------------------------------------------------------
# Malformed requests


def test_raw_size_mismatch() -> None:
    request = triton_request(("pixels", "FP32", np.zeros((2, 64), np.float32)))
    request.raw_input_contents[0] = request.raw_input_contents[0][:-1]
    err = raises_invalid(
        "inputs[0] ('pixels'): raw_input_contents[0] holds 511 bytes", codec.decode_request, request
    )
    assert "needs 512" in err.message


@pytest.mark.parametrize("dims", [[-1, 64], [2, -5]])
def test_negative_dims(dims: list[int]) -> None:
    request = triton_request(("pixels", "FP32", np.zeros((2, 64), np.float32)))
    request.inputs[0].shape[:] = dims
    raises_invalid("inputs[0] ('pixels').shape: dimension", codec.decode_request, request)


@pytest.mark.parametrize("datatype", ["FP32", "BYTES", "BOOL", "BF16"])
@pytest.mark.parametrize("dims", [[2**40], [2**20, 2**20], [2**30, 2]])
def test_huge_declared_shape_fails_without_allocation(datatype: str, dims: list[int]) -> None:
    tensor = pb.ModelInferRequest.InferInputTensor(name="x", datatype=datatype, shape=dims)
    request = pb.ModelInferRequest(inputs=[tensor], raw_input_contents=[b"\x01\x00\x00\x00a" * 4])
    tracemalloc.start()
    try:
        raises_invalid("inputs[0] ('x')", codec.decode_request, request)
        raises_invalid("inputs[0] ('x')", codec.decode_tensor, tensor, None, "inputs[0] ('x')")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20


def test_element_limit_is_configurable() -> None:
    request = triton_request(("x", "UINT8", np.zeros((5, 5), np.uint8)))
    raises_invalid(
        "inputs[0] ('x').shape: [5, 5] declares more than 10", codec.decode_request, request, max_elements=10
    )
    request = triton_request(("x", "UINT8", np.zeros(100, np.uint8)))
    raises_invalid(
        "inputs[0] ('x').shape: dimension 0 is 100, above", codec.decode_request, request, max_elements=10
    )


@pytest.mark.parametrize(
    ("raw", "count", "message"),
    [
        (b"\x01\x00", 1, "2 bytes cannot hold 1 length-prefixed"),
        (b"\x00\x00\x00\x00", 2, "4 bytes cannot hold 2 length-prefixed"),
        (b"\x01\x00\x00\x00ab", 1, "1 trailing bytes after the 1 declared"),
        (b"\x05\x00\x00\x00ab\x00\x00", 2, "element 0: length prefix 5 exceeds the 4 remaining bytes"),
        (b"\x02\x00\x00\x00ab\xff\xff", 2, "element 1: truncated length prefix (2 of 4 bytes at offset 6)"),
        (b"\xff\xff\xff\xff", 1, "element 0: length prefix 4294967295 exceeds the 0 remaining"),
        (b"\x04\x00\x00\x00abcd", 2, "holds 1 BYTES elements, shape needs 2"),
    ],
)
def test_malformed_bytes(raw: bytes, count: int, message: str) -> None:
    tensor = pb.ModelInferRequest.InferInputTensor(name="prompt", datatype="BYTES", shape=[count])
    request = pb.ModelInferRequest(inputs=[tensor], raw_input_contents=[raw])
    err = raises_invalid("inputs[0] ('prompt'): raw_input_contents[0]: ", codec.decode_request, request)
    assert message in err.message
    err = raises_invalid("payload: ", codec.deserialize_bytes, raw, count, "payload")
    assert message in err.message


def test_deserialize_bytes_without_count() -> None:
    assert codec.deserialize_bytes(b"\x00\x00\x00\x00\x01\x00\x00\x00z").tolist() == [b"", b"z"]
    raises_invalid(
        "bytes: element 1: length prefix 9", codec.deserialize_bytes, b"\x00\x00\x00\x00\x09\x00\x00\x00z"
    )
    raises_invalid("bytes: element 0: truncated length prefix", codec.deserialize_bytes, b"\x01\x00")


def test_bool_bytes_must_be_zero_or_one() -> None:
    request = triton_request(("m", "BOOL", np.array([True, False])))
    request.raw_input_contents[0] = b"\x01\x02"
    raises_invalid("inputs[0] ('m'): raw_input_contents[0] holds a BOOL byte", codec.decode_request, request)


def test_raw_and_typed_at_once() -> None:
    request = triton_request(("x", "INT32", np.arange(2, dtype=np.int32)))
    request.inputs[0].contents.int_contents.extend([0, 1])
    raises_invalid("inputs[0] ('x').contents: must be empty", codec.decode_request, request)
    raises_invalid(
        "inputs[0] ('x').contents: must be empty",
        codec.validate_request,
        request,
        [spec("x", "INT32", [2])],
        0,
    )


def test_unknown_datatype() -> None:
    request = triton_request(("a", "FP32", np.zeros(1, np.float32)), ("b", "FP32", np.zeros(1, np.float32)))
    request.inputs[1].datatype = "FLOAT"
    raises_invalid("inputs[1] ('b').datatype: unknown datatype 'FLOAT'", codec.decode_request, request)


def test_duplicate_names() -> None:
    request = triton_request(("a", "FP32", np.zeros(1, np.float32)), ("a", "FP32", np.zeros(1, np.float32)))
    raises_invalid("inputs[1] ('a').name: duplicate input", codec.decode_request, request)
    raises_invalid(
        "inputs[1] ('a').name: duplicate input", codec.validate_request, request, [spec("a", "FP32", [1])], 0
    )


def test_raw_count_mismatch() -> None:
    request = triton_request(("a", "FP32", np.zeros(1, np.float32)), ("b", "FP32", np.zeros(1, np.float32)))
    request.raw_input_contents.append(b"\x00" * 4)
    raises_invalid("raw_input_contents: 3 entries for 2 inputs", codec.decode_request, request)
    del request.raw_input_contents[1:]
    raises_invalid("raw_input_contents: 1 entries for 2 inputs", codec.decode_request, request)


def test_shared_memory_input_is_refused_not_crashing() -> None:
    a = tg.InferInput("a", [1], "FP32")
    a.set_shared_memory("region", 4)
    b = tg.InferInput("b", [1], "FP32")
    b.set_data_from_numpy(np.ones(1, np.float32))
    request = pb.ModelInferRequest(
        inputs=[a._get_tensor(), b._get_tensor()], raw_input_contents=[b._get_content()]
    )
    raises_invalid("inputs[0].parameters['shared_memory_", codec.decode_request, request)


# ---------------------------------------------------------------------------------------------------------
# Signature validation


def spec(name: str, datatype: str, shape: list[int], optional: bool = False) -> common_pb2.TensorSpec:
    return common_pb2.TensorSpec(name=name, datatype=datatype, shape=shape, optional=optional)


TINYLM = [spec("prompt", "BYTES", [1]), spec("max_tokens", "INT32", [1], optional=True)]
DIGITS = [spec("pixels", "FP32", [-1, 64])]
PAIR = [spec("a", "FP32", [-1, 4]), spec("b", "INT64", [-1])]


def test_validate_accepts_good_requests() -> None:
    codec.validate_request(triton_request(("pixels", "FP32", np.zeros((8, 64), np.float32))), DIGITS, 32)
    # The hot path's form: the signature's inputs prepared once.
    digits = codec.InputSpecs(DIGITS)
    codec.validate_request(triton_request(("pixels", "FP32", np.zeros((8, 64), np.float32))), digits, 32)
    codec.validate_request(triton_request(("prompt", "BYTES", np.array([b"hi"], dtype=object))), TINYLM, 0)
    codec.validate_request(
        triton_request(
            ("prompt", "BYTES", np.array(["é"], dtype=object)),
            ("max_tokens", "INT32", np.array([5], np.int32)),
        ),
        TINYLM,
        0,
    )
    typed = pb.ModelInferRequest(inputs=[typed_tensor("max_tokens", "INT32", np.array([5], np.int32))])
    typed.inputs.append(typed_tensor("prompt", "BYTES", np.array([b"x"], dtype=object)))
    codec.validate_request(typed, TINYLM, 0)


@pytest.mark.parametrize(
    ("tensors", "signature", "max_batch", "message"),
    [
        (
            [("pixel", "FP32", np.zeros((1, 64), np.float32))],
            DIGITS,
            8,
            "inputs[0] ('pixel').name: unknown input",
        ),
        (
            [("max_tokens", "INT32", np.array([3], np.int32))],
            TINYLM,
            0,
            "inputs: missing required input(s) 'prompt'",
        ),
        ([("pixels", "FP64", np.zeros((1, 64)))], DIGITS, 8, "inputs[0] ('pixels').datatype: got FP64"),
        (
            [("pixels", "FP32", np.zeros(64, np.float32))],
            DIGITS,
            8,
            "inputs[0] ('pixels').shape: got [64] (rank 1)",
        ),
        (
            [("pixels", "FP32", np.zeros((1, 63), np.float32))],
            DIGITS,
            8,
            "inputs[0] ('pixels').shape: dimension 1 is 63",
        ),
        (
            [("pixels", "FP32", np.zeros((9, 64), np.float32))],
            DIGITS,
            8,
            "inputs[0] ('pixels').shape: batch size 9 exceeds",
        ),
        (
            [("a", "FP32", np.zeros((2, 4), np.float32)), ("b", "INT64", np.zeros(3, np.int64))],
            PAIR,
            8,
            "inputs[1] ('b').shape: batch size 3 differs from 2 of input 'a'",
        ),
        (
            [("prompt", "BYTES", np.array([b"a", b"b"], dtype=object))],
            TINYLM,
            0,
            "inputs[0] ('prompt').shape: dimension 0 is 2",
        ),
    ],
)
@pytest.mark.parametrize("prepared", [False, True], ids=["specs", "input_specs"])
def test_validate_signature_mismatches(
    tensors: list[tuple[str, str, np.ndarray]],
    signature: list[common_pb2.TensorSpec],
    max_batch: int,
    message: str,
    prepared: bool,
) -> None:
    inputs = codec.InputSpecs(signature) if prepared else signature
    raises_invalid(message, codec.validate_request, triton_request(*tensors), inputs, max_batch)


def test_validate_cheap_data_checks() -> None:
    request = triton_request(("pixels", "FP32", np.zeros((2, 64), np.float32)))
    request.raw_input_contents[0] = b"\x00" * 12
    raises_invalid(
        "inputs[0] ('pixels'): raw_input_contents[0] holds 12 bytes",
        codec.validate_request,
        request,
        DIGITS,
        8,
    )
    request.inputs[0].shape[:] = [-1, 64]
    raises_invalid(
        "inputs[0] ('pixels').shape: dimension 0 is -1", codec.validate_request, request, DIGITS, 8
    )
    request.inputs[0].shape[:] = [2**40, 64]
    raises_invalid("inputs[0] ('pixels').shape: dimension 0", codec.validate_request, request, DIGITS, 8)
    typed = pb.ModelInferRequest(inputs=[typed_tensor("b", "INT64", np.arange(3))])
    typed.inputs[0].shape[:] = [4]
    raises_invalid(
        "inputs[0] ('b').contents.int64_contents: holds 3", codec.validate_request, typed, [PAIR[1]], 8
    )
    # An FP32 input whose values came in int_contents: the message names the field it used, not an empty
    # fp32_contents.
    wrong = pb.ModelInferRequest(inputs=[typed_tensor("pixels", "INT32", np.zeros((1, 64), np.int32))])
    wrong.inputs[0].datatype = "FP32"
    raises_invalid(
        "inputs[0] ('pixels').contents: the FP32 input carries int_contents; "
        "FP32 values are expected in fp32_contents",
        codec.validate_request,
        wrong,
        DIGITS,
        8,
    )
    request = triton_request(("x", "FP32", np.zeros(2, np.float32)))
    request.inputs[0].datatype = "FP3"
    raises_invalid(
        "inputs[0] ('x').datatype: unknown datatype",
        codec.validate_request,
        request,
        [spec("x", "FP3", [2])],
        0,
    )


# ---------------------------------------------------------------------------------------------------------
# Encoding errors (server-side bugs → Internal)


def test_encode_errors_are_internal() -> None:
    with pytest.raises(Internal, match=r"outputs \('y'\): cannot encode a float64 array as INT32"):
        codec.encode_tensor("y", np.zeros(2), "INT32")
    with pytest.raises(Internal, match=r"outputs \('y'\): BYTES needs"):
        codec.encode_tensor("y", np.zeros(2), "BYTES")
    with pytest.raises(Internal, match=r"outputs \('y'\).datatype"):
        codec.encode_tensor("y", np.zeros(2, np.complex64))
    with pytest.raises(Internal, match=r"outputs \('y'\).datatype: unknown"):
        codec.encode_tensor("y", np.zeros(2), "FP8")


def test_encode_casts_same_kind_and_non_contiguous() -> None:
    arr = np.arange(12, dtype=np.float64).reshape(3, 4).T  # Fortran-ordered view
    tensor, raw = codec.encode_tensor("y", arr, "FP32")
    assert list(tensor.shape) == [4, 3]
    np.testing.assert_array_equal(np.frombuffer(raw, np.float32).reshape(4, 3), arr.astype(np.float32))
    big_endian = np.arange(3, dtype=">i4")
    tensor, raw = codec.encode_tensor("y", big_endian)
    assert tensor.datatype == "INT32"
    assert raw == np.arange(3, dtype="<i4").tobytes()


# ---------------------------------------------------------------------------------------------------------
# Property: anything tritonclient can send, we decode; anything we encode, tritonclient reads


@st.composite
def tensors(draw: st.DrawFn) -> tuple[str, np.ndarray]:
    datatype = draw(st.sampled_from(ALL))
    shape = draw(hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=4))
    if datatype == "BYTES":
        elements = st.binary(max_size=12) | st.text(max_size=6).map(lambda s: s.encode())
        arr = np.empty(shape, dtype=object)
        for idx in np.ndindex(shape):
            arr[idx] = draw(elements)
        return datatype, arr
    if datatype == "BF16":
        floats = hnp.arrays(np.float32, shape, elements=st.floats(width=32))
        return datatype, draw(floats).astype(ml_dtypes.bfloat16)
    dtype = tu.triton_to_np_dtype(datatype)
    return datatype, draw(hnp.arrays(dtype, shape))


@settings(max_examples=150, deadline=None)
@given(tensors())
def test_round_trip_property(case: tuple[str, np.ndarray]) -> None:
    datatype, arr = case
    decoded = codec.decode_request(triton_request(("x", datatype, arr)))["x"]
    assert_same(decoded, as_expected(datatype, arr))
    response = codec.encode_response(pb.ModelInferResponse(), [("y", decoded, datatype)])
    got = tg.InferResult(response).as_numpy("y")
    assert got.shape == arr.shape
    if datatype == "BYTES":
        assert got.tolist() == arr.tolist()
    else:
        assert got.dtype == arr.dtype
        # numpy's NaN-aware comparison does not know bfloat16: compare its exact float32 values.
        np.testing.assert_array_equal(as_expected(datatype, got), as_expected(datatype, arr))
