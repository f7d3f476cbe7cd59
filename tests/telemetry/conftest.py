"""Fixtures for the telemetry tests (the classes are in ``_mqtt.py``): ``broker``, ``subscriber``
and ``driver`` start what a test asks for and stop all of it afterwards, pass or fail."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from telemetry._mqtt import Broker, Driver, Subscriber


def _unavailable(reason: str) -> None:
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason} (CI=true: not skipping)")
    pytest.skip(reason)


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Callable[..., Broker]]:
    """``broker(persistent=False, lines=())``: start a Mosquitto; all are stopped at the end."""
    exe = shutil.which("mosquitto") or ("/usr/sbin/mosquitto" if os.path.exists("/usr/sbin/mosquitto") else None)
    if exe is None:
        _unavailable("the mosquitto binary is not installed")
    started: list[Broker] = []

    def start(**kw: Any) -> Broker:
        started.append(Broker(str(exe), tmp_path / f"broker{len(started)}", **kw))
        return started[-1]

    yield start
    for b in started:
        b.stop()


@pytest.fixture
def subscriber() -> Iterator[Callable[..., Subscriber]]:
    """``subscriber(port, topic=..., persistent=False)``; all are closed at the end."""
    made: list[Subscriber] = []

    def make(port: int, **kw: Any) -> Subscriber:
        made.append(Subscriber(port, **kw))
        return made[-1]

    yield make
    for s in made:
        s.close()


@pytest.fixture
def driver() -> Iterator[Callable[..., Driver]]:
    """``driver(*args)``: start ``_driver.py ARGS``; any still running at the end is killed."""
    made: list[Driver] = []

    def make(*args: str) -> Driver:
        made.append(Driver(*args))
        return made[-1]

    yield make
    for d in made:
        if d.proc.poll() is None:
            d.kill()
