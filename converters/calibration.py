"""Calibration and validation data for the converters, checked against the model before any work.

Data is an ``.npz`` keyed by input name, or a folder of images run through a pipeline (a JSON/TOML
pipeline file, or a ``.efb`` bundle's own). For each input, an array of the input's rank holds the
samples along its batch axis; one of rank + 1 is a stack of samples, each fed as it is. Every
problem (no samples, a missing input, a wrong shape or dtype, NaN) is a :class:`ModelError` that
names the file and the input, raised before quantizing or converting starts.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgefleet.agent.tensors import TensorSpec
from edgefleet.errors import ConfigError, ModelError

__all__ = ["IMAGE_SUFFIXES", "SampleSet", "load_data", "load_labels", "make_samples", "ort_reader"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff", ".pgm", ".ppm")
Array = np.ndarray[Any, Any]


def _fmt(dims: Sequence[int | None], lead: str = "") -> str:
    return "[" + ", ".join([lead] * bool(lead) + ["?" if d is None else str(d) for d in dims]) + "]"


@dataclass(frozen=True)
class SampleSet:
    """Samples for every model input: ``arrays[name][i]`` is sample ``i``.

    ``stacked[name]`` is true when a sample already has the input's full shape (fed as ``a[i]``),
    false when the samples lie along the input's batch axis (fed as ``a[i:j]``).
    """

    arrays: dict[str, Array]
    stacked: dict[str, bool]
    batchable: bool  # every input has a dynamic batch axis: samples can be fed several at a time
    source: str

    @property
    def count(self) -> int:
        return int(next(iter(self.arrays.values())).shape[0])

    def head(self, n: int) -> SampleSet:
        return SampleSet({k: v[:n] for k, v in self.arrays.items()}, self.stacked, self.batchable, self.source)

    def feed(self, start: int, stop: int) -> dict[str, Array]:
        """Samples ``start:stop`` as one feed (``stop - start`` must be 1 unless ``batchable``)."""
        return {k: np.ascontiguousarray(a[start] if self.stacked[k] else a[start:stop]) for k, a in self.arrays.items()}

    def feeds(self, batch: int = 32) -> Iterator[dict[str, Array]]:
        """Every sample, ``batch`` at a time where the model allows it, else one at a time."""
        step = batch if self.batchable else 1
        for i in range(0, self.count, step):
            yield self.feed(i, min(i + step, self.count))


def load_data(
    path: str | os.PathLike[str], inputs: Sequence[TensorSpec], pipeline: Any = None, limit: int | None = None
) -> dict[str, Array]:
    """The raw arrays of an ``.npz`` file, or a folder of images through ``pipeline`` (a Model's
    :class:`~edgefleet.agent.pipeline.Pipeline`), at most ``limit`` images."""
    p = Path(path)
    if p.is_dir():
        return _load_images(p, pipeline, limit)
    if not p.is_file():
        raise ModelError(f"{p}: no such file or folder")
    try:
        z = np.load(p, allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise ModelError(f"{p}: not a readable .npz file: {e}") from e
    if not isinstance(z, np.lib.npyio.NpzFile):
        raise ModelError(f"{p}: a single array; expected an .npz keyed by input name {[s.name for s in inputs]}")
    with z:
        return {k: z[k] for k in z.files}


def _load_images(folder: Path, pipeline: Any, limit: int | None) -> dict[str, Array]:
    files = sorted(f for f in folder.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
    if limit is not None:
        files = files[:limit]
    if not files:
        raise ModelError(f"{folder}: empty calibration set: no images ({', '.join(IMAGE_SUFFIXES)})")
    if pipeline is None:
        raise ConfigError(f"{folder}: a folder of images needs a pipeline (--pipeline FILE.toml|.json|.efb)")
    rows = [pipeline.prepare(f) for f in files]
    return {pipeline.input: np.concatenate([r[pipeline.input] for r in rows])}


def make_samples(data: Mapping[str, Array], inputs: Sequence[TensorSpec], where: str) -> SampleSet:
    """Check ``data`` against the model's ``inputs``; raises :class:`ModelError` naming the input."""
    names = [s.name for s in inputs]
    if not data:
        raise ModelError(f"{where}: empty calibration set: no arrays; expected one per input {names}")
    arrays: dict[str, Array] = {}
    stacked: dict[str, bool] = {}
    batchable = True
    for s in inputs:
        if s.name not in data:
            raise ModelError(f"{where}: missing input {s.name!r} ({s.describe()}); the file has {sorted(data)}")
        x = np.asarray(data[s.name])
        ok_dtype = x.dtype == s.dtype or (s.quantization is not None and x.dtype == np.float32)
        if not ok_dtype:
            raise ModelError(f"{where}: input {s.name!r}: expected dtype {s.dtype_name}, got {x.dtype}")
        rank = len(s.shape)
        if x.ndim == rank and rank > 0 and s.shape[0] in (None, 1):
            want, is_stacked = list(s.shape[1:]), False
        elif x.ndim == rank + 1:
            want, is_stacked = list(s.shape), True
        else:
            raise ModelError(
                f"{where}: input {s.name!r}: expected shape {_fmt(s.shape[1:], 'N')} (N samples along the "
                f"batch axis) or {_fmt(s.shape, 'N')} (N stacked samples), got {list(x.shape)}"
            )
        got = list(x.shape[1:])
        if any(w is not None and w != g for w, g in zip(want, got, strict=True)):
            raise ModelError(
                f"{where}: input {s.name!r}: each sample must have shape {_fmt(want)}, got {got} "
                f"(array shape {list(x.shape)})"
            )
        if x.shape[0] == 0:
            raise ModelError(f"{where}: empty calibration set: input {s.name!r} has no samples (shape {list(x.shape)})")
        if x.dtype.kind == "f" and not np.isfinite(x).all():
            bad = int(np.argwhere(~np.isfinite(x.reshape(x.shape[0], -1)))[0][0])
            raise ModelError(f"{where}: input {s.name!r}: sample {bad} holds NaN or inf")
        arrays[s.name] = x
        stacked[s.name] = is_stacked
        batchable = batchable and not is_stacked and s.shape[0] is None
    counts = sorted({a.shape[0] for a in arrays.values()})
    if len(counts) != 1:
        raise ModelError(f"{where}: inputs have different sample counts {counts}")
    return SampleSet(arrays, stacked, batchable, where)


