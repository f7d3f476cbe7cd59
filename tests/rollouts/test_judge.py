"""The rollout decision core, scenario by scenario, with an injected clock; and the gates codec."""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgefleet.server.rollouts import codec, judge
from edgefleet.server.rollouts.judge import decide, due, stage_members, stage_size
from edgefleet.server.rollouts.types import (
    Decision,
    DeviceFigures,
    Figures,
    GateResult,
    Gates,
    Member,
    MemberStatus,
    RolloutView,
)

T0 = datetime(2027, 3, 1, 12, 0, tzinfo=UTC).timestamp()  # stage start; devices update at T0
SOAKED = T0 + 700  # past soak_s = 600
GATES = Gates(stages=(10, 50, 100), soak_s=600, max_p95_ratio=1.2, max_error_rate=0.01, stage_timeout_s=3600,
              on_fail="abort")


# -- builders ------------------------------------------------------------------------------------------


def dev(rank: int) -> str:
    return f"dev-{rank:04d}"


def roster(n: int, in_stage: int, status: MemberStatus = "updated", *, ab: bool = False,
           over: dict[int, dict[str, Any]] | None = None) -> tuple[Member, ...]:
    """n members by rank; the first ``in_stage`` have ``status`` (updated at T0), the rest wait.
    ``over={3: {"online": False}}`` overrides fields of rank 3."""
    out = []
    for r in range(n):
        s: MemberStatus = status if r < in_stage else "waiting"
        m = Member(dev(r), r, s, arm="b" if ab and r % 2 else "a",
                   assigned_at=T0 if s != "waiting" else None, updated_at=T0 if s == "updated" else None)
        if over and r in over:
            m = replace(m, **over[r])
        out.append(m)
    return tuple(out)


def view(members: tuple[Member, ...], *, gates: Gates = GATES, stage: int = 0, phase: str = "serve",
         state: str = "running", phase_started: float = T0) -> RolloutView:
    return RolloutView(id=7, model="digits", version="2.0", state=state, stage=stage, phase=phase,  # type: ignore[arg-type]
                       stage_started_at=T0, phase_started_at=phase_started, state_version=3, gates=gates,
                       members=members, previous="1.0")


def device_figs(ids: Iterable[str], *, p95: float = 0.1, err: float = 0.0, acc: float | None = None,
                n: int = 500, seed: int = 0, version: str = "2.0") -> dict[str, DeviceFigures]:
    rng = np.random.default_rng(seed)
    out = {}
    for d in ids:
        a = None if acc is None else float(np.clip(rng.normal(acc, 0.01), 0, 1))
        out[d] = DeviceFigures(d, version, inferences=n, errors=int(rng.binomial(n, err)),
                               p95_s=float(rng.lognormal(math.log(p95), 0.05)), psi_max=float(rng.uniform(0, 0.05)),
                               accuracy=a, labelled=n if acc is not None else 0)
    return out


def figs(cand: Iterable[str], base: Iterable[str], *, p95: tuple[float, float] = (0.1, 0.1),
         err: tuple[float, float] = (0.0, 0.0), acc: tuple[float, float] | None = None) -> Figures:
    return Figures(
        since=T0, until=SOAKED,
        candidate=device_figs(cand, p95=p95[0], err=err[0], acc=acc[0] if acc else None, seed=1),
        baseline=device_figs(base, p95=p95[1], err=err[1], acc=acc[1] if acc else None, seed=2, version="1.0"),
    )


def ids(ranks: Iterable[int]) -> list[str]:
    return [dev(r) for r in ranks]


def shadow_figs(ranks: Iterable[int], compared: int, agreed: int) -> Figures:
    return Figures(since=T0, until=SOAKED, shadow={
        d: DeviceFigures(d, "1.0", inferences=1000, shadow_compared=compared, shadow_agreed=agreed) for d in ids(ranks)})


def gate(d: Decision, name: str) -> GateResult:
    return next(g for g in d.gates if g.name == name)


