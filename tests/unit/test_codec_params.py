"""Request parameters with a fixed meaning: reserved keys refused, typed keys checked."""

from __future__ import annotations

import numpy as np
import pytest
import tritonclient.grpc as tc

from mesh.codec import check_parameters, validate_request
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
