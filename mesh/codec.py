"""KServe v2 tensor codec: raw and typed contents to and from numpy, for every v2 datatype."""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, TypeAlias

import numpy as np
import numpy.typing as npt

from mesh.errors import Internal, InvalidArgument
from mesh.v2 import pb
from mesh_pb import common_pb2

__all__ = [
    "DATATYPES",
    "MAX_ELEMENTS",
    "MAX_PARAMETERS",
    "MAX_PARAMETER_KEY",
    "InputSpecs",
    "bf16_to_float32",
    "decode_request",
    "decode_tensor",
    "deserialize_bytes",
    "element_size",
    "encode_request",
    "encode_response",
    "encode_tensor",
    "float32_to_bf16",
    "numpy_to_datatype",
    "request_priority",
    "serialize_bytes",
    "validate_request",
]

InputTensor: TypeAlias = pb.ModelInferRequest.InferInputTensor
OutputTensor: TypeAlias = pb.ModelInferResponse.InferOutputTensor
NamedArrays: TypeAlias = Mapping[str, np.ndarray] | Sequence[tuple[Any, ...]]

# Largest element count a request tensor may declare; checked before anything of that size is allocated.
MAX_ELEMENTS = 2**31

# Bounds on every parameters map (the request's, each input's, each requested output's): each entry is
# checked on every request, so a client must not be able to make that work unbounded.
MAX_PARAMETERS = 64
"""Most entries one parameters map may hold."""
MAX_PARAMETER_KEY = 256
"""Longest parameter key, in characters."""

# Explicit little-endian dtypes: the wire is little-endian whatever the host is.
DATATYPES: Mapping[str, np.dtype[Any]] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype("<u1"),
    "UINT16": np.dtype("<u2"),
    "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"),
    "INT8": np.dtype("<i1"),
    "INT16": np.dtype("<i2"),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"),
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
    # numpy has no bfloat16: BF16 decodes (exactly) to float32.
    "BF16": np.dtype("<f4"),
    "BYTES": np.dtype(object),
}

_ELEMENT_SIZE: Mapping[str, int] = {
    **{dt: np.dtype(d).itemsize for dt, d in DATATYPES.items() if dt not in ("BF16", "BYTES")},
    "BF16": 2,
}