# -- the decision table --------------------------------------------------------------------------------

SHADOW = replace(GATES, shadow_s=300.0, min_agreement=0.98)
ACCURACY = replace(GATES, min_accuracy_ratio=0.97)
TINY = replace(GATES, stages=(1, 10, 100))
MARGINAL_CAND = Figures(since=T0, until=SOAKED, candidate={
    d: DeviceFigures(d, "2.0", inferences=500, p95_s=p) for d, p in zip(ids(range(3)), (0.08, 0.12, 0.17), strict=True)
} | {d: DeviceFigures(d, "2.0", inferences=10, p95_s=0.1) for d in ids(range(3, 10))},  # too few inferences
    baseline=device_figs(ids(range(10, 100)), seed=2, version="1.0"))


@dataclass(frozen=True)
class Case:
    view: RolloutView
    figures: Figures
    now: float
    action: str
    words: tuple[str, ...] = ()
    check: Callable[[Decision], bool] = lambda d: True


CASES = [
    pytest.param(Case(view(roster(100, 0)), figs([], []), T0 + 1, "assign", ("assign version 2.0 to 10",),
                      lambda d: d.assign == tuple(ids(range(10))) and d.arm_b == ()), id="new-stage-assigns-its-members"),
    pytest.param(Case(view(roster(100, 10)), figs(ids(range(10)), ids(range(10, 100))), T0 + 300, "wait",
                      ("soak", "300s < 600s")), id="good-version-soaking-waits"),
    pytest.param(Case(view(roster(100, 10)), figs(ids(range(10)), ids(range(10, 100))), SOAKED, "advance",
                      ("stage 1 (10%)", "advance to stage 2 (50%)", "p95 ratio"),
                      lambda d: d.stage == 1 and gate(d, "p95_ratio").status == "pass"), id="good-version-soaked-advances"),
    pytest.param(Case(view(roster(100, 10)), figs(ids(range(10)), ids(range(10, 100)), p95=(0.2, 0.1)), SOAKED,
                      "abort", ("stage 1 (10%): p95 ratio 2", "> 1.2 with 10 vs 90 devices", ": abort"),
                      lambda d: gate(d, "p95_ratio").low is not None and gate(d, "p95_ratio").low > 1.8),  # type: ignore[operator]
                 id="2x-latency-fails-p95"),
    pytest.param(Case(view(roster(100, 10)), figs(ids(range(10)), ids(range(10, 100)), p95=(0.2, 0.1)), T0 + 60,
                      "abort", ("p95 ratio",)), id="p95-fails-even-before-soak"),
    pytest.param(Case(view(roster(100, 10)), figs(ids(range(10)), ids(range(10, 100)), err=(0.08, 0.001)), SOAKED,
                      "abort", ("error rate difference",)), id="error-rate-rise-fails"),
    pytest.param(Case(view(roster(100, 10)), MARGINAL_CAND, SOAKED, "wait", ("waiting", "p95 ratio", "straddles 1.2"),
                      lambda d: gate(d, "p95_ratio").n_candidate == 3), id="marginal-data-waits"),
    pytest.param(Case(view(roster(100, 10)), MARGINAL_CAND, T0 + 3601, "abort", ("stage timeout", "straddles")),
                 id="marginal-data-times-out-into-on-fail"),
    pytest.param(Case(view(roster(100, 10), gates=replace(GATES, on_fail="pause")), MARGINAL_CAND, T0 + 3601, "pause",
                      ("stage timeout",)), id="timeout-pauses-when-on-fail-is-pause"),
    pytest.param(Case(view(roster(100, 10)), figs(ids(range(1)), ids(range(10, 100))), SOAKED, "wait",
                      ("p95 ratio: waiting for data: 1 candidate and 90 baseline", ">= 50 inferences")),
                 id="too-few-devices-with-samples-waits"),
    pytest.param(Case(view(roster(200, 2, over={1: {"status": "failed", "updated_at": None}}), gates=TINY),
                      figs(ids(range(1)), ids(range(2, 200))), SOAKED, "abort", ("failure 1 of 2 (50%) > 5%",)),
                 id="tiny-stage-one-failure-in-two-fails"),
    pytest.param(Case(view(roster(100, 50, over={7: {"status": "failed", "updated_at": None}}), stage=1),
                      figs([d for d in ids(range(50)) if d != dev(7)], ids(range(50, 100))), SOAKED, "advance",
                      ("failure 1 of 50 (2%) <= 5%",), lambda d: d.stage == 2), id="one-failure-in-fifty-passes"),
    pytest.param(Case(view(roster(100, 10, over={r: {"status": "failed"} for r in range(10, 15)}), stage=1),
                      figs(ids(range(10)), ids(range(50, 100))), T0 + 60, "abort", ("failure 5 of 50 (10%)",),
                      lambda d: d.assign == ()), id="failure-beats-assigning-due-members"),
    pytest.param(Case(view(roster(100, 10), gates=SHADOW, phase="shadow"), shadow_figs(range(10), 200, 180), T0 + 400,
                      "abort", ("agreement 0.9", "< 0.98", "over 2000 comparisons on 10 devices")),
                 id="shadow-disagreement-fails"),
    pytest.param(Case(view(roster(100, 10), gates=SHADOW, phase="shadow"), shadow_figs(range(10), 500, 500), T0 + 400,
                      "promote_shadow", ("agreement 1",),
                      lambda d: gate(d, "p95_ratio").status == "skip"), id="shadow-agreement-promotes"),
    pytest.param(Case(view(roster(100, 10), gates=SHADOW, phase="shadow"), shadow_figs(range(10), 500, 500), T0 + 200,
                      "wait", ("soak", "in shadow", "< 300s")), id="shadow-needs-shadow-s"),
    pytest.param(Case(view(roster(100, 10), gates=SHADOW, phase="shadow"), shadow_figs(range(10), 20, 20), T0 + 400,
                      "wait", ("agreement: waiting for data: 0 shadow devices",)), id="shadow-short-of-comparisons-waits"),
    pytest.param(Case(view(roster(100, 10), gates=ACCURACY),
                      figs(ids(range(10)), ids(range(10, 100)), acc=(0.80, 0.95)), SOAKED, "abort",
                      ("accuracy ratio 0.8", "< 0.97")), id="accuracy-drop-fails"),
    pytest.param(Case(view(roster(100, 10), gates=ACCURACY),
                      figs(ids(range(10)), ids(range(10, 100)), acc=(0.95, 0.95)), SOAKED, "advance",
                      ("accuracy ratio", ">= 0.97")), id="same-accuracy-passes"),
    pytest.param(Case(view(roster(100, 100), stage=2), Figures(since=T0, until=SOAKED), SOAKED, "complete",
                      ("stage 3 (100%)", "complete"),
                      lambda d: all(gate(d, n).status == "skip" and "no baseline left" in gate(d, n).detail
                                    for n in ("p95_ratio", "error_rate"))), id="last-stage-no-baseline-completes"),
    pytest.param(Case(view(roster(100, 100, over={r: {"status": "failed"} for r in range(6)}), stage=2),
                      Figures(since=T0, until=SOAKED), SOAKED, "abort", ("stage 3 (100%): failure 6 of 100",)),
                 id="last-stage-judged-on-failure"),
    pytest.param(Case(view(roster(50, 1), gates=replace(GATES, stages=(1, 100))), figs(ids(range(1)), ids(range(1, 50))),
                      SOAKED, "advance", ("soak",),
                      lambda d: "too few devices to compare (1 online in the stage" in gate(d, "p95_ratio").detail),
                 id="one-device-stage-judged-on-soak-and-failure"),
    pytest.param(Case(view(roster(3, 2), gates=replace(GATES, stages=(50, 100))), figs(ids(range(2)), ids([2])),
                      SOAKED, "advance", (),
                      lambda d: "2 online in the stage, 1 outside" in gate(d, "error_rate").detail),
                 id="one-baseline-device-left-skips-comparison"),
    pytest.param(Case(view(roster(100, 10, status="waiting", over={r: {"online": False} for r in range(10)})),
                      figs([], []), T0 + 100, "wait", ("no online member",)), id="stage-with-no-online-member-waits"),
    pytest.param(Case(view(roster(100, 10, status="waiting", over={r: {"online": False} for r in range(10)})),
                      figs([], []), T0 + 3601, "abort", ("stage timeout",)), id="no-online-member-times-out"),
    pytest.param(Case(view(roster(100, 8)[:8] + roster(100, 0, over={r: {"online": False} for r in (8, 9)})[8:]),
                      figs(ids(range(8)), ids(range(10, 100))), SOAKED, "advance", ("8 online members serving",)),
                 id="offline-members-do-not-stall"),
    pytest.param(Case(view(roster(100, 10), state="paused"), figs([], []), SOAKED, "wait", ("is paused",)),
                 id="paused-rollout-waits"),
]


