"""Models the API benchmarks build for themselves (no TensorFlow needed): the same dense network as
ONNX (``onnx.helper``) and as TFLite (LiteRT's own flatbuffer schema), and a sensor-shaped ONNX
model with three inputs, one a scalar.

- ``dense``: ``batch`` x ``width`` float input, ``layers`` dense layers with ReLU; at 32 x 512 x 4
  about 1 ms on one core of the benchmark machine.
- ``sensor``: ``features`` [1, 256] float, ``context`` [1, 64] float, ``gain`` [] float (a scalar)
  -> ``scores`` [1, 64] = relu(concat(features, context) @ W1 * gain) @ W2 @ W3; about 100 µs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np


def _dense_weights(width: int, layers: int, seed: int = 0) -> list[np.ndarray[Any, Any]]:
    rng = np.random.default_rng(seed)
    return [(rng.standard_normal((width, width)) / np.sqrt(width)).astype(np.float32) for _ in range(layers)]


def dense_onnx(path: Path, batch: int = 32, width: int = 512, layers: int = 4) -> Path:
    from onnx import TensorProto, helper, numpy_helper, save

    nodes, inits, prev = [], [], "x"
    for i, w in enumerate(_dense_weights(width, layers)):
        inits.append(numpy_helper.from_array(w, f"w{i}"))
        nodes.append(helper.make_node("MatMul", [prev, f"w{i}"], [f"m{i}"]))
        out = "y" if i == layers - 1 else f"h{i}"
        nodes.append(helper.make_node("Relu", [f"m{i}"], [out]))
        prev = out
    graph = helper.make_graph(
        nodes,
        "dense",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, width])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, width])],
        inits,
    )
    save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def dense_tflite(path: Path, batch: int = 32, width: int = 512, layers: int = 4) -> Path:
    """The same network as :func:`dense_onnx`, FULLY_CONNECTED ops with a fused ReLU."""
    import flatbuffers
    from ai_edge_litert import schema_py_generated as s

    model = s.ModelT()
    model.version = 3
    code = s.OperatorCodeT()
    code.builtinCode = code.deprecatedBuiltinCode = s.BuiltinOperator.FULLY_CONNECTED
    code.version = 1
    model.operatorCodes = [code]
    model.buffers = [s.BufferT()]  # buffer 0: empty, by convention
    tensors: list[Any] = []

    def tensor(name: str, shape: list[int], data: np.ndarray[Any, Any] | None = None) -> int:
        t = s.TensorT()
        t.name, t.shape, t.type = name, shape, s.TensorType.FLOAT32
        t.buffer = 0
        if data is not None:
            b = s.BufferT()
            b.data = np.frombuffer(data.tobytes(), np.uint8)
            model.buffers.append(b)
            t.buffer = len(model.buffers) - 1
        tensors.append(t)
        return len(tensors) - 1

    prev = tensor("x", [batch, width])
    ops = []
    for i, w in enumerate(_dense_weights(width, layers)):
        wi = tensor(f"w{i}", [width, width], np.ascontiguousarray(w.T))  # TFLite keeps [out, in]
        out = tensor("y" if i == layers - 1 else f"h{i}", [batch, width])
        op = s.OperatorT()
        op.opcodeIndex, op.inputs, op.outputs = 0, [prev, wi, -1], [out]
        op.builtinOptionsType = s.BuiltinOptions.FullyConnectedOptions
        opts = s.FullyConnectedOptionsT()
        opts.fusedActivationFunction = s.ActivationFunctionType.RELU
        op.builtinOptions = opts
        ops.append(op)
        prev = out
    sub = s.SubGraphT()
    sub.tensors, sub.inputs, sub.outputs, sub.operators, sub.name = tensors, [0], [prev], ops, "main"
    model.subgraphs = [sub]
    model.description = "edgefleet bench dense"
    b = flatbuffers.Builder(1 << 20)
    b.Finish(model.Pack(b), file_identifier=b"TFL3")
    path.write_bytes(bytes(b.Output()))
    return path


def sensor_onnx(path: Path) -> Path:
    from onnx import TensorProto, helper, numpy_helper, save

    rng = np.random.default_rng(1)
    w1 = (rng.standard_normal((320, 1024)) / 18).astype(np.float32)
    w2 = (rng.standard_normal((1024, 256)) / 32).astype(np.float32)
    w3 = (rng.standard_normal((256, 64)) / 16).astype(np.float32)
    nodes = [
        helper.make_node("Concat", ["features", "context"], ["fc"], axis=1),
        helper.make_node("MatMul", ["fc", "w1"], ["m1"]),
        helper.make_node("Mul", ["m1", "gain"], ["g1"]),
        helper.make_node("Relu", ["g1"], ["h1"]),
        helper.make_node("MatMul", ["h1", "w2"], ["h2"]),
        helper.make_node("MatMul", ["h2", "w3"], ["scores"]),
    ]
    graph = helper.make_graph(
        nodes,
        "sensor",
        [
            helper.make_tensor_value_info("features", TensorProto.FLOAT, [1, 256]),
            helper.make_tensor_value_info("context", TensorProto.FLOAT, [1, 64]),
            helper.make_tensor_value_info("gain", TensorProto.FLOAT, []),
        ],
        [helper.make_tensor_value_info("scores", TensorProto.FLOAT, [1, 64])],
        [numpy_helper.from_array(w, n) for w, n in ((w1, "w1"), (w2, "w2"), (w3, "w3"))],
    )
    save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def sensor_inputs(seed: int = 0) -> dict[str, np.ndarray[Any, Any]]:
    rng = np.random.default_rng(seed)
    return {
        "features": rng.random((1, 256), dtype=np.float32),
        "context": rng.random((1, 64), dtype=np.float32),
        "gain": np.array(0.75, np.float32),
    }
