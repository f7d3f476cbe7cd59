"""``edgefleet model package``: a model file and its extras into a reproducible ``.efb`` bundle.

The golden outputs are computed here, by the same runtime the device uses, and the drift baseline
from the data given. The pipeline is run on a synthetic input before anything is written
(:func:`edgefleet.agent.selftest.check_pipeline`): one that does not fit the model is refused.
The creation time is, in order: ``created_at``, ``$SOURCE_DATE_EPOCH``, the model file's
modification time; so packaging the same files again gives the same bytes.
"""

from __future__ import annotations

import io
import json
import os
import tomllib
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import ValidationError

from edgefleet.agent.runtime import Model, load_model
from edgefleet.agent.selftest import check_pipeline
from edgefleet.bundle.archive import file_ref, read_npz, write_bundle
from edgefleet.bundle.manifest import (
    GoldenRef,
    Manifest,
    PipelineSpec,
    QuantParams,
    TensorInfo,
    format_validation_error,
    parse_labels,
)
from edgefleet.converters.calibration import iter_samples, stack_samples
from edgefleet.errors import BundleError, ModelError
from edgefleet.stats import feature_stats

__all__ = ["load_npz", "load_pipeline", "package_model", "samples_for"]

MAX_GOLDEN = 16


def load_npz(path: str | os.PathLike[str]) -> dict[str, np.ndarray[Any, Any]]:
    p = Path(path)
    try:
        with np.load(p, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except FileNotFoundError as e:
        raise BundleError(f"{p}: no such file") from e
    except (ValueError, OSError, EOFError) as e:
        raise BundleError(f"{p}: not a readable .npz file: {e}") from e


def load_pipeline(path: str | os.PathLike[str]) -> PipelineSpec:
    """A pipeline from a JSON or TOML file; errors name the file and the field."""
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as e:
        raise BundleError(f"{p}: cannot read pipeline file: {e.strerror or e}") from e
    try:
        obj = tomllib.loads(text) if p.suffix == ".toml" else json.loads(text)
    except (json.JSONDecodeError, tomllib.TOMLDecodeError) as e:
        raise BundleError(f"{p}: not valid {'TOML' if p.suffix == '.toml' else 'JSON'}: {e}") from e
    try:
        return PipelineSpec.model_validate(obj)
    except ValidationError as e:
        raise BundleError(format_validation_error(e, str(p))) from e


def samples_for(model: Model, data: dict[str, np.ndarray[Any, Any]], where: str) -> dict[str, np.ndarray[Any, Any]]:
    """Check and stack ``data`` (keyed by input name) in the one sample layout of golden vectors and
    calibration sets, ``(N, *input shape)`` with scalars as ``(N,)`` (see
    :func:`edgefleet.converters.calibration.stack_samples`). Raises :class:`BundleError` naming the array."""
    arrays, _ = stack_samples(data, model.inputs, where, error=BundleError)
    return arrays


def _golden(
    model: Model, data: dict[str, np.ndarray[Any, Any]], where: str, rtol: float | None, atol: float | None
) -> tuple[bytes, dict[str, Any]]:
    samples = samples_for(model, data, where)
    n = min(MAX_GOLDEN, next(iter(samples.values())).shape[0])
    outs: dict[str, list[np.ndarray[Any, Any]]] = {s.name: [] for s in model.outputs}
    for i, feed in enumerate(iter_samples(samples, 0, n)):
        try:
            got = model.predict(feed)
        except ModelError as e:
            raise BundleError(f"{where}: sample {i}: {e}") from e
        for k, v in got.items():
            outs[k].append(v)
    arrays = {f"input.{k}": v[:n] for k, v in samples.items()}
    arrays |= {f"output.{k}": np.stack(v) for k, v in outs.items()}
    # Another CPU, another build of the runtime, may round differently: allow a small relative error,
    # and one quantization step on quantized outputs.
    peak = max(
        (
            float(np.abs(a).max())
            for k, a in arrays.items()
            if k.startswith("output.") and a.size and a.dtype.kind in "fiu"
        ),
        default=1.0,
    )
    step = max((s.quantization.scale for s in model.outputs if s.quantization), default=0.0)
    tol = {
        "rtol": 1e-3 if rtol is None else rtol,
        "atol": max(1e-4 * max(peak, 1.0), step * 1.01) if atol is None else atol,
    }
    buf = io.BytesIO()
    np.savez(buf, **{k: arrays[k] for k in sorted(arrays)})  # type: ignore[arg-type]  # uncompressed, ordered: reproducible
    return buf.getvalue(), {**tol, "count": n}


def _created_at(model_path: Path, created_at: datetime | None) -> datetime:
    if created_at is not None:
        return created_at if created_at.tzinfo else created_at.replace(tzinfo=UTC)
    epoch = os.environ.get("SOURCE_DATE_EPOCH")
    if epoch:
        try:
            ts = int(epoch)
        except ValueError as e:
            raise BundleError(f"SOURCE_DATE_EPOCH: expected whole seconds, got {epoch!r}") from e
    else:
        ts = int(model_path.stat().st_mtime)
    return datetime.fromtimestamp(ts, tz=UTC)


def package_model(
    model_path: str | os.PathLike[str],
    name: str,
    version: str,
    out: str | os.PathLike[str] | None = None,
    labels: str | os.PathLike[str] | None = None,
    golden: str | os.PathLike[str] | dict[str, np.ndarray[Any, Any]] | None = None,
    baseline: str | os.PathLike[str] | dict[str, np.ndarray[Any, Any]] | None = None,
    pipeline: str | os.PathLike[str] | PipelineSpec | None = None,
    created_at: datetime | None = None,
    description: str = "",
    rtol: float | None = None,
    atol: float | None = None,
) -> tuple[Path, Manifest]:
    """Write ``NAME-VERSION.efb`` (or ``out``); returns its path and manifest.

    Raises :class:`BundleError` / :class:`ModelError` naming the file or field at fault; nothing
    is written then.
    """
    mpath = Path(model_path)
    model = load_model(mpath)
    runtime: Literal["onnx", "tflite"] = "tflite" if model.backend.name == "litert" else "onnx"
    model_member = f"model.{runtime}"
    members: dict[str, bytes] = {model_member: mpath.read_bytes()}
    extra: dict[str, Any] = {}
    if labels is not None:
        lpath = Path(labels)
        try:
            data = lpath.read_bytes()
        except OSError as e:
            raise BundleError(f"{lpath}: cannot read labels: {e.strerror or e}") from e
        parse_labels(data, str(lpath))
        members["labels.txt"] = data
        extra["labels"] = file_ref("labels.txt", data)
    if golden is not None:
        where = str(golden) if not isinstance(golden, dict) else "golden inputs"
        gdata = load_npz(golden) if not isinstance(golden, dict) else golden
        blob, tol = _golden(model, gdata, where, rtol, atol)
        members["golden.npz"] = blob
        ref = file_ref("golden.npz", blob)
        extra["golden"] = GoldenRef(path=ref.path, sha256=ref.sha256, size=ref.size, **tol)
    if baseline is not None:
        where = str(baseline) if not isinstance(baseline, dict) else "baseline data"
        bdata = load_npz(baseline) if not isinstance(baseline, dict) else baseline
        samples = samples_for(model, bdata, where)
        stats = {k: feature_stats(v.reshape(v.shape[0], -1)) for k, v in samples.items()}
        blob = json.dumps({"inputs": stats}, sort_keys=True).encode()
        members["baseline.json"] = blob
        extra["baseline"] = file_ref("baseline.json", blob)
    spec = pipeline if isinstance(pipeline, PipelineSpec) else (load_pipeline(pipeline) if pipeline else PipelineSpec())
    if golden is not None:  # the first golden sample is a request known to be valid: for dynamic dims
        model.example_inputs = {
            k[6:]: v[0] for k, v in read_npz(members["golden.npz"], "golden.npz").items() if k.startswith("input.")
        }
    where = f"{pipeline}" if pipeline is not None and not isinstance(pipeline, PipelineSpec) else "pipeline"
    label_list = parse_labels(members["labels.txt"], "labels.txt") if "labels.txt" in members else None
    check_pipeline(model, spec, labels=label_list, where=where)

    def info(s: Any) -> TensorInfo:
        q = s.quantization
        return TensorInfo(
            name=s.name,
            dtype=s.dtype_name,
            shape=list(s.shape),
            quantization=None if q is None else QuantParams(scale=q.scale, zero_point=q.zero_point),
        )

    try:
        manifest = Manifest(
            name=name,
            version=version,
            runtime=runtime,
            model=file_ref(model_member, members[model_member]),
            inputs=[info(s) for s in model.inputs],
            outputs=[info(s) for s in model.outputs],
            pipeline=spec,
            created_at=_created_at(mpath, created_at),
            description=description,
            **extra,
        )
    except ValidationError as e:
        raise BundleError(format_validation_error(e, "manifest")) from e
    target = Path(out) if out is not None else Path(manifest.bundle_name)
    if target.is_dir() or target.suffix != ".efb":  # a folder, existing or to be made
        target.mkdir(parents=True, exist_ok=True)
        target = target / manifest.bundle_name
    write_bundle(target, manifest, members)
    return target, manifest
