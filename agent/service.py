"""The long-running agent: load and warm the models, serve the local API, run the flows.

systemd integration: ``READY=1`` once every model is loaded and warmed and the listeners are open,
``WATCHDOG=1`` from the serving event loop at half the watchdog interval (so a hung loop is
restarted), ``STATUS=`` lines, and ``STOPPING=1`` on SIGTERM, after which no new connection is
taken, requests in flight finish, and the process exits 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import signal
import socket
import stat
import threading
from pathlib import Path
from typing import Any

from edgefleet.agent import hardware
from edgefleet.agent.api import InferenceApp
from edgefleet.agent.config import MIN_TOKEN_LENGTH, AgentConfig, ApiConfig, ModelConfig, identity_path
from edgefleet.agent.hardware import HardwareProfile
from edgefleet.agent.http import HttpServer
from edgefleet.agent.metrics import AgentMetrics
from edgefleet.agent.registry import ModelRegistry
from edgefleet.agent.runtime import Model, Watch, detect_runtime, load_model
from edgefleet.agent.sdnotify import Notifier
from edgefleet.errors import ConfigError, EdgefleetError, ModelError

__all__ = ["AgentService", "bind_sockets", "read_token"]

log = logging.getLogger(__name__)


def bind_sockets(host: str, port: int, uds: Path | None) -> list[socket.socket]:
    """Open the listeners before serving, so that a port in use is a clear error, not a crash."""
    socks: list[socket.socket] = []
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY only on sockets that say they are TCP, and without
    # it a response's head and body wait on the client's delayed ACK (40 ms a request).
    tcp = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    tcp.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        tcp.bind((host, port))
    except OSError as e:
        tcp.close()
        raise ConfigError(f"api: cannot listen on {host}:{port}: {e.strerror or e}") from e
    tcp.set_inheritable(True)
    socks.append(tcp)
    if uds is not None:
        if uds.exists() and stat.S_ISSOCK(uds.stat().st_mode):
            uds.unlink()  # a stale socket from a previous run
        if not uds.parent.is_dir():
            # Creating it here would make it as whoever runs the agent (root, under systemd without a
            # RuntimeDirectory), with the umask's mode: the folder is the operator's to make.
            tcp.close()
            raise ConfigError(
                f"api.uds: the folder {uds.parent} does not exist; create it (systemd: RuntimeDirectory=) "
                "or choose a socket path in an existing folder"
            )
        unix = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            unix.bind(str(uds))
        except OSError as e:
            unix.close()
            tcp.close()
            raise ConfigError(f"api.uds: cannot listen on {uds}: {e.strerror or e}") from e
        os.chmod(uds, 0o660)
        socks.append(unix)
    return socks


def read_token(api: ApiConfig) -> bytes | None:
    """The API token, from ``api.token`` or the first line of ``api.token_file``; None when neither is set.

    Raises ConfigError naming ``api.token_file`` when the file cannot be read, or its token is empty or
    shorter than MIN_TOKEN_LENGTH. The token never appears in a message or a log line."""
    if api.token is not None:
        return api.token.get_secret_value().encode()
    path = api.token_file
    if path is None:
        return None
    try:
        raw = path.read_bytes()
        mode = path.stat().st_mode
    except OSError as e:
        raise ConfigError(f"api.token_file: {path}: cannot read it: {e.strerror or e}") from e
    lines = raw.splitlines()
    token = lines[0].strip() if lines else b""
    if len(token) < MIN_TOKEN_LENGTH:
        raise ConfigError(
            f"api.token_file: {path} holds no token of at least {MIN_TOKEN_LENGTH} characters on its first line"
        )
    if mode & 0o077:
        log.warning("api.token_file: %s is readable by other users (mode %o); chmod 600 it", path, mode & 0o777)
    return token


class _Host:
    """The running agent as the update machine sees it: load a bundle as served, swap a served model."""

    def __init__(self, service: AgentService) -> None:
        self.service = service

    def load(self, path: Path) -> Model:
        return self.service._load(ModelConfig(path=path))

    def swap(self, name: str, model: Model, version: str) -> Model | None:
        old = self.service.registry.get(name)
        if model.watch is None:
            model.watch = Watch()
        self.service.observe(name, version, model)
        self.service.registry.put(name, model, version)
        self.service.registry.expected.add(name)
        if old is not None and old.version != version:
            self.service.app.telemetry.retire(name, old.version)
        return old.model if old is not None else None

    def served(self, name: str) -> Model | None:
        s = self.service.registry.get(name)
        return s.model if s is not None else None

    def running(self) -> dict[str, str]:
        return {s.name: s.version for s in self.service.registry.all()}

    def set_shadow(self, name: str, model: Model, version: str) -> None:
        from edgefleet.agent.shadow import ShadowRunner

        model.telemetry = None  # the candidate's calls are the runner's, not served calls
        updates = self.service.config.updates
        runner = ShadowRunner(name, model, version, max_rate=updates.shadow_max_rate,
                              queue=updates.shadow_queue).start()
        old = self.service.app.telemetry.set_shadow(name, runner)
        if old is not None:
            old.stop()

    def clear_shadow(self, name: str) -> None:
        old = self.service.app.telemetry.clear_shadow(name)
        if old is not None:
            old.stop()


class AgentService:
    """The agent process. ``run()`` blocks until SIGTERM/SIGINT and returns the exit code."""

    def __init__(self, config: AgentConfig, notifier: Notifier | None = None) -> None:
        self.config = config
        self.notifier = notifier or Notifier()
        self.watchdog_interval = self.notifier.watchdog_interval()
        self.metrics = AgentMetrics()
        self.registry = ModelRegistry()
        self._token = read_token(config.api)
        self.app = InferenceApp(
            self.registry,
            self.metrics,
            config.api.max_body_bytes,
            config.api.workers,
            config.api.max_json_bytes,
            token=self._token,
            max_image_pixels=config.api.max_image_pixels,
            recent_predictions=config.api.recent_predictions,
        )
        self.flows: list[Any] = []  # edgefleet.agent.flow.Flow, imported only when flows are configured
        self._sockets: list[socket.socket] = []
        self.profile = self._hardware_profile()
        self.updater: Any = None  # edgefleet.agent.updater.machine.UpdateMachine, for an enrolled agent
        self.telemetry: Any = None  # edgefleet.agent.telemetry.loop.TelemetryLoop, with [mqtt.fleet]
        self._feedback: Any = None  # edgefleet.agent.telemetry.local.FeedbackSubscriber, with [mqtt.local]

    def _hardware_profile(self) -> HardwareProfile:
        hw = self.config.hardware
        profile = hardware.load_profile(hw.profile) if hw.profile else hardware.detect().profile
        if hw.overrides:
            profile = hardware.apply_overrides(profile, hw.overrides)
        return profile

    def _load(self, mc: ModelConfig) -> Model:
        """Load with the hardware profile's threads and delegates (Edge TPU, TensorRT...). A delegate
        or provider this device lacks is logged and the model runs on the CPU instead."""
        runtime = mc.backend or detect_runtime(mc.path)
        opts = self.profile.runtime_options(runtime)
        # An explicit [[models]] threads wins; else the runtime chooses up to the profile's threads from
        # the model's measured cost (ONNX Runtime: one thread for a cheap model, no spinning on 2 cores).
        threads, most = mc.threads, opts["threads"]
        try:
            return load_model(
                mc.path, threads=threads, max_threads=most, backend=mc.backend, delegates=opts["delegates"]
            )
        except ModelError as e:
            if not opts["delegates"] or not any(w in str(e) for w in ("delegate", "execution provider")):
                raise
            log.warning("%s; running %s on the CPU instead", e, mc.path)
            return load_model(mc.path, threads=threads, max_threads=most, backend=mc.backend)

    def load_models(self) -> None:
        """Load and warm every configured model (a model that fails stops the start, naming it)."""
        names: dict[str, Path] = {}
        for mc in self.config.models:
            self.notifier.status(f"loading {mc.path}")
            model = self._load(mc)
            name = mc.name or model.name  # a bundle's name is its manifest's, known only once loaded
            if name in names:
                raise ConfigError(
                    f"models: {names[name]} and {mc.path} are both served as {name!r}; "
                    "give one of them another name (models.name)"
                )
            self.registry.put(name, model)
            names[name] = mc.path
            log.info("serving %s (%s) from %s", name, model.backend.name, mc.path)
        self.telemetry = self._make_telemetry()  # before the updater: its events share the outbox's seq
        self.updater = self._make_updater()
        if self.updater is not None:
            # What the updater installed and committed wins over agent.toml's model of the same name.
            for name, inst in self.updater.startup_models().items():
                path = self.config.state_dir / inst.path
                self.notifier.status(f"loading {path}")
                try:
                    model = self._load(ModelConfig(path=path))
                except EdgefleetError as e:
                    log.error("installed %s %s does not load (%s); serving what agent.toml gives", name,
                              inst.version, e)
                    continue
                self.registry.put(name, model, inst.version)
                names[name] = path
                log.info("serving %s %s (installed) from %s", name, inst.version, path)
        for served in self.registry.all():
            served.model.watch = Watch()  # the baseline a new version's probation is compared with
            self.observe(served.name, served.version, served.model)
        self.registry.expected = set(names)
        self.metrics.models_loaded = len(names)

    def observe(self, name: str, version: str, model: Model) -> None:
        """Measure ``model`` for telemetry as ``name`` ``version`` (latency, errors, drift, classes)."""
        try:
            model.telemetry = self.app.telemetry.track_model(name, version, model)
        except EdgefleetError as e:  # a bad baseline.json must not stop serving: no drift for it
            log.warning("telemetry for %s %s: %s", name, version, e)

    def _make_telemetry(self) -> Any:
        """Telemetry to the fleet's broker, for an enrolled agent with ``[mqtt.fleet]`` (None otherwise)."""
        cfg = self.config
        fleet = cfg.mqtt.fleet
        if fleet is None or not fleet.enabled or not cfg.device_id:
            return None
        from edgefleet.agent.telemetry.device import DeviceSampler
        from edgefleet.agent.telemetry.loop import TelemetryLoop

        return TelemetryLoop(fleet, cfg.device_id, cfg.state_dir, self.app.telemetry,
                             DeviceSampler(cfg.state_dir, self.profile))

    def _make_updater(self) -> Any:
        """The update machine, for an enrolled agent with ``[updates] enabled`` (None otherwise)."""
        cfg = self.config
        ident_file = identity_path(cfg.state_dir)
        if not cfg.updates.enabled or not cfg.device_id or not cfg.server_url or not ident_file.is_file():
            return None
        import json

        from edgefleet import __version__
        from edgefleet.agent.updater.client import DeviceClient, recover_identity
        from edgefleet.agent.updater.machine import UpdateMachine

        ident = json.loads(ident_file.read_bytes())
        recover_identity(Path(ident["key"]), Path(ident["certificate"]))  # finish a renewal a power cut stopped
        client = DeviceClient(cfg.server_url, cfg.device_id, Path(ident["key"]), Path(ident["certificate"]),
                              cfg.ca_cert)
        updates = cfg.updates
        if updates.checkin_interval is None:  # rare polls when the server can push "check in now"
            pushed = cfg.mqtt.fleet is not None and cfg.mqtt.fleet.enabled
            updates = updates.model_copy(update={"checkin_interval": 900.0 if pushed else 60.0})
        machine = UpdateMachine(cfg.state_dir, updates, client, _Host(self), cfg.device_id, cfg.server_url,
                                agent_version=__version__, hardware_profile=self.profile.name)
        if self.telemetry is not None:
            outbox = self.telemetry.outbox
            machine.sequence_events(lambda body: outbox.put("events", body)[0])
            self.telemetry.on_cmd = machine.wake
        return machine

    def start_flows(self) -> None:
        """Start every configured flow (after the models are loaded; a flow names a served model)."""
        from edgefleet.agent.flow import Flow, FlowConfig

        for i, raw in enumerate(self.config.flows):
            cfg = raw if isinstance(raw, FlowConfig) else FlowConfig.model_validate(raw)
            if self.registry.get(cfg.model) is None:
                served = sorted(s.name for s in self.registry.all())
                raise ConfigError(f"flows.{i}.model: {cfg.model!r} is not a served model; served: {served}")
            flow = Flow(cfg, self._pipeline_of(cfg.model), device_id=self.config.device_id,
                        remember=self._remembering(cfg.model))
            flow.start()
            self.flows.append(flow)
        if self.flows:
            self.metrics.watch_flows(lambda: {f.name: f.counters() for f in self.flows})
            log.info(
                "flow %s: %s -> %s -> %s", flow.name, cfg.source.type, cfg.model, ", ".join(k.type for k in cfg.sinks)
            )

    def stop_flows(self) -> None:
        """Stop every flow at once (each drains its queue within its own drain_timeout)."""
        threads = [threading.Thread(target=f.stop, name=f"stop-{f.name}") for f in self.flows]
        for t in threads:
            t.start()
        for t in threads:
            t.join()

    def _remembering(self, name: str) -> Any:
        """A flow's ``remember``: its results get ids, kept like the API's, so ground truth sent to
        ``/feedback`` or the ``feedback`` topic counts for the version that predicted."""
        import uuid

        from edgefleet.agent.telemetry.feedback import with_predicted_class

        def remember(result: dict[str, Any]) -> str | None:
            served = self.registry.get(name)
            if served is None:
                return None
            pid = uuid.uuid4().hex
            self.app.predictions.add(pid, served.name, served.version, with_predicted_class(result))
            return pid

        return remember

    def _pipeline_of(self, name: str) -> Any:
        """A getter for the current pipeline of a served model (so a swapped model is picked up)."""

        def get() -> Any:
            served = self.registry.get(name)
            if served is None:
                raise ModelError(f"model {name!r} is no longer served")
            return served.pipeline

        return get

    def on_listening(self) -> None:
        if not self.config.api.enabled:
            msg = (
                f"ready: {len(self.registry.all())} model(s), {len(self.flows)} flow(s); "
                "the local API is off (api.enabled = false)"
            )
        else:
            where = [f"http://{self.config.api.host}:{self.port}"]
            if self.config.api.uds:
                where.append(f"unix:{self.config.api.uds}")
            msg = f"ready: {len(self.registry.all())} model(s) on {', '.join(where)}"
        log.info(msg)
        print(msg, flush=True)
        self.notifier.ready()
        self.notifier.status(msg)

    @property
    def port(self) -> int:
        return int(self._sockets[0].getsockname()[1]) if self._sockets else self.config.api.port

    async def serve(self) -> None:
        """Serve until SIGTERM/SIGINT; then stop taking requests, finish those in flight, stop flows."""
        api = self.config.api
        # [api] enabled = false: no listener at all (flows, the watchdog and the signals work as ever)
        self._sockets = bind_sockets(api.host, api.port, api.uds) if api.enabled else []
        limits = dataclasses.replace(api.limits(), api_token=self._token)  # the token is checked before a body
        server = HttpServer(self.app, limits) if api.enabled else None
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()

        def on_signal(sig: int) -> None:
            if stop.is_set():
                return
            log.info(
                "%s: finishing %d request(s) in flight, then stopping", signal.Signals(sig).name, self.app.in_flight
            )
            self.notifier.stopping()
            stop.set()

        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, on_signal, sig)
        try:
            self.start_flows()
            if server is not None:
                await server.start(self._sockets)
            self.on_listening()
            if self.updater is not None:
                self.updater.start()
            if self.telemetry is not None:
                self.telemetry.start()
            local = self.config.mqtt.local
            if local is not None and local.enabled and self.config.device_id:
                from edgefleet.agent.telemetry.local import FeedbackSubscriber

                self._feedback = FeedbackSubscriber(local, self.config.device_id, self.app.feedback)
                self._feedback.start()
            # The watchdog is fed from the event loop that serves requests: a hung loop gets restarted.
            interval = self.watchdog_interval
            while not stop.is_set():
                if interval is not None:
                    self.notifier.watchdog()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), interval / 2 if interval else None)
            if server is not None:
                await server.stop(self.config.shutdown_timeout)
        finally:
            if self.updater is not None:
                await asyncio.to_thread(self.updater.stop)
            if self.telemetry is not None:
                await asyncio.to_thread(self.telemetry.stop)
            if self._feedback is not None:
                await asyncio.to_thread(self._feedback.stop)
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)
            self.stop_flows()
            self.app.close()
            for s in self._sockets:
                s.close()
            if api.uds is not None and api.enabled:
                with contextlib.suppress(FileNotFoundError):
                    api.uds.unlink()

    def run(self) -> int:
        try:
            self.load_models()
        except EdgefleetError:
            self.notifier.status("failed to load models")
            raise
        asyncio.run(self.serve())
        log.info("stopped")
        return 0
