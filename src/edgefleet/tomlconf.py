"""Validation errors of TOML-backed settings, each naming the key and the line it is on.

Shared by the agent's ``agent.toml``, the hardware profiles and the server's settings.
"""

from __future__ import annotations

import re

from pydantic import ValidationError

__all__ = ["line_of", "problems"]

_KEY = re.compile(r'"?([A-Za-z0-9_-]+)"?\s*=')


def line_of(text: str, loc: tuple[int | str, ...]) -> int | None:
    """The line of the longest prefix of ``loc`` (a pydantic error location) set in the TOML text.

    Tables (``[api]``), arrays of tables (``[[models]]``, counted) and ``key =`` lines are followed;
    inline tables and dotted keys are attributed to the line that holds them.
    """
    table: tuple[int | str, ...] = ()
    counts: dict[str, int] = {}
    best: tuple[int, int] | None = None
    path: tuple[int | str, ...]
    for lineno, raw in enumerate(text.splitlines(), 1):
        s = raw.strip()
        if s.startswith("[["):
            name = s[2 : s.find("]]")].strip()
            counts[name] = counts.get(name, -1) + 1
            path = table = (*name.split("."), counts[name])
        elif s.startswith("["):
            path = table = tuple(s[1 : s.find("]")].strip().split("."))
        elif m := _KEY.match(s):
            path = (*table, m.group(1))
        else:
            continue
        if tuple(loc[: len(path)]) == path and (best is None or len(path) > best[1]):
            best = (lineno, len(path))
    return best[0] if best else None


def problems(
    e: ValidationError,
    text: str | None = None,
    overrides: dict[tuple[str, ...], str] | None = None,
    prefix: tuple[int | str, ...] = (),
) -> list[str]:
    """One ``field (line N): message`` per error of ``e``; a value that came from an environment
    variable (``overrides``: key path -> variable) is attributed to it instead of a line."""
    out = []
    for err in e.errors():
        loc = (*prefix, *err["loc"])
        field = ".".join(str(p) for p in loc)
        var = next((v for k, v in (overrides or {}).items() if loc[: len(k)] == k), None)
        line = line_of(text, loc) if text is not None and var is None else None
        at = f" (from ${var})" if var else f" (line {line})" if line else ""
        msg = "unknown field" if err["type"] == "extra_forbidden" else err["msg"].removeprefix("Value error, ")
        out.append(f"{field}{at}: {msg}" if loc else msg)
    return out
