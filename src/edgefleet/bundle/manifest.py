"""The bundle manifest (``manifest.json``), schema version 1, validated by pydantic.

A manifest names the model file and every other member with its size and sha256, so that a bundle
can be checked member by member while it is unpacked. Unknown keys are refused so that a typo in a
hand-written pipeline does not pass silently.
"""

from __future__ import annotations

import json
import re
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from edgefleet.errors import BundleError

__all__ = [
    "DTYPES",
    "MAX_NAME_LENGTH",
    "MAX_VERSION_LENGTH",
    "NAME_PATTERN",
    "VERSION_PATTERN",
    "ArgmaxStep",
    "CastStep",
    "CenterCropStep",
    "ColorStep",
    "FileRef",
    "GoldenRef",
    "LayoutStep",
    "Manifest",
    "NormalizeStep",
    "PipelineSpec",
    "PostStep",
    "PreStep",
    "QuantParams",
    "ResizeStep",
    "ScaleStep",
    "SoftmaxStep",
    "TensorInfo",
    "TopKStep",
    "format_validation_error",
    "parse_labels",
    "parse_manifest",
    "shown",
]

SCHEMA_VERSION = 1
MAX_MANIFEST_BYTES = 1 << 20  # 1 MiB: a manifest is metadata, never data

# The dtypes a tensor may declare, by numpy name.
DTYPES = (
    "float32",
    "float16",
    "float64",
    "int8",
    "uint8",
    "int16",
    "uint16",
    "int32",
    "uint32",
    "int64",
    "uint64",
    "bool",
    "string",
)

_SEMVER = re.compile(
    r"^(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)"
    r"(?:-((?:0|[1-9]\d*|\d*[a-zA-Z-][0-9a-zA-Z-]*)(?:\.(?:0|[1-9]\d*|\d*[a-zA-Z-][0-9a-zA-Z-]*))*))?"
    r"(?:\+([0-9a-zA-Z-]+(?:\.[0-9a-zA-Z-]+)*))?$"
)
# The limits of a model's name and version: the registry's URL paths accept exactly these, so every
# bundle that validates is addressable once uploaded (one constant for both sides).
MAX_NAME_LENGTH = 64
MAX_VERSION_LENGTH = 128
NAME_PATTERN = rf"^[a-z0-9][a-z0-9._-]{{0,{MAX_NAME_LENGTH - 1}}}$"
VERSION_PATTERN = rf"^[0-9A-Za-z][0-9A-Za-z.+-]{{0,{MAX_VERSION_LENGTH - 1}}}$"  # semver is checked on top
MAX_ECHO = 80  # characters of a untrusted value an error message repeats
_NAME = NAME_PATTERN
_MEMBER = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"  # a flat file name: no folders, no '..'
_SHA256 = r"^[0-9a-f]{64}$"


def shown(value: object, limit: int = MAX_ECHO) -> str:
    """``repr(value)`` for an error message, cut to ``limit`` characters: untrusted input is echoed
    escaped and bounded."""
    r = repr(value)
    return r if len(r) <= limit else f"{r[: limit - 3]}..."


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _check_semver(v: str, field: str) -> str:
    if not _SEMVER.match(v):
        raise ValueError(f"{field} must be a semantic version like 1.2.3, got {shown(v)}")
    return v


class QuantParams(_Strict):
    """Affine quantization of a tensor: ``real = scale * (q - zero_point)``."""

    scale: float = Field(gt=0)
    zero_point: int


class TensorInfo(_Strict):
    """One input or output tensor; ``None`` in ``shape`` is a dynamic dimension."""

    name: str = Field(min_length=1, max_length=256)
    dtype: Literal[DTYPES]  # type: ignore[valid-type]
    shape: list[Annotated[int, Field(ge=0)] | None]
    quantization: QuantParams | None = None


class FileRef(_Strict):
    """A member of the bundle, with the size and hash it must have."""

    path: str = Field(pattern=_MEMBER)
    sha256: str = Field(pattern=_SHA256)
    size: int = Field(ge=0)


class GoldenRef(FileRef):
    """Golden test vectors (``.npz``: ``input.NAME`` and ``output.NAME`` arrays) and their tolerance."""

    rtol: float = Field(default=1e-4, ge=0)
    atol: float = Field(default=1e-4, ge=0)
    count: int = Field(ge=1, description="number of samples")


# --- pipeline steps -----------------------------------------------------------------------------


