"""Staged rollouts judged by how the model behaves on the devices.

``types`` (the data), ``judge`` (the pure decision core: gates, stages, actions), ``stats`` (the
nonparametric tests behind the gates), ``assign`` (writing assignments and the rule of precedence),
``collect`` (the judging window's figures from telemetry), ``controller`` (the loop in the server, one
decision per stage however many replicas run) and ``service`` (what the API and the CLI call).
"""

from __future__ import annotations

__all__: list[str] = []