@pytest.mark.parametrize("case", CASES)
def test_decide(case: Case) -> None:
    d = decide(case.view, case.figures, case.now)
    assert d.action == case.action, d.reason
    for w in case.words:
        assert w in d.reason, d.reason
    assert case.check(d), d
    json.dumps(codec.decision_to_json(d))  # what the audit log stores


def test_reason_is_one_sentence_with_the_numbers() -> None:
    d = decide(view(roster(100, 10)), figs(ids(range(10)), ids(range(10, 100)), p95=(0.2, 0.1)), SOAKED)
    g = gate(d, "p95_ratio")
    assert g.p_value is not None and g.p_value < 1e-5 and g.n_candidate == 10 and g.n_baseline == 90
    assert g.samples_candidate == 5000 and "\n" not in d.reason
    assert f"p={judge._p(g.p_value)}" in d.reason and "e-" in judge._p(g.p_value)


# -- A/B -----------------------------------------------------------------------------------------------

AB = replace(GATES, ab_version="2.0b", hold_s=3600.0)


def test_ab_stage_assigns_arm_b() -> None:
    d = decide(view(roster(100, 0, ab=True), gates=AB), figs([], []), T0 + 1)
    assert d.action == "assign" and d.assign == tuple(ids(range(10)))
    assert d.arm_b == tuple(ids(range(1, 10, 2))) and "5 of them 2.0b" in d.reason