# Typed contents field for each datatype (InferTensorContents); FP16 and BF16 travel raw only.
_TYPED_FIELD: Mapping[str, str] = {
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
_LEN = struct.Struct("<I")
_MAX_BYTES_ELEMENT = 2**32 - 1


# ---------------------------------------------------------------------------------------------------------
# Datatypes


def _check_datatype(datatype: str, field: str) -> np.dtype[Any]:
    dtype = DATATYPES.get(datatype)
    if dtype is None:
        raise InvalidArgument(
            f"{field}: unknown datatype {datatype!r}; expected one of {', '.join(DATATYPES)}"
        )
    return dtype


def element_size(datatype: str) -> int | None:
    """Bytes per element on the wire; None for BYTES (variable length)."""
    _check_datatype(datatype, "datatype")
    return _ELEMENT_SIZE.get(datatype)


def numpy_to_datatype(dtype: npt.DTypeLike) -> str:
    """The v2 datatype for a numpy dtype (float32 → FP32; ml_dtypes.bfloat16 → BF16; str/bytes/object → BYTES)."""
    dt = np.dtype(dtype)
    if dt.name == "bfloat16":
        return "BF16"
    if dt.kind in ("O", "S", "U"):
        return "BYTES"
    if dt.kind == "b":
        return "BOOL"
    if dt.kind in ("i", "u", "f") and dt.itemsize in (1, 2, 4, 8):
        prefix = {"i": "INT", "u": "UINT", "f": "FP"}[dt.kind]
        name = f"{prefix}{dt.itemsize * 8}"
        if name in DATATYPES:
            return name
    raise InvalidArgument(f"dtype: numpy dtype {dt} has no KServe v2 datatype")


# ---------------------------------------------------------------------------------------------------------
# BYTES and BF16 serialization


def _element_bytes(value: Any) -> bytes:
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode("utf-8")
    if isinstance(value, bytearray | memoryview):
        return bytes(value)
    # Same fallback as tritonclient's serialize_byte_tensor: the str() form, UTF-8.
    return str(value).encode("utf-8")


def serialize_bytes(arr: npt.ArrayLike) -> bytes:
    """BYTES raw form: per element (row-major) a 4-byte little-endian length, then the bytes."""
    a = np.asarray(arr)
    parts: list[bytes] = []
    for value in a.ravel(order="C").tolist():
        b = _element_bytes(value)
        if len(b) > _MAX_BYTES_ELEMENT:
            raise InvalidArgument(f"bytes: element of {len(b)} bytes exceeds the 4 GiB BYTES limit")
        parts.append(_LEN.pack(len(b)))
        parts.append(b)
    return b"".join(parts)


def deserialize_bytes(buf: bytes | memoryview, count: int | None = None, field: str = "bytes") -> np.ndarray:
    """Parses length-prefixed BYTES into a 1-D object array of bytes; exactly ``count`` elements when given."""
    view = memoryview(buf).cast("B")
    total = len(view)
    if count is not None and count * 4 > total:
        # Each element needs at least its 4-byte prefix: refuse before allocating ``count`` slots.
        raise InvalidArgument(f"{field}: {total} bytes cannot hold {count} length-prefixed BYTES elements")
    items: list[bytes] = []
    offset = 0
    while offset < total:
        index = len(items)
        if count is not None and index >= count:
            raise InvalidArgument(
                f"{field}: {total - offset} trailing bytes after the {count} declared BYTES elements"
            )
        if total - offset < 4:
            raise InvalidArgument(
                f"{field}: element {index}: truncated length prefix ({total - offset} of 4 bytes at offset {offset})"
            )
        (length,) = _LEN.unpack_from(view, offset)
        offset += 4
        if length > total - offset:
            raise InvalidArgument(
                f"{field}: element {index}: length prefix {length} exceeds the {total - offset} remaining bytes"
            )
        items.append(bytes(view[offset : offset + length]))
        offset += length
    if count is not None and len(items) != count:
        raise InvalidArgument(f"{field}: holds {len(items)} BYTES elements, shape needs {count}")
    out = np.empty(len(items), dtype=object)
    out[:] = items
    return out


def float32_to_bf16(arr: npt.ArrayLike) -> bytes:
    """BF16 raw form: the upper 2 bytes of each little-endian float32, rounded to nearest even (NaN kept)."""
    bits = np.ascontiguousarray(arr, dtype="<f4").view("<u4")
    rounded = (bits + (((bits >> 16) & 1) + 0x7FFF)) >> 16
    # NaN would round into the exponent/sign: keep it a quiet NaN of the same sign instead.
    nan = (bits & 0x7FFFFFFF) > 0x7F800000
    out = np.where(nan, (bits >> 16) | 0x0040, rounded).astype("<u2")
    return out.tobytes()


def bf16_to_float32(buf: bytes | memoryview) -> np.ndarray:
    """Decodes BF16 raw bytes into float32 (exact: bf16 is the top half of a float32)."""
    halves = np.frombuffer(buf, dtype="<u2")
    return (halves.astype("<u4") << 16).view("<f4")


# ---------------------------------------------------------------------------------------------------------
# Decoding


def _shape_and_count(shape: Iterable[int], field: str, max_elements: int | None) -> tuple[list[int], int]:
    limit = MAX_ELEMENTS if max_elements is None else max_elements
    dims = [int(d) for d in shape]
    count = 1
    for i, d in enumerate(dims):
        if d < 0:
            raise InvalidArgument(f"{field}.shape: dimension {i} is {d}; request dimensions must be >= 0")
        if d > limit:
            raise InvalidArgument(f"{field}.shape: dimension {i} is {d}, above the limit of {limit} elements")
        count *= d
        if count > limit:
            raise InvalidArgument(f"{field}.shape: {dims} declares more than {limit} elements")
    return dims, count


def _has_typed(tensor: InputTensor) -> bool:
    return tensor.HasField("contents") and bool(tensor.contents.ListFields())


def _refuse_other_contents(contents: pb.InferTensorContents, datatype: str, wanted: str, field: str) -> None:
    """Refuses values in a typed field other than the datatype's (an FP32 input's values in
    int_contents), which would otherwise read as an empty `wanted` field of the wrong length."""
    for descriptor, _ in contents.ListFields():
        if descriptor.name != wanted:
            raise InvalidArgument(
                f"{field}.contents: the {datatype} input carries {descriptor.name}; "
                f"{datatype} values are expected in {wanted}"
            )


def _decode_typed(tensor: InputTensor, datatype: str, dims: list[int], count: int, field: str) -> np.ndarray:
    dtype = DATATYPES[datatype]
    wanted = _TYPED_FIELD.get(datatype)
    if wanted is None:
        raise InvalidArgument(
            f"{field}.contents: {datatype} has no typed contents; send it in raw_input_contents"
        )
    contents = tensor.contents
    _refuse_other_contents(contents, datatype, wanted, field)
    values = getattr(contents, wanted)
    if len(values) != count:
        raise InvalidArgument(
            f"{field}.contents.{wanted}: holds {len(values)} elements, shape {dims} needs {count}"
        )
    if datatype == "BYTES":
        out = np.empty(count, dtype=object)
        out[:] = list(values)
        return out.reshape(dims)
    if datatype in ("INT8", "INT16", "UINT8", "UINT16"):
        wide = np.array(values, dtype=np.int64)
        info = np.iinfo(dtype)
        if wide.size and (wide.min() < info.min or wide.max() > info.max):
            raise InvalidArgument(f"{field}.contents.{wanted}: value out of range for {datatype}")
        return wide.astype(dtype).reshape(dims)
    return np.array(values, dtype=dtype).reshape(dims)


def _decode_raw(
    raw: bytes, datatype: str, dims: list[int], count: int, field: str, raw_field: str
) -> np.ndarray:
    if datatype == "BYTES":
        return deserialize_bytes(raw, count, f"{field}: {raw_field}").reshape(dims)
    expected = count * _ELEMENT_SIZE[datatype]
    if len(raw) != expected:
        raise InvalidArgument(
            f"{field}: {raw_field} holds {len(raw)} bytes; shape {dims} of {datatype} needs {expected}"
        )
    if datatype == "BF16":
        return bf16_to_float32(raw).reshape(dims)
    if datatype == "BOOL" and count:
        if int(np.frombuffer(raw, dtype=np.uint8).max()) > 1:
            raise InvalidArgument(f"{field}: {raw_field} holds a BOOL byte other than 0 or 1")
    return np.frombuffer(raw, dtype=DATATYPES[datatype]).reshape(dims)


def decode_tensor(
    tensor: InputTensor,
    raw: bytes | None,
    field: str,
    *,
    raw_field: str = "raw contents",
    max_elements: int | None = None,
) -> np.ndarray:
    """One request tensor as numpy, from ``raw`` (its raw_input_contents entry) or its typed contents.

    Every check (datatype, dims >= 0, element limit, byte size) runs before anything of the declared
    size is allocated. Raw fixed-size tensors are read-only zero-copy views of ``raw``.
    """
    datatype = tensor.datatype
    _check_datatype(datatype, f"{field}.datatype")
    dims, count = _shape_and_count(tensor.shape, field, max_elements)
    if raw is not None:
        if _has_typed(tensor):
            raise InvalidArgument(f"{field}.contents: must be empty when raw_input_contents is used")
        return _decode_raw(raw, datatype, dims, count, field, raw_field)
    if not _has_typed(tensor) and count:
        raise InvalidArgument(f"{field}: no data (neither raw_input_contents nor contents)")
    return _decode_typed(tensor, datatype, dims, count, field)


def _input_field(index: int, name: str) -> str:
    return f"inputs[{index}] ({name!r})"


def _pair_inputs(request: pb.ModelInferRequest) -> list[tuple[int, InputTensor, int | None]]:
    """(index, tensor, raw index) per input, after the name and raw-count rules that need no data."""
    seen: dict[str, int] = {}
    paired: list[tuple[int, InputTensor, int | None]] = []
    n_raw = len(request.raw_input_contents)
    next_raw = 0
    for i, tensor in enumerate(request.inputs):
        field = _input_field(i, tensor.name)
        if not tensor.name:
            raise InvalidArgument(f"{field}.name: must not be empty")
        if tensor.name in seen:
            raise InvalidArgument(f"{field}.name: duplicate input (also inputs[{seen[tensor.name]}])")
        seen[tensor.name] = i
        if tensor.parameters:
            _check_parameter_map(tensor.parameters, f"inputs[{i}].parameters", _TENSOR_PARAMETERS)
        if n_raw:
            paired.append((i, tensor, next_raw))
            next_raw += 1
        else:
            paired.append((i, tensor, None))
    if n_raw and n_raw != next_raw:
        raise InvalidArgument(
            f"raw_input_contents: {n_raw} entries for {next_raw} inputs; one entry per input, in order"
        )
    return paired


def decode_request(
    request: pb.ModelInferRequest, *, max_elements: int | None = None
) -> dict[str, np.ndarray]:
    """All inputs of a ModelInferRequest by name; raw_input_contents[k] pairs with the k-th input."""
    out: dict[str, np.ndarray] = {}
    for i, tensor, k in _pair_inputs(request):
        raw = None if k is None else request.raw_input_contents[k]
        out[tensor.name] = decode_tensor(
            tensor,
            raw,
            _input_field(i, tensor.name),
            raw_field=f"raw_input_contents[{k}]",
            max_elements=max_elements,
        )
    return out


# Fixed-size datatypes whose raw bytes need no check beyond their length (BOOL bytes must be 0 or 1,
# BF16 is widened, BYTES is length-prefixed).
_PLAIN_RAW: Mapping[str, np.dtype[Any]] = {
    dt: d for dt, d in DATATYPES.items() if dt not in ("BOOL", "BF16", "BYTES")
}


def decode_validated_request(request: pb.ModelInferRequest) -> dict[str, np.ndarray]:
    """decode_request for a request that validate_request has already passed.

    Every input in raw contents of a plain fixed-size datatype (the usual request) becomes a read-only
    view of its bytes without repeating the checks validate_request made (byte length, dims, pairing);
    anything else goes through decode_request.
    """
    raws = request.raw_input_contents
    inputs = request.inputs
    if len(raws) != len(inputs):
        return decode_request(request)
    out: dict[str, np.ndarray] = {}
    for k, tensor in enumerate(inputs):
        dtype = _PLAIN_RAW.get(tensor.datatype)
        if dtype is None:
            return decode_request(request)
        out[tensor.name] = np.frombuffer(raws[k], dtype=dtype).reshape(tuple(tensor.shape))
    return out


class InputSpecs:
    """A signature's inputs prepared once for validate_request: by name, with shapes and required names.

    Build it when a version is loaded (``InputSpecs(signature.inputs)``) and pass it instead of the
    TensorSpec sequence so a request costs no per-call dict or list building.
    """

    __slots__ = ("by_name", "names", "required")

    def __init__(self, inputs: Iterable[common_pb2.TensorSpec]) -> None:
        specs = list(inputs)
        # name -> (datatype, shape, whether the datatype is one of DATATYPES)
        self.by_name: dict[str, tuple[str, tuple[int, ...], bool]] = {
            spec.name: (spec.datatype, tuple(int(d) for d in spec.shape), spec.datatype in DATATYPES)
            for spec in specs
        }
        self.names: tuple[str, ...] = tuple(spec.name for spec in specs)
        self.required: tuple[str, ...] = tuple(spec.name for spec in specs if not spec.optional)


def validate_request(
    request: pb.ModelInferRequest,
    inputs: Sequence[common_pb2.TensorSpec] | InputSpecs,
    max_batch_size: int,
    *,
    max_elements: int | None = None,
) -> None:
    """Checks a request against a signature without decoding data (cheap enough for every request).

    ``inputs`` shapes include the batch dimension when ``max_batch_size > 0``; -1 matches any size.
    ``inputs`` may be an :class:`InputSpecs` built once per signature (the hot path's form).
    The request's, each input's and each requested output's ``parameters`` are checked as
    :func:`check_parameters` describes.
    """
    specs = inputs if isinstance(inputs, InputSpecs) else InputSpecs(inputs)
    by_name = specs.by_name
    batch: tuple[int, str] | None = None
    for i, tensor, k in _pair_inputs(request):
        field = _input_field(i, tensor.name)
        spec = by_name.get(tensor.name)
        if spec is None:
            expected = ", ".join(repr(n) for n in specs.names) or "none"
            raise InvalidArgument(f"{field}.name: unknown input; the model's inputs are {expected}")
        spec_datatype, spec_shape, known = spec
        if tensor.datatype != spec_datatype or not known:
            _check_datatype(tensor.datatype, f"{field}.datatype")
        if tensor.datatype != spec_datatype:
            raise InvalidArgument(
                f"{field}.datatype: got {tensor.datatype}, the model expects {spec_datatype}"
            )
        dims, count = _shape_and_count(tensor.shape, field, max_elements)
        if len(dims) != len(spec_shape):
            want = list(spec_shape)
            raise InvalidArgument(f"{field}.shape: got {dims} (rank {len(dims)}), the model expects {want}")
        for d, (got, exp) in enumerate(zip(dims, spec_shape, strict=True)):
            if exp >= 0 and got != exp and not (max_batch_size > 0 and d == 0):
                raise InvalidArgument(
                    f"{field}.shape: dimension {d} is {got}, the model expects {list(spec_shape)}"
                )
        if max_batch_size > 0:
            if not dims:
                raise InvalidArgument(f"{field}.shape: a batching model needs a batch dimension")
            if dims[0] < 1:
                raise InvalidArgument(f"{field}.shape: batch size must be at least 1, got {dims[0]}")
            if dims[0] > max_batch_size:
                raise InvalidArgument(
                    f"{field}.shape: batch size {dims[0]} exceeds the model's max_batch_size {max_batch_size}"
                )
            if batch is None:
                batch = (dims[0], tensor.name)
            elif dims[0] != batch[0]:
                raise InvalidArgument(
                    f"{field}.shape: batch size {dims[0]} differs from {batch[0]} of input {batch[1]!r}"
                )
        # Cheap data checks (O(1)): mixing, raw byte length of fixed-size types, typed element count.
        if k is not None:
            if _has_typed(tensor):
                raise InvalidArgument(f"{field}.contents: must be empty when raw_input_contents is used")
            size = _ELEMENT_SIZE.get(tensor.datatype)
            n = len(request.raw_input_contents[k])
            if size is not None and n != count * size:
                raise InvalidArgument(
                    f"{field}: raw_input_contents[{k}] holds {n} bytes; "
                    f"shape {dims} of {tensor.datatype} needs {count * size}"
                )
        elif _has_typed(tensor):
            wanted = _TYPED_FIELD.get(tensor.datatype)
            if wanted is None:
                raise InvalidArgument(
                    f"{field}.contents: {tensor.datatype} has no typed contents; send it in raw_input_contents"
                )
            _refuse_other_contents(tensor.contents, tensor.datatype, wanted, field)
            n = len(getattr(tensor.contents, wanted))
            if n != count:
                raise InvalidArgument(
                    f"{field}.contents.{wanted}: holds {n} elements, shape {dims} needs {count}"
                )
        elif count:
            raise InvalidArgument(f"{field}: no data (neither raw_input_contents nor contents)")
    required = specs.required
    if len(required) == 1 and len(request.inputs) == 1:
        missing = [] if request.inputs[0].name == required[0] else list(required)
    else:
        present = {t.name for t in request.inputs}
        missing = [name for name in required if name not in present]
    if missing:
        raise InvalidArgument(f"inputs: missing required input(s) {', '.join(repr(n) for n in missing)}")
    if request.outputs:
        asked: dict[str, int] = {}
        for j, wanted in enumerate(request.outputs):
            if wanted.name in asked:  # Triton refuses it too: one output cannot be returned twice
                raise InvalidArgument(
                    f"outputs[{j}].name: duplicate output {wanted.name!r} (also outputs[{asked[wanted.name]}])"
                )
            asked[wanted.name] = j
            if wanted.parameters:
                _check_parameter_map(wanted.parameters, f"outputs[{j}].parameters", _OUTPUT_PARAMETERS)
    if request.parameters:
        check_parameters(request.parameters)


# ---------------------------------------------------------------------------------------------------------
# Parameters

# A reserved key's extra rule, run once its kind is right; raises InvalidArgument naming `field`.
_Rule = Callable[[pb.InferParameter, str], None]


def _non_negative(param: pb.InferParameter, field: str) -> None:
    if param.WhichOneof("parameter_choice") == "int64_param" and param.int64_param < 0:
        raise InvalidArgument(f"{field}: must be >= 0, got {param.int64_param}")


def _no_shared_memory(param: pb.InferParameter, field: str) -> None:
    # No region can be registered (the shared-memory RPCs answer UNIMPLEMENTED), so any region a request
    # names is unknown, as Triton refuses an unregistered one.
    raise InvalidArgument(
        f"{field}: shared-memory tensors are not supported; send data in raw_input_contents "
        "(outputs always come back in raw_output_contents)"
    )


def _no_classification(param: pb.InferParameter, field: str) -> None:
    if param.int64_param <= 0:
        raise InvalidArgument(f"{field}: must be > 0 (the top-k count), got {param.int64_param}")
    raise InvalidArgument(
        f"{field}: classification outputs are not supported; request the tensor itself and take its top-k"
    )


# Keys with a fixed meaning in the v2/Triton protocol: the kinds each may carry, and any further rule.
# Every other key is a user parameter (accepted, not interpreted) unless it starts with "triton_".
# Set by a gateway on a request it merged from several clients' requests: how many. A worker's statistics
# count each client request (success, queue and compute counts), as Triton counts requests, so what
# perf_analyzer reads through a gateway matches what it sent.
COALESCED_REQUESTS = "maas_coalesced_requests"
MAX_COALESCED_REQUESTS = 4096

_REQUEST_PARAMETERS: dict[str, tuple[tuple[str, ...], _Rule | None]] = {
    # Lower value = served first by the dynamic batcher; 0 = the model's default (see request_priority).
    "priority": (("int64_param", "uint64_param"), _non_negative),
    "timeout": (("int64_param",), _non_negative),
    "sequence_id": (("int64_param", "string_param"), None),
    "sequence_start": (("bool_param",), None),
    "sequence_end": (("bool_param",), None),
    "triton_enable_empty_final_response": (("bool_param",), None),
    COALESCED_REQUESTS: (("int64_param",), _non_negative),
}
# Per input and per requested output. binary_data (bool) and binary_data_size (int64) are the HTTP
# binary-tensor extension's hints; over gRPC tensors are always binary (raw contents), so a client that
# sends them anyway is accepted and the hints are ignored once their kind is checked.
_TENSOR_PARAMETERS: dict[str, tuple[tuple[str, ...], _Rule | None]] = {
    "shared_memory_region": (("string_param",), _no_shared_memory),
    "shared_memory_byte_size": (("int64_param",), _no_shared_memory),
    "shared_memory_offset": (("int64_param",), _no_shared_memory),
    "binary_data": (("bool_param",), None),
    "binary_data_size": (("int64_param",), _non_negative),
}
_OUTPUT_PARAMETERS: dict[str, tuple[tuple[str, ...], _Rule | None]] = {
    **_TENSOR_PARAMETERS,
    # Triton's top-k classification output ("<value>:<index>[:<label>]" BYTES): not served here.
    "classification": (("int64_param",), _no_classification),
}


def _check_parameter_map(
    parameters: Mapping[str, pb.InferParameter],
    field: str,
    reserved: Mapping[str, tuple[tuple[str, ...], _Rule | None]],
) -> None:
    n = len(parameters)
    if n > MAX_PARAMETERS:
        raise InvalidArgument(f"{field}: {n} entries; at most {MAX_PARAMETERS} are accepted")
    for key, param in parameters.items():
        if len(key) > MAX_PARAMETER_KEY:
            raise InvalidArgument(
                f"{field}: key {key[:32]!r}... has {len(key)} characters; at most {MAX_PARAMETER_KEY}"
            )
        entry = reserved.get(key)
        if entry is None:
            if key.startswith("triton_"):
                raise InvalidArgument(
                    f"{field}[{key!r}]: parameter keys starting with 'triton_' are reserved"
                )
            continue
        allowed, rule = entry
        kind = param.WhichOneof("parameter_choice")
        if kind not in allowed:
            raise InvalidArgument(
                f"{field}[{key!r}]: must be {' or '.join(allowed)}, got {kind or 'no value'}"
            )
        if rule is not None:
            rule(param, f"{field}[{key!r}]")


def check_parameters(parameters: Mapping[str, pb.InferParameter]) -> None:
    """Checks request-level parameters: at most MAX_PARAMETERS keys of at most MAX_PARAMETER_KEY
    characters; reserved keys of the right kind and sign; no unknown ``triton_*`` key.

    validate_request applies the same bounds to each input's and each requested output's parameters,
    where the reserved keys are shared_memory_region/_byte_size/_offset (refused: no shared memory),
    binary_data/binary_data_size (HTTP hints, accepted and ignored) and, on outputs, classification
    (refused: top-k outputs are not served). Other keys are user parameters, accepted as they are.
    """
    _check_parameter_map(parameters, "parameters", _REQUEST_PARAMETERS)


def request_priority(request: pb.ModelInferRequest) -> int:
    """The request's ``priority`` parameter (int64 or uint64; validate_request has checked it), 0 when
    absent: 0 means the model's default level, otherwise a lower value is served first."""
    parameters = request.parameters
    if not parameters or "priority" not in parameters:
        return 0
    param = parameters["priority"]
    kind = param.WhichOneof("parameter_choice")
    if kind == "uint64_param":
        return int(param.uint64_param)
    if kind == "int64_param":
        return max(0, int(param.int64_param))
    return 0


# ---------------------------------------------------------------------------------------------------------
# Encoding


def _to_raw(arr: np.ndarray, datatype: str, field: str) -> bytes:
    if datatype == "BYTES":
        if arr.dtype.kind not in ("O", "S", "U"):
            raise Internal(f"{field}: BYTES needs an object, bytes or str array, got {arr.dtype}")
        try:
            return serialize_bytes(arr)
        except InvalidArgument as exc:
            raise Internal(f"{field}: {exc.message}") from exc
    if datatype == "BF16":
        if arr.dtype.name == "bfloat16":
            return np.ascontiguousarray(arr).view("<u2").astype("<u2", copy=False).tobytes()
        if arr.dtype.kind != "f":
            raise Internal(f"{field}: BF16 needs a floating-point array, got {arr.dtype}")
        return float32_to_bf16(arr)
    target = DATATYPES[datatype]
    if arr.dtype == target:  # the usual case: tobytes() writes C order whatever the array's layout
        return arr.tobytes()
    if arr.dtype.name == "bfloat16":
        arr = arr.astype(np.float32)
    if not np.can_cast(arr.dtype, target, casting="same_kind"):
        raise Internal(f"{field}: cannot encode a {arr.dtype} array as {datatype}")
    return np.ascontiguousarray(arr, dtype=target).tobytes()


def _encode(name: str, arr: npt.ArrayLike, datatype: str | None) -> tuple[np.ndarray, str, bytes]:
    """(array, datatype, raw bytes) of one output; datatype defaults to the array's."""
    a = np.asarray(arr)
    if datatype is None:
        try:
            datatype = numpy_to_datatype(a.dtype)
        except InvalidArgument as exc:
            raise Internal(f"outputs ({name!r}).datatype: {exc.message}") from exc
    elif datatype not in DATATYPES:
        raise Internal(f"outputs ({name!r}).datatype: unknown datatype {datatype!r}")
    return a, datatype, _to_raw(a, datatype, f"outputs ({name!r})")


def encode_tensor(name: str, arr: npt.ArrayLike, datatype: str | None = None) -> tuple[OutputTensor, bytes]:
    """One output tensor and its raw bytes; datatype defaults to the array's (numpy_to_datatype)."""
    a, datatype, raw = _encode(name, arr, datatype)
    return OutputTensor(name=name, datatype=datatype, shape=a.shape), raw


def _named(items: NamedArrays) -> list[tuple[str, np.ndarray, str | None]]:
    if isinstance(items, Mapping):
        return [(name, arr, None) for name, arr in items.items()]
    out: list[tuple[str, np.ndarray, str | None]] = []
    for item in items:
        if len(item) == 2:
            out.append((item[0], item[1], None))
        elif len(item) == 3:
            out.append((item[0], item[1], item[2]))
        else:
            raise Internal(f"outputs: expected (name, array[, datatype]) tuples, got {len(item)} items")
    return out


def _append_raw(tensors: Any, raws: Any, items: NamedArrays) -> None:
    """Appends each (name, array[, datatype]) to a request's inputs or a response's outputs, its bytes
    to the matching raw contents. Tensors are filled in place: append() would copy each message."""
    for name, arr, datatype in _named(items):
        a, datatype, raw = _encode(name, arr, datatype)
        tensor = tensors.add()
        tensor.name = name
        tensor.datatype = datatype
        tensor.shape.extend(a.shape)
        raws.append(raw)


def encode_response(response: pb.ModelInferResponse, outputs: NamedArrays) -> pb.ModelInferResponse:
    """Appends outputs with raw_output_contents (one per output, same order; never typed contents)."""
    if len(response.outputs) != len(response.raw_output_contents):
        raise Internal("outputs: response already mixes outputs without raw_output_contents")
    _append_raw(response.outputs, response.raw_output_contents, outputs)
    return response


def encode_request(request: pb.ModelInferRequest, inputs: NamedArrays) -> pb.ModelInferRequest:
    """Appends inputs with raw_input_contents, as tritonclient's set_data_from_numpy does."""
    if len(request.inputs) != len(request.raw_input_contents):
        raise Internal("inputs: request already mixes inputs without raw_input_contents")
    _append_raw(request.inputs, request.raw_input_contents, inputs)
    return request
