"""Request, input and output parameters: reserved keys refused or kind-checked, user keys accepted, bounds."""

from __future__ import annotations

import re
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as tc
from tritonclient.grpc._utils import _get_inference_request

from mesh.codec import (
    MAX_PARAMETER_KEY,
    MAX_PARAMETERS,
    check_parameters,
    decode_request,
    request_priority,
    validate_request,
)
from mesh.errors import InvalidArgument
from mesh.v2 import pb
from mesh_pb import common_pb2

SPECS = [common_pb2.TensorSpec(name="pixels", datatype="FP32", shape=[-1, 64])]


def _request(batch: int = 2) -> pb.ModelInferRequest:
    inp = tc.InferInput("pixels", [batch, 64], "FP32")
    inp.set_data_from_numpy(np.zeros((batch, 64), np.float32))
    req = pb.ModelInferRequest(model_name="digits")
    req.inputs.append(inp._get_tensor())
    req.raw_input_contents.append(inp._get_content())
    return req


def test_known_parameters_pass() -> None:
    req = _request()
    req.parameters["priority"].uint64_param = 1
    req.parameters["timeout"].int64_param = 1000
    req.parameters["sequence_id"].string_param = "abc"
    req.parameters["custom"].string_param = "anything"
    validate_request(req, SPECS, 64)


@pytest.mark.parametrize(
    ("key", "setter", "message"),
    [
        ("triton_bogus", lambda p: setattr(p, "bool_param", True), "reserved"),
        ("priority", lambda p: setattr(p, "string_param", "high"), "int64_param or uint64_param"),
        ("priority", lambda p: setattr(p, "int64_param", -1), ">= 0"),
        ("timeout", lambda p: setattr(p, "double_param", 1.5), "int64_param"),
        ("sequence_start", lambda p: setattr(p, "int64_param", 1), "bool_param"),
        ("triton_enable_empty_final_response", lambda p: None, "no value"),
    ],
)
def test_bad_parameters_name_the_key(key: str, setter: object, message: str) -> None:
    req = _request()
    setter(req.parameters[key])  # type: ignore[operator]
    with pytest.raises(InvalidArgument, match=rf"parameters\['{key}'\].*{message}"):
        validate_request(req, SPECS, 64)
    with pytest.raises(InvalidArgument):
        check_parameters(req.parameters)


def test_zero_batch_is_refused() -> None:
    with pytest.raises(InvalidArgument, match=r"shape: batch size must be at least 1"):
        validate_request(_request(batch=0), SPECS, 64)


# ---------------------------------------------------------------------------------------------------------
# Per-input and per-requested-output parameters


def _with_output(
    req: pb.ModelInferRequest, name: str = "logits"
) -> pb.ModelInferRequest.InferRequestedOutputTensor:
    return req.outputs.add(name=name)


def _set(param: pb.InferParameter, kind: str, value: object) -> None:
    setattr(param, kind, value)


@pytest.mark.parametrize(
    ("key", "kind", "value"),
    [
        ("binary_data", "bool_param", True),
        ("binary_data_size", "int64_param", 256 * 4),
        ("binary_data_size", "int64_param", 0),
        ("custom", "string_param", "anything"),
        ("custom_double", "double_param", 0.5),
        ("custom_uint", "uint64_param", 2**63),
        ("classification", "string_param", "a user parameter on an input"),
        ("priority", "string_param", "a user parameter on a tensor"),
        ("", "bool_param", False),
    ],
)
def test_tensor_parameters_accepted(key: str, kind: str, value: object) -> None:
    """HTTP binary-data hints (right kind) and user keys pass on inputs; on outputs too, except classification."""
    req = _request()
    _set(req.inputs[0].parameters[key], kind, value)
    validate_request(req, SPECS, 64)
    if key != "classification":
        req = _request()
        _set(_with_output(req).parameters[key], kind, value)
        validate_request(req, SPECS, 64)


