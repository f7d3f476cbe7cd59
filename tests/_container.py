"""Debian roots for tests that need a real Debian and a real systemd: built once, cached, booted per session.

Three layers, each usable on its own (issue 14 builds an arm64 root from the same recipe):

* :class:`RootSpec` is the recipe (suite, architecture, packages). Its :meth:`RootSpec.key` hashes the recipe
  and this module's build steps, so changing either builds a new root.
* :func:`cached_root` builds the root with ``debootstrap`` once into ``CACHE`` (default
  ``/var/cache/edgefleet-test``, outside the clone), atomically: into a temporary folder beside it, then
  renamed, under a lock, so a killed build never leaves a half root and two sessions never build twice.
* :func:`booted` boots a throw-away overlay (or copy) of the cached root with ``systemd-nspawn --boot
  --register=no --keep-unit``, waits until ``systemctl is-system-running`` says ``running`` or ``degraded``,
  and yields a :class:`Container` whose :meth:`Container.run` runs commands inside with ``nsenter``. The
  container is stopped and its overlay removed when the ``with`` block ends, whatever happened.

The host needs root, ``debootstrap`` and ``systemd-nspawn`` (``apt-get install debootstrap
systemd-container``); :func:`unavailable` says what is missing. A foreign architecture (``arm64`` on an x86_64
host) also needs qemu-user-static registered through binfmt_misc (``update-binfmts --enable qemu-aarch64``).

Host settings the root needs to reach PyPI from this machine (pip's configuration files and the extra CA
certificates) are copied into each session's overlay, not into the cached root, so the cache stays plain
Debian and its key does not depend on the host.
"""

from __future__ import annotations

import ast
import contextlib
import fcntl
import hashlib
import inspect
import json
import os
import platform
import shutil
import signal
import subprocess
import tempfile
import textwrap
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

CACHE = Path(os.environ.get("EDGEFLEET_TEST_CACHE", "/var/cache/edgefleet-test"))
BUILD_TIMEOUT = 1200  # s, for debootstrap of one root
BOOT_TIMEOUT = 120  # s, from nspawn's start until systemd says running/degraded
STOP_TIMEOUT = 30  # s, for a clean poweroff before SIGKILL
# The packages a device-like root has on top of minbase: an init, a bus for systemctl, Python with venv,
# TLS roots, curl, sudo (the docs use it) and the tools the docs' blocks call.
BASE_PACKAGES = (
    "systemd",
    "systemd-sysv",
    "dbus",
    "libpam-systemd",
    "python3",
    "python3-venv",
    "ca-certificates",
    "curl",
    "sudo",
    "procps",
    "iproute2",
)
# Where the qemu binary for a foreign architecture is registered (binfmt_misc entry names).
BINFMT = {"arm64": "qemu-aarch64", "armhf": "qemu-arm"}
HOST_ARCH = {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "armhf"}.get(platform.machine(), platform.machine())
# The inside of a container: a clean environment, never the host's (its PATH, venv, PIP_* variables).
CONTAINER_ENV = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "HOME": "/root",
    "LANG": "C.UTF-8",
    "TERM": "dumb",
    "SYSTEMD_PAGER": "",
    "SYSTEMD_COLORS": "0",
}


class ContainerError(RuntimeError):
    """Building, booting or driving a test container failed; the message says which step and why."""


@dataclass(frozen=True)
class RootSpec:
    """The recipe of one Debian root. ``arch`` is a Debian architecture (``amd64``, ``arm64``)."""

    suite: str = "bookworm"
    arch: str = HOST_ARCH
    mirror: str = "http://deb.debian.org/debian"
    variant: str = "minbase"
    packages: tuple[str, ...] = BASE_PACKAGES
    extra: tuple[str, ...] = field(default=())  # more packages, e.g. for issue 14's arm64 device root

    def key(self) -> str:
        """A short hash of the recipe and of this module's build steps (``_build_steps``, as code: a comment
        or reformatting does not rebuild)."""
        steps = ast.dump(ast.parse(textwrap.dedent(inspect.getsource(_build_steps))))
        recipe = json.dumps(asdict(self), sort_keys=True) + steps
        return hashlib.sha256(recipe.encode()).hexdigest()[:16]

    @property
    def name(self) -> str:
        return f"debian-{self.suite}-{self.arch}-{self.key()}"

    @property
    def foreign(self) -> bool:
        return self.arch != HOST_ARCH


