"""JSON forms of the rollout core's types, and the parsers the CLI and the API share.

- ``gates_to_json`` / ``gates_from_json``: :class:`Gates` as stored in ``rollouts.gates``. Reading
  validates every field: a malformed stored value (or a bad API body) raises ``ValueError`` naming the
  field and what was expected. :func:`check_gates` applies the same rules to a ``Gates`` built in code.
- ``gate_result_to_json`` / ``gate_result_from_json``, ``decision_to_json``: what ``rollouts.last_gates``,
  the audit log and ``rollout show`` carry. Non-finite floats (an unbounded interval) become ``null``.
- ``parse_duration("10m")``, ``parse_ratio("5%")``, ``parse_window("22:00-02:00")``: ``ValueError``
  naming the value on bad input.
"""

from __future__ import annotations

import itertools
import math
import re
from dataclasses import asdict, fields
from typing import Any, get_args

from edgefleet.server.rollouts.types import Decision, GateResult, Gates, GateStatus

__all__ = [
    "check_gates",
    "decision_to_json",
    "gate_result_from_json",
    "gate_result_to_json",
    "gates_from_json",
    "gates_to_json",
    "parse_duration",
    "parse_ratio",
    "parse_window",
]

_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
_WINDOW = re.compile(r"^(\d{2}):(\d{2})-(\d{2}):(\d{2})$")


def parse_duration(text: str | float | int) -> float:
    """Seconds from ``"90s"``, ``"10m"``, ``"1h"``, ``"1d"``, ``"1h30m"``, ``"250ms"`` or a bare number
    of seconds (``"30"``, ``30``). Raises ``ValueError`` naming the value when it is not one of these
    or is negative."""
    if isinstance(text, bool):
        raise ValueError(f"duration {text!r}: expected seconds or a number with s, m, h or d")
    if isinstance(text, int | float):
        value = float(text)
    else:
        s = text.strip().lower()
        try:
            value = float(s)
        except ValueError:
            pos, value = 0, 0.0
            for m in _DURATION_PART.finditer(s):
                if m.start() != pos:
                    break
                value += float(m.group(1)) * _UNITS[m.group(2)]
                pos = m.end()
            if pos != len(s) or not s:
                raise ValueError(
                    f"duration {text!r}: expected seconds or a number with s, m, h or d (e.g. 90s, 10m, 1h, 1d)"
                ) from None
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"duration {text!r}: must be a finite number of seconds >= 0")
    return value


def parse_ratio(text: str | float | int, *, upper: float | None = 1.0) -> float:
    """A ratio from ``"5%"`` (0.05) or ``"0.05"``. A bare number above ``upper`` (default 1) is refused
    as ambiguous (write ``5%``); pass ``upper=None`` for ratios that may exceed 1 (a p95 ratio of 1.2).
    Raises ``ValueError`` naming the value when it is not a finite number >= 0."""
    if isinstance(text, bool):
        raise ValueError(f"ratio {text!r}: expected a number or a percentage")
    percent = False
    if isinstance(text, int | float):
        value = float(text)
    else:
        s = text.strip()
        if s.endswith("%"):
            percent, s = True, s[:-1].strip()
        try:
            value = float(s)
        except ValueError:
            raise ValueError(f"ratio {text!r}: expected a number (0.05) or a percentage (5%)") from None
        if percent:
            value /= 100.0
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"ratio {text!r}: must be a finite number >= 0")
    if not percent and upper is not None and value > upper:
        raise ValueError(f"ratio {text!r}: above {upper:g}; write a percentage such as {text}% if that is meant")
    return value


def parse_window(spec: str) -> tuple[int, int]:
    """A maintenance window ``"HH:MM-HH:MM"`` (UTC) as (start, end) minutes of the day; ``end`` may be
    ``24:00``; a window whose end is before its start crosses midnight. Raises ``ValueError`` naming the
    window when malformed or empty (start == end)."""
    m = _WINDOW.match(spec.strip()) if isinstance(spec, str) else None
    if m is None:
        raise ValueError(f"window {spec!r}: expected HH:MM-HH:MM (UTC)")
    h1, m1, h2, m2 = (int(g) for g in m.groups())
    if h1 > 23 or m1 > 59 or m2 > 59 or h2 > 24 or (h2 == 24 and m2 != 0):
        raise ValueError(f"window {spec!r}: not a time of day")
    start, end = h1 * 60 + m1, h2 * 60 + m2
    if start == end % 1440:
        raise ValueError(f"window {spec!r}: start and end are the same time (use 00:00-24:00 for all day)")
    return start, end


