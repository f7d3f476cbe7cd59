"""``edgefleet demo``: the best end-to-end demonstration there is so far.

Packages the digits models (trained by ``tests/fixtures/make_models.py`` on scikit-learn's bundled
digits) as bundles with labels, golden vectors, a drift baseline and a pipeline; verifies them; runs
the held-out split through each bundle's pipeline for accuracy and sample predictions; times
``predict`` beside the bare runtime; serves the int8 bundle from a real agent process over the Open
Inference Protocol; then the fleet updater end to end: a fleet server (SQLite), the operator's
keyring (``keys init``), every bundle pushed and signed, a device enrolled with a pinned token, and a
real ``edgefleet agent run`` that the operator assigns digits 1.0.0 (float), 2.0.0 (int8: switched to
while a load thread sends inferences) and a bad 3.0.0 (golden outputs of the wrong images: refused by
its self-test, reason ``selftest_failed``, while 2.0.0 keeps serving).

What it prints is what happened: predictions are the first held-out images (not picked), each marked
right or wrong; the latency ratio is agent p50 / bare-runtime p50, both timed in this run; update
events are the server's (``GET /api/v1/devices/{id}/events``), at the device's times since each
``device assign``; the load thread's counts are its own answers, each with the version that gave it;
and no URL is printed for a server that is no longer running (``--keep-running`` leaves the fleet
server up, with its URL, until Ctrl-C). The agent and the server are stopped however the demo ends.
"""

from __future__ import annotations

import itertools
import json
import shutil
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from edgefleet.errors import EdgefleetError

__all__ = ["demo", "find_fixtures"]

console = Console(width=max(100, shutil.get_terminal_size().columns))

_MODELS = [
    # file, layout the model wants
    ("digits_cnn_float.onnx", "nchw"),
    ("digits_cnn_int8.onnx", "nchw"),
    ("digits_cnn_float.tflite", "nhwc"),
    ("digits_cnn_int8.tflite", "nhwc"),
]
_UPDATES = {"checkin_interval": 0.5, "probation_inferences": 20, "probation_seconds": 1}  # agent.toml [updates]
_LOAD_RATE = 40.0  # inferences a second the load thread sends while the updates run
_STEP_TIMEOUT = 90.0  # seconds a server, an agent or one update may take before the demo gives up
_FINAL = ("update.committed", "update.refused", "update.rolled_back")  # the events that end an update


def find_fixtures() -> Path:
    """``tests/fixtures/models`` of the source tree this package runs from."""
    here = Path(__file__).resolve()
    for parent in here.parents:
        cand = parent / "tests" / "fixtures" / "models"
        if (cand / "digits_holdout.npz").is_file():
            return cand
    raise EdgefleetError("demo models not found: run from a clone of the edgefleet repository (tests/fixtures/models)")