def unavailable(spec: RootSpec | None = None) -> str | None:
    """Why containers cannot run here (not root, a missing tool, no emulation), or None when they can."""
    spec = spec or RootSpec()
    if os.geteuid() != 0:
        return "needs root (debootstrap and systemd-nspawn)"
    missing = [t for t in ("debootstrap", "systemd-nspawn", "nsenter") if shutil.which(t) is None]
    if missing:
        return f"{', '.join(missing)} not found (apt-get install debootstrap systemd-container util-linux)"
    if spec.foreign:
        entry = BINFMT.get(spec.arch)
        if entry is None:
            return f"no emulation known for architecture {spec.arch!r}"
        status = Path("/proc/sys/fs/binfmt_misc") / entry
        if not status.exists() or not status.read_text().startswith("enabled"):
            return f"{spec.arch} needs {entry} in binfmt_misc (apt-get install qemu-user-static binfmt-support)"
    return None


# --- Building the cached root ---------------------------------------------------------------------


def _build_steps(spec: RootSpec, target: Path, log: Path) -> None:
    """debootstrap into ``target``, then make it bootable and quiet. Part of the cache key: edit = rebuild."""
    include = ",".join((*spec.packages, *spec.extra))
    cmd = ["debootstrap", f"--variant={spec.variant}", f"--arch={spec.arch}", f"--include={include}"]
    _logged(log, [*cmd, spec.suite, str(target), spec.mirror], timeout=BUILD_TIMEOUT)
    # No getty on a console nobody reads, no units that cannot work in a container.
    for unit in ("getty@tty1.service", "console-getty.service", "systemd-timesyncd.service"):
        (target / "etc/systemd/system" / unit).unlink(missing_ok=True)
        (target / "etc/systemd/system" / unit).symlink_to("/dev/null")
    (target / "etc/hostname").write_text("edgefleet-test\n")
    (target / "etc/hosts").write_text("127.0.0.1\tlocalhost\n127.0.1.1\tedgefleet-test\n::1\tlocalhost ip6-localhost\n")
    (target / "etc/machine-id").write_text("")  # a fresh id at every boot
    _logged(log, ["chroot", str(target), "apt-get", "clean"], timeout=120)
    (target / ".edgefleet-root").write_text(json.dumps(asdict(spec), sort_keys=True) + "\n")


def cached_root(spec: RootSpec | None = None, cache: Path = CACHE) -> Path:
    """The cached root for ``spec``, built first if missing. Raises ContainerError if the build fails."""
    spec = spec or RootSpec()
    reason = unavailable(spec)
    if reason:
        raise ContainerError(reason)
    final = cache / spec.name
    if (final / ".edgefleet-root").exists():
        return final
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / f"{spec.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another session may be building the same root: wait for it
        if (final / ".edgefleet-root").exists():
            return final
        for stale in cache.glob(f".{spec.name}.build-*"):  # a build that was killed
            shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{spec.name}.build-", dir=cache))
        tmp.chmod(0o755)  # it becomes the root's /: mkdtemp's 0700 would lock every other user out
        log = cache / f"{spec.name}.log"
        try:
            _build_steps(spec, tmp, log)
            os.rename(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    _prune(spec, cache)
    return final


def _prune(spec: RootSpec, cache: Path) -> None:
    """Remove the roots an older recipe built for the same suite and architecture, unless a session uses one
    (:func:`booted` holds a shared lock on its root's lock file while it runs)."""
    for old in cache.glob(f"debian-{spec.suite}-{spec.arch}-*"):
        if not old.is_dir() or old.name == spec.name:
            continue
        lock_path = cache / f"{old.name}.lock"
        with open(lock_path, "a") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # in use (or being built) by another session
            shutil.rmtree(old, ignore_errors=True)
            (cache / f"{old.name}.log").unlink(missing_ok=True)
            lock_path.unlink(missing_ok=True)


def _logged(log: Path, cmd: Sequence[str], timeout: float) -> None:
    with open(log, "a") as out:
        out.write(f"\n$ {' '.join(cmd)}\n")
        out.flush()
        try:
            r = subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, timeout=timeout)
        except subprocess.TimeoutExpired as e:
            raise ContainerError(f"{cmd[0]} ran over {timeout:.0f} s (log: {log})") from e
    if r.returncode != 0:
        tail = "\n".join(log.read_text().splitlines()[-15:])
        raise ContainerError(f"{cmd[0]} failed with exit {r.returncode} (log: {log}):\n{tail}")