# -- Gates ---------------------------------------------------------------------------------------------

_GATE_FIELDS = {f.name for f in fields(Gates)}


def gates_to_json(gates: Gates) -> dict[str, Any]:
    """``Gates`` as a JSON-ready dict (tuples become lists)."""
    d = asdict(gates)
    d["stages"] = list(gates.stages)
    d["windows"] = [[tag, spec] for tag, spec in gates.windows]
    return d


def _number(d: dict[str, Any], name: str, *, low: float | None = None, high: float | None = None,
            optional: bool = False, strict_low: bool = False, strict_high: bool = False) -> float | None:
    v = d[name]
    if v is None:
        if optional:
            return None
        raise ValueError(f"gates.{name}: expected a number, got null")
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
        raise ValueError(f"gates.{name}: expected a finite number, got {v!r}")
    if low is not None and (v <= low if strict_low else v < low):
        raise ValueError(f"gates.{name}: must be {'>' if strict_low else '>='} {low:g}, got {v!r}")
    if high is not None and (v >= high if strict_high else v > high):
        raise ValueError(f"gates.{name}: must be {'<' if strict_high else '<='} {high:g}, got {v!r}")
    return float(v)


def _integer(d: dict[str, Any], name: str, *, low: int, optional: bool = False) -> int | None:
    v = d[name]
    if v is None and optional:
        return None
    if isinstance(v, bool) or not isinstance(v, int):
        raise ValueError(f"gates.{name}: expected an integer, got {v!r}")
    if v < low:
        raise ValueError(f"gates.{name}: must be >= {low}, got {v!r}")
    return v


def gates_from_json(data: dict[str, Any]) -> Gates:
    """``Gates`` from its JSON form; missing fields take their defaults. Raises ``ValueError`` naming
    the field for an unknown field or a malformed value (see :func:`check_gates` for the rules)."""
    if not isinstance(data, dict):
        raise ValueError(f"gates: expected an object, got {type(data).__name__}")
    unknown = sorted(set(data) - _GATE_FIELDS)
    if unknown:
        raise ValueError(f"gates: unknown field(s) {', '.join(unknown)}")
    d = gates_to_json(Gates()) | dict(data)
    stages = d["stages"]
    if not isinstance(stages, list | tuple) or not stages:
        raise ValueError(f"gates.stages: expected a non-empty list of percentages, got {stages!r}")
    for s in stages:
        if isinstance(s, bool) or not isinstance(s, int):
            raise ValueError(f"gates.stages: expected integer percentages, got {s!r}")
    windows = d["windows"]
    if not isinstance(windows, list | tuple):
        raise ValueError(f"gates.windows: expected a list of [tag, 'HH:MM-HH:MM'], got {windows!r}")
    pairs: list[tuple[str, str]] = []
    for w in windows:
        if not isinstance(w, list | tuple) or len(w) != 2 or not all(isinstance(p, str) for p in w):
            raise ValueError(f"gates.windows: expected [tag, 'HH:MM-HH:MM'], got {w!r}")
        pairs.append((w[0], w[1]))
    if d["ab_version"] is not None and (not isinstance(d["ab_version"], str) or not d["ab_version"]):
        raise ValueError(f"gates.ab_version: expected a version string or null, got {d['ab_version']!r}")
    if d["on_fail"] not in ("pause", "abort"):
        raise ValueError(f"gates.on_fail: expected 'pause' or 'abort', got {d['on_fail']!r}")
    gates = Gates(
        stages=tuple(stages),
        soak_s=_num(d, "soak_s", low=0.0),
        max_failure=_num(d, "max_failure", low=0.0, high=1.0),
        max_p95_ratio=_number(d, "max_p95_ratio", low=0.0, strict_low=True, optional=True),
        max_error_rate=_number(d, "max_error_rate", low=0.0, high=1.0, optional=True),
        max_drift=_number(d, "max_drift", low=0.0, optional=True),
        min_accuracy_ratio=_number(d, "min_accuracy_ratio", low=0.0, strict_low=True, optional=True),
        shadow_s=_number(d, "shadow_s", low=0.0, optional=True),
        min_agreement=_num(d, "min_agreement", low=0.0, high=1.0),
        ab_version=d["ab_version"],
        hold_s=_number(d, "hold_s", low=0.0, optional=True),
        stage_timeout_s=_num(d, "stage_timeout_s", low=0.0, strict_low=True),
        on_fail=d["on_fail"],
        min_devices=_int(d, "min_devices", low=1),
        min_samples=_int(d, "min_samples", low=1),
        confidence=_num(d, "confidence", low=0.0, high=1.0, strict_low=True, strict_high=True),
        max_concurrent=_integer(d, "max_concurrent", low=1, optional=True),
        windows=tuple(pairs),
    )
    check_gates(gates)
    return gates


