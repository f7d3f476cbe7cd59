"""Readers of ``edgefleet agent batch``'s files of samples: ``.npz`` in the sample layout (read one
sample at a time, so a file larger than memory works), JSON lines and CSV (streamed), and the count
of samples a file holds. Each reader yields one loader per sample, so that a resumed run skips what
is done without decoding it."""

from __future__ import annotations

import csv
import functools
import itertools
import json
import math
import zipfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgefleet.agent.runtime import Model
from edgefleet.errors import EdgefleetError

__all__ = [
    "Array", "Key", "Loader", "Source", "count_samples", "csv_samples", "jsonl_samples", "npz_samples",
    "with_batch_axis",
]

Array = np.ndarray[Any, Any]
Key = tuple[str, int | None, int, int]  # (path, index, size, mtime_ns): what identifies a done input
Loader = Callable[[], dict[str, Array]]


@dataclass(frozen=True)
class Source:
    """One input file as it was when listed."""

    path: Path
    kind: str  # "image", "npz", "jsonl" or "csv"
    size: int  # bytes
    mtime_ns: int

    def key(self, index: int | None) -> Key:
        return (str(self.path), index, self.size, self.mtime_ns)



def with_batch_axis(model: Model, feeds: dict[str, Any], where: str) -> dict[str, Array]:
    """Arrays for each input; one missing a leading batch axis of a dynamic-or-1 dim gets it."""
    out: dict[str, Array] = {}
    by_name = {k[6:] if k.startswith("input.") else k: v for k, v in feeds.items()}
    for s in model.inputs:
        if s.name not in by_name:
            raise EdgefleetError(f"{where}: no value for input {s.name!r}; the model's inputs are {_names(model)}")
        a = np.asarray(by_name[s.name])
        if a.ndim == len(s.shape) - 1 and len(s.shape) >= 2 and s.shape[0] in (None, 1):
            a = a[None]
        out[s.name] = a
    return out


def _names(model: Model) -> list[str]:
    return [s.name for s in model.inputs]


def npz_samples(model: Model, src: Source, stack: ExitStack) -> Iterator[Loader]:
    """Sample ``i`` of each input read from the archive as it is needed (seek and read one row), so a
    file larger than memory works; the archive stays open on ``stack``."""
    where = str(src.path)
    try:
        zf = stack.enter_context(zipfile.ZipFile(src.path))
        members = {n[:-4]: n for n in zf.namelist() if n.endswith(".npy") and not n.startswith("output.")}
        rows: dict[str, tuple[Any, int, tuple[int, ...], np.dtype[Any]]] = {}
        for s in model.inputs:
            member = members.get(s.name) or members.get(f"input.{s.name}")
            if member is None:
                raise EdgefleetError(f"{where}: no array for input {s.name!r}; it has {sorted(members)}")
            f = stack.enter_context(zf.open(member))
            shape, fortran, dtype = _npy_header(f)
            if len(shape) != len(s.shape) + 1:
                raise EdgefleetError(
                    f"{where}: array {s.name!r} has shape {list(shape)}; expected samples stacked on a new leading "
                    f"axis, (N, *{_fmt(s.shape)})"
                )
            if fortran or dtype.hasobject:
                raise EdgefleetError(f"{where}: array {s.name!r}: write it C-ordered, of numbers (np.savez does)")
            rows[s.name] = (f, f.tell(), tuple(shape), dtype)
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
        raise EdgefleetError(f"{where}: not a readable .npz file: {e}") from e
    counts = {v[2][0] for v in rows.values()}
    if len(counts) != 1:
        raise EdgefleetError(f"{where}: inputs have different sample counts (the first axis counts samples)")

    def load(i: int) -> dict[str, Array]:
        feeds = {}
        for name, (f, base, shape, dtype) in rows.items():
            n = math.prod(shape[1:]) * dtype.itemsize
            f.seek(base + i * n)
            data = f.read(n)
            if len(data) != n:
                raise EdgefleetError(f"{where}: array {name!r} is cut short at sample {i}")
            feeds[name] = np.frombuffer(data, dtype=dtype).reshape(shape[1:]).copy()
        return feeds

    for i in range(counts.pop()):
        yield functools.partial(load, i)