def test_arm_b_only_in_the_ab_stage() -> None:
    d = decide(view(roster(100, 10, ab=True), gates=AB, stage=1), figs([], []), T0 + 1)
    assert d.action == "assign" and d.arm_b == ()


def _ab_figures(p95_b: float) -> Figures:
    f = figs(ids(range(0, 10, 2)), ids(range(10, 100)))
    return replace(f, candidate_b=device_figs(ids(range(1, 10, 2)), p95=p95_b, seed=3, version="2.0b"))


def test_ab_figures_report_a_significant_difference_without_failing() -> None:
    d = decide(view(roster(100, 10, ab=True), gates=AB), _ab_figures(0.2), SOAKED)
    assert d.action == "hold", d.reason
    ab = [g for g in d.gates if g.name == "ab"]
    p95 = next(g for g in ab if "p95" in g.detail)
    assert p95.estimate is not None and 1.8 < p95.estimate < 2.2
    assert p95.low is not None and p95.low > 1 and p95.p_value is not None and p95.p_value < 0.05
    assert "significant" in p95.detail and "not significant" not in p95.detail
    err = next(g for g in ab if "error rate" in g.detail)
    assert "not significant" in err.detail
    assert all(g.status != "fail" for g in ab)


def test_ab_same_versions_not_significant() -> None:
    d = decide(view(roster(100, 10, ab=True), gates=AB), _ab_figures(0.1), SOAKED)
    p95 = next(g for g in d.gates if g.name == "ab" and "p95" in g.detail)
    assert "not significant" in p95.detail


