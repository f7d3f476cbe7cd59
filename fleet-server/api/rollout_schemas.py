"""Request and response bodies of the rollouts API (see :mod:`edgefleet.server.api.rollouts`).

Durations are seconds (a number) or a string with a unit (``"90s"``, ``"10m"``, ``"1h"``, ``"1d"``);
ratios a number (``0.05``) or a percentage (``"5%"``): both parsed by
:mod:`edgefleet.server.rollouts.codec`, so the CLI and the API read them alike. Every field has a
bound; a bad one is a 422 naming it.
"""

from __future__ import annotations

import itertools
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator

from edgefleet.server.api.schemas import DEVICE_ID, MODEL_NAME, TAG, VERSION
from edgefleet.server.rollouts.codec import parse_duration, parse_ratio, parse_window
from edgefleet.server.rollouts.types import Gates

__all__ = [
    "ActionIn",
    "GateOut",
    "MemberOut",
    "PinIn",
    "PinOut",
    "PromoteIn",
    "RolloutIn",
    "RolloutOut",
    "RolloutSummaryOut",
    "SkippedOut",
    "StageOut",
    "WindowIn",
]

MAX_DURATION = 366 * 86400.0  # s: a year and a day, the longest soak, shadow, hold or stage timeout
_DEFAULT = Gates()


def _duration(v: float | str) -> float:
    seconds = parse_duration(v)
    if seconds > MAX_DURATION:
        raise ValueError(f"duration {v!r}: at most {MAX_DURATION:g} s (366 days)")
    return seconds


def _ratio(v: float | str) -> float:
    return parse_ratio(v)


def _open_ratio(v: float | str) -> float:
    value = parse_ratio(v, upper=None)
    if value <= 0 or value > 1e6:
        raise ValueError(f"ratio {v!r}: must be > 0 and <= 1e6")
    return value


def _number(v: float | str) -> float:
    value = parse_ratio(v, upper=None)
    if value > 1e6:
        raise ValueError(f"{v!r}: at most 1e6")
    return value


_Text = Annotated[str, Field(min_length=1, max_length=32)]
Duration = Annotated[float | _Text, AfterValidator(_duration)]
Ratio = Annotated[float | _Text, AfterValidator(_ratio)]  # 0..1: 0.05 or "5%"
OpenRatio = Annotated[float | _Text, AfterValidator(_open_ratio)]  # > 0, may exceed 1: 1.2 or "120%"
Number = Annotated[float | _Text, AfterValidator(_number)]  # >= 0


