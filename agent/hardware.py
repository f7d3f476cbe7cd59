"""Hardware profiles (threads, runtime, delegates, sensors, devices per board) and which board this is.

Profiles live in ``hardware/*.toml`` (shipped as ``edgefleet/agent/profiles/``). :func:`detect` reads
evidence under a root folder (``/`` on a device, a fake tree in tests) with :func:`gather_evidence`;
:func:`choose_profile`, a pure function of it, picks a profile and says why in plain sentences.
Bad profiles and overrides raise :class:`~edgefleet.errors.ConfigError` naming the file and field.
"""

from __future__ import annotations

import ctypes.util
import dataclasses
import math
import os
import platform
import re
import tomllib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, model_validator

from edgefleet.errors import ConfigError
from edgefleet.tomlconf import problems

__all__ = [
    "LIB_DIRS", "PROFILES_DIR", "Delegate", "Detection", "Evidence", "HardwareProfile", "Sensor", "apply_overrides",
    "choose_profile", "detect", "gather_evidence", "list_profiles", "load_profile", "parse_profile", "read_sensors",
]  # fmt: skip

PROFILES_DIR = Path(__file__).resolve().parent / "profiles"
LIB_DIRS = (  # where libedgetpu.so.1 is looked for, relative to the root
    "usr/lib", "usr/lib64", "usr/local/lib", "lib", "usr/lib/aarch64-linux-gnu", "usr/lib/x86_64-linux-gnu",
    "usr/lib/arm-linux-gnueabihf", "lib/aarch64-linux-gnu", "lib/x86_64-linux-gnu",
)  # fmt: skip
EDGETPU_LIB = "libedgetpu.so.1"
# Coral USB Accelerator: Global Unichip before its firmware is loaded, Google after.
CORAL_USB_IDS = {("1a6e", "089a"), ("18d1", "9302")}
_ARM_PARTS = {
    "0xd03": "Cortex-A53", "0xd04": "Cortex-A35", "0xd05": "Cortex-A55", "0xd07": "Cortex-A57",
    "0xd08": "Cortex-A72", "0xd09": "Cortex-A73", "0xd0a": "Cortex-A75", "0xd0b": "Cortex-A76",
    "0xd0d": "Cortex-A77", "0xd41": "Cortex-A78", "0xd42": "Cortex-A78AE",
}  # fmt: skip
_BOARDS = (  # (profile, pattern on the board model, what it means)
    ("raspberry-pi-4", re.compile(r"Raspberry Pi (4 Model|400|Compute Module 4)"), "a Raspberry Pi 4"),
    ("raspberry-pi-5", re.compile(r"Raspberry Pi (5 Model|500|Compute Module 5)"), "a Raspberry Pi 5"),
    ("jetson-orin-nano", re.compile(r"Orin Nano"), "a Jetson Orin Nano"),
    ("coral-dev-board", re.compile(r"Phanbell"), "a Coral Dev Board (i.MX 8M 'Phanbell')"),
)
_NAME = r"^[a-z0-9][a-z0-9_-]*$"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


def _absolute(value: str) -> str:
    if not value.startswith("/") or ".." in value.split("/"):
        raise ValueError(f"expected an absolute path without '..', got {value!r}")
    return value


def _device(value: str) -> str:
    if not value.startswith("/dev/"):
        raise ValueError(f"expected a path under /dev/, got {value!r}")
    return _absolute(value)


def _provider(value: str) -> str:
    if not re.fullmatch(r"[A-Za-z]+ExecutionProvider", value) or value == "CPUExecutionProvider":
        raise ValueError(f"expected an execution provider other than the CPU's (always tried last), got {value!r}")
    return value


_AbsolutePath = Annotated[str, AfterValidator(_absolute)]
_DevicePath = Annotated[str, AfterValidator(_device)]
_Provider = Annotated[str, AfterValidator(_provider)]