class ResizeStep(_Strict):
    """Resize an HWC image to ``width`` x ``height``; ``letterbox`` keeps the aspect ratio and pads
    with ``pad_value``. With ``keep_aspect`` the size follows the image instead (for models with
    dynamic height/width): scaled to fit the ``width`` and/or ``height`` given, keeping its aspect
    ratio, then padded right and bottom with ``pad_value`` up to a ``multiple`` of pixels."""

    op: Literal["resize"]
    width: int | None = Field(default=None, ge=1, le=16384, description="pixels; optional with keep_aspect")
    height: int | None = Field(default=None, ge=1, le=16384, description="pixels; optional with keep_aspect")
    mode: Literal["stretch", "letterbox"] = "stretch"
    interpolation: Literal["nearest", "linear", "area", "cubic"] = "linear"
    pad_value: float = 0.0
    keep_aspect: bool = False
    multiple: int = Field(default=1, ge=1, le=1024, description="pixels; output dims rounded up to it (keep_aspect)")

    @model_validator(mode="after")
    def _sizes(self) -> ResizeStep:
        if self.keep_aspect:
            if self.width is None and self.height is None:
                raise ValueError("keep_aspect needs width, height or both (the box the image is fitted into)")
            if self.mode == "letterbox":
                raise ValueError("keep_aspect and mode letterbox exclude each other (letterbox pads to the full size)")
        else:
            if self.width is None or self.height is None:
                raise ValueError("width and height are both needed unless keep_aspect is true")
            if self.multiple != 1:
                raise ValueError("multiple applies with keep_aspect = true only (the size is fixed otherwise)")
        return self


class CenterCropStep(_Strict):
    op: Literal["center_crop"]
    width: int = Field(ge=1, le=16384)
    height: int = Field(ge=1, le=16384)


class ColorStep(_Strict):
    """Convert colour order. Decoded images and camera frames are BGR (OpenCV's order)."""

    op: Literal["color"]
    source: Literal["bgr", "rgb", "gray"] = "bgr"
    target: Literal["bgr", "rgb", "gray"]


class NormalizeStep(_Strict):
    """``(x - mean) / std`` per channel (last axis while the data is HWC)."""

    op: Literal["normalize"]
    mean: list[float] = Field(min_length=1)
    std: list[Annotated[float, Field(gt=0)]] = Field(min_length=1)


class ScaleStep(_Strict):
    """``x * factor + offset``."""

    op: Literal["scale"]
    factor: float
    offset: float = 0.0


class LayoutStep(_Strict):
    """Move channels: HWC data to ``nchw`` (channels first) or keep ``nhwc``."""

    op: Literal["layout"]
    target: Literal["nchw", "nhwc"]


class CastStep(_Strict):
    op: Literal["cast"]
    dtype: Literal["float32", "float16", "uint8", "int8", "int32", "int64"]


PreStep = Annotated[
    ResizeStep | CenterCropStep | ColorStep | NormalizeStep | ScaleStep | LayoutStep | CastStep,
    Field(discriminator="op"),
]


class SoftmaxStep(_Strict):
    op: Literal["softmax"]
    axis: int = -1


class ArgmaxStep(_Strict):
    """The best class; with ``axis`` (of the output without its batch axis), one per position along
    the other axes (e.g. ``axis = -1`` on a ``[T, C]`` sequence gives ``T`` classes)."""

    op: Literal["argmax"]
    axis: int | None = None


class TopKStep(_Strict):
    """The ``k`` best classes; with ``axis``, ``k`` per position along the other axes."""

    op: Literal["topk"]
    k: int = Field(default=5, ge=1, le=1000)
    axis: int | None = None


PostStep = Annotated[SoftmaxStep | ArgmaxStep | TopKStep, Field(discriminator="op")]


class PipelineSpec(_Strict):
    """How raw data becomes the model's input, and its output a result.

    ``input``/``output`` name the tensors the steps apply to (default: the model's first).
    ``raw_outputs`` (default off) adds the model's raw outputs to every result: a detector's can be
    hundreds of KB of JSON per frame.
    """

    input: str | None = None
    output: str | None = None
    preprocess: list[PreStep] = Field(default_factory=list)
    postprocess: list[PostStep] = Field(default_factory=list)
    raw_outputs: bool | list[Annotated[str, Field(min_length=1, max_length=256)]] = Field(
        default=False,
        description="put the model's raw outputs in the result: true for all, or a list of output names",
    )