@pytest.mark.parametrize(
    ("key", "kind", "value", "message"),
    [
        ("binary_data", "int64_param", 1, "must be bool_param, got int64_param"),
        ("binary_data", "string_param", "true", "must be bool_param, got string_param"),
        ("binary_data_size", "string_param", "4", "must be int64_param, got string_param"),
        ("binary_data_size", "uint64_param", 4, "must be int64_param, got uint64_param"),
        ("binary_data_size", "int64_param", -1, "must be >= 0, got -1"),
        ("binary_data_size", None, None, "must be int64_param, got no value"),
        ("shared_memory_region", "int64_param", 1, "must be string_param, got int64_param"),
        ("shared_memory_byte_size", "string_param", "4", "must be int64_param, got string_param"),
        ("shared_memory_offset", "double_param", 0.0, "must be int64_param, got double_param"),
        ("shared_memory_region", "string_param", "region", "shared-memory tensors are not supported"),
        ("shared_memory_byte_size", "int64_param", 1024, "shared-memory tensors are not supported"),
        ("shared_memory_offset", "int64_param", 0, "shared-memory tensors are not supported"),
        ("triton_anything", "bool_param", True, "parameter keys starting with 'triton_' are reserved"),
    ],
)
@pytest.mark.parametrize("where", ["inputs", "outputs"])
def test_bad_tensor_parameters_name_the_field(
    where: str, key: str, kind: str | None, value: object, message: str
) -> None:
    req = _request()
    params = req.inputs[0].parameters if where == "inputs" else _with_output(req).parameters
    if kind is None:
        params[key].SetInParent()  # present, no member of the oneof set
    else:
        _set(params[key], kind, value)
    with pytest.raises(InvalidArgument, match=rf"^{where}\[0\]\.parameters\['{key}'\]: {re.escape(message)}"):
        validate_request(req, SPECS, 64)


def test_second_output_is_named() -> None:
    req = _request()
    _with_output(req, "a")
    _with_output(req, "b").parameters["binary_data"].int64_param = 1
    with pytest.raises(
        InvalidArgument, match=r"^outputs\[1\]\.parameters\['binary_data'\]: must be bool_param"
    ):
        validate_request(req, SPECS, 64)


def test_duplicate_output_is_refused() -> None:
    req = _request()
    _with_output(req, "logits")
    _with_output(req, "probs")
    validate_request(req, SPECS, 64)  # distinct names pass (unknown ones are the worker's to refuse)
    _with_output(req, "logits")
    with pytest.raises(
        InvalidArgument, match=r"^outputs\[2\]\.name: duplicate output 'logits' \(also outputs\[0\]\)$"
    ):
        validate_request(req, SPECS, 64)


@pytest.mark.parametrize(
    ("kind", "value", "message"),
    [
        ("int64_param", 3, "classification outputs are not supported"),
        ("int64_param", 0, "must be > 0 (the top-k count), got 0"),
        ("int64_param", -2, "must be > 0 (the top-k count), got -2"),
        ("uint64_param", 3, "must be int64_param, got uint64_param"),
        ("string_param", "3", "must be int64_param, got string_param"),
    ],
)
def test_classification_output_refused(kind: str, value: object, message: str) -> None:
    req = _request()
    _set(_with_output(req).parameters["classification"], kind, value)
    with pytest.raises(
        InvalidArgument, match=rf"^outputs\[0\]\.parameters\['classification'\]: {re.escape(message)}"
    ):
        validate_request(req, SPECS, 64)


def test_tritonclient_classification_and_shared_memory_outputs_refused() -> None:
    req = _request()
    req.outputs.append(tc.InferRequestedOutput("logits", class_count=3)._get_tensor())
    with pytest.raises(
        InvalidArgument, match=r"outputs\[0\]\.parameters\['classification'\]: classification"
    ):
        validate_request(req, SPECS, 64)
    out = tc.InferRequestedOutput("logits")
    out.set_shared_memory("region", 40)
    req = _request()
    req.outputs.append(out._get_tensor())
    with pytest.raises(
        InvalidArgument, match=r"outputs\[0\]\.parameters\['shared_memory_\w+'\]: shared-memory"
    ):
        validate_request(req, SPECS, 64)
    # The plain tritonclient output request carries no parameters and passes.
    req = _request()
    req.outputs.append(tc.InferRequestedOutput("logits")._get_tensor())
    validate_request(req, SPECS, 64)


