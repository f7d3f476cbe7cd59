"""The golden self-test: a bundle's stored inputs must give its stored outputs within tolerance.

``golden.npz`` holds ``input.NAME`` and ``output.NAME`` arrays whose first axis is the sample; each
sample is exactly what ``predict`` is fed (so a model with a fixed batch of one is fed one at a time).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from edgefleet.agent.runtime import Model
from edgefleet.bundle.archive import read_npz
from edgefleet.bundle.manifest import GoldenRef, shown
from edgefleet.errors import BundleError, EdgefleetError

__all__ = ["GoldenReport", "load_golden", "run_golden", "verify_bundle"]


@dataclass
class GoldenReport:
    passed: bool
    samples: int
    max_abs_error: dict[str, float] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "passed": self.passed,
            "samples": self.samples,
            "max_abs_error": self.max_abs_error,
            "failures": self.failures,
        }


def load_golden(
    data: bytes, where: str = "golden.npz"
) -> tuple[dict[str, np.ndarray[Any, Any]], dict[str, np.ndarray[Any, Any]]]:
    """(inputs, outputs) by tensor name. Raises :class:`BundleError` for a malformed file, or one whose
    arrays declare more than their bytes hold (checked before anything is allocated)."""
    arrays = read_npz(data, where)
    ins = {k[6:]: v for k, v in arrays.items() if k.startswith("input.")}
    outs = {k[7:]: v for k, v in arrays.items() if k.startswith("output.")}
    if not ins or not outs:
        raise BundleError(f"{where}: needs input.NAME and output.NAME arrays, has {shown(sorted(arrays))}")
    counts = {v.shape[0] if v.ndim else -1 for v in (*ins.values(), *outs.values())}
    if len(counts) != 1 or -1 in counts:
        raise BundleError(f"{where}: every array must have the same number of samples on its first axis")
    return ins, outs


def run_golden(model: Model, data: bytes, ref: GoldenRef, where: str = "golden.npz") -> GoldenReport:
    """Run every golden sample and compare with ``ref``'s tolerance; never raises for a mismatch.

    A stateful model runs the samples in order from its initial state (as they were recorded) and is
    reset afterwards, so that what it serves next does not start from the self-test's state."""
    ins, outs = load_golden(data, where)
    model.reset()
    try:
        return _compare(model, ins, outs, ref)
    finally:
        model.reset()


def _compare(
    model: Model, ins: dict[str, np.ndarray[Any, Any]], outs: dict[str, np.ndarray[Any, Any]], ref: GoldenRef
) -> GoldenReport:
    n = next(iter(ins.values())).shape[0]
    report = GoldenReport(passed=True, samples=n)
    for i in range(n):
        try:
            got = model.predict({k: v[i] for k, v in ins.items()})
        except EdgefleetError as e:
            report.passed = False
            report.failures.append(f"sample {i}: {e}")
            continue
        for name, want in outs.items():
            if name not in got:
                report.passed = False
                report.failures.append(f"sample {i}: output {name!r} missing")
                continue
            g = got[name]
            if g.shape != want[i].shape:
                report.passed = False
                report.failures.append(
                    f"sample {i}: output {name!r} shape {list(g.shape)}, expected {list(want[i].shape)}"
                )
                continue
            err = float(np.max(np.abs(g.astype(np.float64) - want[i].astype(np.float64)))) if g.size else 0.0
            report.max_abs_error[name] = max(report.max_abs_error.get(name, 0.0), err)
            if not np.allclose(g, want[i], rtol=ref.rtol, atol=ref.atol):
                report.passed = False
                report.failures.append(
                    f"sample {i}: output {name!r} differs by {err:.3g} (rtol={ref.rtol}, atol={ref.atol})"
                )
    return report


def verify_bundle(path: str, threads: int | None = None) -> dict[str, Any]:
    """Check a bundle end to end: every member's hash, the manifest, that the model loads and matches
    the manifest, and the golden self-test. Returns a JSON-ready report with ``ok``; raises
    :class:`BundleError` / :class:`~edgefleet.errors.ModelError` for a bundle that cannot be read."""
    from edgefleet.agent.runtime import load_model
    from edgefleet.bundle.archive import BundleReader

    with BundleReader(path) as b:
        b.verify_hashes()
        manifest = b.manifest
        golden = b.read(manifest.golden.path) if manifest.golden else None
    model = load_model(path, threads=threads)
    report: dict[str, Any] = {
        "bundle": str(path),
        "name": manifest.name,
        "version": manifest.version,
        "runtime": manifest.runtime,
        "hashes": "ok",
        "model": "loads, tensors match the manifest",
        "golden": None,
        "ok": True,
    }
    if manifest.golden is not None and golden is not None:
        g = run_golden(model, golden, manifest.golden, f"{path}: {manifest.golden.path}")
        report["golden"] = g.to_dict()
        report["ok"] = g.passed
    return report