def _npy_header(f: Any) -> tuple[tuple[int, ...], bool, np.dtype[Any]]:
    """(shape, fortran order, dtype) of the ``.npy`` at ``f``'s position; ``f`` is left at its data."""
    major, _ = np.lib.format.read_magic(f)
    read = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
    return read(f)  # type: ignore[no-any-return]


def _fmt(shape: Sequence[int | None]) -> str:
    return "[" + ", ".join("?" if d is None else str(d) for d in shape) + "]"


def jsonl_samples(model: Model, src: Source, stack: ExitStack) -> Iterator[Loader]:
    def load(raw: bytes, i: int) -> dict[str, Array]:
        where = f"{src.path}: line {i + 1}"
        try:
            obj = json.loads(raw)
        except ValueError as e:
            raise EdgefleetError(f"{where}: not JSON: {e}") from e
        if not isinstance(obj, dict):
            if len(model.inputs) != 1:
                raise EdgefleetError(f"{where}: give an object keyed by input name {_names(model)}")
            obj = {model.inputs[0].name: obj}
        try:
            return with_batch_axis(model, obj, where)
        except (ValueError, TypeError) as e:
            raise EdgefleetError(f"{where}: not an array: {e}") from e

    f = stack.enter_context(src.path.open("rb"))
    for i, raw in enumerate(ln for ln in f if ln.strip()):
        yield functools.partial(load, raw, i)


def csv_samples(model: Model, src: Source, stack: ExitStack) -> Iterator[Loader]:
    if len(model.inputs) != 1:
        raise EdgefleetError(f"{src.path}: CSV rows feed a model with one input; this one has {_names(model)}")
    spec = model.inputs[0]
    dims = [1 if (d is None and i == 0 and len(spec.shape) >= 2) else d for i, d in enumerate(spec.shape)]
    if any(d is None for d in dims):
        raise EdgefleetError(
            f"{src.path}: CSV rows need an input whose dims are fixed but the batch; {spec.name!r} is "
            f"{_fmt(spec.shape)}: use .npz or JSON lines"
        )
    shape = tuple(int(d) for d in dims if d is not None)

    def load(row: list[str], i: int) -> dict[str, Array]:
        where = f"{src.path}: row {i + 1}"
        try:
            values = np.array([float(c) for c in row], dtype=np.float64)
        except ValueError as e:
            raise EdgefleetError(f"{where}: not a row of numbers: {e}") from e
        if values.size != math.prod(shape):
            raise EdgefleetError(
                f"{where}: {values.size} numbers; input {spec.name!r} {list(shape)} takes {math.prod(shape)}"
            )
        if spec.dtype.kind in "iu" and spec.quantization is None:
            if not np.all(values == np.rint(values)):
                raise EdgefleetError(f"{where}: input {spec.name!r} takes whole numbers ({spec.dtype_name})")
            values = values.astype(spec.dtype)
        return {spec.name: values.reshape(shape)}

    f = stack.enter_context(src.path.open(newline=""))
    rows: Iterator[list[str]] = (r for r in csv.reader(f) if any(c.strip() for c in r))
    first = next(rows, None)
    if first is not None:
        try:
            [float(c) for c in first]
            rows = itertools.chain([first], rows)
        except ValueError:
            pass  # a header
    for i, row in enumerate(rows):
        yield functools.partial(load, row, i)


def count_samples(src: Source) -> int:
    """How many samples a file holds, from its header or its non-empty lines (nothing is decoded);
    a CSV's header counts as one."""
    if src.kind == "image":
        return 1
    try:
        if src.kind == "npz":
            with zipfile.ZipFile(src.path) as zf:
                for name in zf.namelist():
                    if name.endswith(".npy") and not name.startswith("output."):
                        with zf.open(name) as f:
                            shape = _npy_header(f)[0]
                            return int(shape[0]) if shape else 1
            return 1
        with src.path.open("rb") as f:
            return max(1, sum(1 for ln in f if ln.strip()))
    except (OSError, ValueError, zipfile.BadZipFile):
        return 1  # the run writes the file's error


