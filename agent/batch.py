"""Batch inference on the device: ``edgefleet agent batch MODEL INPUT... -o OUT.jsonl``, resumable.

Inputs are files and folders (walked in sorted order, recursively; hidden files, files of other
types and OUT itself are skipped). What each file holds:

* an image (``.png``, ``.jpg``, ...): one sample, run through the bundle's pipeline (decode, the
  preprocess steps, the model, the postprocess steps);
* ``.npz``: samples in the sample layout of golden vectors and calibration sets, one array per model
  input keyed ``NAME`` or ``input.NAME``, each ``(N, *input shape)``, a scalar input ``(N,)``
  (``output.*`` arrays are ignored, so a bundle's ``golden.npz`` is a valid input);
* ``.jsonl`` / ``.ndjson``: one sample a line, a JSON object ``{input name: nested list or number}``,
  or, for a model with one input, the bare nested list; the batch axis may be left out;
* ``.csv``: one sample a row of numbers, reshaped to the (single) input's shape, for an input whose
  dims are fixed but a leading batch dim; a first row that is not numbers is a header.

Samples in files are the model's inputs (as in golden vectors), so the preprocess, which is made for
raw images, is not applied to them; the postprocess is. With a bare model file (or ``direct``) the
model runs directly and the result is its raw outputs.

OUT gets one JSON object a line, appended::

    {"input": {"path": "/abs/file.npz", "index": 3, "size": 1234, "mtime_ns": 1764...},
     "model": "digits", "version": "1.0.0", "result": {...}}        (or "error": "...")

``index`` is the sample's position within its file (null for an image). **A done input is identified
by (path, index, size, mtime_ns)**: the absolute path, the index within the file, and the file's size
in bytes and modification time in nanoseconds when it was read. On start, OUT's complete lines say
what is done and those samples are skipped: nothing is written twice. A torn last line (the process
killed mid-write) is cut off first. A file changed since (another size or mtime) is run again, its
new lines appended beside the old ones. A sample whose line is an error is done too (delete the
line to run it again). Lines are fsync'd every ``sync_every`` lines, at least every second, and at
the end.
An OUT written by another model or version is refused.

Batching: where every input has a dynamic leading batch dim, samples are run ``batch_size`` at a
time; the batches are aligned within each file (and over consecutive images), so a resumed run
computes exactly the batches a clean run would, and gets the same results. A stateful model runs
one sample at a time from its initial state at the start of each file; resuming inside a file
replays that file's done samples (without writing them) to rebuild the state.
"""

from __future__ import annotations

import csv
import fcntl
import itertools
import json
import os
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgefleet.agent._batch_inputs import Array, Key, Source, _fmt, with_batch_axis
from edgefleet.agent._batch_inputs import count_samples as _count
from edgefleet.agent._batch_inputs import csv_samples as _csv_samples
from edgefleet.agent._batch_inputs import jsonl_samples as _jsonl_samples
from edgefleet.agent._batch_inputs import npz_samples as _npz_samples
from edgefleet.agent.pipeline import Pipeline, decode_image
from edgefleet.agent.runtime import Model
from edgefleet.errors import ConfigError, EdgefleetError

