"""``edgefleet model convert``: a trained model to the format a device runs, with a report.

* Keras (``.keras``/``.h5``) or a SavedModel folder to TFLite with TensorFlow's converter: float,
  dynamic-range, float16, or full-integer from a representative dataset, with float32, int8 or
  uint8 input and output.
* PyTorch (a TorchScript file, or a pickled ``nn.Module``) to ONNX with ``torch.onnx.export``'s
  TorchScript-based exporter (``dynamo=False``: the dynamo exporter needs ``onnxscript``, one more
  dependency, for the same graphs here), every input and output with a dynamic batch axis.
* scikit-learn (a pickle/joblib file) to ONNX with skl2onnx, class probabilities as a plain tensor
  (no ZipMap).

ONNX results can be quantized on the way (``dynamic``, or ``int8`` with onnxruntime's static QDQ
quantizer). Each framework is imported inside the function that needs it; a missing one is a
:class:`ModelError` naming the extra that installs it. The report's "before" is always the float
model in the target format; the output is written, atomically, only when the report passes.
Loading a pickled model runs code from the file: convert only models you trust.
"""

from __future__ import annotations

import os
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from edgefleet.agent.runtime import load_model
from edgefleet.converters.calibration import SampleSet, load_data, load_labels, make_samples
from edgefleet.converters.quantize import (
    QuantizeOptions,
    check_gate_options,
    check_output,
    commit,
    quantize_onnx,
    quiet,
    require,
)
from edgefleet.converters.report import Report, measure, onnx_float_nodes, tflite_float_ops
from edgefleet.errors import ConfigError, ModelError

__all__ = ["ConvertOptions", "convert_model", "detect_framework", "parse_input_shape"]

Framework = Literal["keras", "savedmodel", "torch", "sklearn"]
Shape = tuple[str | None, tuple[int, ...]]
_TARGET = {"keras": ".tflite", "savedmodel": ".tflite", "torch": ".onnx", "sklearn": ".onnx"}
_EXTRA = {"keras": "convert-tf", "savedmodel": "convert-tf", "torch": "convert-torch", "sklearn": "convert"}


@dataclass(frozen=True)
class ConvertOptions:
    """How to convert. ``input_shapes`` (name or None, dims) are for torch and scikit-learn."""

    framework: Framework | None = None  # default: from the source's name
    quantize: Literal["none", "dynamic", "float16", "int8"] = "none"
    io_type: Literal["float32", "int8", "uint8"] = "float32"
    input_shapes: tuple[Shape, ...] = ()
    opset: int = 17
    max_samples: int = 300  # representative samples used, at most
    allow_no_gain: bool = False  # write a quantized model even when nothing was quantized or it grew


def parse_input_shape(text: str) -> Shape:
    """``"1,5,4"`` or ``"x:1,5,4"`` to ``(name, dims)``."""
    name, _, dims = text.rpartition(":")
    try:
        shape = tuple(int(d) for d in dims.replace("x", ",").split(",") if d.strip())
    except ValueError as e:
        raise ConfigError(f"--input-shape: expected [NAME:]D1,D2,... with whole numbers, got {text!r}") from e
    if not shape or any(d < 1 for d in shape):
        raise ConfigError(f"--input-shape: expected positive dimensions, got {text!r}")
    return (name or None, shape)


def detect_framework(src: Path) -> Framework:
    """The source framework from the file name (a folder is a SavedModel)."""
    if src.is_dir():
        return "savedmodel"
    suffix = src.suffix.lower()
    for fw, suffixes in (
        ("keras", (".keras", ".h5", ".hdf5")),
        ("torch", (".pt", ".pth", ".pt2", ".ts", ".torchscript")),
        ("sklearn", (".pkl", ".pickle", ".joblib", ".skops")),
    ):
        if suffix in suffixes:
            return fw  # type: ignore[return-value]
    raise ConfigError(f"{src}: cannot tell the framework from the name; pass --from keras|savedmodel|torch|sklearn")


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


# --- TensorFlow ---------------------------------------------------------------------------------


