"""The updater's persisted state, ``STATE_DIR/update.json``: what is installed, what is under way, what
was refused, and the events not yet delivered.

The state machine writes this file (atomically and durably: :func:`edgefleet.durable.atomic_write_bytes`)
*before* it runs a phase, so that after a power cut or a SIGKILL the agent knows what it was doing and
either resumes (a download) or redoes (an install, a self-test) the phase. ``schema`` is checked; a file
this agent cannot read is moved aside (``update.json.corrupt-TIME``) and the installed models are
found again from ``models/NAME/VERSION/target.json``, so a bad file never stops serving.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError

from edgefleet.durable import atomic_write_bytes

__all__ = ["SCHEMA", "Installed", "Pending", "RefusedTarget", "UpdateState", "load_state", "save_state"]

log = logging.getLogger(__name__)

SCHEMA = 1
FILE = "update.json"
MAX_OUTBOX = 500  # events kept while the server cannot be reached (the oldest are dropped, and counted)
Phase = Literal["download", "install", "selftest", "switch", "probation", "commit", "rollback"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Installed(_Strict):
    """One installed version: ``models/NAME/VERSION/bundle.efb`` (its bytes are the signed target's)."""

    name: str
    version: str
    target: str  # NAME-VERSION.efb
    sha256: str
    length: int
    path: str  # the bundle file, relative to the state directory


class Pending(_Strict):
    """The update under way: one target, the phase it is in, and how it has gone so far."""

    phase: Phase
    name: str
    version: str
    target: str
    sha256: str
    length: int
    role: str = "serve"
    attempts: int = 0  # transient failures so far
    not_before: float = 0.0  # wall clock: the next attempt waits until then (back-off)
    probation_started: float | None = None
    probation_restarts: int = 0  # agent starts seen while in probation
    reason: str | None = None  # why a rollback is under way
    detail: str | None = None


class RefusedTarget(_Strict):
    target: str
    reason: str
    detail: str
    at: float


class UpdateState(_Strict):
    schema_: int = Field(default=SCHEMA, alias="schema")
    current: dict[str, Installed] = Field(default_factory=dict)  # name -> the version served
    previous: dict[str, Installed] = Field(default_factory=dict)  # name -> the version kept for rollback
    # name -> the candidate self-tested and run beside the served version (director role "shadow"); a
    # file written before shadow mode has no such key (the default: none)
    shadow: dict[str, Installed] = Field(default_factory=dict)
    pending: Pending | None = None
    refused: dict[str, RefusedTarget] = Field(default_factory=dict)  # sha256 -> why
    last_failure: dict[str, Any] | None = None
    etag: str | None = None
    last_refresh: float | None = None  # wall clock of the last successful TUF refresh
    last_checkin: float | None = None
    event_seq: int = 0
    outbox: list[dict[str, Any]] = Field(default_factory=list)
    dropped_events: int = 0

    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    # With MQTT telemetry: puts the event on the telemetry outbox and returns the seq it got there, so an
    # event has one seq whether the broker or the HTTP report (the fallback) delivers it.
    _sequencer: Any = PrivateAttr(default=None)

    def event(self, kind: str, **data: Any) -> dict[str, Any]:
        """Queue an event for the server (``seq`` grows by one each time; the outbox is bounded)."""
        e = {"at": _iso(time.time()), "kind": kind, **{k: v for k, v in data.items() if v is not None}}
        if "detail" in e:
            e["detail"] = str(e["detail"])[:2000]
        seq = None
        if self._sequencer is not None:
            try:
                seq = int(self._sequencer(e))
            except Exception as err:  # the queue full or broken: the HTTP report still carries it
                log.warning("event %s: not queued for MQTT (%s)", kind, err)
        self.event_seq = seq if seq is not None and seq > self.event_seq else self.event_seq + 1
        e = {"seq": self.event_seq, **e}
        self.outbox.append(e)
        if len(self.outbox) > MAX_OUTBOX:
            drop = len(self.outbox) - MAX_OUTBOX
            del self.outbox[:drop]
            self.dropped_events += drop
        log.info("update event %s %s", kind, " ".join(f"{k}={v}" for k, v in data.items() if v is not None))
        return e


def _iso(t: float) -> str:
    from datetime import UTC, datetime

    return datetime.fromtimestamp(t, UTC).isoformat()


def state_path(state_dir: Path) -> Path:
    return state_dir / FILE


def save_state(state_dir: Path, st: UpdateState) -> None:
    data = st.model_dump(mode="json", by_alias=True)
    atomic_write_bytes(state_path(state_dir), (json.dumps(data, indent=1, sort_keys=True) + "\n").encode(),
                       mode=0o600)


def load_state(state_dir: Path) -> UpdateState:
    """The persisted state; a fresh one when there is none. A file that is not a state this agent reads
    is moved aside with a warning and the installed versions are recovered from ``models/``."""
    path = state_path(state_dir)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return UpdateState(current=_scan_installed(state_dir))
    try:
        data = json.loads(raw)
        if not isinstance(data, dict) or data.get("schema") != SCHEMA:
            raise ValueError(f"schema {data.get('schema') if isinstance(data, dict) else None!r}, expected {SCHEMA}")
        return UpdateState.model_validate(data)
    except (ValueError, ValidationError) as e:
        aside = path.with_name(f"{FILE}.corrupt-{int(time.time())}")
        os.replace(path, aside)
        log.warning("%s: not an update state this agent reads (%s); moved to %s, recovering from models/",
                    path, str(e).splitlines()[0][:200], aside.name)
        return UpdateState(current=_scan_installed(state_dir))


def _scan_installed(state_dir: Path) -> dict[str, Installed]:
    """The newest complete install of each model under ``models/`` (each has a ``target.json``)."""
    from edgefleet.agent.updater.install import read_installed

    found: dict[str, Installed] = {}
    for inst in read_installed(state_dir):
        best = found.get(inst.name)
        if best is None or _version_key(inst.version) > _version_key(best.version):
            found[inst.name] = inst
    return found


def _version_key(v: str) -> tuple[Any, ...]:
    parts = v.split("-")[0].split("+")[0].split(".")
    return tuple(int(p) if p.isdigit() else 0 for p in parts)
