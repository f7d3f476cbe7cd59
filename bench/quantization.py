"""What int8 costs on a real data set: a >=100k-parameter CNN on scikit-learn's digits, in both formats.

Trains a Keras CNN on the training split (the split of ``tests/fixtures/make_models.py``: 80/20,
stratified, seed 7), exports it to float ONNX (node by node, checked against Keras) and keeps the
Keras model for TFLite. Then, through the same code as ``edgefleet model quantize|convert``:

* ONNX: static QDQ int8, per-channel weights, MinMax calibration on 300 training images;
* TFLite: full-integer with int8 input and output, the same 300 images as representative data;

and reports, on the 360 held-out images, size, latency (the ``edgefleet model bench`` harness),
top-1 agreement and accuracy before/after. The bounds checked are issue 4's: int8 ONNX at least
3.5x smaller than float, and each int8 model at most 1 point less accurate than its float model.
Needs TensorFlow (``pip install 'edgefleet[convert-tf]'``); takes about a minute on 2 cores.

    .venv/bin/python bench/quantization.py [--epochs 12] [--keep DIR] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np

from edgefleet.agent import load_model
from edgefleet.converters.convert import ConvertOptions, convert_model
from edgefleet.converters.quantize import QuantizeOptions, quantize_onnx

CAL = 300  # calibration / representative samples (training split)


# The split, the trainer and the node-by-node ONNX export are the fixture script's, with wider layers.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "fixtures"))
from make_models import keras_to_onnx, load_split, train_keras  # noqa: E402


def row(name: str, r: dict[str, Any]) -> str:
    lat, acc, size = r["latency_us"], r["accuracy"], r["size_bytes"]
    before, after = lat["before"], lat["after"]
    return (
        f"{name:<34} {size['before']:>9,} {size['after']:>9,} {size['ratio']:>6.2f}x"
        f" {before['p50']:>8.1f} {after['p50']:>8.1f} {before['p99']:>8.1f} {after['p99']:>8.1f}"
        f" {acc['before'] * 100:>7.2f} {acc['after'] * 100:>7.2f} {acc['drop_points']:>6.2f}"
        f" {r['top1_agreement'] * 100:>7.2f} {r['max_abs_error']:>8.4f} {r['cosine_similarity']:>8.6f}"
        f" {len(r['float_nodes']):>5}"
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=12)
    ap.add_argument("--runs", type=int, default=500, help="timed calls per model for latency")
    ap.add_argument("--keep", type=Path, help="keep the models and data in this folder")
    ap.add_argument("--json", type=Path, help="write both reports here")
    args = ap.parse_args()

    import onnx
    import onnxruntime as ort

    t0 = time.perf_counter()
    x_train_u8, x_test_u8, y_train, y_test = load_split()  # pixels 0..16
    x_train, x_test = x_train_u8.astype(np.float32) / 16.0, x_test_u8.astype(np.float32) / 16.0
    model = train_keras(x_train_u8, y_train, filters=(32, 64), dense=128, epochs=args.epochs, lr=1e-3)
    params = model.count_params()
    keras_acc = float((model.predict(x_test[..., None], verbose=0).argmax(1) == y_test).mean())
    t_train = time.perf_counter() - t0

    work = args.keep or Path(tempfile.mkdtemp(prefix="edgefleet-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    model.save(work / "digits_cnn.keras")
    float_onnx = work / "digits_cnn_float.onnx"
    onnx.save(keras_to_onnx(model, "digits_cnn_150k"), float_onnx)
    sess = ort.InferenceSession(str(float_onnx), providers=["CPUExecutionProvider"])
    err = float(
        np.abs(sess.run(None, {"input": x_test[:, None]})[0] - model.predict(x_test[..., None], verbose=0)).max()
    )
    assert err < 1e-3, f"ONNX export differs from Keras by {err}"
    np.savez(work / "calib_nchw.npz", input=x_train[:CAL, None])
    np.savez(work / "holdout_nchw.npz", input=x_test[:, None], y=y_test)
    np.savez(work / "calib_nhwc.npz", image=x_train[:CAL, ..., None])
    np.savez(work / "holdout_nhwc.npz", image=x_test[..., None], y=y_test)

    onnx_report = quantize_onnx(
        float_onnx,
        work / "digits_cnn_int8.onnx",
        QuantizeOptions(mode="static", fmt="qdq", method="minmax", per_channel=True),
        calibration=work / "calib_nchw.npz",
        validation=work / "holdout_nchw.npz",
        labels="y",
        bench_runs=args.runs,
        max_accuracy_drop=1.0,
    ).to_dict()
    tfl_report = convert_model(
        work / "digits_cnn.keras",
        work / "digits_cnn_int8.tflite",
        ConvertOptions(quantize="int8", io_type="int8"),
        representative=work / "calib_nhwc.npz",
        validation=work / "holdout_nhwc.npz",
        labels="y",
        bench_runs=args.runs,
        max_accuracy_drop=1.0,
    ).to_dict()
    # The full-integer model through the agent's own loader, int8 in and out, float data given.
    tfl = load_model(work / "digits_cnn_int8.tflite")
    agent_acc = float((tfl.predict({"image": x_test[..., None]})["output_0"].argmax(1) == y_test).mean())
    elapsed = time.perf_counter() - t0

    ok_size = onnx_report["size_bytes"]["ratio"] >= 3.5
    ok_onnx = onnx_report["accuracy"]["drop_points"] <= 1.0
    ok_tfl = tfl_report["accuracy"]["drop_points"] <= 1.0 and tfl.inputs[0].dtype == np.int8
    print(f"CNN: {params:,} parameters, {args.epochs} epochs, Keras held-out accuracy {keras_acc * 100:.2f}%")
    print(f"train/held-out: {len(y_train)}/{len(y_test)} images; calibration: {CAL} training images")
    print(f"ONNX export vs Keras: max |diff| {err:.2e}; training {t_train:.0f} s, whole run {elapsed:.0f} s")
    print(
        f"latency: batch 1, {args.runs} timed calls per model, runtime default threads; accuracy in %, drop in points"
    )
    print()
    head = (
        f"{'model':<34} {'bytes':>9} {'int8':>9} {'ratio':>7} {'p50 f':>8} {'p50 q':>8} {'p99 f':>8} {'p99 q':>8}"
        f" {'acc f':>7} {'acc q':>7} {'drop':>6} {'agree':>7} {'max|e|':>8} {'cosine':>8} {'float':>5}"
    )
    print(head)
    print("-" * len(head))
    print(row("ONNX static QDQ per-channel", onnx_report))
    print(row("TFLite full-integer, int8 I/O", tfl_report))
    print()
    print(
        f"ONNX nodes left in float: {onnx_report['float_nodes'] or 'none'} ({onnx_report['quantized_nodes']} quantized)"
    )
    print(
        f"TFLite ops left in float: {tfl_report['float_nodes'] or 'none'} ({tfl_report['quantized_nodes']} quantized)"
    )
    for name, r in (("ONNX", onnx_report), ("TFLite", tfl_report)):
        for w in r["warnings"]:
            print(f"{name} warning: {w}")
    print(f"TFLite int8 model through edgefleet.agent.load_model (float in, int8 I/O): {agent_acc * 100:.2f}%")
    print(f"int8 ONNX >= 3.5x smaller: {'yes' if ok_size else 'NO'}; accuracy drop <= 1 point: "
          f"ONNX {'yes' if ok_onnx else 'NO'}, TFLite {'yes' if ok_tfl else 'NO'}")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps({"params": params, "onnx": onnx_report, "tflite": tfl_report}, indent=2))
    return 0 if ok_size and ok_onnx and ok_tfl else 1


if __name__ == "__main__":
    sys.exit(main())