def _tf() -> Any:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    with quiet():
        return require("tensorflow", "convert-tf")


def _tflite(src: Path, framework: Framework, mode: str, io_type: str, rep: SampleSet | None, keras: Any) -> bytes:
    tf = _tf()
    conv = (
        tf.lite.TFLiteConverter.from_keras_model(keras)
        if framework == "keras"
        else tf.lite.TFLiteConverter.from_saved_model(str(src))
    )
    if mode != "none":
        conv.optimizations = [tf.lite.Optimize.DEFAULT]
    if mode == "float16":
        conv.target_spec.supported_types = [tf.float16]
    if mode == "int8":
        assert rep is not None

        def representative() -> Any:
            yield from rep.feeds(1)

        conv.representative_dataset = representative
        conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        if io_type != "float32":
            conv.inference_input_type = conv.inference_output_type = {"int8": tf.int8, "uint8": tf.uint8}[io_type]
    try:
        with quiet():  # Keras prints "Saved artifact at ..." on stdout, the converter its settings on fd 2
            return conv.convert()  # type: ignore[no-any-return]
    except Exception as e:  # TensorFlow raises ConverterError, ValueError, RuntimeError...
        raise ModelError(f"{src}: TensorFlow Lite conversion ({mode}) failed: {_first_line(e)}") from e


def _load_keras(src: Path) -> Any:
    tf = _tf()
    try:
        with quiet():
            return tf.keras.models.load_model(str(src), compile=False)
    except Exception as e:
        raise ModelError(f"{src}: not a loadable Keras model: {_first_line(e)}") from e


# --- PyTorch ------------------------------------------------------------------------------------


def _load_torch(torch: Any, src: Path) -> Any:
    if src.suffix == ".pt2":
        raise ModelError(
            f"{src}: a torch.export program needs torch.onnx's dynamo exporter, which needs onnxscript (not an "
            "edgefleet dependency); save the module as TorchScript instead: torch.jit.script(model).save(path)"
        )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit is deprecated in favour of torch.export
        try:
            return torch.jit.load(str(src), map_location="cpu")
        except Exception:  # not TorchScript: try a pickled module
            pass
    try:
        obj = torch.load(str(src), map_location="cpu", weights_only=False)
    except Exception as e:
        raise ModelError(
            f"{src}: neither TorchScript nor a loadable pickled module ({_first_line(e)}); "
            "save it as TorchScript: torch.jit.script(model).save(path)"
        ) from e
    if isinstance(obj, dict):
        raise ModelError(
            f"{src}: a state_dict holds weights, not a model; save the module (torch.jit.script(m).save(path))"
        )
    if not isinstance(obj, torch.nn.Module):
        raise ModelError(f"{src}: holds a {type(obj).__name__}, not a torch.nn.Module")
    return obj


def _torch_to_onnx(src: Path, dst: Path, shapes: list[tuple[str, tuple[int, ...], Any]], opset: int) -> None:
    torch = require("torch", "convert-torch")
    model = _load_torch(torch, src).eval()
    args = tuple(
        torch.from_numpy(sample) if sample is not None else torch.zeros(dims, dtype=torch.float32)
        for _, dims, sample in shapes
    )
    in_names = [name for name, _, _ in shapes]
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            result = model(*args)
            n_out = len(result) if isinstance(result, tuple | list) else 1
            out_names = ["output"] if n_out == 1 else [f"output_{i}" for i in range(n_out)]
            torch.onnx.export(
                model,
                args,
                str(dst),
                dynamo=False,  # the TorchScript exporter: no onnxscript needed
                input_names=in_names,
                output_names=out_names,
                dynamic_axes={n: {0: "batch"} for n in in_names + out_names},
                opset_version=opset,
            )
    except Exception as e:  # torch raises RuntimeError, TypeError, its own export errors...
        raise ModelError(f"{src}: torch.onnx.export failed: {_first_line(e)}") from e


# --- scikit-learn -------------------------------------------------------------------------------


