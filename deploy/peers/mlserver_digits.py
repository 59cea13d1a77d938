"""MLServer custom runtime serving the mesh's `digits` demo model (a torch.export `.pt2` artifact).

Written the way MLServer's own docs describe a custom runtime: an `MLModel` subclass whose `load()`
reads the artifact named by `parameters.uri` in model-settings.json and whose `predict()` decodes the
request with MLServer's codecs and encodes the response with them. Runs in the `.tools/peers/mlserver`
venv (deploy/peers/install.sh), never in the project's.

Contract (the same as the mesh's): input `pixels` FP32 [-1, 64], output `logits` FP32 [-1, 10].
"""

from __future__ import annotations

import torch
from mlserver import MLModel
from mlserver.codecs import NumpyCodec
from mlserver.types import InferenceRequest, InferenceResponse
from mlserver.utils import get_model_uri


class DigitsRuntime(MLModel):
    """`implementation` in model-settings.json: `mlserver_digits.DigitsRuntime`."""

    async def load(self) -> bool:
        torch.set_num_threads(1)
        path = await get_model_uri(self._settings)
        self._module = torch.export.load(path).module()
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        pixels = self.decode(payload.inputs[0], default_codec=NumpyCodec)
        with torch.inference_mode():
            logits = self._module(torch.as_tensor(pixels, dtype=torch.float32)).numpy()
        return InferenceResponse(
            model_name=self.name,
            model_version=self.version,
            id=payload.id,
            outputs=[NumpyCodec.encode_output(name="logits", payload=logits)],
        )
