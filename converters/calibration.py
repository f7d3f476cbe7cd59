"""Calibration and validation data for the converters, checked against the model before any work.

Data is an ``.npz`` keyed by input name, or a folder of images run through a pipeline (a JSON/TOML
pipeline file, or a ``.efb`` bundle's own).

The sample layout, shared with golden vectors (``model package``) and bench inputs (``model
bench``): each array holds its input's samples **stacked on a new leading axis**, ``(N, *input
shape)``, a scalar input as ``(N,)``; sample ``i`` is ``a[i]``, fed exactly as it is. Inputs with
dynamic dims get the concrete shape of the array (one shape per file). As a shorthand, an array of
the input's own rank, for an input of rank 2 or more whose first dim is dynamic or 1, is read as
``N`` rows of that first axis taken as a batch axis (sample ``i`` is ``a[i:i+1]``, and several
rows may be fed at once); use the stacked layout for a model whose first dim is not a batch. A
rank-1 input (a waveform ``[T]``, say) has no shorthand: ``(N, T)``.

Every problem (no samples, a missing input, a wrong layout, shape or dtype, NaN) raises the error
class the caller names (:class:`ModelError` by default) naming the file and the input, before
quantizing or converting starts. :func:`stack_samples` and :func:`iter_samples` are the one
implementation of the layout, for every command that reads samples.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgefleet.agent.tensors import TensorSpec
from edgefleet.errors import ConfigError, EdgefleetError, ModelError

__all__ = [
    "IMAGE_SUFFIXES",
    "LAYOUT",
    "SampleSet",
    "iter_samples",
    "load_data",
    "load_labels",
    "make_samples",
    "ort_reader",
    "stack_samples",
]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff", ".pgm", ".ppm")
LAYOUT = "samples stacked on a new leading axis, (N, *input shape); a scalar input as (N,)"
Array = np.ndarray[Any, Any]


def _fmt(dims: Sequence[int | None], lead: str = "") -> str:
    return "[" + ", ".join([lead] * bool(lead) + ["?" if d is None else str(d) for d in dims]) + "]"


def _c(x: Any) -> Array:
    """A C-contiguous array that keeps a 0-d sample 0-d (``np.ascontiguousarray`` makes it ``[1]``)."""
    return np.array(x, order="C", copy=None)


def stack_samples(
    data: Mapping[str, Array],
    inputs: Sequence[TensorSpec],
    where: str,
    error: type[EdgefleetError] = ModelError,
    float_for_quantized: bool = True,
) -> tuple[dict[str, Array], set[str]]:
    """``data`` in the stacked layout, ``{name: (N, *sample shape)}``, checked against ``inputs``,
    and the names of the arrays that came in the batch-axis shorthand (see the module docstring).

    Extra keys (labels, say) are ignored. An array of a dtype that casts safely to the input's
    (int32 for int64) is cast; float data for a quantized input is kept when ``float_for_quantized``
    (the runtime quantizes it). Raises ``error`` naming ``where`` and the input: a missing input, a
    layout or shape that does not fit, a wrong dtype, no samples, NaN, or unequal sample counts.
    """
    names = [s.name for s in inputs]
    if not data:
        raise error(f"{where}: empty calibration set: no arrays; expected one per input {names}")
    arrays: dict[str, Array] = {}
    shorthand: set[str] = set()
    for s in inputs:
        if s.name not in data:
            raise error(f"{where}: missing input {s.name!r} ({s.describe()}); the file has {sorted(data)}")
        x = np.asarray(data[s.name])
        if x.dtype != s.dtype and not (float_for_quantized and s.quantization is not None and x.dtype == np.float32):
            if x.dtype.kind in "biuf" and s.dtype.kind in "biuf" and np.can_cast(x.dtype, s.dtype, "safe"):
                x = x.astype(s.dtype)
            else:
                raise error(f"{where}: input {s.name!r}: expected dtype {s.dtype_name}, got {x.dtype}")
        rank = len(s.shape)
        if x.ndim == rank + 1:
            want = list(s.shape)
        elif x.ndim == rank and rank > 1 and s.shape[0] in (None, 1):
            want = [1, *s.shape[1:]]
            x = x[:, None]
            shorthand.add(s.name)
        else:
            also = (
                f", or {_fmt(s.shape[1:], 'N')} (N rows of its batch axis)"
                if rank > 1 and s.shape[0] in (None, 1)
                else ""
            )
            raise error(
                f"{where}: array {s.name!r} has shape {list(x.shape)}; expected {_fmt(s.shape, 'N')} ({LAYOUT}{also})"
            )
        got = list(x.shape[1:])
        if any(w is not None and w != g for w, g in zip(want, got, strict=True)):
            raise error(
                f"{where}: input {s.name!r}: each sample must have shape {_fmt(want)}, got {got} "
                f"(array shape {list(np.shape(data[s.name]))})"
            )
        if x.shape[0] == 0:
            given = list(np.shape(data[s.name]))
            raise error(f"{where}: empty calibration set: input {s.name!r} has no samples (shape {given})")
        if x.dtype.kind == "f" and not np.isfinite(x).all():
            bad = int(np.argwhere(~np.isfinite(x.reshape(x.shape[0], -1)))[0][0])
            raise error(f"{where}: input {s.name!r}: sample {bad} holds NaN or inf")
        arrays[s.name] = x
    counts = sorted({a.shape[0] for a in arrays.values()})
    if len(counts) != 1:
        by = {k: int(v.shape[0]) for k, v in arrays.items()}
        raise error(f"{where}: inputs have different sample counts {by} (the first axis counts samples: {LAYOUT})")
    return arrays, shorthand


def iter_samples(arrays: Mapping[str, Array], start: int = 0, stop: int | None = None) -> Iterator[dict[str, Array]]:
    """One feed per sample of stacked arrays (as :func:`stack_samples` returns them): ``a[i]`` for
    each input, C-contiguous, a scalar input's sample 0-d."""
    count = min((int(a.shape[0]) for a in arrays.values()), default=0)
    for i in range(start, count if stop is None else min(stop, count)):
        yield {k: _c(a[i]) for k, a in arrays.items()}