def _sklearn_to_onnx(src: Path, dst: Path, n_features: int | None, name: str, opset: int) -> None:
    require("skl2onnx", "convert")
    import joblib  # type: ignore[import-untyped]
    from skl2onnx import convert_sklearn
    from skl2onnx.common.data_types import FloatTensorType
    from sklearn.base import is_classifier

    try:
        model = joblib.load(src)
    except Exception as e:
        raise ModelError(f"{src}: not a loadable scikit-learn pickle: {_first_line(e)}") from e
    n = n_features or getattr(model, "n_features_in_", None)
    if n is None:
        raise ConfigError(f"{src}: the number of features is unknown; pass --input-shape N")
    try:
        onx = convert_sklearn(
            model,
            initial_types=[(name, FloatTensorType([None, int(n)]))],
            options={"zipmap": False} if is_classifier(model) else None,
            target_opset={"": opset, "ai.onnx.ml": 3},
        )
    except Exception as e:  # skl2onnx raises MissingShapeCalculator, RuntimeError, NameError...
        raise ModelError(f"{src}: skl2onnx cannot convert {type(model).__name__}: {_first_line(e)}") from e
    dst.write_bytes(onx.SerializeToString())


def _onnx_shapes(
    o: ConvertOptions, raw: dict[str, Any], src: Path, fw: Framework, labels: str | None
) -> list[tuple[str, tuple[int, ...], Any]]:
    """(input name, example dims, example array or None) for the exporter, from --input-shape or data
    (scikit-learn models know their feature count: neither is needed)."""
    if o.input_shapes:
        many = len(o.input_shapes) > 1
        return [(n or (f"input_{i}" if many else "input"), d, None) for i, (n, d) in enumerate(o.input_shapes)]
    if fw == "sklearn" and not raw:
        return [("input", (), None)]
    arrays = [(k, v) for k, v in raw.items() if k != labels and v.ndim >= 1 and v.dtype.kind in "fiu"]
    if len(arrays) != 1:
        raise ConfigError(f"{src}: pass --input-shape (one per input), or --representative data with one array")
    k, v = arrays[0]
    example = v[:1].astype(np.float32) if v.dtype.kind == "f" else v[:1].copy()
    return [(k, (1, *v.shape[1:]), example)]


# --- the command --------------------------------------------------------------------------------


def _check(
    o: ConvertOptions, fw: Framework, out: Path, rep: object, val: object, labels: str | None, max_drop: float | None
) -> None:
    target = _TARGET[fw]
    if out.suffix.lower() != target:
        raise ConfigError(f"-o {out}: {fw} converts to {target[1:].upper()}; the output must end in {target}")
    if o.io_type != "float32" and not (target == ".tflite" and o.quantize == "int8"):
        raise ConfigError(f"--io-type {o.io_type}: needs a full-integer TFLite model (--quantize int8 from Keras)")
    if o.quantize == "float16" and target != ".tflite":
        raise ConfigError("--quantize float16: TFLite only; for ONNX use --quantize dynamic or int8")
    if o.quantize == "int8" and rep is None:
        raise ConfigError("--quantize int8: needs --representative data (an .npz keyed by input name)")
    check_gate_options(rep or val, labels, max_drop)