def load_labels(spec: str | os.PathLike[str], data: Mapping[str, Array], count: int, where: str) -> Array:
    """Class labels from a ``.npy`` file or a key of the validation data: integers, one per sample
    (one-hot rows are reduced to their index)."""
    p = Path(spec)
    if str(spec) in data:
        y, src = np.asarray(data[str(spec)]), f"{where}[{spec}]"
    elif p.suffix == ".npy" and p.is_file():
        try:
            y, src = np.load(p, allow_pickle=False), str(p)
        except (ValueError, OSError) as e:
            raise ModelError(f"{p}: not a readable .npy array: {e}") from e
    else:
        raise ConfigError(f"--labels: {str(spec)!r} is neither a .npy file nor a key of {where} (keys {sorted(data)})")
    if y.ndim == 2 and y.shape[1] > 1:
        y = y.argmax(axis=1)
    y = y.reshape(-1) if y.ndim == 2 else y
    if y.ndim != 1 or y.dtype.kind not in "iu":
        raise ModelError(f"{src}: labels must be integer class indices of shape [N], got {y.dtype} {list(y.shape)}")
    if y.shape[0] != count:
        raise ModelError(f"{src}: {y.shape[0]} labels for {count} validation samples")
    return y


def ort_reader(samples: SampleSet, batch: int = 32) -> Any:
    """An onnxruntime ``CalibrationDataReader`` over ``samples``."""
    from onnxruntime.quantization import CalibrationDataReader

    class _Reader(CalibrationDataReader):  # type: ignore[misc]
        def __init__(self) -> None:
            self._it = samples.feeds(batch)

        def get_next(self) -> dict[str, Array] | None:
            return next(self._it, None)

        def rewind(self) -> None:
            self._it = samples.feeds(batch)

    return _Reader()
