"""Hostile requests: random bytes for every method, and valid ModelInferRequests mutated in every way
the KServe v2 contract can be lied about. Deterministic for a seed."""

from __future__ import annotations

import random
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

from mesh.v2 import pb

JUNK_STRINGS = (
    "",
    " ",
    "\x00",
    "digits\x00",
    "dígits",
    "𝔡𝔦𝔤𝔦𝔱𝔰",
    "‮stigid",
    "../../../etc/passwd",
    "store://../../x",
    "%s%s%s%n",
    "{}{}{}",
    "digits" * 2000,
    "ᄀ" * 300,
    "\ud7ff\ue000\ufffd",
    "-1",
    "99999999999999999999999",
    "1.5",
    "stable\n",
    "latest",
    "0x10",
)
DATATYPES = (
    "BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64",
    "FP16", "BF16", "FP32", "FP64", "BYTES", "", "fp32", "FLOAT", "TYPE_FP32", "FP8", "\x00",
)  # fmt: skip
HUGE_DIMS = (2**31, 2**32, 2**40, 2**62, 2**63 - 1, -(2**63), -2, -1, 0)
RESERVED_PARAMS = (
    "triton_enable_empty_final_response",
    "triton_final_response",
    "triton_grpc_error",
    "triton_unknown_flag",
    "triton_",
    "priority",
    "timeout",
    "sequence_id",
    "sequence_start",
    "sequence_end",
    "binary_data_output",
    "shared_memory_region",
    "shared_memory_offset",
    "shared_memory_byte_size",
    "classification",
    "headers",
    "",
    "x" * 5000,
)


def set_param(params: object, key: str, rng: random.Random) -> None:
    """Sets one InferParameter to a value of a random kind (including absurd ones)."""
    p = params[key]  # type: ignore[index]
    choice = rng.randrange(6)
    if choice == 0:
        p.bool_param = rng.random() < 0.5
    elif choice == 1:
        p.int64_param = rng.choice((-1, 0, 1, 2**63 - 1, -(2**63), 10**12))
    elif choice == 2:
        p.string_param = rng.choice(JUNK_STRINGS)
    elif choice == 3:
        p.double_param = rng.choice((float("nan"), float("inf"), -1.0, 1e308))
    elif choice == 4:
        p.uint64_param = rng.choice((0, 2**64 - 1, 1))
    # choice 5: an InferParameter with nothing set


@dataclass
class Target:
    """A model the hostile requests aim at: a valid request builder plus its input names."""

    model: str
    valid: Callable[[random.Random], pb.ModelInferRequest]


def digits_request(rng: random.Random, batch: int = 2) -> pb.ModelInferRequest:
    x = np.asarray([[rng.uniform(0, 16) for _ in range(64)] for _ in range(batch)], dtype=np.float32)
    req = pb.ModelInferRequest(model_name="digits", id=f"h{rng.randrange(10**6)}")
    req.inputs.add(name="pixels", datatype="FP32", shape=[batch, 64])
    req.raw_input_contents.append(x.tobytes())
    return req


def bytes_prefixed(items: list[bytes]) -> bytes:
    return b"".join(struct.pack("<I", len(i)) + i for i in items)


def prompt_request(model: str, rng: random.Random) -> pb.ModelInferRequest:
    req = pb.ModelInferRequest(model_name=model, id=f"p{rng.randrange(10**6)}")
    req.inputs.add(name="prompt", datatype="BYTES", shape=[1])
    req.raw_input_contents.append(bytes_prefixed([b"hello"]))
    req.inputs.add(name="max_tokens", datatype="INT32", shape=[1])
    req.raw_input_contents.append(np.asarray([4], dtype=np.int32).tobytes())
    return req


# ------------------------------------------------------------------------------------------ mutators
# Each takes a valid request (a copy it may change) and the rng, and returns the hostile request.

Mutator = Callable[[pb.ModelInferRequest, random.Random], pb.ModelInferRequest]


def _input(req: pb.ModelInferRequest) -> pb.ModelInferRequest.InferInputTensor:
    """The first input (one is added when an earlier mutation removed them all)."""
    if not req.inputs:
        req.inputs.add(name="pixels", datatype="FP32", shape=[1, 64])
    return req.inputs[0]


def _raw0(req: pb.ModelInferRequest) -> bytes:
    """The first raw content (an empty one is added when an earlier mutation removed them all)."""
    if not req.raw_input_contents:
        req.raw_input_contents.append(b"")
    return req.raw_input_contents[0]


def lying_dims(req: pb.ModelInferRequest, rng: random.Random) -> pb.ModelInferRequest:
    t = _input(req)
    if not t.shape:
        t.shape.append(5)
    t.shape[0] = max(-(2**63), min(2**63 - 1, t.shape[0] * rng.choice((2, 3, 1000, 10**6))))
    return req