__all__ = ["BatchSummary", "Source", "default_batch_size", "find_inputs", "read_done", "run_batch"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff", ".pgm", ".ppm")
SAMPLE_SUFFIXES = (".npz", ".jsonl", ".ndjson", ".csv")
SYNC_SECONDS = 1.0  # fsync OUT at least this often (seconds) while lines are written, whatever sync_every says


@dataclass
class BatchSummary:
    samples: int = 0  # every sample of the inputs
    skipped: int = 0  # done before this run (found in OUT)
    written: int = 0  # lines this run appended
    errors: int = 0  # of which errors
    seconds: float = 0.0
    torn_bytes: int = 0  # cut from OUT's torn last line
    ignored_lines: int = 0  # complete lines of OUT that are not results (not JSON, say)
    files: int = 0
    skipped_files: list[str] = field(default_factory=list)  # in folders: not an image or file of samples

    def to_dict(self) -> dict[str, Any]:
        per_s = self.written / self.seconds if self.seconds > 0 else 0.0
        return {**self.__dict__, "throughput_per_s": per_s}


def _kind(p: Path) -> str | None:
    s = p.suffix.lower()
    if s in IMAGE_SUFFIXES:
        return "image"
    if s in (".jsonl", ".ndjson"):
        return "jsonl"
    return s[1:] if s in SAMPLE_SUFFIXES else None


def find_inputs(paths: Sequence[str | os.PathLike[str]], out: Path | None = None) -> tuple[list[Source], list[str]]:
    """The input files in order (see the module docstring), and the files of other types skipped in
    folders. Raises :class:`ConfigError` for a missing input or a file given by name of a type that
    cannot be read."""
    found: list[Source] = []
    skipped: list[str] = []
    out_abs = out.resolve() if out is not None else None
    seen: set[Path] = set()
    for given in paths:
        p = Path(given)
        if p.is_dir():
            files = sorted(f for f in p.rglob("*") if f.is_file() and not f.name.startswith("."))
        elif p.is_file():
            if _kind(p) is None:
                raise ConfigError(f"{p}: not an image or a file of samples ({', '.join(SAMPLE_SUFFIXES)}, or an image)")
            files = [p]
        else:
            raise ConfigError(f"{p}: no such file or folder")
        for f in files:
            a = f.resolve()
            if a == out_abs or a in seen:  # a file given twice (by name and in its folder) runs once
                continue
            seen.add(a)
            kind = _kind(f)
            if kind is None:
                skipped.append(str(f))
                continue
            st = a.stat()
            found.append(Source(a, kind, st.st_size, st.st_mtime_ns))
    return found, skipped


def read_done(out: Path, model: str, version: str | None) -> tuple[_Done, int, int]:
    """The keys OUT's complete lines record, the bytes cut from a torn last line, and the number of
    complete lines that are not results. Raises :class:`ConfigError` when OUT holds another model's
    or version's results, or cannot be read."""
    done = _Done()
    if not out.exists():
        return done, 0, 0
    ignored = 0
    try:
        with out.open("r+b") as f:
            good_end = 0
            for line in f:
                if not line.endswith(b"\n"):
                    break  # torn: cut below
                good_end += len(line)
                try:
                    obj = json.loads(line)
                    inp = obj["input"]
                    key: Key = (str(inp["path"]), inp["index"], int(inp["size"]), int(inp["mtime_ns"]))
                except (ValueError, KeyError, TypeError):
                    ignored += line.strip() != b""
                    continue
                if obj.get("model") != model or obj.get("version") != version:
                    raise ConfigError(
                        f"{out}: holds results of {obj.get('model')} {obj.get('version')}; this run is {model} "
                        f"{version}: give another -o (results of two models are not mixed)"
                    )
                done.add(key)
            torn = f.seek(0, os.SEEK_END) - good_end
            if torn:
                f.truncate(good_end)
                f.flush()
                os.fsync(f.fileno())
    except OSError as e:
        raise ConfigError(f"{out}: cannot read the results so far: {e.strerror or e}") from e
    return done, torn, ignored


def default_batch_size(model: Model) -> int:
    """32 where every input has a dynamic leading batch dim (and the model keeps no state), else 1."""
    return 32 if _batchable(model) else 1


def _batchable(model: Model) -> bool:
    return not model.stateful and all(len(s.shape) >= 2 and s.shape[0] is None for s in model.inputs)


# --- reading samples -------------------------------------------------------------------------------


class _Done:
    """What OUT records as done: a bitmap of sample indices per (path, size, mtime_ns) (an image's
    index None is bit 0), an eighth of a byte a sample."""

    def __init__(self) -> None:
        self.files: dict[tuple[str, int, int], bytearray] = {}

    def add(self, key: Key) -> None:
        bits = self.files.setdefault((key[0], key[2], key[3]), bytearray())
        i = key[1] or 0
        if i >= 8 * len(bits):
            bits.extend(bytes(i // 8 + 1 - len(bits)))
        bits[i // 8] |= 1 << (i % 8)

    def __contains__(self, key: Key) -> bool:
        bits = self.files.get((key[0], key[2], key[3]))
        i = key[1] or 0
        return bits is not None and i < 8 * len(bits) and bool(bits[i // 8] >> (i % 8) & 1)

    def count(self, src: Source) -> int:
        bits = self.files.get((str(src.path), src.size, src.mtime_ns))
        return 0 if bits is None else sum(bin(b).count("1") for b in bits)


# --- running ---------------------------------------------------------------------------------------


@dataclass
class _Item:
    src: Source
    index: int | None
    load: Callable[[], dict[str, Array]]
    feeds: dict[str, Array] | None = None
    error: str | None = None


class _Runner:
    def __init__(self, model: Model, pipeline: Pipeline | None, fd: int, sync_every: int, summary: BatchSummary):
        self.model, self.pipeline, self.fd, self.sync_every, self.summary = model, pipeline, fd, sync_every, summary
        self.version = model.manifest.version if model.manifest else None
        self.unsynced = 0
        self.synced_at = time.monotonic()

    def result(self, outputs: dict[str, Array]) -> dict[str, Any]:
        p = self.pipeline
        if p is None:
            return {"outputs": {k: v.tolist() for k, v in outputs.items()}}
        return p.finish(outputs, p.raw_outputs or (() if p.spec.postprocess else tuple(outputs)))

    def prepare(self, item: _Item) -> None:
        """Load the item's feeds and check them against the model (so that an error lands on its sample);
        the feeds stay as given (float for a quantized input), for ``predict`` to convert."""
        if item.error is not None:
            return
        try:
            if item.src.kind == "image":
                p, where = item.src.path, str(item.src.path)
                raw = {self.model.inputs[0].name: decode_image(p.read_bytes(), where)} if not self.pipeline else {}
                item.feeds = with_batch_axis(self.model, self.pipeline.prepare(p) if self.pipeline else raw, where)
            else:
                item.feeds = item.load()
            self.model.prepare(item.feeds)
        except (EdgefleetError, OSError) as e:
            item.feeds, item.error = None, str(e)

    def run_chunk(self, chunk: list[_Item], write: set[int]) -> None:
        """Run every item of ``chunk`` (one call when they batch), write those whose position is in ``write``."""
        for it in chunk:
            self.prepare(it)
        ok = [it for it in chunk if it.feeds is not None]
        results: dict[int, dict[str, Any]] = {}
        if len(ok) > 1 and all(_same_shapes(ok[0].feeds, it.feeds) for it in ok):
            feeds = [it.feeds for it in ok if it.feeds is not None]
            stacked = {k: np.concatenate([f[k] for f in feeds]) for k in feeds[0]}
            try:
                out = self.model.predict(stacked)
                if all(v.ndim >= 1 and v.shape[0] == len(ok) for v in out.values()):
                    for j, it in enumerate(ok):
                        results[id(it)] = self.result({k: v[j : j + 1] for k, v in out.items()})
            except EdgefleetError:
                results = {}  # one at a time below, so each error lands on its sample
        for it in ok:
            if id(it) in results:
                continue
            try:
                results[id(it)] = self.result(self.model.predict(it.feeds))  # type: ignore[arg-type]
            except EdgefleetError as e:
                it.error = str(e)
        lines = []
        for pos, it in enumerate(chunk):
            if pos not in write:
                continue
            lines.append(self.line(it, results.get(id(it))))
        self.emit(lines)

    def line(self, it: _Item, result: dict[str, Any] | None) -> bytes:
        src = it.src
        obj: dict[str, Any] = {
            "input": {"path": str(src.path), "index": it.index, "size": src.size, "mtime_ns": src.mtime_ns},
            "model": self.model.name,
            "version": self.version,
        }
        if result is not None and it.error is None:
            try:
                return json.dumps({**obj, "result": result}, allow_nan=False).encode() + b"\n"
            except ValueError:
                it.error = "the result holds NaN or inf (not JSON)"
        obj["error"] = it.error or "no result"
        self.summary.errors += 1
        return json.dumps(obj).encode() + b"\n"

    def emit(self, lines: list[bytes]) -> None:
        if not lines:
            return
        data = b"".join(lines)
        view = memoryview(data)
        while view:
            n = os.write(self.fd, view)
            view = view[n:]
        self.summary.written += len(lines)
        self.unsynced += len(lines)
        if self.unsynced >= self.sync_every or time.monotonic() - self.synced_at >= SYNC_SECONDS:
            self.sync()

    def sync(self) -> None:
        if self.unsynced:
            os.fsync(self.fd)
            self.unsynced = 0
        self.synced_at = time.monotonic()


def _same_shapes(a: dict[str, Array] | None, b: dict[str, Array] | None) -> bool:
    return a is not None and b is not None and all(a[k].shape == b[k].shape for k in a)


def _groups(sources: list[Source]) -> Iterator[list[Source]]:
    """Each file of samples alone; consecutive images together (they batch across files)."""
    images: list[Source] = []
    for s in sources:
        if s.kind == "image":
            images.append(s)
            continue
        if images:
            yield images
            images = []
        yield [s]
    if images:
        yield images


def run_batch(
    model: Model,
    inputs: Sequence[str | os.PathLike[str]],
    out: str | os.PathLike[str],
    direct: bool = False,
    batch_size: int | None = None,
    sync_every: int = 1000,
    progress: Callable[[int, int], None] | None = None,
) -> BatchSummary:
    """Run ``model`` (through its pipeline unless ``direct`` or a bare model) over ``inputs`` into
    ``out``, skipping what ``out`` records as done (see the module docstring). ``progress(done,
    total)`` is called after every batch. Per-sample failures are lines with ``error``; raises
    :class:`ConfigError` for a missing input, a batch size the model cannot take, or an ``out``
    of another model."""
    out_path = Path(out)
    size = default_batch_size(model) if batch_size is None else batch_size
    if size < 1:
        raise ConfigError(f"--batch-size: expected a positive number, got {size}")
    if size > 1 and not _batchable(model):
        why = "keeps state between calls" if model.stateful else f"has no dynamic batch dim ({_shapes(model)})"
        raise ConfigError(f"--batch-size {size}: the model {why}; it runs one sample at a time (--batch-size 1)")
    if sync_every < 1:
        raise ConfigError(f"--sync-every: expected a positive number, got {sync_every}")
    pipeline = None if direct or model.manifest is None else Pipeline(model)
    sources, skipped_files = find_inputs(inputs, out_path)
    summary = BatchSummary(files=len(sources), skipped_files=skipped_files)
    version = model.manifest.version if model.manifest else None
    try:
        fd = os.open(out_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    except OSError as e:
        raise ConfigError(f"{out_path}: cannot write the results: {e.strerror or e}") from e
    runner = _Runner(model, pipeline, fd, sync_every, summary)
    seen = 0
    step = 1 if model.stateful else size
    t0 = time.perf_counter()
    try:
        try:  # one run at a time per OUT: two would both find a sample not done and both write it
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ConfigError(f"{out_path}: another `edgefleet agent batch` is writing it") from None
        done, summary.torn_bytes, summary.ignored_lines = read_done(out_path, model.name, version)
        counts = {s: _count(s) for s in sources}
        total = summary.samples = sum(counts.values())
        for group in _groups(sources):
            if model.stateful:  # from its initial state; a group all done is not replayed
                model.reset()
                if all(done.count(s) >= counts[s] for s in group):
                    summary.skipped += sum(done.count(s) for s in group)
                    seen += sum(counts[s] for s in group)
                    continue
            with ExitStack() as stack:
                items = _items(model, group, stack)
                while chunk := list(itertools.islice(items, step)):
                    write = {j for j, it in enumerate(chunk) if it.src.key(it.index) not in done}
                    summary.skipped += len(chunk) - len(write)
                    if write or model.stateful:
                        runner.run_chunk(chunk, write)
                    seen += len(chunk)
                    if progress:
                        progress(min(seen, total), total)
        if progress:
            progress(total, total)
    finally:
        runner.sync()
        os.close(fd)
        summary.seconds = time.perf_counter() - t0
    return summary


def _shapes(model: Model) -> str:
    return ", ".join(f"{s.name} {_fmt(s.shape)}" for s in model.inputs)


def _no_feeds() -> dict[str, Array]:
    return {}


def _items(model: Model, group: list[Source], stack: ExitStack) -> Iterator[_Item]:
    """The samples of a group, read as they are needed; a file that cannot be read is one item
    carrying its error (index None, or the index where reading broke off)."""
    for src in group:
        if src.kind == "image":
            yield _Item(src, None, _no_feeds)
            continue
        reader = {"npz": _npz_samples, "jsonl": _jsonl_samples, "csv": _csv_samples}[src.kind]
        i: int | None = None
        try:
            for i, load in enumerate(reader(model, src, stack)):
                yield _Item(src, i, load)
        except (EdgefleetError, OSError, UnicodeDecodeError, csv.Error) as e:
            yield _Item(src, None if i is None else i + 1, _no_feeds, error=f"{src.path}: {e}")
