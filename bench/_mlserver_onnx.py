"""A custom MLServer runtime that serves an ONNX model with onnxruntime (there is no
``mlserver-onnx`` on PyPI). Runs inside the separate MLServer virtualenv, not the project's.

model-settings.json: ``{"implementation": "_mlserver_onnx.OnnxModel", "parameters": {"uri": PATH}}``.
One intra-op thread, as the agent chooses for the same model, so inference costs the same on both.
"""

from __future__ import annotations

import onnxruntime as ort
from mlserver import MLModel
from mlserver.codecs import NumpyCodec
from mlserver.types import InferenceRequest, InferenceResponse


class OnnxModel(MLModel):
    async def load(self) -> bool:
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1
        self._session = ort.InferenceSession(
            self.settings.parameters.uri, sess_options=opts, providers=["CPUExecutionProvider"]
        )
        self._names = [o.name for o in self._session.get_outputs()]
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        feeds = {inp.name: NumpyCodec.decode_input(inp) for inp in payload.inputs}
        values = self._session.run(self._names, feeds)
        return InferenceResponse(
            model_name=self.name,
            id=payload.id,
            outputs=[NumpyCodec.encode_output(n, v) for n, v in zip(self._names, values, strict=True)],
        )
