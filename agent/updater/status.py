"""``edgefleet agent status``: what this device runs and trusts, read from its state directory alone
(no network, no running agent needed): running versions, shadow candidates, the update under way, the
last failure, refused targets, events not yet delivered, and the TUF metadata's versions and expiries."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from edgefleet.agent.updater.state import UpdateState, load_state
from edgefleet.agent.updater.trust import trust_summary

__all__ = ["describe", "format_status"]


def _when(t: float | None) -> str | None:
    return None if t is None else datetime.fromtimestamp(t, UTC).isoformat(timespec="seconds")


def describe(state_dir: Path, st: UpdateState | None = None) -> dict[str, Any]:
    st = st or load_state(state_dir)
    identity: dict[str, Any] = {}
    try:
        ident = json.loads((state_dir / "identity" / "identity.json").read_bytes())
        identity = {"device_id": ident.get("device_id"), "server_url": ident.get("server_url")}
    except (OSError, ValueError):
        identity = {"device_id": None, "server_url": None}
    p = st.pending
    return {
        "state_dir": str(state_dir),
        **identity,
        "running": {n: {"version": i.version, "sha256": i.sha256, "target": i.target} for n, i in st.current.items()},
        "previous": {n: i.version for n, i in st.previous.items()},
        "shadow": {n: {"version": i.version, "sha256": i.sha256, "target": i.target} for n, i in st.shadow.items()},
        "update": None if p is None else {"phase": p.phase, "target": p.target, "attempts": p.attempts,
                                          "probation_restarts": p.probation_restarts},
        "last_failure": None if st.last_failure is None else {
            **st.last_failure, "at": _when(st.last_failure.get("at"))},
        "refused": {k: {"target": v.target, "reason": v.reason, "detail": v.detail, "at": _when(v.at)}
                    for k, v in st.refused.items()},
        "last_checkin": _when(st.last_checkin),
        "last_refresh": _when(st.last_refresh),
        "events_pending": len(st.outbox),
        "events_dropped": st.dropped_events,
        "trust": trust_summary(state_dir),
    }


def format_status(d: dict[str, Any]) -> list[str]:
    """The text form: a few lines a person reads at a glance."""
    lines = [f"device: {d.get('device_id') or '(not enrolled)'}  server: {d.get('server_url') or '-'}"]
    if d["running"]:
        for name, r in sorted(d["running"].items()):
            prev = d["previous"].get(name)
            lines.append(f"running: {name} {r['version']} (sha256 {r['sha256'][:12]}…)"
                         + (f", previous {prev} kept" if prev else ""))
    else:
        lines.append("running: nothing installed by the updater (models from agent.toml only)")
    for name, r in sorted(d["shadow"].items()):
        lines.append(f"shadow: {name} {r['version']} (sha256 {r['sha256'][:12]}…) runs beside it on live inputs")
    u = d["update"]
    lines.append("update: idle" if u is None else f"update: {u['target']} in {u['phase']} "
                 f"(attempts {u['attempts']}, restarts {u['probation_restarts']})")
    f = d["last_failure"]
    if f:
        lines.append(f"last failure: {f.get('reason')} at {f.get('at')}: {f.get('detail')}")
    for r in d["refused"].values():
        lines.append(f"refused: {r['target']}: {r['reason']}")
    lines.append(f"last check-in: {d['last_checkin'] or 'never'}; last metadata refresh: "
                 f"{d['last_refresh'] or 'never'}; events waiting: {d['events_pending']}")
    for repo, roles in d["trust"].items():
        parts = []
        for role, v in roles.items():
            parts.append(f"{role} v{v['version']} until {v['expires']}" if v else f"{role} -")
        lines.append(f"trust {repo}: " + "; ".join(parts))
    return lines