# --- Booting a throw-away copy -------------------------------------------------------------------


@dataclass
class Result:
    """What a command inside the container did: its exit code and its output (stdout and stderr together)."""

    cmd: str
    returncode: int
    output: str


class Container:
    """A booted container: ``pid`` is its systemd (PID 1 inside) as the host sees it, ``root`` its file system."""

    def __init__(self, name: str, root: Path, pid: int) -> None:
        self.name, self.root, self.pid = name, root, pid

    def run(
        self, script: str, *, timeout: float = 300, env: Mapping[str, str] | None = None, cwd: str = "/root"
    ) -> Result:
        """Run ``script`` with bash inside the container (all its namespaces), in a clean environment.

        Never raises for a failing command (see ``returncode``); raises ContainerError when it runs over
        ``timeout`` (its process group is killed).
        """
        environ = {**CONTAINER_ENV, **(env or {})}
        cmd = [
            "nsenter",
            "-t",
            str(self.pid),
            "-a",
            "--",
            "/usr/bin/env",
            "-i",
            *(f"{k}={v}" for k, v in environ.items()),
        ]
        cmd += ["/bin/bash", "-c", f"cd {_q(cwd)} && {script}"]
        proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        try:
            out, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired as e:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            out, _ = proc.communicate()
            raise ContainerError(f"ran over {timeout:.0f} s in the container: {script}\n{out[-3000:]}") from e
        return Result(script, proc.returncode, out)

    def check(
        self, script: str, *, timeout: float = 300, env: Mapping[str, str] | None = None, cwd: str = "/root"
    ) -> str:
        """:meth:`run`, raising ContainerError (with the output) unless it exits 0; returns the output."""
        r = self.run(script, timeout=timeout, env=env, cwd=cwd)
        if r.returncode != 0:
            raise ContainerError(f"exit {r.returncode} in the container: {script}\n{r.output[-4000:]}")
        return r.output

    def journal(self, unit: str | None = None, lines: int = 200) -> str:
        """The container's journal (of one unit), for failure messages."""
        which = f"-u {_q(unit)} " if unit else ""
        return self.run(f"journalctl --no-pager -o short-monotonic {which}-n {lines}", timeout=60).output


def _q(s: object) -> str:
    return "'" + str(s).replace("'", "'\\''") + "'"


def _host_settings(root: Path) -> None:
    """This machine's pip configuration and extra CA certificates, so the root reaches PyPI as the host does."""
    for conf in (Path("/etc/pip.conf"), Path("/etc/xdg/pip")):
        if conf.is_dir():
            shutil.copytree(conf, root / conf.relative_to("/"), dirs_exist_ok=True)
        elif conf.is_file():
            shutil.copy2(conf, root / conf.relative_to("/"))
    pip_env = {k[4:].lower().replace("_", "-"): v for k, v in os.environ.items() if k.startswith("PIP_")}
    pip_env.pop("find-links", None)  # host folders do not exist inside
    pip_env.pop("cert", None)  # the root's own bundle, made below from the same certificates
    if pip_env:
        conf = root / "etc/pip.conf"
        text = conf.read_text() if conf.exists() else "[global]\n"
        extra = "".join(f"{k} = {v}\n" for k, v in sorted(pip_env.items()))
        conf.write_text(text.replace("[global]\n", "[global]\n" + extra, 1) if "[global]" in text else text + extra)
    extra_cas = Path("/usr/local/share/ca-certificates")
    if extra_cas.is_dir() and any(extra_cas.iterdir()):
        shutil.copytree(extra_cas, root / "usr/local/share/ca-certificates", dirs_exist_ok=True)
        r = subprocess.run(["chroot", str(root), "update-ca-certificates"], capture_output=True, text=True, timeout=120)
        if r.returncode != 0:
            raise ContainerError(f"update-ca-certificates in the root failed: {r.stdout}{r.stderr}")