def demo(
    models: Path | None = typer.Option(None, help="Folder with the digits fixtures (default: the source tree's)."),
    workdir: Path | None = typer.Option(None, help="Where to write the bundles (default: a temp folder)."),
    runs: int = typer.Option(300, min=10, help="Timed calls per model for the latency table."),
    keep_running: bool = typer.Option(
        False, "--keep-running", help="Leave the fleet server running at the end, print its URL; Ctrl-C stops it."
    ),
) -> None:
    """Package, verify and run the digits models; show predictions, accuracy and latency.

    Raises EdgefleetError (a one-line error) when the fixtures are missing or a server does not start.
    """
    import numpy as np

    from edgefleet.agent import Pipeline, load_model
    from edgefleet.agent.benchmark import bench_model
    from edgefleet.agent.selftest import verify_bundle
    from edgefleet.bundle.manifest import PipelineSpec
    from edgefleet.converters.package import package_model

    src = models or find_fixtures()
    holdout = np.load(src / "digits_holdout.npz")
    x, y = holdout["x"], holdout["y"]
    names = (src / "digits_labels.txt").read_text().split()
    console.rule("[bold]edgefleet demo: digits on the device runtime")
    console.print(f"models from {src}; held-out split: {len(y)} real 8x8 digit images (scikit-learn)")
    tmp = tempfile.TemporaryDirectory(prefix="edgefleet-demo-") if workdir is None else None
    out_dir = Path(tmp.name) if tmp else workdir
    assert out_dir is not None
    out_dir.mkdir(parents=True, exist_ok=True)
    acc_table = Table(
        "bundle",
        "size",
        "golden",
        "accuracy",
        "agent p50 µs",
        "bare p50 µs",
        "agent/bare",
        title="held-out accuracy and latency",
        caption=(
            f"predict() at batch 1, {runs} timed calls each, through edgefleet and through the bare runtime on "
            "the same model and input; agent/bare = ratio of the two p50s (1.00 = no overhead)"
        ),
    )
    samples: list[tuple[str, list[dict[str, Any]]]] = []
    try:
        for fname, layout in _MODELS:
            path = src / fname
            spec = PipelineSpec.model_validate(
                {
                    "preprocess": [{"op": "scale", "factor": 1 / 16}, {"op": "layout", "target": layout}],
                    "postprocess": [{"op": "softmax"}, {"op": "topk", "k": 3}],
                }
            )
            xs = (x[:, None] if layout == "nchw" else x[..., None]).astype(np.float32) / 16
            inp = "input" if fname.endswith(".onnx") else "image"
            name = fname.replace("_", "-").replace(".", "-")  # digits-cnn-int8-tflite
            bundle, _ = package_model(
                path,
                name,
                "1.0.0",
                out=out_dir,
                labels=src / "digits_labels.txt",
                golden={inp: xs[:16]},
                baseline={inp: xs},
                pipeline=spec,
            )
            report = verify_bundle(str(bundle))
            model = load_model(bundle)
            pipe = Pipeline(model)
            results = [pipe.run(img) for img in x]
            acc = float(np.mean([r["top_k"][0]["index"] == t for r, t in zip(results, y, strict=True)]))
            # Both sides get the model's own dtype (int8 for the int8 TFLite model): the same work.
            native, _ = model.prepare({inp: xs[:1]})
            b = bench_model(model, native, runs=runs)
            g = report["golden"]
            acc_table.add_row(
                bundle.name,
                f"{bundle.stat().st_size / 1024:.0f} KiB",
                "passed" if g and g["passed"] else "FAILED",
                f"{acc:.2%}",
                f"{b['agent']['p50_us']:.1f}",
                f"{b['bare']['p50_us']:.1f}",
                f"{b['ratio_p50']:.3f}",
            )
            samples.append((bundle.name, results[:5]))
        console.print(acc_table)
        name, first = samples[-1]
        pred = Table(
            "image",
            "true",
            "top-1",
            "score",
            "right?",
            "top-3",
            title=f"predictions of {name} on the first {len(first)} held-out images (not picked)",
        )
        for i, r in enumerate(first):
            top = r["top_k"]
            pred.add_row(
                str(i),
                names[int(y[i])],
                top[0]["label"],
                f"{top[0]['score']:.3f}",
                "right" if top[0]["index"] == y[i] else "[bold red]WRONG[/]",
                ", ".join(f"{t['label']} {t['score']:.2f}" for t in top),
            )
        console.print(pred)
        _serve(out_dir / "digits-cnn-int8-tflite-1.0.0.efb", x[:3].astype(np.float32) / 16, y[:3], names)
        _fleet(out_dir, src, x, y, names, keep_running=keep_running)
        console.print(
            f"bundles written to {out_dir}"
            if tmp is None
            else "bundles were written to a temp folder (use --workdir to keep them)"
        )
    finally:
        if tmp is not None:
            tmp.cleanup()


