"""The rollout controller: the loop in the server that judges every active rollout and commits what
the decision core decides, one decision per rollout state however many replicas run it.

One pass (:meth:`RolloutController.tick`):

1. take or renew the lease ``rollouts`` (:mod:`.lease`); a replica that does not hold it does nothing;
2. for each rollout ``running`` or ``paused``: members moved on from what their devices reported
   (:func:`.collect.refresh_members`, committed on its own), the view and the judging window's figures
   read (:mod:`.collect`), :func:`.judge.decide`;
3. then in ONE transaction: the lease is still ours with the same token (:func:`.lease.still_held`,
   the row locked on PostgreSQL), the rollout is unchanged since it was read (:func:`.apply.cas` on
   the view's ``state_version``), and the decision is applied (:func:`.apply.apply_decision`). A lost
   lease or a lost compare-and-set is logged and the decision dropped: that is the fencing. A replica
   stopped between reading and committing (a long GC, SIGSTOP, a network partition) finds on waking
   that the lease has moved on, and even if it had not noticed, that the rollout's ``state_version``
   has: its stale decision changes nothing.

A ``wait`` only writes ``reason``, ``last_gates`` and ``last_judged_at`` (a conditional UPDATE on the
same ``state_version``, not raising it: a judgement every few seconds does not race the operator's
commands) and no audit entry. Devices whose assignment changed are told to check in after the commit.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import uuid
import weakref
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import datetime
from typing import TYPE_CHECKING, Any

from sqlalchemy import select, update

from edgefleet.server.models import Rollout, utcnow
from edgefleet.server.rollouts import apply, collect, judge, lease
from edgefleet.server.rollouts.codec import gate_result_to_json
from edgefleet.server.rollouts.types import ACTIVE_STATES, Decision
from edgefleet.server.telemetry.rollups import WINDOW

if TYPE_CHECKING:
    from edgefleet.server.state import ServerState
    from edgefleet.server.tuf.director import DirectorRepository

__all__ = ["ACTOR", "ASSIGN_BATCH", "LEASE", "Outcome", "RolloutController", "default_holder"]

log = logging.getLogger(__name__)

LEASE = "rollouts"  # the ControllerLease row's name
ACTOR = "controller"  # the audit log's actor for the controller's decisions
ASSIGN_BATCH = 50  # members assigned (director metadata signed) per transaction


def default_holder() -> str:
    """This replica's name in the lease: host, process and a random part (a restarted process is new)."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:12]}"


_COUNTERS: weakref.WeakKeyDictionary[Any, Any] = weakref.WeakKeyDictionary()


def _decisions_counter(registry: Any) -> Any:
    """``edgefleet_rollout_decisions{action, result}`` in ``registry``, registered once per registry (an
    app restarted on the same server state makes a second controller)."""
    counter = _COUNTERS.get(registry)
    if counter is None:
        from prometheus_client import Counter

        counter = Counter("edgefleet_rollout_decisions", "Rollout controller judgements by action and result "
                          "(committed, skipped, lease, cas, error)", ["action", "result"], registry=registry)
        _COUNTERS[registry] = counter
    return counter


@dataclass(frozen=True)
class Outcome:
    """What one rollout's judgement came to: ``committed`` (the decision was written), ``skipped`` (not
    running: nothing decided), ``lease`` (the lease was lost before the commit), ``cas`` (the rollout
    changed since it was read), ``error``."""

    rollout_id: int
    action: str
    result: str
    reason: str = ""
    devices: tuple[str, ...] = ()


