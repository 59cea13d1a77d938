"""KServe Python model server (`kserve.ModelServer`) serving the mesh's `digits` demo model.

Written the way KServe's docs describe a custom predictor: a `kserve.Model` subclass that loads the
artifact in `load()`, sets `ready`, answers v2 `InferRequest`s in `predict()` with an `InferResponse`,
and declares its tensors for ModelMetadata; the server is started with
`ModelServer(grpc_port=...).start([model])`. Runs in the `.tools/peers/kserve` venv
(deploy/peers/install.sh), never in the project's.

    python kserve_digits.py --model_name digits --model_path /path/to/model.pt2 --grpc_port 8081 --http_port 8080

Contract (the same as the mesh's): input `pixels` FP32 [-1, 64], output `logits` FP32 [-1, 10].
"""

from __future__ import annotations

import argparse

import torch
from kserve import InferOutput, InferRequest, InferResponse, Model, ModelServer, model_server


class DigitsModel(Model):
    def __init__(self, name: str, path: str) -> None:
        super().__init__(name)
        self.path = path
        self.module: torch.nn.Module | None = None
        self.load()

    def load(self) -> bool:
        torch.set_num_threads(1)
        self.module = torch.export.load(self.path).module()
        self.ready = True
        return self.ready

    def get_input_types(self) -> list[dict]:
        return [{"name": "pixels", "datatype": "FP32", "shape": [-1, 64]}]

    def get_output_types(self) -> list[dict]:
        return [{"name": "logits", "datatype": "FP32", "shape": [-1, 10]}]

    def predict(self, payload: InferRequest, headers: dict[str, str] | None = None) -> InferResponse:
        assert self.module is not None
        pixels = payload.inputs[0].as_numpy()
        with torch.inference_mode():
            logits = self.module(torch.as_tensor(pixels, dtype=torch.float32)).numpy()
        output = InferOutput(name="logits", shape=list(logits.shape), datatype="FP32", data=logits)
        return InferResponse(response_id=payload.id, model_name=self.name, infer_outputs=[output])


if __name__ == "__main__":
    parser = argparse.ArgumentParser(parents=[model_server.parser])
    parser.add_argument("--model_path", required=True, help="the digits .pt2 (torch.export) artifact")
    args, _ = parser.parse_known_args()
    model = DigitsModel(args.model_name, args.model_path)
    ModelServer(grpc_port=args.grpc_port, http_port=args.http_port).start([model])
