"""Shadow mode end to end: a real server signs a shadow target (role ``shadow`` in the device's director
metadata) and a real agent process installs and self-tests the candidate, runs it beside the served
version on live inputs and reports agreement in its telemetry (read from a Mosquitto of the test's
own), while only the served version answers; then promotion, removal and a restart.

A shadow is assigned the way a rollout does it: :func:`edgefleet.server.rollouts.assign.set_shadow` /
``set_assignment`` on the server's database, which signs the device's director metadata in the same
transaction (the server process keeps running; the agent checks in every half second)."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from sqlalchemy import select
from updater._fleet import Agent, Fleet, models

from edgefleet.agent.updater.state import Installed, UpdateState, load_state
from edgefleet.agent.updater.status import describe, format_status
from edgefleet.converters.package import package_model

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from telemetry._mqtt import Broker, Subscriber, mosquitto_binary

FAST = {"checkin_interval": 0.5, "probation_inferences": 0, "probation_seconds": 0.2}
NAME = models.MODEL_NAME



def _package(tmp: Path, onnx_bytes: bytes, version: str) -> Path:
    folder = tmp / f"pkg-{version}"
    folder.mkdir(parents=True)
    src = folder / "model.onnx"
    src.write_bytes(onnx_bytes)
    path, _ = package_model(src, NAME, version, out=folder,
                            golden={"x": np.stack([models.sample_input(i) for i in range(4)])})
    return path


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """``served`` 1.0.0; ``same`` 1.0.1 (its weights); ``rotated`` 1.1.0 (each digit called the next one);
    ``raises`` 7.0.0 (raises on :func:`models.failing_input`)."""
    tmp = tmp_path_factory.mktemp("shadow-bundles")
    return {
        "served": models.bundle("good", "1.0.0", tmp / "served"),
        "same": _package(tmp, models.onnx_model("good", "1.0.0"), "1.0.1"),
        "rotated": _package(tmp, models.onnx_model("good", "1.0.0", shift=1), "1.1.0"),
        "raises": models.bundle("errors_in_probation", "7.0.0", tmp / "raises"),
    }


class Shadowed:
    """A fleet with a broker, a subscriber on it, and one agent publishing telemetry every second."""

    def __init__(self, root: Path, bundles: dict[str, Path]) -> None:
        self.broker = Broker(mosquitto_binary(), root / "broker")
        self.sub = Subscriber(self.broker.port)
        self.fleet = Fleet(root / "fleet").start()
        for b in bundles.values():
            self.fleet.push(b)
        mqtt = {"fleet": {"host": "127.0.0.1", "port": self.broker.port, "tls": False, "telemetry_interval_s": 1.0}}
        self.agent: Agent = self.fleet.agent(bundles["served"], updates=FAST, config={"mqtt": mqtt})
        assert self.agent.device_id is not None
        self.device_id: str = self.agent.device_id

    def close(self) -> None:
        try:
            self.fleet.close()
        finally:
            self.sub.close()
            self.broker.stop()

    # the server's database, as a rollout writes it -------------------------------------------------

    def assign(self, serve: str | None, shadow: str | None) -> None:
        """Serve ``serve`` (None: keep the assignment's) and run ``shadow`` beside it (None: no shadow)."""
        from edgefleet.server.db import make_engine, make_sessionmaker
        from edgefleet.server.models import ModelVersion
        from edgefleet.server.rollouts.assign import OPERATOR, set_assignment, set_shadow
        from edgefleet.server.tuf.director import DirectorRepository
        from edgefleet.server.tuf.keys import load_online_keys

        data = self.fleet.server.data
        engine = make_engine(f"sqlite:///{(data / 'edgefleet.db').resolve()}")
        try:
            sessions = make_sessionmaker(engine)
            director = DirectorRepository(sessions, load_online_keys(data))
            with sessions.begin() as s:
                def vid(v: str | None) -> int | None:
                    if v is None:
                        return None
                    got = s.scalar(select(ModelVersion.id).where(ModelVersion.name == NAME, ModelVersion.version == v))
                    assert got is not None, f"registry: no {NAME} {v}"
                    return int(got)

                if serve is not None:
                    served = vid(serve)
                    assert served is not None
                    set_assignment(s, director, self.device_id, NAME, served, OPERATOR, shadow_version_id=vid(shadow))
                else:
                    assert set_shadow(s, director, self.device_id, NAME, vid(shadow)), "no assignment to shadow"
        finally:
            engine.dispose()

    # what the device says -----------------------------------------------------------------------------

    def kinds_since(self, n: int) -> list[tuple[str, str | None]]:
        return [(e["kind"], e.get("version")) for e in self.fleet.events(self.device_id)[n:]]

    def entries(self, since: int = 0) -> list[dict[str, Any]]:
        """The ``digits`` entries of the telemetry messages from the ``since``-th on."""
        return [m for r in self.sub.on("/telemetry")[since:] for m in r.body["models"] if m["name"] == NAME]

    def entries_after(self, kind: str, version: str) -> list[dict[str, Any]]:
        """The ``digits`` entries of telemetry built after the device's event ``kind`` of ``version``: one
        sequence numbers both, and the first message past the event may have been measured before it."""
        seq = max(e["seq"] for e in self.fleet.events(self.device_id)
                  if e["kind"] == kind and e.get("version") == version)
        later = sorted((r for r in self.sub.on("/telemetry") if r.body["seq"] > seq), key=lambda r: r.body["seq"])
        return [m for r in later[1:] for m in r.body["models"] if m["name"] == NAME]

    def shadow_totals(self, version: str, since: int = 0) -> dict[str, float]:
        """The shadow blocks for candidate ``version`` summed over the messages from ``since`` on."""
        out = {"compared": 0, "agreed": 0, "skipped": 0, "abs_error_sum": 0.0, "errors": 0}
        for e in self.entries(since):
            sh = e.get("shadow")
            if sh and sh["version"] == version:
                for k in out:
                    out[k] += sh.get(k, 0)
        return out

    def wait_compared(self, version: str, n: int, since: int = 0, timeout: float = 60) -> dict[str, float]:
        def enough() -> dict[str, float] | None:
            t = self.shadow_totals(version, since)
            return t if t["compared"] >= n else None

        got: dict[str, float] = self.fleet.wait_for(enough, timeout, f"{n} inputs compared on the shadow {version}")
        return got


@pytest.fixture
def shadowed(tmp_path: Path, bundles: dict[str, Path]) -> Iterator[Shadowed]:
    s = Shadowed(tmp_path, bundles)
    try:
        yield s
    finally:
        s.close()


def test_a_shadow_candidate_runs_beside_the_served_version_only_the_served_one_answers_and_promotion_downloads_nothing(
    shadowed: Shadowed,
) -> None:
    sh, fleet, agent = shadowed, shadowed.fleet, shadowed.agent
    # the serve assignment and a shadow at once: the serve update goes first
    sh.assign(serve="1.0.0", shadow="1.1.0")
    fleet.wait_event(sh.device_id, "shadow.ok", timeout=60, version="1.1.0")
    kinds = sh.kinds_since(0)
    assert kinds.index(("update.committed", "1.0.0")) < kinds.index(("shadow.started", "1.1.0")), kinds
    assert agent.served_version() == "1.0.0"
    assert (agent.state_dir / "models" / NAME / "1.1.0" / "bundle.efb").is_file()
    state = json.loads((agent.state_dir / "update.json").read_text())
    assert state["shadow"][NAME]["version"] == "1.1.0" and state["current"][NAME]["version"] == "1.0.0"

    # a candidate that disagrees: counted, while every answer is the served version's
    with agent.load(rate=40) as load:
        rotated = sh.wait_compared("1.1.0", 10)
    assert set(load.versions()) == {"1.0.0"} and not load.failures(), load.failures()[:3]
    assert rotated["agreed"] <= 0.3 * rotated["compared"] and rotated["abs_error_sum"] > 0, rotated
    assert rotated["skipped"] > 0 and rotated["errors"] == 0  # 40 calls a second, 5 a second compared at most

    # a candidate that raises on these inputs: disagreements, and serving never notices
    n = len(fleet.events(sh.device_id))
    sh.assign(serve=None, shadow="7.0.0")
    fleet.wait_event(sh.device_id, "shadow.ok", timeout=60, version="7.0.0")
    assert ("shadow.stopped", "1.1.0") in sh.kinds_since(n)
    mark = len(sh.sub.on("/telemetry"))
    with agent.load(rate=40, inputs=lambda i: models.failing_input()) as load:
        raised = sh.wait_compared("7.0.0", 5, since=mark)
    assert set(load.versions()) == {"1.0.0"} and not load.failures(), load.failures()[:3]
    assert raised["agreed"] == 0 and raised["errors"] == raised["compared"], raised

    # an identical candidate agrees on every input
    sh.assign(serve=None, shadow="1.0.1")
    fleet.wait_event(sh.device_id, "shadow.ok", timeout=60, version="1.0.1")
    mark = len(sh.sub.on("/telemetry"))
    with agent.load(rate=40) as load:
        same = sh.wait_compared("1.0.1", 10, since=mark)
    assert set(load.versions()) == {"1.0.0"}
    assert same["agreed"] == same["compared"] and same["abs_error_sum"] == 0.0 and same["errors"] == 0, same

    # promotion: the same version now served; it is installed, so nothing is downloaded
    n = len(fleet.events(sh.device_id))
    sh.assign(serve="1.0.1", shadow=None)
    fleet.wait_event(sh.device_id, "update.committed", timeout=60, version="1.0.1")
    after = sh.kinds_since(n)
    assert after[0] == ("shadow.stopped", "1.0.1") and ("update.started", "1.0.1") in after, after
    assert not [k for k in after if k[0] == "download.ok"], after
    assert agent.served_version() == "1.0.1"
    installed = sorted(p.name for p in (agent.state_dir / "models" / NAME).iterdir())
    assert installed == ["1.0.0", "1.0.1"], installed  # the shadows before it went at the commit's cleanup
    with agent.load(rate=20):
        fleet.wait_for(lambda: any(e["version"] == "1.0.1" and e["inferences"]
                                   for e in sh.entries_after("shadow.stopped", "1.0.1")), 30, "telemetry of 1.0.1")
    assert not [e for e in sh.entries_after("shadow.stopped", "1.0.1") if e.get("shadow")]


def test_a_shadow_survives_a_restart_and_stops_when_the_director_drops_it_its_files_kept_until_cleanup(
    shadowed: Shadowed,
) -> None:
    sh, fleet, agent = shadowed, shadowed.fleet, shadowed.agent
    sh.assign(serve="1.0.0", shadow="1.1.0")
    fleet.wait_event(sh.device_id, "shadow.ok", timeout=60, version="1.1.0")
    status = describe(agent.state_dir)  # `edgefleet agent status` shows the candidate
    assert status["shadow"][NAME]["version"] == "1.1.0"
    assert any(line.startswith(f"shadow: {NAME} 1.1.0") for line in format_status(status))
    n = len(fleet.events(sh.device_id))
    agent.restart()
    mark = len(sh.sub.on("/telemetry"))
    with agent.load(rate=20) as load:
        sh.wait_compared("1.1.0", 5, since=mark)  # attached again from update.json
    assert set(load.versions()) == {"1.0.0"}
    again = sh.kinds_since(n)
    assert not [k for k in again if k[0] in ("shadow.started", "download.ok", "update.refused")], again

    n = len(fleet.events(sh.device_id))
    sh.assign(serve=None, shadow=None)
    fleet.wait_event(sh.device_id, "shadow.stopped", timeout=60, version="1.1.0")
    assert json.loads((agent.state_dir / "update.json").read_text())["shadow"] == {}
    with agent.load(rate=20):
        fleet.wait_for(lambda: any(e["inferences"] for e in sh.entries_after("shadow.stopped", "1.1.0")), 30,
                       "telemetry after the stop")
    assert not [e for e in sh.entries_after("shadow.stopped", "1.1.0") if e.get("shadow")]
    assert (agent.state_dir / "models" / NAME / "1.1.0").is_dir()  # kept until a cleanup...
    agent.restart()
    assert not (agent.state_dir / "models" / NAME / "1.1.0").exists()  # ...which a start does
    assert agent.served_version() == "1.0.0"


def test_an_update_state_written_before_shadow_mode_loads_with_no_shadow(tmp_path: Path) -> None:
    inst = Installed(name=NAME, version="1.0.0", target=f"{NAME}-1.0.0.efb", sha256="a" * 64, length=1,
                     path="models/digits/1.0.0/bundle.efb")
    old = UpdateState(current={NAME: inst}).model_dump(mode="json", by_alias=True)
    del old["shadow"]
    (tmp_path / "update.json").write_text(json.dumps(old))
    st = load_state(tmp_path)
    assert st.shadow == {} and st.current[NAME].version == "1.0.0"
    assert not list(tmp_path.glob("update.json.corrupt-*"))