def _serve(bundle: Path, images: Any, labels: Any, names: list[str]) -> None:
    """Start a real agent process on the bundle and ask it over the Open Inference Protocol."""
    import json
    import socket
    import subprocess
    import sys
    import time
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    exe = Path(sys.executable).parent / "edgefleet"
    console.rule("[bold]the agent serving it: Open Inference Protocol on 127.0.0.1")
    console.print(f"$ edgefleet agent serve {bundle.name} --port {port}")
    proc = subprocess.Popen(
        [str(exe), "agent", "serve", str(bundle), "--port", str(port), "--log-level", "warning"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert proc.stdout is not None
        ready = proc.stdout.readline().strip()
        if not ready.startswith("ready"):
            raise EdgefleetError(f"the agent did not start: {ready or f'exit {proc.wait(30)}'}")
        # Its URL is not printed: the agent stops at the end of this step.
        console.print(f"agent pid {proc.pid}: {ready.split(' on ')[0]}")
        base = f"http://127.0.0.1:{port}"
        for img, label in zip(images, labels, strict=True):
            body = {
                "inputs": [
                    {
                        "name": "image",
                        "shape": [1, 8, 8, 1],
                        "datatype": "FP32",
                        "data": img.reshape(-1).round(4).tolist(),
                    }
                ]
            }
            req = urllib.request.Request(
                f"{base}/v2/models/digits-cnn-int8-tflite/infer",
                data=json.dumps(body).encode(),
                headers={"Content-Type": "application/json"},
            )
            t0 = time.perf_counter()
            with urllib.request.urlopen(req, timeout=10) as r:
                out = json.loads(r.read())["outputs"][0]
            ms = (time.perf_counter() - t0) * 1e3
            logits = out["data"]
            top1 = max(range(len(logits)), key=logits.__getitem__)
            verdict = "right" if top1 == label else "[bold red]WRONG[/]"
            console.print(
                f"POST /v2/models/digits-cnn-int8-tflite/infer  true {names[int(label)]}  predicted "
                f"{names[top1]} ({verdict})  ({ms:.1f} ms round trip)"
            )
        with urllib.request.urlopen(f"{base}/metrics", timeout=10) as r:
            text = r.read().decode()
        count = next(line for line in text.splitlines() if line.startswith("edgefleet_inference_seconds_count"))
        console.print(f"GET /metrics  {count}")
    finally:
        proc.terminate()
        proc.wait(30)
    console.print(f"agent stopped on SIGTERM ({_exit_status(proc.returncode)})")


def _fleet(work: Path, src: Path, images: Any, labels: Any, names: list[str], *, keep_running: bool = False) -> None:
    """A fleet server (SQLite) and a real agent process following it, as an operator runs them.

    ``keys init`` (the operator's offline keyring), every bundle pushed and signed into the image
    targets, a pinned enrollment token, ``agent enroll``, then ``agent run`` serving digits 1.0.0 while
    the operator assigns 1.0.0, 2.0.0 (switched to under load) and a bad 3.0.0 (refused by its self-test);
    :func:`_updates` does that part. With ``keep_running`` the server stays up, its URL printed, until
    Ctrl-C; otherwise it is stopped before this returns and no URL of it is printed. Raises EdgefleetError
    when a step fails; the agent and the server are stopped whatever happens.
    """
    import os
    import re
    import subprocess

    exe = str(Path(sys.executable).parent / "edgefleet")
    port = _free_port()
    data, device, keys = work / "fleet-data", work / "device", work / "keys"
    console.rule("[bold]the fleet server: signed bundles and an enrolled device")
    init = subprocess.run([exe, "server", "init", "--data", str(data)], capture_output=True, text=True, check=True)
    token = re.search(r"efo_\S+", init.stdout)
    if token is None:
        raise EdgefleetError("server init printed no admin token")
    url = f"http://127.0.0.1:{port}"
    # Devices must use HTTPS in production; plain HTTP is allowed here because all of it is on loopback.
    env = {**os.environ, "EDGEFLEET_SERVER_ALLOW_PLAIN_HTTP_DEVICES": "true"}
    log = work / "server.log"
    with log.open("ab") as out:
        server = subprocess.Popen([exe, "server", "run", "--data", str(data), "--port", str(port)], env=env,
                                  stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
    finished = False
    try:
        deadline = time.monotonic() + _STEP_TIMEOUT
        while True:
            try:
                urllib.request.urlopen(f"{url}/healthz", timeout=2).close()
                break
            except OSError:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise EdgefleetError(f"the fleet server did not start: {_last_line(log)}") from None
                time.sleep(0.1)
        console.print(f"$ edgefleet server run --data {data.name} --port {port}   (SQLite)")
        op = _Operator(exe, url, token.group(0), keys)
        ring = op.cli("keys", "init", "--keys", str(keys))
        console.print(f"$ edgefleet keys init --keys {keys.name} --server …   -> image root {ring['root_version']}, "
                      f"fingerprint {str(ring['fingerprint'])[:16]}…; the root and release keys stay in {keys.name}/")
        updates = _update_bundles(src, work / "updates", images)
        for bundle in [*sorted(work.glob("*.efb")), updates["1.0.0"]]:
            op.push(bundle)
        enroll = op.cli("device", "enroll-token", "--tag", "demo", "--max-uses", "1", "--keys", str(keys))
        console.print("$ edgefleet device enroll-token --tag demo --keys keys   -> a token pinning image root "
                      f"{enroll['token'].rsplit('.', 2)[-2]}")
        enrolled = op.cli("agent", "enroll", "--token", enroll["token"], "--state-dir", str(device), "--allow-http")
        device_id = str(enrolled["device_id"])
        console.print(f"$ edgefleet agent enroll --token …   -> device {device_id} (its key never left {device.name}/; "
                      "it trusts the pinned image root and the director root that root signed)")
        _updates(op, exe, work, device_id, updates, images, labels, names)
        finished = True
        if keep_running:
            try:  # Ctrl-C may come as soon as the URL is out, so the prints are inside the try too
                console.print(f"the fleet server is running: API docs at {url}/docs (the dashboard comes later)")
                console.print("press Ctrl-C to stop it")
                server.wait()
            except KeyboardInterrupt:
                pass
    finally:
        server.terminate()
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(30)
        console.print(  # said even when the demo fails or is interrupted; the hint only after a full run
            f"fleet server stopped ({_exit_status(server.returncode)})"
            + ("" if keep_running or not finished
               else "; `edgefleet demo --keep-running` leaves it up to browse its API at /docs")
        )


def _update_bundles(src: Path, out: Path, images: Any) -> dict[str, Path]:
    """Model ``digits`` in three versions: 1.0.0 the float CNN, 2.0.0 the same network quantized to int8
    (same input and output), 3.0.0 the int8 model whose golden outputs were recorded for other images
    (each shifted by one): its hashes and signatures are all right, only the device's self-test can
    tell. The golden inputs are the first 16 held-out images."""
    import io

    import numpy as np

    from edgefleet.bundle.archive import BundleReader, file_ref, read_npz, write_bundle
    from edgefleet.bundle.manifest import PipelineSpec
    from edgefleet.converters.package import package_model

    xs = images.astype(np.float32)[:, None] / 16  # NCHW, as the ONNX models want
    spec = PipelineSpec.model_validate(
        {
            "preprocess": [{"op": "scale", "factor": 1 / 16}, {"op": "layout", "target": "nchw"}],
            "postprocess": [{"op": "softmax"}, {"op": "topk", "k": 3}],
        }
    )
    common: dict[str, Any] = {"labels": src / "digits_labels.txt", "golden": {"input": xs[:16]}, "pipeline": spec}
    out.mkdir(parents=True, exist_ok=True)
    v1, _ = package_model(src / "digits_cnn_float.onnx", "digits", "1.0.0", out=out, **common,
                          description="digits CNN, float32")
    v2, _ = package_model(src / "digits_cnn_int8.onnx", "digits", "2.0.0", out=out, **common,
                          description="digits CNN, quantized to int8")
    with tempfile.TemporaryDirectory(dir=out, prefix=".v3-") as tmp:
        good, manifest = package_model(src / "digits_cnn_int8.onnx", "digits", "3.0.0", out=Path(tmp), **common,
                                       description="digits CNN, int8, golden outputs of the wrong images")
        assert manifest.golden is not None
        with BundleReader(good) as r:
            members = {ref.path: r.read(ref.path) for ref in manifest.members()}
    arrays = read_npz(members[manifest.golden.path])
    arrays = {k: np.roll(a, 1, axis=0) if k.startswith("output.") else a for k, a in arrays.items()}
    buf = io.BytesIO()
    np.savez(buf, **{k: arrays[k] for k in sorted(arrays)})
    blob = members[manifest.golden.path] = buf.getvalue()
    ref = file_ref(manifest.golden.path, blob)
    manifest = manifest.model_copy(update={"golden": manifest.golden.model_copy(update={"sha256": ref.sha256,
                                                                                       "size": ref.size})})
    v3 = write_bundle(out / manifest.bundle_name, manifest, members)
    return {"1.0.0": v1, "2.0.0": v2, "3.0.0": v3}


def _updates(op: _Operator, exe: str, work: Path, device_id: str, bundles: dict[str, Path], images: Any,
             labels: Any, names: list[str]) -> None:
    """The update loop on a real ``edgefleet agent run``: serve 1.0.0 from agent.toml, assign 1.0.0 (the
    updater installs its own verified copy), then 2.0.0 while a load thread sends inferences (every
    event printed as the server gets it, the switch seen by the load), then the bad 3.0.0 (refused, with
    its reason from ``device show`` and ``agent status``); the fleet's tables; the agent stopped
    whatever happens. Raises EdgefleetError when an update does not end as it should."""
    import numpy as np

    console.rule("[bold]the fleet updater: a real agent process follows its server")
    xs = images.astype(np.float32)[:, None] / 16
    agent = _Agent(exe, work / "agent", work / "device", bundles["1.0.0"])
    load: _Load | None = None
    seen: set[int] = set()
    try:
        agent.start()
        assert agent.proc is not None
        console.print(f"$ edgefleet agent run --config agent.toml   -> pid {agent.proc.pid}: {agent.ready}")
        for line in agent.config.read_text().splitlines():
            console.print(f"    [dim]{escape(line)}[/]" if line else "")
        load = _Load(agent, xs, labels).start()

        t0 = op.assign(device_id, "1.0.0")
        end = _follow(op, device_id, "1.0.0", load, t0, seen, show=False)
        _expect(end, "update.committed", agent)
        steps = [e["kind"] for e in end["_all"]]
        console.print(f"  the device checked the signed 1.0.0 against the image and director metadata, installed "
                      f"and self-tested it, then served its own copy: {' → '.join(steps)} in "
                      f"{_at(end) - t0:.1f} s")
        version, top1 = agent.infer(xs[0])
        console.print(f"POST /v2/models/digits/infer  true {names[int(labels[0])]}  predicted {names[top1]} "
                      f"({'right' if top1 == labels[0] else '[bold red]WRONG[/]'})  answered by digits {version}")

        v1, v2 = (bundles[v].stat().st_size for v in ("1.0.0", "2.0.0"))
        op.push(bundles["2.0.0"])
        console.print(f"  2.0.0 is the same network quantized to int8: {v2 / 1024:.0f} KiB instead of "
                      f"{v1 / 1024:.0f} KiB")
        t0 = op.assign(device_id, "2.0.0")
        console.print(f"  while a load thread sends {_LOAD_RATE:g} inferences a second (each answer records the "
                      "version that gave it):")
        end = _follow(op, device_id, "2.0.0", load, t0, seen, show=True)
        _expect(end, "update.committed", agent)
        _summary(load.since(t0), "while it updated")

        op.push(bundles["3.0.0"])
        console.print("  3.0.0: the int8 model under golden outputs recorded for the wrong images (shifted by one): "
                      "signed, hashes right; only the self-test can tell")
        t0 = op.assign(device_id, "3.0.0")
        end = _follow(op, device_id, "3.0.0", load, t0, seen, show=True)
        _expect(end, ("update.refused", "update.rolled_back"), agent)
        load.wait_answers(t0=_at(end), n=int(_LOAD_RATE))  # a second of answers after the refusal
        shown = op.cli("device", "show", device_id)
        running = ", ".join(f"{r.get('name')} {r.get('version')}" for r in shown.get("running") or [])
        refusal = next(e for e in shown.get("events") or [] if e["kind"] in _FINAL and e.get("version") == "3.0.0")
        console.print(f"$ edgefleet device show {device_id}   -> running {running or '(nothing reported)'}; "
                      f"{refusal['kind']} {refusal.get('model')} {refusal.get('version')}: reason "
                      f"[bold]{refusal.get('reason')}[/]")
        console.print(f"  detail: {escape(_clip(str(refusal.get('detail')), 200))}")
        console.print("$ edgefleet agent status --config agent.toml   (the device's own view, read from "
                      f"{agent.state_dir.name}/)")
        for line in op.run("agent", "status", "--config", str(agent.config)).splitlines():
            if line.startswith(("running:", "update:", "last failure:", "refused:")):
                console.print(f"  {escape(_clip(line, 160))}")
        version, top1 = agent.infer(xs[1])
        console.print(f"POST /v2/models/digits/infer  true {names[int(labels[1])]}  predicted {names[top1]} "
                      f"({'right' if top1 == labels[1] else '[bold red]WRONG[/]'})  answered by digits {version}")
        _summary(load.since(t0), "while it tried 3.0.0 and after")

        table = Table("device", "tags", "online", "revoked", "running", title="edgefleet device list",
                      caption="online: checked in recently (this agent: every 0.5 s)")
        for d in op.cli("device", "list"):
            table.add_row(str(d["id"]), ", ".join(d.get("tags", [])), str(d.get("online")), str(d.get("revoked")),
                          ", ".join(str(r) for r in d.get("running") or []))  # NAME@VERSION
        console.print(table)
        versions = Table("name", "version", "runtime", "size", title="edgefleet model list")
        for m in op.cli("model", "list"):
            versions.add_row(m["name"], m["version"], m["runtime"], str(m["size"]))
        console.print(versions)
    finally:
        if load is not None:
            load.stop()
        if agent.proc is not None:  # said even when the demo fails or is interrupted
            console.print(f"agent stopped on SIGTERM ({_exit_status(agent.stop())})")


def _expect(end: dict[str, Any], kinds: str | tuple[str, ...], agent: _Agent) -> None:
    """Raise EdgefleetError unless the event that ended an update is of ``kinds``."""
    if end["kind"] not in ((kinds,) if isinstance(kinds, str) else kinds):
        raise EdgefleetError(f"digits {end.get('version')} ended in {end['kind']} ({end.get('reason')}: "
                             f"{end.get('detail')}); agent: {_last_line(agent.log)}")


def _at(event: dict[str, Any]) -> float:
    """When an event happened on the device (its ``at``; the device is this machine: the same clock)."""
    from datetime import UTC, datetime

    at = datetime.fromisoformat(str(event["at"]).replace("Z", "+00:00"))
    return (at if at.tzinfo else at.replace(tzinfo=UTC)).timestamp()


def _follow(op: _Operator, device_id: str, version: str, load: _Load, t0: float, seen: set[int],
            show: bool) -> dict[str, Any]:
    """Poll the server's events of the device until one ends the update to ``version`` (committed,
    refused, rolled back) and return it, with every new event of this update under ``_all``. With
    ``show``, print each event as the server gets it and the load thread's first answer from
    ``version``, each at its time since ``t0``. Raises EdgefleetError when the agent exits, or after
    ``_STEP_TIMEOUT``."""
    deadline = time.monotonic() + _STEP_TIMEOUT
    new: list[dict[str, Any]] = []
    first_seen = False
    while True:
        for e in op.events(device_id):
            if e.get("seq") is None or e["seq"] in seen:
                continue
            seen.add(e["seq"])
            new.append(e)
            if show:
                reason = f"  reason [bold]{escape(str(e['reason']))}[/]" if e.get("reason") else ""
                detail = escape(_clip(str(e.get("detail") or "")))
                console.print(f"  {f'+{_at(e) - t0:.2f}':>6} s  {e['kind']:<18} {e.get('model') or ''} "
                              f"{e.get('version') or ''}{reason}  [dim]{detail}[/]")
            if e.get("version") == version and e["kind"] in _FINAL:
                return {**e, "_all": new}
        if show and not first_seen:
            samples = load.since(t0)
            i = next((i for i, s in enumerate(samples) if s.version == version), None)
            if i is not None:
                first_seen = True
                before = sorted({s.version for s in samples[:i] if s.version})
                console.print(f"  {f'+{samples[i].at - t0:.2f}':>6} s  [bold]load thread[/]        first answer from "
                              f"{version} ({i} answers before it, from {', '.join(before) or 'nothing'})")
        agent = load.agent
        if agent.proc is not None and agent.proc.poll() is not None:
            raise EdgefleetError(f"the agent exited ({_exit_status(agent.proc.returncode)}) while updating to "
                                 f"{version}: {_last_line(agent.log)}")
        if time.monotonic() > deadline:
            raise EdgefleetError(f"digits {version}: no end of the update in {_STEP_TIMEOUT:g} s; last event: "
                                 f"{new[-1]['kind'] if new else 'none'}")
        time.sleep(0.1)


def _summary(samples: list[_Sample], when: str) -> None:
    """One line on the load thread's answers: how many per version (and right), how many failed, how
    often the answering version changed."""
    failed = [s for s in samples if s.version is None]
    per: dict[str, list[_Sample]] = {}
    for s in samples:
        if s.version is not None:
            per.setdefault(s.version, []).append(s)
    counts = ", ".join(f"{v} × {len(a)} ({sum(s.right for s in a) / len(a):.0%} right)" for v, a in per.items())
    answered = [s.version for s in samples if s.version is not None]
    flips = sum(1 for a, b in itertools.pairwise(answered) if a != b)
    verdict = ("no inference failed" if not failed
               else f"[bold red]{len(failed)} inferences failed[/] (first: {escape(failed[0].error[:100])})")
    console.print(f"  load thread {when}: {len(samples)} inferences, answered by {counts or 'nothing'}; {verdict}; "
                  f"the answering version changed {flips} time{'' if flips == 1 else 's'}")


@dataclass(frozen=True)
class _Sample:
    """One inference of the load thread: when it was sent (``time.time()``), the version that answered
    (None: it failed), whether its top-1 was the true digit, and the error if it failed."""

    at: float
    version: str | None
    right: bool
    error: str = ""


class _Load:
    """Inferences sent to the agent from a thread, ``_LOAD_RATE`` a second through the held-out images,
    each recorded as a :class:`_Sample`, until :meth:`stop`."""

    def __init__(self, agent: _Agent, images: Any, labels: Any) -> None:
        self.agent, self.images, self.labels = agent, images, labels
        self._samples: list[_Sample] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="demo-load", daemon=True)

    def start(self) -> _Load:
        self._thread.start()
        return self

    def _run(self) -> None:
        started, i = time.monotonic(), 0
        while not self._stop.wait(max(0.0, started + i / _LOAD_RATE - time.monotonic())):
            n = i % len(self.images)
            at = time.time()
            try:
                version, top1 = self.agent.infer(self.images[n])
                sample = _Sample(at, version, top1 == int(self.labels[n]))
            except Exception as e:  # every failure is a sample, reported by _summary; the thread goes on
                sample = _Sample(at, None, False, f"{type(e).__name__}: {e}")
            with self._lock:
                self._samples.append(sample)
            i += 1

    def since(self, t: float) -> list[_Sample]:
        """The samples sent at or after ``t`` (``time.time()``), in order."""
        with self._lock:
            return [s for s in self._samples if s.at >= t]

    def wait_answers(self, t0: float, n: int) -> None:
        """Wait until ``n`` inferences sent after ``t0`` came back (answered or failed), or ``_STEP_TIMEOUT``."""
        deadline = time.monotonic() + _STEP_TIMEOUT
        while len(self.since(t0)) < n and time.monotonic() < deadline:
            time.sleep(0.05)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(30)


class _Operator:
    """The operator: the ``edgefleet`` CLI as processes, and the server's events over HTTP, with the
    admin token from ``server init``."""

    def __init__(self, exe: str, url: str, token: str, keys: Path) -> None:
        import os

        self.exe, self.url, self.token, self.keys = exe, url, token, keys
        self.env = {**os.environ, "EDGEFLEET_TOKEN": token}

    def run(self, *args: str) -> str:
        """``edgefleet ARGS``; its output. Raises EdgefleetError with its error line."""
        import subprocess

        r = subprocess.run([self.exe, *args], env=self.env, capture_output=True, text=True, timeout=_STEP_TIMEOUT,
                           stdin=subprocess.DEVNULL)
        if r.returncode != 0:
            raise EdgefleetError(f"edgefleet {' '.join(args[:2])}: {r.stderr.strip()}")
        return r.stdout

    def cli(self, *args: str) -> Any:
        """``edgefleet ARGS --server URL --json``; its parsed output (None when empty)."""
        out = self.run(*args, "--server", self.url, "--json")
        return json.loads(out) if out.strip() else None

    def push(self, bundle: Path) -> None:
        """``model push BUNDLE --keys keys``: uploaded and signed into the image targets; printed."""
        pushed = self.cli("model", "push", str(bundle), "--keys", str(self.keys))
        console.print(f"$ edgefleet model push {bundle.name} --keys {self.keys.name}   -> sha256 "
                      f"{str(pushed.get('sha256', ''))[:16]}…, signed into the image targets")

    def assign(self, device_id: str, version: str) -> float:
        """``device assign DEVICE digits VERSION``, printed; returns when it was sent (``time.time()``)."""
        t0 = time.time()
        self.cli("device", "assign", device_id, "digits", version)
        console.print(f"$ edgefleet device assign {device_id} digits {version}")
        return t0

    def events(self, device_id: str) -> list[dict[str, Any]]:
        """The device's last 100 update events, oldest first (``GET /api/v1/devices/{id}/events``)."""
        req = urllib.request.Request(f"{self.url}/api/v1/devices/{device_id}/events?limit=100",
                                     headers={"Authorization": f"Bearer {self.token}"})
        with urllib.request.urlopen(req, timeout=10) as r:
            return list(reversed(json.loads(r.read())))


class _Agent:
    """A real ``edgefleet agent run`` for the enrolled ``state_dir``: its agent.toml (written here: the
    local API on a free loopback port, ``bundle`` in ``[[models]]``, fast ``[updates]``) and its output
    in ``agent.log``, both in ``folder``."""

    def __init__(self, exe: str, folder: Path, state_dir: Path, bundle: Path) -> None:
        self.exe, self.state_dir, self.bundle = exe, state_dir, bundle
        folder.mkdir(parents=True, exist_ok=True)
        self.config, self.log = folder / "agent.toml", folder / "agent.log"
        self.proc: Any = None  # subprocess.Popen[bytes] once started
        self.base = self.ready = ""

    def start(self) -> None:
        """Write agent.toml, start the agent, wait for its ``ready:`` line. Raises EdgefleetError."""
        import os
        import re
        import subprocess

        updates = "".join(f"{k} = {v}\n" for k, v in _UPDATES.items())
        self.config.write_text(
            f"state_dir = {json.dumps(str(self.state_dir))}\nlog_level = \"info\"\n\n"
            f"[api]\nhost = \"127.0.0.1\"\nport = 0  # any free port\n\n[updates]\n{updates}\n"
            f"[[models]]\npath = {json.dumps(str(self.bundle))}\n"
        )
        # Only agent.toml steers it: none of the operator's EDGEFLEET_* variables.
        env = {k: v for k, v in os.environ.items() if not k.startswith("EDGEFLEET_")} | {"PYTHONUNBUFFERED": "1"}
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen([self.exe, "agent", "run", "--config", str(self.config)], env=env,
                                         stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
        ready = re.compile(r"^(ready: \d+ model\(s\)) on http://127\.0\.0\.1:(\d+)", re.M)
        deadline = time.monotonic() + _STEP_TIMEOUT
        while (m := ready.search(self.log.read_text(errors="replace"))) is None:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise EdgefleetError(f"the agent did not start ({_exit_status(self.proc.poll())}): "
                                     f"{_last_line(self.log)}")
            time.sleep(0.1)
        self.ready, self.base = m.group(1), f"http://127.0.0.1:{m.group(2)}"

    def infer(self, image: Any) -> tuple[str, int]:
        """``POST /v2/models/digits/infer`` (the Open Inference Protocol) with one [1, 1, 8, 8] image; the
        version that answered and the top-1 class. Raises OSError (HTTPError for a non-200) or ValueError."""
        body = {"inputs": [{"name": "input", "shape": [1, 1, 8, 8], "datatype": "FP32",
                            "data": image.reshape(-1).round(4).tolist()}]}
        req = urllib.request.Request(f"{self.base}/v2/models/digits/infer", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=10) as r:
            answer = json.loads(r.read())
        logits = answer["outputs"][0]["data"]
        return str(answer["model_version"]), max(range(len(logits)), key=logits.__getitem__)

    def stop(self) -> int | None:
        """SIGTERM and wait (SIGKILL after 30 s); the exit code (None: it never started)."""
        import subprocess

        if self.proc is None:
            return None
        self.proc.terminate()
        try:
            return int(self.proc.wait(30))
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return int(self.proc.wait(30))


def _free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _clip(text: str, limit: int = 100) -> str:
    """``text`` if it fits in ``limit`` characters; else up to its first ``; `` (a detail lists its
    failures so), at most ``limit`` characters, with … where it was cut."""
    if len(text) <= limit:
        return text
    return text.split("; ", 1)[0][:limit] + "…"


def _last_line(log: Path) -> str:
    """The last non-empty line of a process's log, for a one-line error."""
    try:
        lines = [line for line in log.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return "(no log)"
    return lines[-1][:300] if lines else "(no output)"


def _exit_status(code: int | None) -> str:
    """``exit 0``, or the signal that ended a process (``killed by SIGTERM``) as Popen reports it."""
    import signal

    if code is None:
        return "still running"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit {code}"