@dataclass(frozen=True)
class SampleSet:
    """Samples for every model input in the stacked layout: ``arrays[name][i]`` is sample ``i``."""

    arrays: dict[str, Array]
    batchable: bool  # every input came as rows of a dynamic batch axis: rows can be fed several at a time
    source: str

    @property
    def count(self) -> int:
        return int(next(iter(self.arrays.values())).shape[0])

    def head(self, n: int) -> SampleSet:
        return SampleSet({k: v[:n] for k, v in self.arrays.items()}, self.batchable, self.source)

    def feed(self, start: int, stop: int) -> dict[str, Array]:
        """Samples ``start:stop`` as one feed (``stop - start`` must be 1 unless ``batchable``)."""
        if stop - start == 1 or not self.batchable:
            return next(iter_samples(self.arrays, start, start + 1))
        return {k: _c(a[start:stop].reshape((-1, *a.shape[2:]))) for k, a in self.arrays.items()}

    def feeds(self, batch: int = 32) -> Iterator[dict[str, Array]]:
        """Every sample, ``batch`` at a time where the model allows it, else one at a time."""
        if not self.batchable or batch <= 1:
            yield from iter_samples(self.arrays)
            return
        for i in range(0, self.count, batch):
            yield self.feed(i, min(i + batch, self.count))


def load_data(
    path: str | os.PathLike[str], inputs: Sequence[TensorSpec], pipeline: Any = None, limit: int | None = None
) -> dict[str, Array]:
    """The raw arrays of an ``.npz`` file, or a folder of images through ``pipeline`` (a Model's
    :class:`~edgefleet.agent.pipeline.Pipeline`), at most ``limit`` images, in the stacked layout.
    Raises :class:`ModelError` for a missing or unreadable file and :class:`ConfigError` for a
    folder without a pipeline."""
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
    rows = [pipeline.prepare(f)[pipeline.input] for f in files]
    shapes = sorted({tuple(r.shape) for r in rows})
    if len(shapes) != 1:
        raise ModelError(
            f"{folder}: the pipeline gives images of different shapes {[list(s) for s in shapes[:4]]}; "
            "a calibration set needs one shape (resize to a fixed size in the pipeline)"
        )
    return {pipeline.input: np.stack(rows)}


def make_samples(data: Mapping[str, Array], inputs: Sequence[TensorSpec], where: str) -> SampleSet:
    """Check ``data`` against the model's ``inputs`` (:func:`stack_samples`); raises
    :class:`ModelError` naming the input."""
    arrays, shorthand = stack_samples(data, inputs, where)
    batchable = all(s.name in shorthand and s.shape[0] is None for s in inputs)
    return SampleSet(arrays, batchable, where)


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