def _num(d: dict[str, Any], name: str, **kw: Any) -> float:
    v = _number(d, name, **kw)
    assert v is not None
    return v


def _int(d: dict[str, Any], name: str, *, low: int) -> int:
    v = _integer(d, name, low=low)
    assert v is not None
    return v


def check_gates(gates: Gates) -> Gates:
    """Check the rules a stored ``Gates`` must follow and return it; ``ValueError`` naming the field:
    stages strictly increasing percentages in 1..100 ending at 100; durations >= 0 (the stage timeout
    > 0); ratios as documented on :class:`Gates`; ``hold_s`` only with ``ab_version``; windows
    ``(tag, "HH:MM-HH:MM")`` with a non-empty tag."""
    st = gates.stages
    if not st or any(not 1 <= s <= 100 for s in st) or any(b <= a for a, b in itertools.pairwise(st)):
        raise ValueError(f"gates.stages: expected strictly increasing percentages in 1..100, got {list(st)!r}")
    if st[-1] != 100:
        raise ValueError(f"gates.stages: the last stage must be 100, got {list(st)!r}")
    if gates.hold_s is not None and gates.ab_version is None:
        raise ValueError("gates.hold_s: a hold needs an A/B version (ab_version)")
    for tag, spec in gates.windows:
        if not tag:
            raise ValueError(f"gates.windows: empty tag for window {spec!r}")
        try:
            parse_window(spec)
        except ValueError as e:
            raise ValueError(f"gates.windows: {e}") from None
    return gates


# -- results and decisions -----------------------------------------------------------------------------

_STATUSES = get_args(GateStatus)


def _finite(v: float | None) -> float | None:
    return v if v is None or math.isfinite(v) else None


def gate_result_to_json(result: GateResult) -> dict[str, Any]:
    """A ``GateResult`` as a JSON-ready dict (non-finite floats become ``null``)."""
    d = asdict(result)
    for k in ("threshold", "estimate", "low", "high", "p_value"):
        d[k] = _finite(d[k])
    return d


def gate_result_from_json(data: dict[str, Any]) -> GateResult:
    """A ``GateResult`` from :func:`gate_result_to_json`'s form; ``ValueError`` naming a bad field."""
    if not isinstance(data, dict):
        raise ValueError(f"gate result: expected an object, got {type(data).__name__}")
    known = {f.name for f in fields(GateResult)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"gate result: unknown field(s) {', '.join(unknown)}")
    if not isinstance(data.get("name"), str):
        raise ValueError(f"gate result.name: expected a string, got {data.get('name')!r}")
    if data.get("status") not in _STATUSES:
        raise ValueError(f"gate result.status: expected one of {', '.join(_STATUSES)}, got {data.get('status')!r}")
    for k in ("threshold", "estimate", "low", "high", "p_value"):
        v = data.get(k)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int | float)):
            raise ValueError(f"gate result.{k}: expected a number or null, got {v!r}")
    for k in ("n_candidate", "n_baseline", "samples_candidate", "samples_baseline"):
        v = data.get(k, 0)
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ValueError(f"gate result.{k}: expected an integer >= 0, got {v!r}")
    if not isinstance(data.get("detail", ""), str):
        raise ValueError(f"gate result.detail: expected a string, got {data.get('detail')!r}")
    def num(k: str) -> float | None:
        v = data.get(k)
        return None if v is None else float(v)

    return GateResult(
        name=data["name"],
        status=data["status"],
        threshold=num("threshold"),
        estimate=num("estimate"),
        low=num("low"),
        high=num("high"),
        p_value=num("p_value"),
        n_candidate=data.get("n_candidate", 0),
        n_baseline=data.get("n_baseline", 0),
        samples_candidate=data.get("samples_candidate", 0),
        samples_baseline=data.get("samples_baseline", 0),
        detail=data.get("detail", ""),
    )


def decision_to_json(decision: Decision) -> dict[str, Any]:
    """A ``Decision`` as a JSON-ready dict (for the audit log)."""
    return {
        "action": decision.action,
        "reason": decision.reason,
        "gates": [gate_result_to_json(g) for g in decision.gates],
        "assign": list(decision.assign),
        "stage": decision.stage,
        "arm_b": list(decision.arm_b),
    }