@pytest.mark.parametrize(("now", "action"), [(SOAKED + 100, "wait"), (SOAKED + 3600, "advance")],
                         ids=["holding", "hold-over-advances"])
def test_ab_hold(now: float, action: str) -> None:
    v = view(roster(100, 10, ab=True), gates=AB, phase="hold", phase_started=SOAKED)
    d = decide(v, _ab_figures(0.1), now)
    assert d.action == action, d.reason
    if action == "advance":
        assert d.stage == 1 and "A/B p95 ratio b/a" in d.reason


def test_ab_without_hold_advances() -> None:
    d = decide(view(roster(100, 10, ab=True), gates=replace(AB, hold_s=None)), _ab_figures(0.1), SOAKED)
    assert d.action == "advance"


def test_hold_does_not_time_out() -> None:
    v = view(roster(100, 10, ab=True), gates=replace(AB, hold_s=86400.0), phase="hold", phase_started=SOAKED)
    assert decide(v, _ab_figures(0.1), T0 + 7200).action == "wait"


# -- membership, concurrency, windows ------------------------------------------------------------------


def test_stage_members_are_a_stable_prefix_without_skipped() -> None:
    members = roster(7, 0, over={2: {"status": "skipped", "detail": "pinned"}})
    v = view(members)
    assert [stage_size(v, k) for k in range(3)] == [1, 3, 6]  # ceil of 10%, 50%, 100% of 6
    s = [[m.device_id for m in stage_members(v, k)] for k in range(3)]
    assert s[0] == s[1][:1] and s[1] == s[2][:3] and dev(2) not in s[2]
    shuffled = view(tuple(reversed(members)))
    assert [m.device_id for m in stage_members(shuffled, 1)] == s[1]


def test_max_concurrent_caps_assignments() -> None:
    members = roster(100, 0, over={0: {"status": "assigned"}, 1: {"status": "assigned", "online": False}})
    v = view(members, gates=replace(GATES, max_concurrent=3))
    assert [m.device_id for m in due(v, T0)] == ids([2, 3])  # one in flight online; the offline one does not count
    d = decide(v, figs([], []), T0)
    assert d.action == "assign" and d.assign == tuple(ids([2, 3]))
    full = view(roster(100, 3, status="assigned"), gates=replace(GATES, max_concurrent=3))
    assert due(full, T0) == [] and decide(full, figs([], []), T0 + 10).action == "wait"


def _at(hh: int, mm: int) -> float:
    return datetime(2027, 3, 1, hh, mm, tzinfo=UTC).timestamp()


WINDOWED = (
    Member(dev(0), 0, "waiting", tags=("night",)),
    Member(dev(1), 1, "waiting", tags=()),
    Member(dev(2), 2, "waiting", tags=("day", "other")),
    Member(dev(3), 3, "waiting", tags=("night", "day")),
    Member(dev(4), 4, "waiting", tags=("night",), online=False),
)


@pytest.mark.parametrize(
    ("now", "expected"),
    [
        (_at(23, 30), [0, 1, 3]),
        (_at(0, 0), [0, 1, 3]),
        (_at(1, 59), [0, 1, 3]),
        (_at(2, 0), [1]),  # the end is excluded
        (_at(12, 0), [1, 2, 3]),
        (_at(21, 59), [1]),
    ],
    ids=["before-midnight", "midnight", "just-before-end", "end", "midday", "just-before-start"],
)
def test_maintenance_windows_cross_midnight(now: float, expected: list[int]) -> None:
    g = replace(GATES, stages=(100,), windows=(("night", "22:00-02:00"), ("day", "08:00-17:00")))
    v = view(WINDOWED, gates=g)
    assert [m.device_id for m in due(v, now)] == ids(expected)


def test_offline_members_are_not_due() -> None:
    v = view(roster(100, 0, over={0: {"online": False}}))
    assert dev(0) not in [m.device_id for m in due(v, T0)] and len(due(v, T0)) == 9