def test_shared_memory_input_refused_by_decode_too() -> None:
    inp = tc.InferInput("pixels", [1, 64], "FP32")
    inp.set_shared_memory("region", 256, offset=16)
    req = pb.ModelInferRequest(model_name="digits")
    req.inputs.append(inp._get_tensor())
    for check in (lambda: validate_request(req, SPECS, 64), lambda: decode_request(req)):
        with pytest.raises(InvalidArgument, match=r"^inputs\[0\]\.parameters\['shared_memory_\w+'\]"):
            check()


# ---------------------------------------------------------------------------------------------------------
# Bounds on every parameters map


def _fill(params: object, n: int) -> None:
    for i in range(n):
        params[f"user_{i}"].int64_param = i  # type: ignore[index]


def _request_with_params_at(where: str) -> tuple[pb.ModelInferRequest, Any]:
    """A valid request with one requested output, and the parameters map named by `where`."""
    req = _request()
    out = _with_output(req)
    target = {
        "parameters": req.parameters,
        "inputs[0].parameters": req.inputs[0].parameters,
        "outputs[0].parameters": out.parameters,
    }[where]
    return req, target


@pytest.mark.parametrize("where", ["parameters", "inputs[0].parameters", "outputs[0].parameters"])
def test_parameter_count_bounded(where: str) -> None:
    def build(n: int) -> pb.ModelInferRequest:
        req, target = _request_with_params_at(where)
        _fill(target, n)
        return req

    validate_request(build(MAX_PARAMETERS), SPECS, 64)
    field = re.escape(where)
    with pytest.raises(
        InvalidArgument, match=rf"^{field}: {MAX_PARAMETERS + 1} entries; at most {MAX_PARAMETERS}"
    ):
        validate_request(build(MAX_PARAMETERS + 1), SPECS, 64)


@pytest.mark.parametrize("where", ["parameters", "inputs[0].parameters", "outputs[0].parameters"])
def test_parameter_key_length_bounded(where: str) -> None:
    def build(key: str) -> pb.ModelInferRequest:
        req, target = _request_with_params_at(where)
        target[key].string_param = "v"
        return req

    validate_request(build("k" * MAX_PARAMETER_KEY), SPECS, 64)
    with pytest.raises(InvalidArgument) as info:
        validate_request(build("k" * 5000), SPECS, 64)
    message = info.value.message
    assert (
        message.startswith(f"{where}: key 'kkkk")
        and f"5000 characters; at most {MAX_PARAMETER_KEY}" in message
    )
    assert len(message) < 200  # the key itself is not echoed


def test_check_parameters_bounds_request_level() -> None:
    req = _request()
    _fill(req.parameters, MAX_PARAMETERS + 1)
    with pytest.raises(InvalidArgument, match=r"^parameters: "):
        check_parameters(req.parameters)


# ---------------------------------------------------------------------------------------------------------
# request_priority


@pytest.mark.parametrize(
    ("kind", "value", "expected"),
    [(None, None, 0), ("uint64_param", 1, 1), ("uint64_param", 2**64 - 1, 2**64 - 1), ("int64_param", 7, 7)],
)
def test_request_priority(kind: str | None, value: object, expected: int) -> None:
    req = _request()
    if kind is not None:
        _set(req.parameters["priority"], kind, value)
    validate_request(req, SPECS, 64)
    assert request_priority(req) == expected
    assert "priority" in req.parameters or kind is None
    if kind is None:
        assert "priority" not in req.parameters  # reading it did not insert the key


def test_request_priority_from_tritonclient() -> None:
    """tritonclient sends priority as uint64_param and leaves it out when 0."""
    inp = tc.InferInput("pixels", [1, 64], "FP32")
    inp.set_data_from_numpy(np.zeros((1, 64), np.float32))
    for priority in (0, 3):
        req = _get_inference_request(
            model_name="digits",
            inputs=[inp],
            model_version="",
            request_id="",
            outputs=None,
            sequence_id=0,
            sequence_start=False,
            sequence_end=False,
            priority=priority,
            timeout=None,
            parameters=None,
        )
        assert ("priority" in req.parameters) == bool(priority)
        validate_request(req, SPECS, 64)
        assert request_priority(req) == priority