class Manifest(_Strict):
    """``manifest.json`` at the root of a ``.efb`` bundle."""

    schema_version: Literal[1] = 1
    name: str = Field(pattern=_NAME, description="model name: lower case, digits, '.', '_', '-'")
    version: str = Field(max_length=MAX_VERSION_LENGTH, description="semantic version of this model")
    runtime: Literal["onnx", "tflite"]
    model: FileRef
    inputs: list[TensorInfo] = Field(min_length=1)
    outputs: list[TensorInfo] = Field(min_length=1)
    pipeline: PipelineSpec = Field(default_factory=PipelineSpec)
    labels: FileRef | None = None
    golden: GoldenRef | None = None
    baseline: FileRef | None = Field(default=None, description="training-data statistics for drift")
    min_agent_version: str = Field(default="0.1.0", max_length=MAX_VERSION_LENGTH)
    created_at: datetime
    description: str = Field(default="", max_length=4096)
    metadata: dict[str, str] = Field(default_factory=dict)

    @field_validator("version")
    @classmethod
    def _version(cls, v: str) -> str:
        return _check_semver(v, "version")

    @field_validator("min_agent_version")
    @classmethod
    def _min_agent(cls, v: str) -> str:
        return _check_semver(v, "min_agent_version")

    @field_validator("created_at")
    @classmethod
    def _aware(cls, v: datetime) -> datetime:
        if v.tzinfo is None:
            raise ValueError("created_at must carry a time zone, e.g. 2026-11-23T12:00:00Z")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> Manifest:
        for kind, tensors in (("inputs", self.inputs), ("outputs", self.outputs)):
            names = [t.name for t in tensors]
            dup = {n for n in names if names.count(n) > 1}
            if dup:
                raise ValueError(f"{kind}: duplicate tensor name(s) {shown(sorted(dup))}")
        members = [r.path for r in self.members()]
        if "manifest.json" in members:
            raise ValueError("no member may be called manifest.json")
        dup = {m for m in members if members.count(m) > 1}
        if dup:
            raise ValueError(f"two members share the path(s) {sorted(dup)}")
        suffix = {"onnx": ".onnx", "tflite": ".tflite"}[self.runtime]
        if not self.model.path.endswith(suffix):
            raise ValueError(
                f"model.path: a {self.runtime} model file must end in {suffix}, got {shown(self.model.path)}"
            )
        p = self.pipeline
        if p.input is not None and p.input not in {t.name for t in self.inputs}:
            raise ValueError(
                f"pipeline.input: {shown(p.input)} is not one of the inputs {shown([t.name for t in self.inputs])}"
            )
        if p.output is not None and p.output not in {t.name for t in self.outputs}:
            raise ValueError(
                f"pipeline.output: {shown(p.output)} is not one of the outputs {shown([t.name for t in self.outputs])}"
            )
        return self

    def members(self) -> list[FileRef]:
        """Every file of the bundle besides ``manifest.json``, model first."""
        refs: list[FileRef] = [self.model]
        refs += [r for r in (self.labels, self.golden, self.baseline) if r is not None]
        return refs

    @property
    def bundle_name(self) -> str:
        """The conventional file name, ``NAME-VERSION.efb``."""
        return f"{self.name}-{self.version}.efb"

    def to_json(self) -> bytes:
        """Canonical JSON: sorted keys, so that the same manifest always gives the same bytes."""
        return json.dumps(self.model_dump(mode="json"), sort_keys=True, indent=2).encode() + b"\n"


def parse_labels(data: bytes, where: str = "labels.txt") -> list[str]:
    """One label per line, UTF-8; trailing blank lines are dropped."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise BundleError(f"{where}: not UTF-8 text: {e}") from e
    labels = [line.rstrip("\r") for line in text.split("\n")]
    while labels and not labels[-1].strip():
        labels.pop()
    if not labels:
        raise BundleError(f"{where}: no labels")
    return labels


def _bounded(text: str, limit: int = MAX_ECHO) -> str:
    return text if len(text) <= limit else f"{text[: limit - 3]}..."


def format_validation_error(err: ValidationError, where: str) -> str:
    """One line per problem, each naming the field by its dotted path."""
    lines = []
    for e in err.errors():
        loc = ".".join(_bounded(str(p)) for p in e["loc"]) or "(root)"
        msg = _bounded(e["msg"].removeprefix("Value error, "), 4 * MAX_ECHO)
        lines.append(f"{where}: {loc}: {msg}")
    return "; ".join(lines)


def parse_manifest(data: bytes | str | dict[str, Any], where: str = "manifest.json") -> Manifest:
    """Parse and validate a manifest. Raises :class:`BundleError` naming the field at fault."""
    if isinstance(data, bytes | str):
        if len(data) > MAX_MANIFEST_BYTES:
            raise BundleError(f"{where}: larger than {MAX_MANIFEST_BYTES} bytes")
        try:
            obj = json.loads(data)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise BundleError(f"{where}: not valid JSON: {e}") from e
    else:
        obj = data
    if not isinstance(obj, dict):
        raise BundleError(f"{where}: must be a JSON object, got {type(obj).__name__}")
    version = obj.get("schema_version")
    if version != SCHEMA_VERSION:
        raise BundleError(
            f"{where}: schema_version: this agent reads schema version {SCHEMA_VERSION}, got {shown(version)}"
        )
    try:
        return Manifest.model_validate(obj)
    except ValidationError as e:
        raise BundleError(format_validation_error(e, where)) from e
