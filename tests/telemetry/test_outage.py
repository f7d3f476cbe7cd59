"""Store and forward through an outage, end to end with real processes: a driver process (Outbox +
Publisher, ``_driver.py``) produces 10,000 telemetry and event messages; the broker (a real
Mosquitto, persistent) is stopped for a while and started again, and the driver is SIGKILLed once
during the outage and started again on the same state folder. A subscriber with a persistent
session (QoS 1, clean start off) records every ``(epoch, seq)``: each seq from 1 to 10,000 arrives
at least once, none is missing, every new seq arrives in order, all in one epoch. Duplicates (QoS 1
allows them; the server deduplicates) are counted and printed."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from telemetry._mqtt import Broker, Subscriber

TOTAL = 10_000
RATE = 700  # messages per second the driver puts (about 14 s of production in all)


def test_outage_and_sigkill_lose_nothing_and_deliver_every_seq_in_order(
    broker: Callable[..., Broker], subscriber: Callable[..., Subscriber], driver: Any, tmp_path: Path
) -> None:
    b = broker(persistent=True)
    sub = subscriber(b.port, persistent=True)
    state = tmp_path / "state"
    args = ("--state", str(state), "--port", str(b.port), "--total", str(TOTAL), "--rate", str(RATE), "--every", "100")

    first = driver(*args)
    assert sub.wait_for(lambda ms: len(ms) >= 1500, 60), first.stderr()  # delivered live
    b.stop()  # the outage: the driver keeps putting, its queue grows
    assert first.wait_line(lambda d: d.last_put >= 4000, 60), first.stderr()
    first.kill()  # SIGKILL mid-outage: the backlog and what was in flight when the broker went are on disk
    killed_at = first.last_put

    second = driver(*args)
    assert second.wait_line(lambda d: d.last_put >= 5500, 60), second.stderr()
    assert second.line("epoch") == first.line("epoch")  # the same queue: the same epoch
    b.start()  # the broker is back: the backlog drains in order, then live again

    assert second.wait(120) == 0, second.stderr()
    assert second.has("drained") and second.line("dropped") == "dropped 0", second.seen[-5:]
    assert sub.wait_for(lambda ms: len(set(sub.seqs())) >= TOTAL, 60), f"{len(set(sub.seqs()))} of {TOTAL}"

    epoch = first.line("epoch").split()[1]
    data = [m for m in sub.messages if "seq" in m.body]
    assert {m.body["epoch"] for m in data} == {epoch}
    seqs = [m.body["seq"] for m in data]
    assert sorted(set(seqs)) == list(range(1, TOTAL + 1)), "a seq is missing"
    assert not _out_of_order(seqs), _out_of_order(seqs)[:10]
    assert all(m.body["device_id"] == "dev-1" and m.topic == f"edgefleet/v1/dev-1/{'telemetry' if m.body['seq'] % 2 else 'events'}"
               for m in data)
    status = [m.body["state"] for m in sub.on("/status")]
    assert status[-1] == "offline"  # the clean close
    dups = len(seqs) - len(set(seqs))
    print(f"\noutage: {TOTAL} messages, {dups} duplicate deliveries (QoS 1 resends), killed after put {killed_at}, "
          f"subscriber connections {sub.connections}, status sequence {status}")


def test_a_sigkill_while_connected_loses_nothing_in_flight_or_unacknowledged(
    broker: Callable[..., Broker], subscriber: Callable[..., Subscriber], driver: Any, tmp_path: Path
) -> None:
    """The driver puts as fast as it can with the broker up and is SIGKILLed mid-stream (paho holding
    messages in flight, acknowledgements not yet deleted from the queue): after the restart every
    seq arrives, new ones in order."""
    b = broker(persistent=True)
    sub = subscriber(b.port, persistent=True)
    total = 3000
    args = ("--state", str(tmp_path / "state"), "--port", str(b.port), "--total", str(total), "--every", "50")
    first = driver(*args)
    assert sub.wait_for(lambda ms: len(ms) >= 1000, 60), first.stderr()
    first.kill()
    second = driver(*args)
    assert second.wait(60) == 0, second.stderr()
    assert second.line("dropped") == "dropped 0"
    assert sub.wait_for(lambda ms: len(set(sub.seqs())) >= total, 60)
    seqs = sub.seqs()
    assert sorted(set(seqs)) == list(range(1, total + 1))
    assert not _out_of_order(seqs), _out_of_order(seqs)[:10]
    print(f"\nsigkill while connected: {total} messages, {len(seqs) - len(set(seqs))} duplicate deliveries, "
          f"killed after put {first.last_put}")


def _out_of_order(seqs: list[int]) -> list[tuple[int, int]]:
    """(highest so far, next new seq) wherever a new seq is not the next one (a repeat of an earlier
    seq is a QoS 1 resend: fine)."""
    top, bad = 0, []
    for s in seqs:
        if s > top:
            if s != top + 1:
                bad.append((top, s))
            top = s
    return bad
