"""The update state machine: one target at a time, every phase persisted before it runs.

::

    idle --(check-in changed, or metadata older than max_metadata_age)--> refresh TUF (image + director)
         --(a served model's assigned target differs, not refused)--> download
    download   Range-resumed into staging/, never past the signed length     (Transient: retry, back-off)
    install    verify length + sha256, models/NAME/VERSION/ all or nothing   (Refused: hash_mismatch, bad_bundle)
    selftest   load, warm up, golden vectors within tolerance, pipeline      (Refused: selftest_failed)
    switch     the registry swaps the served model (requests in flight finish on the old one)
    probation  N runtime calls and T seconds: error rate and p95 against the previous version
    commit     current -> previous, older versions deleted                  | rollback: old model back, refused

    shadow targets (role "shadow", after every serve target is settled):
    download, install, selftest as above, then the candidate runs beside the served version
    (``host.set_shadow``; ``state.shadow``; event ``shadow.ok``) until the director stops listing it
    (``host.clear_shadow``; event ``shadow.stopped``; its files stay until the next cleanup)

After a restart the agent serves ``current`` (complete by construction) and resumes: a download
continues where it stopped, an install or self-test is redone, a switch or probation is redone from the
self-test (counted: ``max_probation_restarts`` restarts in one probation roll it back, for a model that
crashes the agent). A shadow candidate is loaded and self-tested again and put back beside its model at
the first step after a restart. Promotion after shadow (the director lists the same version with role
"serve") stops the shadow and updates as usual: the version is installed, so nothing is downloaded.
A refused target's sha256 is remembered and not tried again until the director stops
assigning it. Transient failures retry with exponential back-off up to ``max_attempts``, then the target
is given up the same way. Every transition is an event (``state.outbox``) sent with the next report.

The machine's collaborators are injected: ``client`` (HTTP: check-in, reports, downloads, the TUF fetcher;
:class:`~.client.DeviceClient`), ``host`` (load a bundle, swap the served model: :class:`Host`) and
``clock`` (wall seconds), so tests drive it against a real server with a real agent.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from edgefleet.agent.config import UpdatesConfig
from edgefleet.agent.runtime import Model, Watch
from edgefleet.agent.updater import install as inst_mod
from edgefleet.agent.updater.errors import Refused, Transient, UpdateError
from edgefleet.agent.updater.state import Installed, Pending, RefusedTarget, UpdateState, load_state, save_state
from edgefleet.agent.updater.trust import Assigned, refresh, resolve

__all__ = ["Host", "UpdateMachine"]

log = logging.getLogger(__name__)

_MIN_LATENCY_SAMPLES = 20  # a baseline p95 needs at least this many calls of the previous version
_PROBATION_POLL = 0.1  # seconds between probation checks
_RENEW_CHECK = 3600.0  # seconds between certificate expiry checks


class Host(Protocol):
    """What the machine needs of the running agent."""

    def load(self, path: Path) -> Model:
        """Load (and warm up) a bundle as the agent would serve it. Raises EdgefleetError."""
        ...

    def swap(self, name: str, model: Model, version: str) -> Model | None:
        """Serve ``model`` as ``name``; returns the model served before (None if there was none)."""
        ...

    def served(self, name: str) -> Model | None:
        ...

    def running(self) -> dict[str, str]:
        """Every served model's name and version (agent.toml's included)."""
        ...

    def set_shadow(self, name: str, model: Model, version: str) -> None:
        """Run ``model`` (version ``version``) beside the served ``name`` on a sample of its live calls,
        off the serving path; it replaces any candidate run there before."""
        ...

    def clear_shadow(self, name: str) -> None:
        """Stop the candidate run beside ``name`` (nothing when there is none)."""
        ...


@dataclass
class _Live:
    """What only the running process knows about the pending update (lost on a restart, rebuilt)."""

    candidate: Model | None = None
    old: Model | None = None
    t0: float = 0.0  # monotonic start of probation
    base_p95: float | None = None
    base_error_rate: float = 0.0
    hashed: str | None = None  # the sha256 the download just checked (no second pass over the file)


class UpdateMachine:
    def __init__(
        self,
        state_dir: Path,
        config: UpdatesConfig,
        client: Any,
        host: Host,
        device_id: str,
        server_url: str,
        agent_version: str = "0",
        hardware_profile: str | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.state_dir = state_dir
        if config.checkin_interval is None:  # the service resolves it (900 s with MQTT push); 60 s here
            config = config.model_copy(update={"checkin_interval": 60.0})
        self.config = config
        self.interval: float = float(config.checkin_interval or 60.0)
        self.client = client
        self.host = host
        self.device_id = device_id
        self.server_url = server_url
        self.agent_version = agent_version
        self.hardware_profile = hardware_profile
        self.clock = clock
        self.st: UpdateState = load_state(state_dir)
        self._live = _Live()
        self._lock = threading.Lock()  # one step at a time (the thread, and tests calling step())
        self._next_renew = 0.0
        self._metadata_problem: str | None = None  # the last metadata refusal reported (not repeated)
        self._thread: threading.Thread | None = None
        self._report_due = True  # the server learns what this device runs at start, events or not
        self.stop_event = threading.Event()
        self._wake = threading.Event()  # set by wake(): check in now (the server's `cmd` over MQTT)
        self._shadows_attached = not self.st.shadow  # persisted shadows are put back at the first step
        # One target at a time: when one ends, the others the metadata named (a shadow after a serve
        # update) are planned at the next check-in even if nothing changed on the server.
        self._replan = self.st.pending is not None
        self._resume_after_restart()

    # start ---------------------------------------------------------------------------------------

    def startup_models(self) -> dict[str, Installed]:
        """What to serve at start: the committed version of each model (the previous one when the
        current one's file is gone)."""
        out: dict[str, Installed] = {}
        for name, cur in self.st.current.items():
            for cand in (cur, self.st.previous.get(name)):
                if cand is not None and inst_mod.bundle_file(self.state_dir, cand).is_file():
                    out[name] = cand
                    break
        return out

    def _resume_after_restart(self) -> None:
        p = self.st.pending
        if p is None:
            # A cut after a commit (or a refusal) was saved may have left the older version's folder and
            # the staging file: finish that cleanup now.
            for name in self.st.current:
                inst_mod.prune(self.state_dir, name, self._kept_versions(name))
            inst_mod.clear_staging(self.state_dir)
            return
        if p.phase in ("selftest", "switch", "probation"):
            p.probation_restarts += 1
            if p.probation_restarts > self.config.max_probation_restarts:
                p.phase, p.reason = "rollback", "crashed_in_probation" if p.role == "serve" else "crashed_in_selftest"
                p.detail = f"the agent restarted {p.probation_restarts - 1} times while testing {p.target}"
            else:
                p.phase = "selftest"  # the candidate was only in memory: load and test it again
        elif p.phase == "rollback":
            pass  # the old version is what starts anyway: finish the bookkeeping
        self._save()

    def start(self) -> None:
        """Run the machine in a daemon thread until :meth:`stop`."""
        self._thread = threading.Thread(target=self._run, name="updater", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self.stop_event.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def sequence_events(self, put: Callable[[dict[str, Any]], int]) -> None:
        """Give every event from now on the seq ``put(event)`` returns (the telemetry outbox's, where it is
        queued for MQTT), so the HTTP report, the fallback, carries the same one."""
        self.st._sequencer = put

    def wake(self) -> None:
        """Check in now instead of at the next interval (a push from the server: it carries no
        authority; whatever the check-in brings is verified through TUF as always)."""
        self._wake.set()

    def _run(self) -> None:
        while not self.stop_event.is_set():
            try:
                pause = self.step()
            except Exception:  # a bug must not kill updates for good: log, wait, go on
                log.exception("updater: unexpected error")
                pause = self.interval
            self._wake.wait(max(0.0, pause))
            self._wake.clear()

    # one step ------------------------------------------------------------------------------------

    def step(self) -> float:
        """Do what is due now; returns the seconds until the next step."""
        with self._lock:
            now = self.clock()
            self._maybe_renew(now)
            if not self._shadows_attached:
                self._reattach_shadows(now)
            p = self.st.pending
            pause = self._advance(p, now) if p is not None else self._check(now)
            self._flush()
            return pause

    def _check(self, now: float) -> float:
        interval = self.interval
        try:
            ci = self.client.check_in(self.st.etag)
        except UpdateError as e:
            log.info("check-in: %s", e)
            self.st.last_failure = {"at": now, "reason": e.reason, "detail": str(e)}
            return _retry_after(e, interval)
        self.st.last_checkin = now
        age = None if self.st.last_refresh is None else now - self.st.last_refresh
        if (not ci.changed and age is not None and age < self.config.max_metadata_age
                and self._metadata_problem is None and not self._replan):
            return interval
        try:
            trusted = refresh(self.state_dir, self.server_url, self.device_id, self.client.tuf_fetcher())
        except Refused as e:
            if self._metadata_problem != e.reason:
                self._metadata_problem = e.reason
                self.st.event("metadata.refused", reason=e.reason, detail=str(e))
                self.st.last_failure = {"at": now, "reason": e.reason, "detail": str(e)}
                self._save()
            return interval
        except Transient as e:
            log.info("metadata refresh: %s", e)
            return _retry_after(e, interval)
        if self._metadata_problem is not None:
            self.st.event("metadata.ok", detail="metadata verifies again")
            self._metadata_problem = None
        self.st.last_refresh = now
        self.st.etag = ci.etag
        assigned, bad = resolve(trusted)
        self._replan = False
        self._plan(assigned, bad, now)
        self._save()
        return 0.0 if self.st.pending is not None else interval

    def _plan(self, assigned: list[Assigned], bad: list[tuple[str, Refused]], now: float) -> None:
        shas = {a.sha256 for a in assigned}
        for key in [k for k in self.st.refused if not k.startswith("path:") and k not in shas]:
            del self.st.refused[key]  # the assignment changed: that target may be tried again later
        # Targets refused at resolution (the image repository does not list them...) are judged afresh
        # at every refresh (an operator may sign one later); an event only when the verdict changes.
        before = {k: v for k, v in self.st.refused.items() if k.startswith("path:")}
        for key in before:
            del self.st.refused[key]
        for target, e in bad:
            key = _sha_of(target)
            seen = before.get(key)
            if seen is not None and seen.reason == e.reason:
                self.st.refused[key] = seen
                continue
            self.st.refused[key] = RefusedTarget(target=target, reason=e.reason, detail=str(e), at=now)
            self.st.event("update.refused", target=target, reason=e.reason, detail=str(e))
            self.st.last_failure = {"at": now, "target": target, "reason": e.reason, "detail": str(e)}
        shadows = {a.name: a for a in assigned if a.role == "shadow"}
        for name, inst in list(self.st.shadow.items()):  # first: a promotion must not find it still shadowing
            want = shadows.get(name)
            if want is None or want.sha256 != inst.sha256:
                self._stop_shadow(name, "no longer assigned" if want is None else f"replaced by {want.version}")
        for a in assigned:
            if a.role != "serve":
                continue
            cur = self.st.current.get(a.name)
            if cur is not None and cur.sha256 == a.sha256:
                continue
            if a.sha256 in self.st.refused:
                continue
            self.st.pending = Pending(phase="download", name=a.name, version=a.version, target=a.target,
                                      sha256=a.sha256, length=a.length, role=a.role)
            self._live = _Live()
            self.st.event("update.started", model=a.name, version=a.version, target=a.target, sha256=a.sha256,
                          detail=f"{a.length} bytes")
            return
        for name, a in sorted(shadows.items()):  # serve updates first: only when none is due
            cur = self.st.current.get(name)
            if name in self.st.shadow or a.sha256 in self.st.refused or (cur is not None and cur.sha256 == a.sha256):
                continue
            self.st.pending = Pending(phase="download", name=a.name, version=a.version, target=a.target,
                                      sha256=a.sha256, length=a.length, role=a.role)
            self._live = _Live()
            self.st.event("shadow.started", model=a.name, version=a.version, target=a.target, sha256=a.sha256,
                          detail=f"{a.length} bytes")
            return

    # phases --------------------------------------------------------------------------------------

    def _advance(self, p: Pending, now: float) -> float:
        if now < p.not_before:
            return p.not_before - now
        try:
            return self._phase(p)
        except Transient as e:
            if e.reason == "disk_full" and p.phase == "download":
                # What arrived is what filled the disk: drop it, or not even update.json can be saved
                # (the retry, the give-up and its refusal would live in memory only, and the full
                # staging file would stay). Nothing resumes while the disk is full: start from byte 0.
                inst_mod.clear_staging(self.state_dir)
            p.attempts += 1
            self.st.last_failure = {"at": now, "target": p.target, "reason": e.reason, "detail": str(e)}
            if p.attempts >= self.config.max_attempts:
                self._refuse(p, Refused(f"gave up after {p.attempts} attempts: {e}", e.reason))
                return self.interval
            pause = e.retry_after or min(self.config.backoff_max, 2.0 ** p.attempts * 0.5) * random.uniform(0.8, 1.2)
            p.not_before = now + pause
            self.st.event("update.retry", target=p.target, model=p.name, version=p.version, reason=e.reason,
                          detail=f"attempt {p.attempts}: {e}")
            self._save()
            return pause
        except Refused as e:
            self._refuse(p, e)
            return self.interval

    def _phase(self, p: Pending) -> float:
        """Run phases until one must wait (probation) or the update ends."""
        while self.st.pending is p:
            if p.phase == "download":
                self._download(p)
                self._enter(p, "install")
            elif p.phase == "install":
                if inst_mod.installed(self.state_dir, p.name, p.version, p.sha256) is None:
                    part = inst_mod.staging_part(self.state_dir, p.sha256)
                    if not part.exists() and not inst_mod.staged(self.state_dir, p.sha256).is_file():
                        self._enter(p, "download")  # a cut in the middle of the install: fetch it again
                        continue
                    inst_mod.verify_staged(self.state_dir, p.sha256, p.length, hashed=self._live.hashed == p.sha256)
                    inst_mod.install(self.state_dir, p.name, p.version, p.target, p.sha256, p.length)
                self.st.event("install.ok", model=p.name, version=p.version, target=p.target)
                self._enter(p, "selftest")
            elif p.phase == "selftest":
                self._live.candidate = self._selftest(p)
                self.st.event("selftest.ok", model=p.name, version=p.version, target=p.target)
                if p.role == "shadow":
                    self._start_shadow(p)
                    return 0.0
                self._enter(p, "switch")
            elif p.phase == "switch":
                if self._live.candidate is None:
                    self._enter(p, "selftest")
                    continue
                self._switch(p)
                self._enter(p, "probation")
            elif p.phase == "probation":
                if self._live.candidate is None:  # cannot happen after _resume_after_restart; be safe
                    self._enter(p, "selftest")
                    continue
                verdict = self._probation(p)
                if verdict is None:
                    return _PROBATION_POLL
                self._enter(p, "commit")
            elif p.phase == "commit":
                if self._live.candidate is None:
                    # A restart after probation passed: the agent started on the old version, so serve the
                    # new one again (self-tested again) before it is committed: committed == served.
                    self._live.candidate = self._selftest(p)
                    self._switch(p)
                self._commit(p)
            elif p.phase == "rollback":
                self._refuse(p, Refused(p.detail or "rolled back", p.reason or "rollback"))
        return 0.0

    def _enter(self, p: Pending, phase: str) -> None:
        p.phase = phase  # type: ignore[assignment]
        p.attempts = 0
        self._save()

    def _download(self, p: Pending) -> None:
        if inst_mod.staged(self.state_dir, p.sha256).is_file():
            return
        if inst_mod.installed(self.state_dir, p.name, p.version, p.sha256) is not None:
            return  # the previous version kept on disk, assigned again: nothing to fetch
        part = inst_mod.staging_part(self.state_dir, p.sha256)
        had = part.stat().st_size if part.exists() else 0
        got = self.client.download(f"/tuf/image/targets/{p.sha256}.{p.target}", part, p.length,
                                   expected_sha256=p.sha256)
        self._live.hashed = p.sha256  # the client hashed every byte of the file (resumed part included)
        self.st.event("download.ok", model=p.name, version=p.version, target=p.target,
                      detail=f"{got} bytes received" + (f", resumed at {had}" if had else ""))

    def _selftest(self, p: Pending) -> Model:
        from edgefleet.agent.selftest import check_pipeline, run_golden
        from edgefleet.bundle.archive import BundleReader
        from edgefleet.errors import EdgefleetError

        path = self.state_dir / "models" / p.name / p.version / inst_mod.BUNDLE
        try:
            model = self.host.load(path)
            with BundleReader(path) as b:
                manifest = b.manifest
                golden = b.read(manifest.golden.path) if manifest.golden else None
            if golden is not None and manifest.golden is not None:
                report = run_golden(model, golden, manifest.golden, f"{p.target}: {manifest.golden.path}")
                if not report.passed:
                    raise Refused(f"self-test: {'; '.join(report.failures[:3])}", "selftest_failed")
            check_pipeline(model, manifest.pipeline, where=f"{p.target}: pipeline")
        except Refused:
            raise
        except EdgefleetError as e:
            raise Refused(f"self-test: {e}", "selftest_failed") from e
        model.watch = Watch()
        return model

    def _switch(self, p: Pending) -> None:
        live = self._live
        assert live.candidate is not None
        old = self.host.served(p.name)
        live.old = old
        live.base_p95, live.base_error_rate = None, 0.0
        if old is not None:
            w = old.watch
            if w is not None and w.calls >= _MIN_LATENCY_SAMPLES:
                live.base_p95, live.base_error_rate = w.p95(), w.error_rate()
            elif old.cost is not None:
                live.base_p95 = old.cost
        self.host.swap(p.name, live.candidate, p.version)
        live.t0 = time.monotonic()
        p.probation_started = self.clock()
        self.st.event("switch.ok", model=p.name, version=p.version, target=p.target,
                      detail=f"serving {p.version}; probation: {self.config.probation_inferences} calls, "
                      f"{self.config.probation_seconds:g} s")

    def _probation(self, p: Pending) -> bool | None:
        """None while probation runs; True when it passed. Raises Refused when it failed."""
        cfg, live = self.config, self._live
        assert live.candidate is not None and live.candidate.watch is not None
        w = live.candidate.watch
        elapsed = time.monotonic() - live.t0
        window = max(w.calls, cfg.probation_inferences)
        allowed = int((cfg.max_error_rate + live.base_error_rate) * window)
        if w.errors > allowed:
            raise Refused(f"probation: {w.errors} runtime errors in {w.calls} calls (allowed {allowed} in "
                          f"{window}; previous version {live.base_error_rate:.1%})", "probation_errors")
        done = w.calls >= cfg.probation_inferences and elapsed >= cfg.probation_seconds
        if not done and elapsed < cfg.probation_max_seconds:
            return None
        p95 = w.p95()
        enough = w.calls >= min(_MIN_LATENCY_SAMPLES, cfg.probation_inferences)
        if live.base_p95 is not None and p95 is not None and enough:
            bound = live.base_p95 * cfg.max_latency_ratio + cfg.latency_slack_ms / 1000
            if p95 > bound:
                raise Refused(f"probation: p95 {p95 * 1000:.2f} ms over {w.calls} calls, bound {bound * 1000:.2f} ms "
                              f"({cfg.max_latency_ratio:g}x the previous {live.base_p95 * 1000:.2f} ms + "
                              f"{cfg.latency_slack_ms:g} ms)", "probation_latency")
        self.st.event("probation.ok", model=p.name, version=p.version, target=p.target,
                      detail=f"{w.calls} calls, {w.errors} errors, p95 "
                      f"{'-' if p95 is None else f'{p95 * 1000:.2f} ms'} in {elapsed:.1f} s")
        return True

    def _commit(self, p: Pending) -> None:
        new = Installed(name=p.name, version=p.version, target=p.target, sha256=p.sha256, length=p.length,
                        path=str(Path("models") / p.name / p.version / inst_mod.BUNDLE))
        old = self.st.current.get(p.name)
        if old is not None and old.sha256 != new.sha256:
            self.st.previous[p.name] = old
        self.st.current[p.name] = new
        self.st.pending = None
        self._replan = True
        keep = self._kept_versions(p.name)
        self.st.event("update.committed", model=p.name, version=p.version, target=p.target, sha256=p.sha256,
                      detail=f"kept {sorted(keep)}")
        self._save()
        gone = inst_mod.prune(self.state_dir, p.name, keep)
        inst_mod.clear_staging(self.state_dir)
        if gone:
            log.info("updater: deleted %s %s", p.name, ", ".join(gone))
        self._live = _Live()
        self._release_memory()

    def _refuse(self, p: Pending, e: Refused) -> None:
        """Give the target up: put the old model back if the candidate was served, remember why."""
        live = self._live
        rolled_back = False
        if live.candidate is not None and self.host.served(p.name) is live.candidate:
            old = live.old or self._reload_current(p.name)
            if old is not None:
                cur = self.st.current.get(p.name)
                self.host.swap(p.name, old, cur.version if cur else (old.manifest.version if old.manifest else "1"))
                rolled_back = True
        now = self.clock()
        self.st.refused[p.sha256] = RefusedTarget(target=p.target, reason=e.reason, detail=str(e), at=now)
        self.st.last_failure = {"at": now, "target": p.target, "reason": e.reason, "detail": str(e)}
        rollback = rolled_back or (p.role == "serve" and p.phase in ("probation", "rollback"))
        self.st.event("update.rolled_back" if rollback else "update.refused",
                      model=p.name, version=p.version, target=p.target, sha256=p.sha256, reason=e.reason,
                      detail=str(e))
        self.st.pending = None
        self._replan = True
        self._save()
        keep = {v.version for v in (self.st.current.get(p.name), self.st.previous.get(p.name),
                                    self.st.shadow.get(p.name)) if v is not None and v.sha256 != p.sha256}
        inst_mod.prune(self.state_dir, p.name, keep)
        inst_mod.clear_staging(self.state_dir)
        self._live = _Live()
        self._release_memory()

    def _release_memory(self) -> None:
        """After a model is dropped: hand its memory back to the system (:func:`_release_memory`)."""
        _release_memory()

    # shadow mode ---------------------------------------------------------------------------------

    def _kept_versions(self, name: str) -> set[str]:
        """The versions of ``name`` whose files a cleanup keeps: served, kept for rollback, in shadow."""
        return {v.version for v in (self.st.current.get(name), self.st.previous.get(name), self.st.shadow.get(name))
                if v is not None}

    def _start_shadow(self, p: Pending) -> None:
        """The self-tested candidate of a shadow target runs beside the served version from now on."""
        model = self._live.candidate
        assert model is not None
        model.watch = None  # not served: no probation counts it
        inst = Installed(name=p.name, version=p.version, target=p.target, sha256=p.sha256, length=p.length,
                         path=str(Path("models") / p.name / p.version / inst_mod.BUNDLE))
        self.host.set_shadow(p.name, model, p.version)
        self.st.shadow[p.name] = inst
        self.st.pending = None
        self._replan = True
        served = self.host.running().get(p.name)
        self.st.event("shadow.ok", model=p.name, version=p.version, target=p.target, sha256=p.sha256,
                      detail=f"running beside {p.name} {served}" if served else f"no {p.name} served yet")
        self._save()
        inst_mod.clear_staging(self.state_dir)
        self._live = _Live()

    def _stop_shadow(self, name: str, why: str) -> None:
        """Stop the candidate beside ``name``; its files stay until a cleanup (a promotion switches to them)."""
        inst = self.st.shadow.pop(name)
        self.host.clear_shadow(name)
        self.st.event("shadow.stopped", model=name, version=inst.version, target=inst.target, sha256=inst.sha256,
                      detail=why)
        self._save()
        self._release_memory()

    def _reattach_shadows(self, now: float) -> None:
        """After a restart: load, self-test and run again each persisted shadow candidate; one that fails
        now is refused (and forgotten) as at its first self-test."""
        self._shadows_attached = True
        for name, inst in list(self.st.shadow.items()):
            p = Pending(phase="selftest", name=name, version=inst.version, target=inst.target, sha256=inst.sha256,
                        length=inst.length, role="shadow")
            try:
                if inst_mod.installed(self.state_dir, name, inst.version, inst.sha256) is None:
                    raise Refused(f"{inst.target}: installed files missing or changed", "bad_bundle")
                model = self._selftest(p)
            except Refused as e:
                del self.st.shadow[name]
                self.st.refused[inst.sha256] = RefusedTarget(target=inst.target, reason=e.reason, detail=str(e), at=now)
                self.st.last_failure = {"at": now, "target": inst.target, "reason": e.reason, "detail": str(e)}
                self.st.event("update.refused", model=name, version=inst.version, target=inst.target,
                              sha256=inst.sha256, reason=e.reason, detail=f"shadow after a restart: {e}")
                self._save()
                continue
            model.watch = None
            self.host.set_shadow(name, model, inst.version)
            log.info("shadow: %s %s runs beside %s again", name, inst.version, name)

    def _reload_current(self, name: str) -> Model | None:
        cur = self.st.current.get(name)
        if cur is None:
            return None
        try:
            return self.host.load(inst_mod.bundle_file(self.state_dir, cur))
        except Exception as e:  # the old version must come back if it can at all
            log.error("rollback: cannot load %s %s: %s", name, cur.version, e)
            return None

    # reports and identity ------------------------------------------------------------------------

    def report_body(self) -> dict[str, Any]:
        import re

        from edgefleet.bundle.manifest import NAME_PATTERN, VERSION_PATTERN

        running = []
        for name, version in sorted(self.host.running().items()):
            if not (re.match(NAME_PATTERN, name) and re.match(VERSION_PATTERN, version)):
                continue  # a bare model file's stem may not be a registry name: the server would refuse it all
            inst = self.st.current.get(name)
            sha = inst.sha256 if inst is not None and inst.version == version else None
            running.append({"name": name, "version": version, **({"sha256": sha} if sha else {})})
        p = self.st.pending
        return {
            "agent_version": self.agent_version,
            "hardware_profile": self.hardware_profile,
            "running": running,
            "events": list(self.st.outbox[:100]),
            "update": {"state": p.phase if p else "idle", "target": p.target if p else None,
                       "last_failure": self.st.last_failure},
        }

    def _flush(self) -> None:
        if not self.st.outbox and not self._report_due:
            return
        body = self.report_body()
        sent = len(body["events"])
        try:
            self.client.report(body)
        except UpdateError as e:
            log.info("report: %s", e)
            return
        self._report_due = False
        if sent:
            del self.st.outbox[:sent]
            self._save()

    def _maybe_renew(self, now: float) -> None:
        if now < self._next_renew:
            return
        self._next_renew = now + _RENEW_CHECK
        try:
            if self.client.renew(self.config.renew_days_before):
                self.st.event("identity.renewed", detail="certificate renewed with proof of the current key")
                self._save()
        except UpdateError as e:
            log.warning("certificate renewal: %s", e)
            self._next_renew = now + min(_RENEW_CHECK, 60.0)

    def _save(self) -> None:
        save_state(self.state_dir, self.st)

    def status(self) -> dict[str, Any]:
        from edgefleet.agent.updater.status import describe

        return describe(self.state_dir, self.st)


def _release_memory() -> None:
    """Give the freed memory of the old model (or the refused one) back to the system: glibc keeps freed
    heap otherwise, and a device with 1 GB should not carry two models' worth after every update."""
    import ctypes

    try:
        trim = ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc (musl, macOS)
        return
    import gc

    gc.collect()
    trim(0)


def _retry_after(e: UpdateError, default: float) -> float:
    after = getattr(e, "retry_after", None)
    return float(after) if after else default


def _sha_of(target: str) -> str:
    """Refused director targets are remembered by target path (their sha256 may be what is wrong)."""
    return f"path:{target}"
