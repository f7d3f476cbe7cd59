"""``edgefleet demo``: the best end-to-end demonstration there is so far.

Packages the digits models (trained by ``tests/fixtures/make_models.py`` on scikit-learn's bundled
digits) as bundles with labels, golden vectors, a drift baseline and a pipeline; verifies them; runs
the held-out split through each bundle's pipeline for accuracy and sample predictions; times
``predict`` beside the bare runtime; serves the int8 bundle from a real agent process over the Open
Inference Protocol; and starts a fleet server (SQLite) that takes the bundles and enrolls a device.

What it prints is what happened: predictions are the first held-out images (not picked), each marked
right or wrong; the latency ratio is agent p50 / bare-runtime p50, both timed in this run; and no URL
is printed for a server that is no longer running (``--keep-running`` leaves the fleet server up, with
its URL, until Ctrl-C).
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
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
        _fleet(out_dir, keep_running=keep_running)
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


def _fleet(work: Path, *, keep_running: bool = False) -> None:
    """A fleet server (SQLite) as a real process: push the bundles, enroll a device, list the fleet.

    With ``keep_running`` the server stays up, its URL printed, until Ctrl-C; otherwise it is stopped
    before this returns and no URL of it is printed. Raises EdgefleetError when a step fails.
    """
    import json
    import os
    import re
    import socket
    import subprocess
    import sys
    import time
    import urllib.request

    exe = str(Path(sys.executable).parent / "edgefleet")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    data, device = work / "fleet-data", work / "device"
    console.rule("[bold]the fleet server: registry and device enrollment")
    init = subprocess.run([exe, "server", "init", "--data", str(data)], capture_output=True, text=True, check=True)
    token = re.search(r"efo_\S+", init.stdout)
    if token is None:
        raise EdgefleetError("server init printed no admin token")
    url = f"http://127.0.0.1:{port}"
    # Devices must use HTTPS in production; plain HTTP is allowed here because all of it is on loopback.
    env = {**os.environ, "EDGEFLEET_TOKEN": token.group(0), "EDGEFLEET_SERVER_ALLOW_PLAIN_HTTP_DEVICES": "true"}
    server = subprocess.Popen(
        [exe, "server", "run", "--data", str(data), "--port", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(f"{url}/healthz", timeout=2).close()
                break
            except OSError:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise EdgefleetError("the fleet server did not start") from None
                time.sleep(0.1)
        console.print(f"$ edgefleet server run --data {data.name} --port {port}   (SQLite)")

        def cli(*args: str) -> Any:
            r = subprocess.run([exe, *args, "--server", url, "--json"], env=env, capture_output=True, text=True)
            if r.returncode != 0:
                raise EdgefleetError(f"edgefleet {' '.join(args)}: {r.stderr.strip()}")
            return json.loads(r.stdout)

        for bundle in sorted(work.glob("*.efb")):
            pushed = cli("model", "push", str(bundle))
            console.print(f"$ edgefleet model push {bundle.name}   -> sha256 {str(pushed.get('sha256', ''))[:16]}…")
        enroll = cli("device", "enroll-token", "--tag", "demo", "--max-uses", "1")
        r = subprocess.run(
            [
                exe,
                "agent",
                "enroll",
                "--server",
                url,
                "--token",
                enroll["token"],
                "--state-dir",
                str(device),
                "--allow-http",
                "--json",
            ],
            env=env,
            capture_output=True,
            text=True,
        )
        if r.returncode != 0:
            raise EdgefleetError(f"agent enroll: {r.stderr.strip()}")
        console.print(
            f"$ edgefleet agent enroll   -> device {json.loads(r.stdout).get('device_id')} "
            f"(its key never left {device.name}/)"
        )
        table = Table(
            "device",
            "tags",
            "online",
            "revoked",
            title="edgefleet device list",
            caption="online = checked in recently; this device enrolled but runs no agent that checks in",
        )
        for d in cli("device", "list"):
            table.add_row(str(d["id"]), ", ".join(d.get("tags", [])), str(d.get("online")), str(d.get("revoked")))
        console.print(table)
        versions = Table("name", "version", "runtime", "size", title="edgefleet model list")
        for m in cli("model", "list"):
            versions.add_row(m["name"], m["version"], m["runtime"], str(m["size"]))
        console.print(versions)
        if keep_running:
            try:  # Ctrl-C may come as soon as the URL is out, so the prints are inside the try too
                console.print(f"the fleet server is running: API docs at {url}/docs (the dashboard comes later)")
                console.print("press Ctrl-C to stop it")
                server.wait()
            except KeyboardInterrupt:
                pass
    finally:
        server.terminate()
        server.wait(30)
    console.print(
        f"fleet server stopped ({_exit_status(server.returncode)})"
        + ("" if keep_running else "; `edgefleet demo --keep-running` leaves it up to browse its API at /docs")
    )


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