class _In(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class WindowIn(_In):
    tag: str = Field(pattern=TAG, description="members carrying this tag are assigned only inside the window")
    window: str = Field(min_length=11, max_length=11, description="HH:MM-HH:MM, UTC (may cross midnight)",
                        examples=["22:00-04:00"])

    @field_validator("window")
    @classmethod
    def _window(cls, v: str) -> str:
        parse_window(v)
        return v


class RolloutIn(_In):
    """A rollout of ``model`` ``version`` to the devices carrying every tag of ``tags`` (none: all)."""

    model: str = Field(pattern=MODEL_NAME)
    version: str = Field(pattern=VERSION, description="the candidate (in an A/B stage: arm a)")
    tags: list[Annotated[str, Field(pattern=TAG)]] = Field(default_factory=list, max_length=32)
    stages: list[Annotated[int, Field(ge=1, le=100)]] = Field(
        default_factory=lambda: list(_DEFAULT.stages), min_length=1, max_length=20,
        description="percent of the members in each stage, strictly increasing, the last 100")
    soak: Duration = Field(default=_DEFAULT.soak_s, description="s an updated device runs before its stage passes")
    max_failure: Ratio = Field(default=_DEFAULT.max_failure, description="failed / online members of a stage, at most")
    max_p95_ratio: OpenRatio | None = Field(default=_DEFAULT.max_p95_ratio,
                                            description="candidate p95 / baseline p95 (upper bound); null: no gate")
    max_error_rate: Ratio | None = Field(default=_DEFAULT.max_error_rate,
                                         description="candidate - baseline error rate (upper bound); null: no gate")
    max_drift: Number | None = Field(default=None, description="candidate - baseline psi_max (upper bound)")
    min_accuracy_ratio: OpenRatio | None = Field(default=None,
                                                 description="candidate / baseline live accuracy (lower bound)")
    shadow: Duration | None = Field(default=None, description="s each stage first runs the candidate in shadow")
    min_agreement: Ratio = Field(default=_DEFAULT.min_agreement, description="shadow agreement, lower bound")
    version_b: str | None = Field(default=None, pattern=VERSION, description="A/B: the first stage's arm b runs it")
    hold: Duration | None = Field(default=None, description="s the A/B stage is held once its gates pass")
    stage_timeout: Duration = Field(default=_DEFAULT.stage_timeout_s, description="s a stage may stay undecided")
    on_fail: Literal["pause", "abort"] = "pause"
    min_devices: int = Field(default=_DEFAULT.min_devices, ge=1, le=10_000,
                             description="devices with enough data a comparative gate needs on each side")
    min_samples: int = Field(default=_DEFAULT.min_samples, ge=1, le=10**9,
                             description="inferences (comparisons, labels) per such device")
    confidence: float = Field(default=_DEFAULT.confidence, gt=0.5, lt=1, description="two-sided confidence level")
    max_concurrent: int | None = Field(default=None, ge=1, le=1_000_000,
                                       description="members assigned and not yet updated or failed, at most")
    windows: list[WindowIn] = Field(default_factory=list, max_length=64)

    @field_validator("stages")
    @classmethod
    def _stages(cls, v: list[int]) -> list[int]:
        if any(b <= a for a, b in itertools.pairwise(v)):
            raise ValueError(f"stages must be strictly increasing, got {v}")
        if v[-1] != 100:
            raise ValueError(f"the last stage must be 100, got {v}")
        return v

    @model_validator(mode="after")
    def _together(self) -> RolloutIn:
        if self.hold is not None and self.version_b is None:
            raise ValueError("hold: an A/B hold needs version_b")
        if self.version_b is not None and self.version_b == self.version:
            raise ValueError("version_b: must differ from version")
        return self

    def gates(self) -> Gates:
        def f(v: float | str | None) -> float | None:
            return None if v is None else float(v)

        return Gates(
            stages=tuple(self.stages), soak_s=float(self.soak), max_failure=float(self.max_failure),
            max_p95_ratio=f(self.max_p95_ratio), max_error_rate=f(self.max_error_rate), max_drift=f(self.max_drift),
            min_accuracy_ratio=f(self.min_accuracy_ratio), shadow_s=f(self.shadow),
            min_agreement=float(self.min_agreement), ab_version=self.version_b, hold_s=f(self.hold),
            stage_timeout_s=float(self.stage_timeout), on_fail=self.on_fail, min_devices=self.min_devices,
            min_samples=self.min_samples, confidence=self.confidence, max_concurrent=self.max_concurrent,
            windows=tuple((w.tag, w.window) for w in self.windows),
        )


class ActionIn(_In):
    """An operator's pause, resume or abort (the body may be left out)."""

    reason: str | None = Field(default=None, max_length=256, pattern=r"^[^\x00-\x1f\x7f]*$",
                               description="recorded in the rollout's reason and the audit log")
    state_version: int | None = Field(default=None, ge=0, le=2**62,
                                      description="act only if the rollout is still at this state version "
                                      "(as `GET` showed it); else 409")


class PromoteIn(ActionIn):
    version: str | None = Field(default=None, pattern=VERSION,
                                description="in an A/B hold: the winner (version_b makes it the candidate)")


class PinIn(_In):
    version: str = Field(pattern=VERSION)


class PinOut(BaseModel):
    device_id: str = Field(pattern=DEVICE_ID)
    model: str
    version: str
    source: str = Field(description="pin | operator")
    changed: bool
    released_from_rollouts: list[int] = Field(default_factory=list)


class GateOut(BaseModel):
    name: str = Field(description="soak | failure | p95_ratio | error_rate | drift | accuracy_ratio | agreement | ab")
    status: str = Field(description="pass | fail | wait | skip")
    threshold: float | None = None
    estimate: float | None = None
    low: float | None = Field(default=None, description="the confidence interval on the estimate")
    high: float | None = None
    p_value: float | None = None
    n_candidate: int = Field(default=0, description="devices with enough data (candidate; in A/B: b)")
    n_baseline: int = Field(default=0, description="devices with enough data (baseline; in A/B: a)")
    samples_candidate: int = 0
    samples_baseline: int = 0
    detail: str = ""


class StageOut(BaseModel):
    number: int = Field(description="1-based")
    percent: int
    devices: int = Field(description="members in the stage (cumulative)")
    current: bool
    members: dict[str, int] = Field(description="the stage's members by status (those new in this stage)")


class SkippedOut(BaseModel):
    device_id: str
    detail: str


class RolloutSummaryOut(BaseModel):
    id: int
    model: str
    version: str
    version_b: str | None
    tags: list[str]
    state: str = Field(description="running | paused | aborted | completed")
    stage: int = Field(description="0-based index into stages")
    stage_percent: int
    phase: str = Field(description="shadow | serve | hold")
    state_version: int
    reason: str
    created_at: datetime
    created_by: str
    updated_at: datetime
    ended_at: datetime | None


class RolloutOut(RolloutSummaryOut):
    stages: list[StageOut]
    stage_started_at: datetime
    phase_started_at: datetime
    last_judged_at: datetime | None
    gates: dict[str, Any] = Field(description="the rollout's parameters (seconds, ratios 0..1)")
    members: dict[str, int] = Field(description="members by status, and total")
    last_gates: list[GateOut] = Field(description="the last judgement's gates (without the A/B figures)")
    ab: list[GateOut] = Field(description="the A/B comparison (arm b against arm a), when there is one")
    explanation: str = Field(description="the state in words and numbers")
    skipped: list[SkippedOut] = Field(description="skipped members (up to 100) and why")


class MemberOut(BaseModel):
    device_id: str
    rank: int
    stage: int | None = Field(description="1-based stage the member joins in (null: skipped)")
    arm: str
    status: str
    previous_version: str | None
    assigned_at: datetime | None
    updated_at: datetime | None
    detail: str