def test_initial_phase() -> None:
    assert judge.initial_phase(GATES) == "serve" and judge.initial_phase(SHADOW) == "shadow"


# -- codec ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("30", 30.0), ("90s", 90.0), ("10m", 600.0), ("1h", 3600.0), ("1d", 86400.0), ("1h30m", 5400.0),
     ("1.5s", 1.5), ("250ms", 0.25), (" 2M ", 120.0), (45, 45.0)],
    ids=lambda v: repr(v),
)
def test_parse_duration(text: str, seconds: float) -> None:
    assert codec.parse_duration(text) == seconds


@pytest.mark.parametrize("bad", ["", "ten", "10x", "-5", "5m-", "m5", "inf", "1h 30m"], ids=repr)
def test_parse_duration_bad(bad: str) -> None:
    with pytest.raises(ValueError, match="duration"):
        codec.parse_duration(bad)


@pytest.mark.parametrize(("text", "value"), [("5%", 0.05), ("0.05", 0.05), ("100%", 1.0), ("0", 0.0), (" 2.5 % ", 0.025)],
                         ids=repr)
def test_parse_ratio(text: str, value: float) -> None:
    assert codec.parse_ratio(text) == pytest.approx(value)


@pytest.mark.parametrize("bad", ["5", "abc", "-1%", "nan", ""], ids=repr)
def test_parse_ratio_bad_names_the_value(bad: str) -> None:
    with pytest.raises(ValueError, match=f"ratio {bad!r}"):
        codec.parse_ratio(bad)


def test_parse_ratio_above_one_when_allowed() -> None:
    assert codec.parse_ratio("1.2", upper=None) == 1.2


@pytest.mark.parametrize(
    ("patch", "field"),
    [
        ({"stages": [10, 5, 100]}, "gates.stages"),
        ({"stages": [10, 50]}, "gates.stages"),
        ({"stages": []}, "gates.stages"),
        ({"stages": [0, 100]}, "gates.stages"),
        ({"stages": ["10", 100]}, "gates.stages"),
        ({"soak_s": "10m"}, "gates.soak_s"),
        ({"soak_s": -1}, "gates.soak_s"),
        ({"max_failure": 2}, "gates.max_failure"),
        ({"max_p95_ratio": 0}, "gates.max_p95_ratio"),
        ({"max_error_rate": True}, "gates.max_error_rate"),
        ({"min_agreement": None}, "gates.min_agreement"),
        ({"on_fail": "explode"}, "gates.on_fail"),
        ({"min_devices": 0}, "gates.min_devices"),
        ({"min_samples": 1.5}, "gates.min_samples"),
        ({"confidence": 1}, "gates.confidence"),
        ({"stage_timeout_s": 0}, "gates.stage_timeout_s"),
        ({"max_concurrent": True}, "gates.max_concurrent"),
        ({"ab_version": ""}, "gates.ab_version"),
        ({"hold_s": 60}, "gates.hold_s"),
        ({"windows": [["site", "25:00-01:00"]]}, "gates.windows"),
        ({"windows": [["site", "10:00-10:00"]]}, "gates.windows"),
        ({"windows": [["site"]]}, "gates.windows"),
        ({"windows": "site"}, "gates.windows"),
        ({"bogus": 1}, "bogus"),
    ],
    ids=lambda v: v if isinstance(v, str) else json.dumps(v),
)
def test_gates_from_json_names_the_bad_field(patch: dict[str, object], field: str) -> None:
    data = codec.gates_to_json(GATES) | patch
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        codec.gates_from_json(data)


def test_gates_from_json_defaults_missing_fields() -> None:
    assert codec.gates_from_json({}) == Gates()
    assert codec.gates_from_json({"stages": [5, 25, 100], "soak_s": 10}) == Gates(stages=(5, 25, 100), soak_s=10.0)


