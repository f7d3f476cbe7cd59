"""A mistyped command line is one line naming the option, exit 2; help and --version still work."""

from __future__ import annotations

import subprocess
import sys

import pytest


def _edgefleet(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", "from edgefleet.cli.entry import main; main()", *args],
        capture_output=True, text=True, timeout=120,
    )


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (("--bogus",), "No such option: --bogus"),
        (("server", "tls", "--days", "abc"), "'--days'"),
        (("model", "inspect"), "path"),
    ],
)
def test_bad_command_line_is_one_line_and_exit_2(args: tuple[str, ...], needle: str) -> None:
    r = _edgefleet(*args)
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert r.returncode == 2, r.stderr
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], r.stderr
    assert "--help" in lines[0] and "Traceback" not in r.stderr


def test_group_without_command_prints_its_help_and_version_prints() -> None:
    r = _edgefleet("model")
    assert r.returncode == 0 and "inspect" in r.stdout, r
    v = _edgefleet("--version")
    assert v.returncode == 0 and v.stdout.startswith("edgefleet "), v