class Delegate(_Strict):
    """A LiteRT delegate library and its options (``load_delegate(library, options)``)."""

    library: str = Field(min_length=1, description="shared library to load, e.g. libedgetpu.so.1")
    options: dict[str, str] = Field(
        default_factory=dict, description="delegate options, all strings (Edge TPU: device = 'usb', 'pci', 'usb:0')"
    )


class Sensor(_Strict):
    """A sysfs value to report; the path may hold glob wildcards (first match in sorted order wins)."""

    name: str = Field(pattern=r"^[a-z][a-z0-9_]*$", description="key in read_sensors' result, unit as suffix")
    path: _AbsolutePath = Field(description="absolute sysfs path, wildcards allowed")
    kind: Literal["number", "text", "hex"] = Field(
        default="number", description="number: value × scale; text: the stripped text; hex: a hex word as '0x…'"
    )
    scale: float = Field(default=1.0, description="factor from the file's unit to `unit` (0.001: kHz → MHz)")
    unit: str = Field(default="", description="unit after scaling: °C, MHz, mV, mA, rpm")
    description: str = ""


class HardwareProfile(_Strict):
    """Settings for one kind of board. Frozen: use :func:`apply_overrides` to change fields."""

    name: str = Field(pattern=_NAME, description="profile name, the file's stem")
    description: str = Field(default="", description="the board, for humans")
    threads: int = Field(ge=1, le=256, description="runtime intra-op threads, count; capped at the cores found")
    preferred_runtime: Literal["tflite", "onnx"] = Field(description="runtime for models shipped in both formats")
    delegates: list[Delegate] = Field(default_factory=list, description="LiteRT delegates, in order")
    onnx_providers: list[_Provider] = Field(
        default_factory=list, description="ONNX Runtime execution providers tried before CPUExecutionProvider"
    )
    thermal_zone: _AbsolutePath | None = Field(default=None, description="sysfs file: SoC temperature, millidegrees C")
    sensors: list[Sensor] = Field(default_factory=list, description="other sysfs values to report")
    devices: list[_DevicePath] = Field(default_factory=list, description="device nodes the agent opens, wildcards ok")

    @model_validator(mode="after")
    def _sensor_names(self) -> HardwareProfile:
        names = [s.name for s in self.sensors]
        dup = sorted({n for n in names if names.count(n) > 1 or n == "temperature_c"})
        if dup:
            raise ValueError(f"sensor names must be unique and not temperature_c (the thermal zone's): {dup}")
        return self

    def runtime_options(self, runtime: str | None = None) -> dict[str, Any]:
        """``threads`` and ``delegates`` for ``load_model`` on ``runtime`` ("tflite"/"onnx", default preferred)."""
        if (runtime or self.preferred_runtime) == "onnx":
            return {"threads": self.threads, "delegates": list(self.onnx_providers)}
        return {"threads": self.threads, "delegates": [(d.library, dict(d.options)) for d in self.delegates]}


# --- loading ------------------------------------------------------------------------------------------


def list_profiles() -> list[str]:
    """Names of the shipped profiles, sorted."""
    return sorted(p.stem for p in PROFILES_DIR.glob("*.toml"))


