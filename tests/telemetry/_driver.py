"""A stand-in for the agent's telemetry side, run in its own process by the tests (so that they can
SIGKILL it): an Outbox in ``--state`` and, unless ``--no-publish``, a Publisher to the broker on
``--port``; it puts ``--total`` messages in all (telemetry and events alternately, counting what
earlier runs on the same state folder already put) at ``--rate`` per second, then waits until the
broker has acknowledged everything and closes (``--hold``: stays connected instead, until killed).

Prints, one line each, flushed: ``epoch E`` at start, ``put N`` after a put of seq N has returned
(every ``--every``-th one and the last), ``drained``, ``dropped D``, ``closed``.
"""

from __future__ import annotations

import argparse
import logging
import sys
import threading
import time
from pathlib import Path

from edgefleet.agent.telemetry.config import MqttFleetConfig
from edgefleet.agent.telemetry.publisher import Publisher
from edgefleet.agent.telemetry.queue import Outbox


def body(seq: int) -> dict[str, object]:
    """A message of realistic size (~700 bytes of telemetry; events are smaller)."""
    if seq % 2:
        return {
            "interval_s": 60.0,
            "models": [{"name": "digits", "version": "2.0.0", "inferences": 123 + seq, "errors": 1,
                        "latency": {"counts": [0, 3, 40, 70, 9, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0], "sum_s": 0.12,
                                    "p50_s": 0.0007, "p95_s": 0.002, "p99_s": 0.004},
                        "drift": None, "classes": {"3": 40, "7": 2}, "accuracy": None}],
            "device": {"cpu_percent": 3.5, "memory_rss_bytes": 61_000_000, "memory_percent": 1.5,
                       "temperature_c": None, "disk_free_bytes": 10_000_000_000, "uptime_s": 100.0 + seq,
                       "queue_depth": 0, "dropped": 0, "agent_version": "0.1.0"},
        }
    return {"kind": "switched", "model": "digits", "version": "2.0.0", "detail": f"event {seq}"}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--state", type=Path, required=True)
    ap.add_argument("--device", default="dev-1")
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--protocol", default="5")
    ap.add_argument("--total", type=int, required=True)
    ap.add_argument("--rate", type=float, default=0.0, help="messages per second; 0: as fast as possible")
    ap.add_argument("--every", type=int, default=100)
    ap.add_argument("--no-publish", action="store_true")
    ap.add_argument("--hold", action="store_true")
    ap.add_argument("--drop-unrouted", action="store_true", help="resend_unrouted = false (no subscriber at all)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="driver %(levelname)s %(name)s: %(message)s")

    outbox = Outbox(args.state / "queue.db", args.device)
    print(f"epoch {outbox.epoch}", flush=True)
    pub = None
    if not args.no_publish:
        cfg = MqttFleetConfig(host="127.0.0.1", port=args.port, tls=False, protocol=args.protocol, keepalive=5,
                              reconnect_min_s=0.1, reconnect_max_s=0.8, close_timeout_s=10,
                              resend_unrouted=not args.drop_unrouted)
        pub = Publisher(cfg, args.device, outbox)
        pub.start()
    start = time.monotonic()
    made = 0
    pause = threading.Event()
    while (seq := outbox.last_seq()) < args.total:
        kind = "telemetry" if (seq + 1) % 2 else "events"
        seq, _ = outbox.put(kind, body(seq + 1))
        made += 1
        if seq % args.every == 0 or seq == args.total:
            print(f"put {seq}", flush=True)
        if args.rate:
            ahead = start + made / args.rate - time.monotonic()
            if ahead > 0:
                pause.wait(ahead)
    if pub is not None:
        while outbox.depth():
            pause.wait(0.02)
        print("drained", flush=True)
        if args.hold:
            print(f"connected {int(pub.connected.is_set())}", flush=True)
            pause.wait()  # until killed
        pub.close()
    print(f"dropped {outbox.dropped()}", flush=True)
    outbox.close()
    print("closed", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