def huge_dims(req: pb.ModelInferRequest, rng: random.Random) -> pb.ModelInferRequest:
    t = _input(req)
    del t.shape[:]
    t.shape.extend(rng.choice(HUGE_DIMS) for _ in range(rng.randrange(1, 4)))
    return req


def negative_dims(req: pb.ModelInferRequest, rng: random.Random) -> pb.ModelInferRequest:
    t = _input(req)
    if t.shape:
        t.shape[rng.randrange(len(t.shape))] = rng.choice((-1, -2, -64, -(2**63)))
    return req


def zero_dims(req: pb.ModelInferRequest, rng: random.Random) -> pb.ModelInferRequest:
    t = _input(req)
    if t.shape:
        t.shape[rng.randrange(len(t.shape))] = 0
    if rng.random() < 0.5:
        _raw0(req)
        req.raw_input_contents[0] = b""
    return req


def many_dims(req: pb.ModelInferRequest, rng: random.Random) -> pb.ModelInferRequest:
    t = _input(req)
    del t.shape[:]
    t.shape.extend([1] * rng.choice((0, 9, 64, 5000)))
    return req


def raw_size_disagrees(req: pb.ModelInferRequest, rng: random.Random) -> pb.ModelInferRequest:
    raw = _raw0(req)
    cut = max(1, rng.choice((1, 3, 4, len(raw) // 2, len(raw) - 1)))
    req.raw_input_contents[0] = raw[:-cut] if rng.random() < 0.5 else raw + bytes(cut)
    return req


def raw_count_disagrees(req: pb.ModelInferRequest, rng: random.Random) -> pb.ModelInferRequest:
    if rng.random() < 0.5:
        del req.raw_input_contents[:]
    else:
        req.raw_input_contents.extend([b"\x00" * 16] * rng.randrange(1, 5))
    return req


def raw_and_typed(req: pb.ModelInferRequest, rng: random.Random) -> pb.ModelInferRequest:
    t = _input(req)
    t.contents.fp32_contents.extend([1.0] * rng.choice((1, 128, 129)))
    if rng.random() < 0.5:
        del req.raw_input_contents[:]
    return req


def typed_wrong_kind(req: pb.ModelInferRequest, rng: random.Random) -> pb.ModelInferRequest:
    t = _input(req)
    del req.raw_input_contents[:]
    n = 1
    for d in t.shape:
        n *= max(0, min(d, 4096))
    n = min(n, 10_000)
    field = rng.choice(
        (
            "int_contents",
            "int64_contents",
            "uint_contents",
            "bool_contents",
            "bytes_contents",
            "fp64_contents",
        )
    )
    values: object = {
        "int_contents": [2**31 - 1] * n,
        "int64_contents": [-(2**63)] * n,
        "uint_contents": [2**32 - 1] * n,
        "bool_contents": [True] * n,
        "bytes_contents": [b"\xff" * 3] * n,
        "fp64_contents": [float("nan")] * n,
    }[field]
    getattr(t.contents, field).extend(values)
    return req


def bad_bytes_prefix(req: pb.ModelInferRequest, rng: random.Random) -> pb.ModelInferRequest:
    """BYTES tensors whose 4-byte length prefixes lie (past the end, truncated, trailing junk)."""
    t = _input(req)
    t.datatype = "BYTES"
    count = 1
    for d in t.shape:
        count *= max(0, min(d, 64))
    kind = rng.randrange(6)
    if kind == 0:
        buf = struct.pack("<I", 2**32 - 1) + b"abc"
    elif kind == 1:
        buf = struct.pack("<I", 100) + b"short"
    elif kind == 2:
        buf = b"\x01\x00"
    elif kind == 3:
        buf = bytes_prefixed([b"ok"] * count) + b"\x07trailing"
    elif kind == 4:
        buf = bytes_prefixed([b"\xff\xfe\x00" * 10] * max(0, count - 1))
    else:
        buf = struct.pack("<I", 2**31) * 4
    if req.raw_input_contents:
        req.raw_input_contents[0] = buf
    else:
        req.raw_input_contents.append(buf)
    return req


def wrong_datatype(req: pb.ModelInferRequest, rng: random.Random) -> pb.ModelInferRequest:
    _input(req)
    t = req.inputs[rng.randrange(len(req.inputs))]
    t.datatype = rng.choice(DATATYPES)
    return req


def junk_names(req: pb.ModelInferRequest, rng: random.Random) -> pb.ModelInferRequest:
    where = rng.randrange(5)
    if where == 0:
        req.model_name = rng.choice(JUNK_STRINGS)
    elif where == 1:
        _input(req)
        req.inputs[rng.randrange(len(req.inputs))].name = rng.choice(JUNK_STRINGS)
    elif where == 2:
        req.model_version = rng.choice(JUNK_STRINGS)
    elif where == 3:
        req.id = rng.choice(JUNK_STRINGS)
    else:
        req.outputs.add(name=rng.choice(JUNK_STRINGS))
    return req


def reserved_params(req: pb.ModelInferRequest, rng: random.Random) -> pb.ModelInferRequest:
    for _ in range(rng.randrange(1, 4)):
        target = rng.randrange(3)
        key = rng.choice(RESERVED_PARAMS)
        if target == 0:
            set_param(req.parameters, key, rng)
        elif target == 1:
            _input(req)
            set_param(req.inputs[rng.randrange(len(req.inputs))].parameters, key, rng)
        else:
            out = req.outputs.add(name=rng.choice(("logits", "text", "nope")))
            set_param(out.parameters, key, rng)
    return req


def thousands_of_inputs(req: pb.ModelInferRequest, rng: random.Random) -> pb.ModelInferRequest:
    template = _input(req)
    n = rng.choice((1000, 3000, 5000))
    same_name = rng.random() < 0.5
    raw = req.raw_input_contents[0] if req.raw_input_contents else b""
    for i in range(n):
        t = req.inputs.add(
            name=template.name if same_name else f"{template.name}{i}", datatype=template.datatype
        )
        t.shape.extend(template.shape)
        if rng.random() < 0.9:
            req.raw_input_contents.append(raw[:64])
    return req


def thousands_of_outputs(req: pb.ModelInferRequest, rng: random.Random) -> pb.ModelInferRequest:
    for i in range(rng.choice((1000, 5000))):
        req.outputs.add(name="logits" if i % 2 else f"out{i}")
    return req


def oversize(req: pb.ModelInferRequest, rng: random.Random) -> pb.ModelInferRequest:
    """A message of several MiB whose declared shape is small (or absurd)."""
    size = rng.choice((5, 9, 17)) << 20
    _raw0(req)
    req.raw_input_contents[0] = bytes(size)
    if rng.random() < 0.5:
        del _input(req).shape[:]
        _input(req).shape.extend([size // 256, 64])
    return req


def no_inputs(req: pb.ModelInferRequest, rng: random.Random) -> pb.ModelInferRequest:
    del req.inputs[:]
    if rng.random() < 0.5:
        del req.raw_input_contents[:]
    return req


MUTATORS: dict[str, Mutator] = {
    "lying_dims": lying_dims,
    "huge_dims": huge_dims,
    "negative_dims": negative_dims,
    "zero_dims": zero_dims,
    "many_dims": many_dims,
    "raw_size_disagrees": raw_size_disagrees,
    "raw_count_disagrees": raw_count_disagrees,
    "raw_and_typed": raw_and_typed,
    "typed_wrong_kind": typed_wrong_kind,
    "bad_bytes_prefix": bad_bytes_prefix,
    "wrong_datatype": wrong_datatype,
    "junk_names": junk_names,
    "reserved_params": reserved_params,
    "thousands_of_inputs": thousands_of_inputs,
    "thousands_of_outputs": thousands_of_outputs,
    "oversize": oversize,
    "no_inputs": no_inputs,
}
# Expensive to build and to send: a few of each per storm.
RARE = {"oversize": 0.01, "thousands_of_inputs": 0.02, "thousands_of_outputs": 0.02}


def mutated_requests(
    builders: list[Callable[[random.Random], pb.ModelInferRequest]], count: int, seed: int
) -> Iterator[tuple[str, pb.ModelInferRequest]]:
    """`count` hostile requests: each a valid request from one builder with one or two mutations."""
    rng = random.Random(seed)
    names = list(MUTATORS)
    weights = [RARE.get(n, 1.0) for n in names]
    for i in range(count):
        req = builders[i % len(builders)](rng)
        chosen = rng.choices(names, weights, k=1 if rng.random() < 0.8 else 2)
        for name in chosen:
            req = MUTATORS[name](req, rng)
        yield "+".join(chosen), req


def random_payloads(rng: random.Random, count: int) -> Iterator[bytes]:
    """Random byte strings: empty, tiny, protobuf-looking (valid tags, lying lengths) and plain noise."""
    for _ in range(count):
        kind = rng.randrange(5)
        if kind == 0:
            yield b""
        elif kind == 1:
            yield rng.randbytes(rng.randrange(1, 16))
        elif kind == 2:
            # field 1/5/7 length-delimited with a length that runs past the end
            tag = rng.choice((0x0A, 0x2A, 0x3A, 0x12))
            yield bytes([tag]) + bytes([0xFF, 0xFF, 0xFF, 0x7F]) + rng.randbytes(rng.randrange(0, 32))
        elif kind == 3:
            # nested garbage inside a valid-looking inputs entry
            inner = rng.randbytes(rng.randrange(0, 64))
            yield bytes([0x2A, len(inner)]) + inner if len(inner) < 128 else inner
        else:
            yield rng.randbytes(rng.randrange(16, 4096))
