"""The ``edgefleet`` console script.

``edgefleet agent run --config FILE`` is what a device's systemd unit keeps running for months, so
it starts without the interactive CLI machinery (typer, click's help formatting, rich): about
3.5 MB less resident memory and 150 ms less start-up on a Pi. Every other command, and
``agent run --help``, goes through the full CLI in :mod:`edgefleet.cli.main`.
"""

from __future__ import annotations

import argparse
import sys

__all__ = ["main"]


def _agent_run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="edgefleet agent run", add_help=False)
    parser.add_argument("--config", "-c", required=True)
    args, extra = parser.parse_known_args(argv)
    if extra:
        print(f"error: unexpected argument(s) {extra}; see 'edgefleet agent run --help'", file=sys.stderr)
        return 2
    import logging

    from edgefleet.agent.config import load_config
    from edgefleet.agent.service import AgentService
    from edgefleet.errors import EdgefleetError

    try:
        cfg = load_config(args.config)
        logging.basicConfig(
            level=getattr(logging, cfg.log_level.upper()),
            format="%(asctime)s %(levelname)s %(name)s: %(message)s",
            stream=sys.stderr,
        )
        return AgentService(cfg).run()
    except EdgefleetError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def main() -> None:
    argv = sys.argv[1:]
    if argv[:2] == ["agent", "run"] and not {"-h", "--help"} & set(argv) and any(
        a in ("--config", "-c") or a.startswith("--config=") for a in argv
    ):
        sys.exit(_agent_run(argv[2:]))
    from edgefleet.cli.main import main as full

    full()