@contextlib.contextmanager
def _scratch_root(base: Path, work: Path) -> Iterator[Path]:
    """An overlay of ``base`` (changes land in ``work``), or a full copy where overlayfs cannot mount."""
    upper, lower_work, merged = work / "upper", work / "work", work / "root"
    for d in (upper, lower_work, merged):
        d.mkdir(parents=True, mode=0o755)
    upper.chmod(0o755)  # the merged / takes upper's mode
    opts = f"lowerdir={base},upperdir={upper},workdir={lower_work}"
    mounted = (
        subprocess.run(["mount", "-t", "overlay", "overlay", "-o", opts, str(merged)], capture_output=True).returncode
        == 0
    )
    if not mounted:
        shutil.rmtree(merged)
        subprocess.run(["cp", "-a", "--reflink=auto", str(base), str(merged)], check=True, timeout=600)
    try:
        yield merged
    finally:
        if mounted:
            for _ in range(10):
                if subprocess.run(["umount", str(merged)], capture_output=True).returncode == 0:
                    break
                time.sleep(0.5)
            else:
                subprocess.run(["umount", "-l", str(merged)], capture_output=True)


def _container_init(nspawn_pid: int) -> int | None:
    """The host PID of the container's PID 1 (a descendant of nspawn whose innermost NSpid is 1)."""
    todo, seen = [nspawn_pid], set()
    while todo:
        pid = todo.pop()
        if pid in seen:
            continue
        seen.add(pid)
        try:
            status = Path(f"/proc/{pid}/status").read_text()
            for task in Path(f"/proc/{pid}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
        except (FileNotFoundError, ProcessLookupError):
            continue
        nspid = next((line.split()[1:] for line in status.splitlines() if line.startswith("NSpid:")), [])
        if pid != nspawn_pid and len(nspid) > 1 and nspid[-1] == "1":
            return pid
    return None


@contextlib.contextmanager
def booted(
    spec: RootSpec | None = None,
    *,
    binds: Mapping[Path, str] | None = None,
    cache: Path = CACHE,
    workdir: Path | None = None,
) -> Iterator[Container]:
    """Boot a throw-away overlay of the cached root; yields the running :class:`Container`.

    ``binds`` maps host folders to paths inside (e.g. a pip cache). Raises ContainerError when the root
    cannot be built or systemd does not reach running/degraded within BOOT_TIMEOUT (with its output).
    """
    spec = spec or RootSpec()
    base = cached_root(spec, cache)
    name = f"ef-test-{uuid.uuid4().hex[:8]}"
    work = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=workdir or cache))
    log = work / "console.log"
    in_use = open(cache / f"{spec.name}.lock", "a")  # noqa: SIM115 - held for the whole session
    fcntl.flock(in_use, fcntl.LOCK_SH)  # a newer recipe's build must not prune this root under us
    try:
        with _scratch_root(base, work) as root:
            _host_settings(root)
            cmd = [
                "systemd-nspawn",
                "--boot",
                "--register=no",
                "--keep-unit",
                "--quiet",
                "--console=passive",
                f"--directory={root}",
                f"--machine={name}",
                "--resolv-conf=copy-host",
                "--timezone=off",
            ]
            cmd += [f"--bind={host}:{inside}" for host, inside in (binds or {}).items()]
            with open(log, "w") as out:
                proc = subprocess.Popen(
                    cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
                )
            container: Container | None = None
            try:
                container = _wait_booted(proc, name, root, log)
                yield container
            finally:
                _stop(proc, container)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        in_use.close()


def _wait_booted(proc: subprocess.Popen[bytes], name: str, root: Path, log: Path) -> Container:
    deadline = time.monotonic() + BOOT_TIMEOUT
    container: Container | None = None
    state = ""
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise ContainerError(f"systemd-nspawn exited {proc.returncode} while booting:\n{log.read_text()[-3000:]}")
        if container is None:
            pid = _container_init(proc.pid)
            container = Container(name, root, pid) if pid else None
        if container is not None:
            state = container.run("systemctl is-system-running", timeout=30).output.strip()
            if state in ("running", "degraded"):
                return container
        time.sleep(0.5)
    failed = container.run("systemctl --failed --no-pager", timeout=30).output if container else ""
    raise ContainerError(f"systemd did not reach running within {BOOT_TIMEOUT} s (last: {state!r}):\n{failed}")


def _stop(proc: subprocess.Popen[bytes], container: Container | None) -> None:
    """Power off cleanly (SIGTERM to nspawn halts the container), then SIGKILL whatever is left."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            pass
    if proc.poll() is None or (container and Path(f"/proc/{container.pid}").exists()):
        for pid in (container.pid if container else None, proc.pid):
            if pid:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(STOP_TIMEOUT)