class RolloutController:
    """The loop (see the module docstring). ``director_getter``: the director repositories to sign with
    (None when the server has no online TUF keys); ``interval`` and ``lease_ttl`` in seconds;
    ``clock``: the time now, aware UTC (tests inject one); ``notify``: told each device whose assignment
    changed, after the commit (default: ``notify_check_in`` through the server's ingester);
    ``registry``: a Prometheus registry to count decisions in (optional)."""

    def __init__(
        self,
        state: ServerState,
        director_getter: Callable[[], DirectorRepository | None],
        interval: float = 5.0,
        lease_ttl: float = 15.0,
        holder: str | None = None,
        clock: Callable[[], datetime] = utcnow,
        notify: Callable[[str], object] | None = None,
        registry: Any = None,
    ) -> None:
        if lease_ttl <= interval:
            raise ValueError(f"lease_ttl ({lease_ttl:g} s) must be above interval ({interval:g} s)")
        self.state = state
        self.sessions = state.sessions
        self.director_getter = director_getter
        self.interval = interval
        self.lease_ttl = lease_ttl
        self.holder = holder or default_holder()
        self.clock = clock
        self.notify = notify or self._notify_check_in
        self.online_window = float(state.settings.online_window)
        self.token: int | None = None  # the fencing token of the lease while we hold it
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._decisions = _decisions_counter(registry) if registry is not None else None

    def _notify_check_in(self, device_id: str) -> object:
        from edgefleet.server.telemetry.ingest import notify_check_in

        return notify_check_in(self.state, device_id)

    # -- lifecycle
    def start(self) -> None:
        self._thread = threading.Thread(target=self.run_forever, name="edgefleet-rollouts", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Stop after the pass in flight, and give the lease up so another replica takes over at once."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
        if self.token is not None:
            try:
                with self.sessions.begin() as s:
                    lease.release(s, LEASE, self.holder, self.token, self.clock())
            except Exception:
                log.exception("rollouts: the lease was not released (it expires by itself)")
            self.token = None

    def run_forever(self) -> None:
        while not self._stop.is_set():
            try:
                self.tick()
            except Exception:  # a database outage or a bug must not end the loop: the next pass retries
                log.exception("rollouts: a pass failed; retrying")
            self._stop.wait(self.interval)

    # -- one pass
    def tick(self) -> list[Outcome]:
        """One pass: the lease, then each active rollout judged (see the module docstring). Returns
        what each judgement came to (empty when another replica holds the lease)."""
        with self.sessions.begin() as s:
            token = lease.acquire(s, LEASE, self.holder, self.lease_ttl, self.clock())
        if token != self.token:
            if token is None:
                log.info("rollouts: the lease is held by another replica (token %s was ours)", self.token)
            else:
                log.info("rollouts: lease taken by %s with token %d", self.holder, token)
        self.token = token
        if token is None:
            return []
        with self.sessions() as s:
            ids = list(s.scalars(select(Rollout.id).where(Rollout.state.in_(ACTIVE_STATES)).order_by(Rollout.id)))
        out: list[Outcome] = []
        for rid in ids:
            if self._stop.is_set():
                break
            try:
                o = self.judge_one(rid, token)
            except Exception as e:
                log.exception("rollouts: rollout %d: judging failed", rid)
                o = Outcome(rid, "?", "error", str(e))
            if self._decisions is not None:
                self._decisions.labels(o.action, o.result).inc()
            out.append(o)
        return out

    def judge_one(self, rollout_id: int, token: int) -> Outcome:
        """Refresh, read, decide and commit one rollout under lease ``token``."""
        now = self.clock()
        with self.sessions.begin() as s:
            if not lease.still_held(s, LEASE, self.holder, token, now):
                return self._lost(rollout_id, "?", "lease")
            view = collect.load_view(s, rollout_id, now, self.online_window)
            if view.state in ACTIVE_STATES and collect.refresh_members(s, view, now):
                view = collect.load_view(s, rollout_id, now, self.online_window)
        if view.state != "running":  # paused: members still move on, but nothing is decided (its reason stays)
            return Outcome(rollout_id, "wait", "skipped", f"rollout {rollout_id} is {view.state}")
        with self.sessions() as s:
            figs = collect.figures(s, view, now, WINDOW)
        decision = judge.decide(view, figs, now.timestamp())
        if decision.action != "assign" or len(decision.assign) <= ASSIGN_BATCH:
            return self.commit(view.id, view.state_version, decision, token, now)
        return self._assign_in_batches(view.id, view.state_version, decision, token, now)

    def _assign_in_batches(self, rollout_id: int, state_version: int, decision: Decision, token: int,
                           now: datetime) -> Outcome:
        """A large ``assign`` (a whole stage of thousands of devices) as one transaction per
        :data:`ASSIGN_BATCH` members, in device id order: each batch signs its devices' director
        metadata and commits on its own, under the lease and the compare-and-set (one state version per
        batch), so no transaction holds SQLite's write lock, or PostgreSQL's device rows, for minutes
        while check-ins and telemetry wait on them. A lost lease or compare-and-set stops the rest:
        the next pass judges again."""
        ids = sorted(decision.assign)
        arm_b = set(decision.arm_b)
        done: list[str] = []
        last: Outcome | None = None
        for i in range(0, len(ids), ASSIGN_BATCH):
            if self._stop.is_set():
                break
            chunk = tuple(ids[i:i + ASSIGN_BATCH])
            part = replace(decision, assign=chunk, arm_b=tuple(d for d in chunk if d in arm_b),
                           reason=f"{decision.reason} (batch {i // ASSIGN_BATCH + 1} of "
                                  f"{-(-len(ids) // ASSIGN_BATCH)}: {len(chunk)} members)")
            last = self.commit(rollout_id, state_version, part, token, now)
            if last.result != "committed":
                return last
            state_version += 1
            done += last.devices
        assert last is not None
        return Outcome(rollout_id, "assign", "committed", decision.reason, tuple(done))

    def commit(self, rollout_id: int, state_version: int, decision: Decision, token: int,
               now: datetime) -> Outcome:
        """In one transaction: the lease still ours, the rollout still at ``state_version``, then the
        decision applied; the devices whose assignment changed are notified after the commit."""
        changed: list[str] = []
        with self.sessions.begin() as s:
            if not lease.still_held(s, LEASE, self.holder, token, self.clock()):
                return self._lost(rollout_id, decision.action, "lease")
            if decision.action == "wait":
                if not self._note_wait(s, rollout_id, state_version, decision, now):
                    return self._lost(rollout_id, decision.action, "cas")
            else:
                if not apply.cas(s, rollout_id, state_version):
                    return self._lost(rollout_id, decision.action, "cas")
                rollout = s.get(Rollout, rollout_id, populate_existing=True)
                assert rollout is not None  # cas found it
                changed = apply.apply_decision(s, self.director_getter(), rollout, decision, ACTOR, now)
        if decision.action != "wait":
            log.info("rollouts: rollout %d: %s: %s", rollout_id, decision.action, decision.reason)
        for device_id in changed:
            try:
                self.notify(device_id)
            except Exception:  # the device's next poll finds the change
                log.exception("rollouts: check-in notice to %s failed", device_id)
        return Outcome(rollout_id, decision.action, "committed", decision.reason, tuple(changed))

    def _note_wait(self, s: Any, rollout_id: int, state_version: int, decision: Decision, now: datetime) -> bool:
        done = s.execute(update(Rollout).where(Rollout.id == rollout_id, Rollout.state_version == state_version)
                         .values(reason=decision.reason, last_gates=[gate_result_to_json(g) for g in decision.gates],
                                 last_judged_at=now)
                         .execution_options(synchronize_session=False))
        return int(getattr(done, "rowcount", 0) or 0) == 1

    def _lost(self, rollout_id: int, action: str, why: str) -> Outcome:
        what = "the lease was lost" if why == "lease" else "the rollout changed since it was read"
        log.warning("rollouts: rollout %d: %s not applied: %s (holder %s, token %s)", rollout_id, action, what,
                    self.holder, self.token)
        if why == "lease":
            self.token = None
        return Outcome(rollout_id, action, why, what)