def parse_profile(text: str, where: str = "profile") -> HardwareProfile:
    """Validate a profile's TOML text; ``where`` names it in errors. Raises :class:`ConfigError`."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{where}: not valid TOML: {e}") from e
    try:
        return HardwareProfile.model_validate(data)
    except ValidationError as e:
        raise ConfigError(f"{where}: " + "; ".join(problems(e, text))) from e


def load_profile(name_or_path: str | os.PathLike[str]) -> HardwareProfile:
    """A shipped profile by name (``"raspberry-pi-4"``), or a profile file by path.

    Raises :class:`ConfigError` for an unknown name, an unreadable file, bad TOML or a bad value
    (naming the file, the field and its line).
    """
    s = os.fspath(name_or_path)
    if isinstance(name_or_path, str) and re.fullmatch(_NAME, s) and not s.endswith(".toml"):
        path = PROFILES_DIR / f"{s}.toml"
        if not path.is_file():
            raise ConfigError(f"hardware profile {s!r}: no such profile; known: {', '.join(list_profiles())}")
    else:
        path = Path(s)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot read hardware profile: {getattr(e, 'strerror', None) or e}") from e
    return parse_profile(text, str(path))


def apply_overrides(profile: HardwareProfile, overrides: Mapping[str, Any]) -> HardwareProfile:
    """A copy of ``profile`` with top-level fields replaced (``[hardware.overrides]`` in agent.toml).

    Lists are replaced whole (``delegates = []`` turns the Edge TPU off). Raises :class:`ConfigError`
    naming ``hardware.overrides.<key>``.
    """
    if not overrides:
        return profile
    data = profile.model_dump()
    data.update(overrides)
    try:
        return HardwareProfile.model_validate(data)
    except ValidationError as e:
        raise ConfigError("; ".join(f"hardware.overrides.{p}" for p in problems(e))) from e


# --- detection: evidence (I/O), then a pure choice ------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Evidence:
    """What :func:`gather_evidence` found; every field is ``None``/false when its source is missing."""

    machine: str
    device_tree_model: str | None = None
    cpuinfo_model: str | None = None  # the "Model" line (Raspberry Pi kernels)
    cpuinfo_hardware: str | None = None  # the "Hardware" line (32-bit ARM kernels)
    cpu_name: str | None = None  # "Cortex-A72", or x86's "model name"
    cores: int | None = None  # "processor" entries in /proc/cpuinfo
    l4t_release: str | None = None  # "R36.4.0" from /etc/nv_tegra_release
    apex: bool = False  # /dev/apex_0: an Edge TPU on PCIe
    libedgetpu: str | None = None  # where libedgetpu.so.1 was found
    usb_readable: bool = False  # /sys/bus/usb/devices exists
    coral_usb: str | None = None  # "18d1:9302 at /sys/bus/usb/devices/2-1"


@dataclasses.dataclass(frozen=True)
class Detection:
    """The chosen profile, the sentences saying why, and the evidence behind them."""

    profile: HardwareProfile
    reasons: list[str]
    evidence: dict[str, Any]


def _read(root: Path, rel: str) -> bytes | None:
    try:
        return (root / rel).read_bytes()
    except OSError:
        return None


def _parse_cpuinfo(text: str) -> tuple[int | None, dict[str, str], str | None]:
    cores = 0
    fields: dict[str, str] = {}
    parts: set[str] = set()
    vendors: set[str] = set()
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        key, value = key.strip(), value.strip()
        if not sep:
            continue
        if key == "processor":
            cores += 1
        elif key == "CPU part":
            parts.add(value)
        elif key == "CPU implementer":
            vendors.add(value)
        elif key in ("Model", "Hardware", "model name"):
            fields.setdefault(key, value)
    name = fields.get("model name")
    if parts and vendors == {"0x41"}:
        name = "/".join(sorted(_ARM_PARTS.get(p, f"ARM part {p}") for p in parts))
    return cores or None, fields, name


def _find_libedgetpu(root: Path, libs: Sequence[str] | None) -> str | None:
    for d in LIB_DIRS if libs is None else libs:
        rel = f"{d.strip('/')}/{EDGETPU_LIB}"
        if (root / rel).exists():
            return "/" + rel
    if libs is None and root.resolve() == Path("/").resolve():
        found = ctypes.util.find_library("edgetpu")
        if found:
            return f"{found} (in the ld.so cache)"
    return None


def _find_coral_usb(root: Path) -> tuple[bool, str | None]:
    base = root / "sys/bus/usb/devices"
    if not base.is_dir():
        return False, None
    for dev in sorted(base.iterdir()):
        vid, pid = (
            (_read(dev, f) or b"").decode("ascii", "replace").strip().lower() for f in ("idVendor", "idProduct")
        )
        if (vid, pid) in CORAL_USB_IDS:
            return True, f"{vid}:{pid} at /sys/bus/usb/devices/{dev.name}"
    return True, None


def gather_evidence(root: Path = Path("/"), machine: str | None = None, libs: Sequence[str] | None = None) -> Evidence:
    """Read the files detection looks at, relative to ``root``. Never raises for a missing file.

    ``libs``: library folders (relative to ``root``) searched for libedgetpu.so.1; by default
    :data:`LIB_DIRS`, then, when ``root`` is ``/``, the ld.so cache (``ctypes.util.find_library``).
    """
    raw = _read(root, "proc/device-tree/model")
    dt_model = raw.split(b"\0", 1)[0].decode("utf-8", "replace").strip() if raw else ""  # NUL-terminated
    cpuinfo = _read(root, "proc/cpuinfo")
    cores, fields, cpu_name = _parse_cpuinfo(cpuinfo.decode("utf-8", "replace")) if cpuinfo else (None, {}, None)
    tegra = _read(root, "etc/nv_tegra_release")
    l4t = None
    if tegra is not None:
        m = re.search(r"R(\d+)\s*\(release\),\s*REVISION:\s*([\d.]+)", tegra.decode("utf-8", "replace"))
        l4t = f"R{m.group(1)}.{m.group(2)}" if m else "unknown release"
    usb_readable, coral_usb = _find_coral_usb(root)
    return Evidence(
        machine=machine or platform.machine(),
        device_tree_model=dt_model or None,
        cpuinfo_model=fields.get("Model"),
        cpuinfo_hardware=fields.get("Hardware"),
        cpu_name=cpu_name,
        cores=cores,
        l4t_release=l4t,
        apex=(root / "dev/apex_0").exists(),
        libedgetpu=_find_libedgetpu(root, libs),
        usb_readable=usb_readable,
        coral_usb=coral_usb,
    )


def _generic(machine: str) -> tuple[str, str]:
    m = machine.lower()
    if m in ("aarch64", "arm64") or m.startswith("armv8"):
        return "generic-aarch64", f"machine is {machine}"
    if m in ("x86_64", "amd64"):
        return "generic-x86_64", f"machine is {machine}"
    name = "generic-aarch64" if m.startswith("arm") else "generic-x86_64"
    return name, f"no profile for machine {machine!r}; {name} (CPU only) is the closest"


def choose_profile(ev: Evidence) -> tuple[str, list[str]]:
    """The profile name for this evidence and the sentences saying why. Pure: no I/O."""
    facts: list[str] = []
    model = ev.device_tree_model or ev.cpuinfo_model
    if ev.device_tree_model:
        facts.append(f"/proc/device-tree/model says {ev.device_tree_model!r}")
    elif ev.cpuinfo_model:
        facts.append(f"no /proc/device-tree/model; the Model line of /proc/cpuinfo says {ev.cpuinfo_model!r}")
    else:
        facts.append("no board model: /proc/device-tree/model is missing and /proc/cpuinfo has no Model line")
    if ev.cores:
        facts.append(f"/proc/cpuinfo lists {ev.cores} cores" + (f" ({ev.cpu_name})" if ev.cpu_name else ""))
    if ev.cpuinfo_hardware:
        facts.append(f"the Hardware line of /proc/cpuinfo says {ev.cpuinfo_hardware!r}")
    if ev.l4t_release:
        facts.append(f"/etc/nv_tegra_release says Jetson Linux (L4T) {ev.l4t_release}")
    if ev.apex:
        facts.append("/dev/apex_0 exists: an Edge TPU on PCIe, with its driver loaded")
    if ev.libedgetpu:
        facts.append(f"{EDGETPU_LIB} (the Edge TPU runtime) found at {ev.libedgetpu}")
    if ev.coral_usb:
        facts.append(f"a Coral USB Accelerator is plugged in: USB {ev.coral_usb}")

    board, why = None, ""
    for name, pattern, meaning in _BOARDS:
        if model and pattern.search(model):
            board, why = name, f"the board model names {meaning}"
            break
    if board == "jetson-orin-nano" and not ev.l4t_release:
        facts.append("no /etc/nv_tegra_release: without JetPack's libraries the GPU providers may be missing")
    if board is None and ev.l4t_release:
        facts.append(f"a Jetson, but {model or 'its model'!r} has no profile of its own")

    if board == "coral-dev-board":
        missing = [what for what, ok in (("/dev/apex_0", ev.apex), (EDGETPU_LIB, ev.libedgetpu)) if not ok]
        if missing:
            facts.append(f"but {' and '.join(missing)} missing: the Edge TPU delegate will fail to load")
        return board, [*facts, f"chose coral-dev-board: {why}"]
    if ev.apex:
        facts.append(
            "that is a PCIe/M.2 Edge TPU on a host with no profile for it; to use it, override "
            "delegates = [{library = 'libedgetpu.so.1', options = {device = 'pci'}}]"
        )
    elif ev.libedgetpu:
        host = f"; the host is {board}, set profile = '{board}' to run on its CPU instead" if board else ""
        if ev.coral_usb:
            return "coral-usb", [*facts, f"chose coral-usb: the Edge TPU runtime and the accelerator are present{host}"]
        if not ev.usb_readable:
            return "coral-usb", [
                *facts,
                "/sys/bus/usb/devices is not readable, so a USB accelerator cannot be confirmed (no lsusb)",
                f"chose coral-usb: the Edge TPU runtime is installed and there is no /dev/apex_0{host}",
            ]
        facts.append("but no Coral USB Accelerator (1a6e:089a or 18d1:9302) is among the USB devices: not using it")
    if board is not None:
        return board, [*facts, f"chose {board}: {why}"]
    name, why = _generic(ev.machine)
    return name, [*facts, f"chose {name}: no known board, and {why}"]


def detect(root: Path = Path("/"), machine: str | None = None, libs: Sequence[str] | None = None) -> Detection:
    """Pick the profile for the device under ``root``; threads are capped at the cores found.

    ``machine`` defaults to ``platform.machine()``; ``libs`` as in :func:`gather_evidence`.
    Raises :class:`ConfigError` only if a shipped profile is broken.
    """
    ev = gather_evidence(root, machine, libs)
    name, reasons = choose_profile(ev)
    profile = load_profile(name)
    if ev.cores is not None and profile.threads > ev.cores:
        reasons.append(f"threads capped from the profile's {profile.threads} to the {ev.cores} cores found")
        profile = profile.model_copy(update={"threads": ev.cores})
    elif ev.cores is None:
        reasons.append(f"core count unknown (no /proc/cpuinfo): threads left at the profile's {profile.threads}")
    return Detection(profile, reasons, dataclasses.asdict(ev))


# --- sensors ----------------------------------------------------------------------------------------------


def _resolve(root: Path, path: str) -> Path | None:
    rel = path.lstrip("/")
    if not any(c in rel for c in "*?["):
        return root / rel
    try:
        return next(iter(sorted(root.glob(rel))), None)
    except OSError:
        return None


def _value(root: Path, path: str, kind: str, scale: float) -> float | str | None:
    p = _resolve(root, path)
    try:
        text = p.read_text(encoding="utf-8", errors="replace").strip() if p is not None else ""
    except OSError:  # missing, unreadable (EACCES), or a sysfs read error (EIO, ENODATA)
        return None
    if not text:
        return None
    try:
        if kind == "text":
            return text
        if kind == "hex":
            return f"0x{int(text, 16):x}"
        value = float(text) * scale
    except ValueError:
        return None
    return round(value, 6) if math.isfinite(value) else None


def read_sensors(profile: HardwareProfile, root: Path = Path("/")) -> dict[str, float | str | None]:
    """``temperature_c`` from the thermal zone (millidegrees → °C), then each sensor by name.

    A missing, unreadable or unparsable file gives ``None``; this never raises for one.
    """
    out: dict[str, float | str | None] = {
        "temperature_c": None if profile.thermal_zone is None else _value(root, profile.thermal_zone, "number", 0.001)
    }
    for s in profile.sensors:
        out[s.name] = _value(root, s.path, s.kind, s.scale)
    return out