_stages = st.lists(st.integers(1, 99), max_size=4, unique=True).map(lambda s: (*sorted(s), 100))
_opt_ratio = st.none() | st.floats(0.001, 1.0)
_window = st.tuples(st.integers(0, 23), st.integers(0, 59), st.integers(1, 23), st.integers(0, 59)).map(
    lambda t: f"{t[0]:02d}:{t[1]:02d}-{(t[0] + t[2]) % 24:02d}:{t[3]:02d}")
_gates = st.builds(
    Gates,
    stages=_stages,
    soak_s=st.floats(0, 1e6),
    max_failure=st.floats(0, 1),
    max_p95_ratio=st.none() | st.floats(1.0, 10.0),
    max_error_rate=_opt_ratio,
    max_drift=st.none() | st.floats(0, 5),
    min_accuracy_ratio=st.none() | st.floats(0.5, 1.0),
    shadow_s=st.none() | st.floats(0, 1e5),
    min_agreement=st.floats(0, 1),
    ab_version=st.none(),
    hold_s=st.none(),
    stage_timeout_s=st.floats(1, 1e6),
    on_fail=st.sampled_from(["pause", "abort"]),
    min_devices=st.integers(1, 50),
    min_samples=st.integers(1, 10_000),
    confidence=st.floats(0.5, 0.999),
    max_concurrent=st.none() | st.integers(1, 1000),
    windows=st.lists(st.tuples(st.sampled_from(["site-a", "lab"]), _window), max_size=3).map(tuple),
).filter(lambda g: all(codec.parse_window(w) for _, w in g.windows) if g.windows else True)


@settings(max_examples=200, deadline=None)
@given(_gates, st.none() | st.tuples(st.text(min_size=1, max_size=10), st.none() | st.floats(0, 1e6)))
def test_gates_codec_round_trip(g: Gates, ab: tuple[str, float | None] | None) -> None:
    if ab is not None:
        g = replace(g, ab_version=ab[0], hold_s=ab[1])
    data = json.loads(json.dumps(codec.gates_to_json(g)))
    assert codec.gates_from_json(data) == g


@settings(max_examples=200, deadline=None)
@given(st.builds(
    GateResult,
    name=st.sampled_from(["soak", "p95_ratio", "ab"]),
    status=st.sampled_from(["pass", "fail", "wait", "skip"]),
    threshold=st.none() | st.floats(allow_nan=False, allow_infinity=False),
    estimate=st.none() | st.floats(allow_nan=False, allow_infinity=False),
    low=st.none() | st.floats(allow_nan=False, allow_infinity=False),
    high=st.none() | st.floats(allow_nan=False, allow_infinity=False),
    p_value=st.none() | st.floats(0, 1),
    n_candidate=st.integers(0, 10**6),
    n_baseline=st.integers(0, 10**6),
    samples_candidate=st.integers(0, 10**9),
    samples_baseline=st.integers(0, 10**9),
    detail=st.text(max_size=50),
))
def test_gate_result_codec_round_trip(r: GateResult) -> None:
    assert codec.gate_result_from_json(json.loads(json.dumps(codec.gate_result_to_json(r)))) == r


def test_gate_result_unbounded_interval_becomes_null() -> None:
    r = GateResult("p95_ratio", "wait", low=-math.inf, high=math.inf, estimate=1.1)
    d = codec.gate_result_to_json(r)
    assert d["low"] is None and d["high"] is None and json.dumps(d, allow_nan=False)


@pytest.mark.parametrize(("patch", "field"), [({"status": "maybe"}, "status"), ({"low": "1"}, "low"),
                                              ({"n_candidate": -1}, "n_candidate"), ({"extra": 1}, "extra")],
                         ids=["status", "low", "n_candidate", "unknown"])
def test_gate_result_from_json_names_the_bad_field(patch: dict[str, object], field: str) -> None:
    data = codec.gate_result_to_json(GateResult("soak", "pass")) | patch
    with pytest.raises(ValueError, match=field):
        codec.gate_result_from_json(data)


def test_every_gate_field_is_in_the_codec() -> None:
    assert set(codec.gates_to_json(GATES)) == {f.name for f in dataclasses.fields(Gates)}