def convert_model(
    src: str | os.PathLike[str],
    out: str | os.PathLike[str],
    options: ConvertOptions = ConvertOptions(),
    representative: str | os.PathLike[str] | None = None,
    validation: str | os.PathLike[str] | None = None,
    labels: str | None = None,
    bench_runs: int = 200,
    max_accuracy_drop: float | None = None,
) -> Report:
    """Convert ``src`` to ``out`` (``.tflite`` from TensorFlow, ``.onnx`` from torch/scikit-learn).

    ``representative`` calibrates full-integer quantization; the report compares on ``validation``
    (default: the representative data). ``out`` is written only if the report passes
    ``max_accuracy_drop``. Raises :class:`ModelError` (naming the file, the input or the extra to
    install) or :class:`ConfigError`; nothing is written then.
    """
    src_p, out_p = Path(src), Path(out)
    if not src_p.exists():
        raise ModelError(f"{src_p}: no such file or folder")
    fw = options.framework or detect_framework(src_p)
    check_output(out_p, src_p)
    _check(options, fw, out_p, representative, validation, labels, max_accuracy_drop)
    if fw in ("keras", "savedmodel"):  # the framework first: a missing one is the first thing to say
        _tf()
    else:
        require(*(("torch", "convert-torch") if fw == "torch" else ("skl2onnx", "convert")))
    settings = {"from": fw, "quantize": options.quantize, "io_type": options.io_type}
    with tempfile.TemporaryDirectory(prefix="edgefleet-convert-") as tmp:
        float_path = Path(tmp) / f"float{_TARGET[fw]}"
        keras = None
        if fw in ("keras", "savedmodel"):
            keras = _load_keras(src_p) if fw == "keras" else None
            float_path.write_bytes(_tflite(src_p, fw, "none", "float32", None, keras))
        else:
            data = representative or validation
            raw = load_data(data, []) if data is not None and not options.input_shapes else {}
            shapes = _onnx_shapes(options, raw, src_p, fw, labels)
            if fw == "torch":
                _torch_to_onnx(src_p, float_path, shapes, options.opset)
            else:
                n = shapes[0][1][-1] if options.input_shapes else None
                _sklearn_to_onnx(src_p, float_path, n, shapes[0][0], options.opset)
            if options.quantize in ("dynamic", "int8"):
                q = QuantizeOptions(
                    mode="dynamic" if options.quantize == "dynamic" else "static",
                    per_channel=True,
                    max_samples=options.max_samples,
                    allow_no_gain=options.allow_no_gain,
                )
                report = quantize_onnx(
                    float_path, out_p, q, representative, validation, labels, None, bench_runs, max_accuracy_drop
                )
                report.command, report.source, report.before = "convert", str(src_p), f"float ONNX export of {src_p}"
                report.settings = {**settings, **report.settings}
                return report
        with quiet():  # LiteRT announces its XNNPACK delegate on stderr
            before = load_model(float_path)
        cal = val = None
        raw = {}
        if representative is not None:
            raw = load_data(representative, before.inputs)
            val = cal = make_samples(raw, before.inputs, str(representative))
            cal = cal.head(options.max_samples)
        if validation is not None:
            raw = load_data(validation, before.inputs)
            val = make_samples(raw, before.inputs, str(validation))
        y = load_labels(labels, raw, val.count, val.source) if labels is not None and val is not None else None
        after_path = float_path
        if fw in ("keras", "savedmodel") and options.quantize != "none":
            after_path = Path(tmp) / "quantized.tflite"
            after_path.write_bytes(_tflite(src_p, fw, options.quantize, options.io_type, cal, keras))
        with quiet():
            after = before if after_path == float_path else load_model(after_path)
        kind = "TFLite conversion" if _TARGET[fw] == ".tflite" else "ONNX export"
        report = Report(
            "convert", str(src_p), str(out_p), f"float {kind} of {src_p}", settings,
            float_path.stat().st_size, after_path.stat().st_size,
        )  # fmt: skip
        measure(report, before, after, val, y, bench_runs)
        if _TARGET[fw] == ".tflite":
            report.float_nodes, report.quantized_nodes = tflite_float_ops(after_path.read_bytes())
        else:
            onnx = require("onnx", "convert")
            proto = onnx.load(str(float_path))
            nodes = onnx_float_nodes(proto, proto, qdq=False)
            report.float_nodes, report.quantized_nodes, report.subgraph_nodes = nodes[:3]
        if options.quantize != "none":
            # float16, and TFLite's dynamic-range quantization (int8 weights, float "hybrid" kernels), keep
            # float ops by design: only their size can fail to gain.
            by_design = options.quantize == "float16" or (_TARGET[fw] == ".tflite" and options.quantize == "dynamic")
            report.check_gain(nodes=not by_design)
        report.apply_gate(max_accuracy_drop, options.allow_no_gain or options.quantize == "none")
        if report.passed:
            commit(after_path, out_p)
    return report
